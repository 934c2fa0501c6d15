"""Translation (sequence to sequence): pairs → encoder inputs and decoder labels, the
label-smoothed loss, and validation BLEU of beam-search translations.

An example is a source text and its target text, encoded with one shared tokenizer as
`source_ids = [tag] source EOS` and `labels = [tag] target EOS`. Multilingual models (one model,
several target languages) name the language by a tag token, in one of the two styles users know:

- `source_token` (Google's multilingual NMT): `<2de>` is the source's first token; the decoder
  starts as usual.
- `forced_bos` (mBART, M2M-100): the tag is the decoder's first token after the start token —
  trained as the first label, and forced at generation (`forced_bos_token_id`).

Too-long texts are truncated (EOS kept), counted and logged (lmlab.data.pairs.truncate). Batches are
right-padded to their longest row; the labels' padding is -100, ignored by the loss. The model is
an encoder–decoder with `encode(ids, attention_mask=)`, `shift_right(labels)` and
`model(decoder_ids, encoder_hidden=, encoder_mask=)` → logits (lmlab.models.t5).

Decoding needs the generation engine, which this layer does not import: the task is given a
`Translate` function (the recipe's) that turns encoded sources into text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.data.pairs import truncate
from lmlab.errors import ConfigError
from lmlab.evaluation.translation import METRICS, corpus_scores
from lmlab.tasks.batching import (NO_TARGETS, EpochPlan, length_sorted_batches, pad_rows,
                                  to_device, without_targets)
from lmlab.tokenizer import Tokenizer

TAG_STYLES = ("source_token", "forced_bos")
IGNORE = -100  # cross-entropy's ignore_index: label padding

# translate(model, sources, *, forced_bos_token_id) -> one text per source, in order
Translate = Callable[..., list[str]]


def language_tag(lang: str) -> str:
    """The token that names target language `lang`: Google's `<2de>`."""
    return f"<2{lang}>"


@dataclass
class Encoded:
    """Encoded examples: encoder inputs, decoder labels, and what BLEU compares against."""

    sources: list[np.ndarray] = field(default_factory=list)  # [tag] source EOS
    labels: list[np.ndarray] = field(default_factory=list)  # [tag] target EOS
    references: list[str] = field(default_factory=list)  # the target texts
    texts: list[str] = field(default_factory=list)  # the source texts
    langs: list[str | None] = field(default_factory=list)  # target language (None: bilingual)
    truncated_sources: int = 0  # sources cut to max_source_length
    truncated_targets: int = 0  # targets cut to max_target_length
    forced_bos: bool = False  # labels start with the language tag that generation forces

    @property
    def lengths(self) -> np.ndarray:
        """Source + target tokens of each example: what a batch costs."""
        return np.fromiter((len(s) + len(t) for s, t in zip(self.sources, self.labels)),
                           dtype=np.int64, count=len(self.sources))

    def __len__(self) -> int:
        return len(self.sources)

    def extend(self, other: Encoded) -> Encoded:
        self.sources += other.sources
        self.labels += other.labels
        self.references += other.references
        self.texts += other.texts
        self.langs += other.langs
        self.truncated_sources += other.truncated_sources
        self.truncated_targets += other.truncated_targets
        self.forced_bos = self.forced_bos or other.forced_bos
        return self

    def subset(self, rows: Sequence[int]) -> Encoded:
        return Encoded([self.sources[i] for i in rows], [self.labels[i] for i in rows],
                       [self.references[i] for i in rows], [self.texts[i] for i in rows],
                       [self.langs[i] for i in rows], forced_bos=self.forced_bos)


def tag_id(tokenizer: Tokenizer, lang: str) -> int:
    """The id of `lang`'s tag token; a ConfigError when the tokenizer lacks it."""
    token = language_tag(lang)
    found = tokenizer.token_to_id(token)
    if found is None:
        raise ConfigError(f"target language {lang!r}: the tokenizer has no tag token {token}; "
                          "a multilingual model needs one per target language (a model built "
                          "from scratch by the recipe has them)")
    return found


def encode(tokenizer: Tokenizer, sources: Sequence[str], targets: Sequence[str] | None, *,
           max_source_length: int, max_target_length: int, lang: str | None = None,
           tag_style: str | None = None, where: str = "") -> Encoded:
    """Encoder inputs and labels of (source, target) texts — `targets` None: sources only
    (translation of new text). `lang` with `tag_style`: every example translates into `lang`,
    tagged in that style. Longer texts are cut (EOS kept), counted, and logged naming `where`."""
    if tag_style is not None and tag_style not in TAG_STYLES:
        raise ConfigError(f"tag_style: expected one of {', '.join(TAG_STYLES)}, got "
                          f"{tag_style!r}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token; translation ends every text with one")
    tag = [] if lang is None or tag_style is None else [tag_id(tokenizer, lang)]
    on_source = tag if tag_style == "source_token" else []
    on_target = tag if tag_style == "forced_bos" else []
    if min(max_source_length - len(on_source), max_target_length - len(on_target)) < 2:
        raise ConfigError("max_source_length and max_target_length must leave room for a token "
                          "and EOS (and the language tag)")
    out = Encoded(texts=list(sources), langs=[lang] * len(sources), forced_bos=bool(on_target))
    cut = truncate([on_source + ids + [eos] for ids in tokenizer.encode_batch(list(sources))],
                   max_source_length, eos_id=eos, what="sources", where=where)
    out.sources = [np.asarray(ids, dtype=np.int64) for ids in cut.sequences]
    out.truncated_sources = cut.n_truncated
    if targets is None:
        out.labels = [np.asarray(on_target, dtype=np.int64) for _ in sources]
        out.references = ["" for _ in sources]
        return out
    cut = truncate([on_target + ids + [eos] for ids in tokenizer.encode_batch(list(targets))],
                   max_target_length, eos_id=eos, what="targets", where=where)
    out.labels = [np.asarray(ids, dtype=np.int64) for ids in cut.sequences]
    out.truncated_targets = cut.n_truncated
    out.references = list(targets)
    return out


def collate(data: Encoded, rows: Sequence[int], *, pad_id: int,
            device: torch.device) -> dict[str, torch.Tensor]:
    """source_ids, source_mask (B, S) and labels (B, T) with -100 at the padding."""
    sources = [data.sources[i] for i in rows]
    batch = {"source_ids": pad_rows(sources, pad_id),
             "source_mask": pad_rows([np.ones(len(s), np.int64) for s in sources], 0),
             "labels": pad_rows([data.labels[i] for i in rows], IGNORE)}
    return {k: to_device(v, device) for k, v in batch.items()}


def summed_loss(model, batch: dict[str, torch.Tensor], *,
                label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy summed over the batch's target tokens (padding ignored), with the targets
    smoothed towards uniform by `label_smoothing` (Szegedy et al.; transformers' and PyTorch's
    definition: (1 − ε)·NLL + ε·mean over the vocabulary of −log p)."""
    labels = batch["labels"]
    # Under DDP the decoder's call goes through the wrapper (which readies the gradient
    # all-reduce); the encoder's output is one of its inputs, so its weights' gradients come
    # from the same backward.
    inner = getattr(model, "module", model)
    encoded = inner.encode(batch["source_ids"], attention_mask=batch["source_mask"])
    keep = labels != IGNORE
    logits = model(inner.shift_right(labels), encoder_hidden=encoded,
                   encoder_mask=batch["source_mask"], only=keep)  # (N, vocab): no padding
    return F.cross_entropy(logits.float(), labels[keep], reduction="sum",
                           label_smoothing=label_smoothing)


@torch.inference_mode()
def evaluate_loss(model, data: Encoded, *, batch_size: int, pad_id: int,
                  device: torch.device) -> dict[str, float]:
    """Teacher-forced loss (no smoothing) and perplexity per target token."""
    total, count = 0.0, 0
    for rows in length_sorted_batches(data.lengths, batch_size):
        batch = collate(data, rows, pad_id=pad_id, device=device)
        total += float(summed_loss(model, batch))
        count += int((batch["labels"] != IGNORE).sum())
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def score(hypotheses: Sequence[str], data: Encoded, *,
          prefix: str = "") -> tuple[dict[str, float], dict[str, str]]:
    """sacreBLEU BLEU and chrF, and tokenised BLEU, of `hypotheses` against `data`'s
    references — per target language when there are several (`bleu_de`, …; `bleu` is then
    their mean: each direction counts alike, however many examples it has) — and each score's
    signature line as sacreBLEU prints it (`BLEU = 38.21 (nrefs:1|…)`)."""
    by_lang: dict[str | None, list[int]] = {}
    for i, lang in enumerate(data.langs):
        by_lang.setdefault(lang, []).append(i)
    figures: dict[str, float] = {}
    signatures: dict[str, str] = {}
    for lang, rows in by_lang.items():
        scores = corpus_scores([hypotheses[i] for i in rows], [data.references[i] for i in rows],
                               target_lang=lang)
        suffix = "" if len(by_lang) == 1 else f"_{lang}"
        for name in METRICS:
            metric = getattr(scores, name)
            figures[prefix + name + suffix] = metric.score
            signatures[prefix + name + suffix] = metric.format()
    if len(by_lang) > 1:
        for name in METRICS:
            figures[prefix + name] = float(np.mean([figures[f"{prefix}{name}_{lang}"]
                                                    for lang in by_lang]))
    return figures, signatures


class TranslationTask:
    """Label-smoothed cross-entropy on pairs; evaluation = the validation loss per token, then
    BLEU and chrF of the beam-search translations of the first `bleu_examples` validation
    examples of each target language (all when None) — `val_bleu` is the early-stopping
    metric."""

    def __init__(self, *, train: Encoded | None, val: Encoded | None, plan: EpochPlan | None,
                 translate: Translate, device: torch.device, pad_id: int,
                 label_smoothing: float = 0.0, eval_batch_size: int = 64,
                 bleu_examples: int | None = None):
        if not 0 <= label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.train, self.val, self.plan, self.translate = train, val, plan, translate
        self.device, self.pad_id, self.label_smoothing = device, pad_id, label_smoothing
        self.eval_batch_size, self.bleu_examples = eval_batch_size, bleu_examples
        self.last_hypotheses: list[str] | None = None

    def train_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        def batch(rows):
            return collate(self.train, rows, pad_id=self.pad_id, device=self.device)

        shares = self.plan.micro_batches(step)
        return ([batch(rows) for rows in shares] if shares
                else [without_targets(batch(self.plan.stand_in(step)), ["labels"])])

    def num_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return 0 if batch.get(NO_TARGETS) else int((batch["labels"] != IGNORE).sum())

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return summed_loss(model, batch, label_smoothing=self.label_smoothing)

    def evaluate(self, model, *, final: bool = False) -> dict[str, float]:
        if self.val is None:
            return {}
        figures = {f"val_{k}": v for k, v in
                   evaluate_loss(model, self.val, batch_size=self.eval_batch_size,
                                 pad_id=self.pad_id, device=self.device).items()}
        val = self.val
        if self.bleu_examples is not None:  # the first N of each target language
            seen: dict[str | None, int] = {}
            rows = []
            for i, lang in enumerate(val.langs):
                seen[lang] = seen.get(lang, 0) + 1
                if seen[lang] <= self.bleu_examples:
                    rows.append(i)
            val = val.subset(rows) if len(rows) < len(val) else val
        hypotheses = translate_all(self.translate, model, val)
        self.last_hypotheses = hypotheses if len(val) == len(self.val) else None
        figures.update(score(hypotheses, val, prefix="val_")[0])
        return figures


def translate_all(translate: Translate, model, data: Encoded) -> list[str]:
    """Translations of every source of `data`, in its order; a multilingual set is decoded one
    target language at a time (a forced first token is one per call)."""
    out: list[str] = [""] * len(data)
    by_lang: dict[str | None, list[int]] = {}
    for i, lang in enumerate(data.langs):
        by_lang.setdefault(lang, []).append(i)
    for rows in by_lang.values():
        # forced_bos: the labels' first token is the tag the decoder must start with
        forced = int(data.labels[rows[0]][0]) if data.forced_bos else None
        texts = translate(model, [data.sources[i] for i in rows], forced_bos_token_id=forced)
        for i, text in zip(rows, texts):
            out[i] = text
    return out

