"""Recipe `translation` (`lmlab finetune translation`): a T5 encoder–decoder trained on parallel
text (JSONL pairs), for one direction (en → de) or one source and several target languages.

The model is a T5 checkpoint to fine-tune (`model: DIR`), or a T5 built from scratch (the
`scratch:` section: its shape) with a Unigram vocabulary shared by source and target, trained on
the training pairs. Language codes are the JSONL field names (`source_lang: en`,
`target_lang: de`); files with other names say `source_field` / `target_field`. Multilingual
(`target_langs: [de, fr, cs]`) makes one example per (pair, target language) and names the
language by a tag token, `tag_style: source_token` (`<2de>` first in the source) or
`forced_bos` (the decoder's first token, forced at generation); lmlab.tasks.translation.

Every epoch the whole validation set is translated with beam search (`num_beams`) and scored
with sacreBLEU; the best epoch is the one of the highest `val_bleu` (for several target
languages, the mean of their BLEU), and `patience` epochs without a better one stop the run.

RUN_DIR also holds `translation.json` (the languages, tags and lengths `lmlab translate` reads),
`translations_<split>.jsonl` (source, reference, hypothesis) for the test split, else validation,
and in results.json the BLEU, chrF and tokenised BLEU of that split with sacreBLEU's signatures.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lmlab.data.pairs import ParallelData, read_pairs
from lmlab.errors import CheckpointError, ConfigError
from lmlab.fileio import atomic_write_text
from lmlab.generation import generate
from lmlab.generation.side_by_side import batches_at_once, side_by_side
from lmlab.models.hf import from_pretrained, read_config
from lmlab.models.t5 import T5Config, T5ForConditionalGeneration
from lmlab.recipes import run_steps
from lmlab.recipes.finetuning import (FinetuneConfig, FinetuneResult, FinetunedRun, adapt,
                                      finetuning_optim, finish, is_adapter, resolve_model,
                                      train_epochs)
from lmlab.recipes.registry import Recipe, register_recipe
from lmlab.tasks import translation as tr
from lmlab.tasks.batching import length_sorted_batches, pad_rows
from lmlab.tokenizer import Tokenizer
from lmlab.training.distributed import from_environment
from lmlab.training.loop import OptimConfig

log = logging.getLogger(__name__)
META_FILE = "translation.json"  # RUN_DIR's languages, tags and lengths, for `lmlab translate`
TOKENIZER_DIR = "tokenizer"  # a from-scratch run's vocabulary, trained once (a resume reuses it)
_LANG_CODE = re.compile(r"[A-Za-z0-9_-]+")


def translation_optim() -> OptimConfig:
    """AdamW at 5e-4 (a small transformer's rate, Vaswani et al. scaled down), decaying linearly;
    the best epoch is the one of the highest validation BLEU."""
    optim = finetuning_optim(metric="val_bleu")
    optim.lr, optim.greater_is_better = 5e-4, True
    return optim


@dataclass
class ScratchT5:
    """A T5 built from scratch (lmlab.models.t5.T5Config) and its shared vocabulary's size."""

    vocab_size: int = 8000  # the Unigram vocabulary trained on both sides of the training pairs
    # a tokenizer directory to use instead of training one (it needs </s>, <pad> and, for
    # several target languages, their tags <2de> …)
    tokenizer: str | None = None
    d_model: int = 256  # width of the embeddings and the residual stream
    d_kv: int = 32  # width of one attention head
    d_ff: int = 1024  # width of the feed-forward layers
    num_layers: int = 3  # encoder blocks
    num_decoder_layers: int | None = None  # decoder blocks; None: as many as the encoder
    num_heads: int = 8  # attention heads per layer
    relative_attention_num_buckets: int = 32  # distance buckets of the relative position bias
    relative_attention_max_distance: int = 128  # distances beyond this share the last bucket
    dropout_rate: float = 0.1  # dropout after every sub-layer and on the attention weights
    # T5 v1.0 (ReLU, output tied to the embedding) or v1.1 (gated GELU, untie the output)
    feed_forward_proj: Literal["relu", "gated-gelu"] = "relu"
    tie_word_embeddings: bool = True  # the output layer shares the embedding matrix (v1.0)

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class TranslationConfig(FinetuneConfig):
    model: str | None = None  # a T5 directory to fine-tune; none: build one (the scratch keys)
    scratch: ScratchT5 | None = None  # build a T5 from scratch: set any of its keys (d_model, …)
    # the longest source and target in tokens (tag and EOS included); longer ones are cut, and
    # counted in the log. max_source_length / max_target_length set them apart.
    max_length: int = 128
    max_source_length: int | None = None  # None: max_length
    max_target_length: int | None = None  # None: max_length
    # -- the languages: codes are JSONL field names
    source_lang: str | None = None  # the source language, e.g. en (its field)
    target_lang: str | None = None  # one target language, e.g. de
    target_langs: list[str] | None = None  # several target languages: one multilingual model
    # how a multilingual model is told the target language: source_token (<2de> first in the
    # source, Google's) or forced_bos (the decoder's first token, mBART's / M2M-100's)
    tag_style: Literal["source_token", "forced_bos"] = "source_token"
    source_field: str | None = None  # instead of source_lang: the source's field name
    target_field: str | None = None  # instead of target_lang: the target's field name
    # -- training and evaluation
    label_smoothing: float = 0.1  # the targets' probability spread evenly over the vocabulary
    num_beams: int = 5  # beam search for the validation BLEU and the report
    # validation examples translated for BLEU after each epoch (the first N of each target
    # language); None: all
    bleu_examples: int | None = None
    optim: OptimConfig = field(default_factory=translation_optim)

    def __post_init__(self):
        super().__post_init__()
        if self.model is not None and self.scratch is not None:
            raise ConfigError("model and the scratch keys exclude each other: fine-tune the T5 of "
                              "model, or build one from scratch")
        for name in ("max_source_length", "max_target_length"):
            if getattr(self, name) is not None and getattr(self, name) < 3:
                raise ConfigError(f"{name} must be at least 3, got {getattr(self, name)}")
        if self.target_lang is not None and self.target_langs is not None:
            raise ConfigError("target_lang and target_langs exclude each other: one target "
                              "language, or several")
        if self.source_lang is not None and self.source_field is not None:
            raise ConfigError("source_lang and source_field exclude each other")
        if self.target_field is not None and (self.target_lang or self.target_langs):
            raise ConfigError("target_field and target_lang(s) exclude each other")
        if self.target_langs is not None:
            if not self.target_langs or len(set(self.target_langs)) < len(self.target_langs):
                raise ConfigError(f"target_langs must be distinct language codes, got "
                                  f"{self.target_langs}")
            bad = [c for c in self.target_langs if not _LANG_CODE.fullmatch(c)]
            if bad:
                raise ConfigError(f"target_langs: {bad[0]!r} is not a language code (letters, "
                                  "digits, - and _)")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.num_beams < 1:
            raise ConfigError(f"num_beams must be at least 1, got {self.num_beams}")
        if self.bleu_examples is not None and self.bleu_examples < 1:
            raise ConfigError(f"bleu_examples must be positive, got {self.bleu_examples}")

    @property
    def source_length(self) -> int:
        return self.max_source_length or self.max_length

    @property
    def target_length(self) -> int:
        return self.max_target_length or self.max_length

    def fields(self) -> tuple[str, list[str]]:
        """The source field and the target fields; a ConfigError when they are not given."""
        source = self.source_field or self.source_lang
        targets = self.target_langs or [t for t in (self.target_field, self.target_lang) if t]
        if source is None or not targets:
            raise ConfigError("no languages: set source_lang and target_lang (JSONL fields named "
                              "by language codes, e.g. --source_lang en --target_lang de), "
                              "target_langs for several, or source_field and target_field")
        if source in targets:
            raise ConfigError(f"the source field {source!r} is also a target")
        return source, targets

    @property
    def tagged(self) -> bool:
        return self.target_langs is not None


# -- what a run records for `lmlab translate` ----------------------------------------------------
@dataclass
class Languages:
    """A translation model's languages: RUN_DIR/translation.json."""

    source: str | None  # the source language (or field)
    targets: list[str]  # its target languages (or one field)
    tag_style: str | None  # None: one target language, no tags
    max_source_length: int
    max_target_length: int

    @property
    def tags(self) -> dict[str, str]:
        return {lang: tr.language_tag(lang) for lang in self.targets} if self.tag_style else {}

    def save(self, directory: Path) -> None:
        data = {"source": self.source, "targets": self.targets, "tag_style": self.tag_style,
                "tags": self.tags, "max_source_length": self.max_source_length,
                "max_target_length": self.max_target_length}
        atomic_write_text(Path(directory) / META_FILE, json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path, model) -> Languages:
        """RUN_DIR's translation.json; a model without one (a T5 trained elsewhere) translates
        into its one language, sources and targets up to its n_positions."""
        path = Path(directory) / META_FILE
        limit = model.config.n_positions
        if not path.is_file():
            return cls(source=None, targets=[], tag_style=None, max_source_length=limit,
                       max_target_length=limit)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(source=data["source"], targets=list(data["targets"]),
                       tag_style=data["tag_style"],
                       max_source_length=int(data["max_source_length"]),
                       max_target_length=int(data["max_target_length"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{path}: not a translation.json lmlab wrote ({error})") \
                from None

    def direction(self, to: str | None) -> str | None:
        """The target language to tag for `--to` (None: the model's only one, untagged)."""
        known = ", ".join(self.targets) or "none recorded"
        if to is not None and to not in self.targets:
            raise ConfigError(f"--to {to}: not a target language of this model (its languages: "
                              f"{known})")
        if self.tag_style is None:
            return None
        if to is None:
            raise ConfigError(f"--to: this model translates into several languages ({known}); "
                              "name one")
        return to


# -- reading and encoding ------------------------------------------------------------------------
def read_split(cfg: TranslationConfig, path) -> list[tuple[str, ParallelData]]:
    """A pairs file's pairs into each target (a language code, or the target field). Pairs with
    an empty side are skipped, counted in a warning (lmlab.data.pairs)."""
    _, targets = cfg.fields()
    data = []
    for target in targets:
        side = "target_field" if cfg.target_field is not None else "target_lang"
        data.append((target, read_pairs(path, source_field=cfg.source_field,
                                        source_lang=cfg.source_lang, **{side: target})))
    return data


def encode_split(cfg: TranslationConfig, split: list[tuple[str, ParallelData]],
                 tokenizer: Tokenizer) -> tr.Encoded:
    """One example per pair and target language; too-long texts truncated, counted in a
    warning."""
    encoded = tr.Encoded()
    for target, pairs in split:
        where = pairs.path + (f" (→ {target})" if len(split) > 1 else "")
        encoded.extend(tr.encode(tokenizer, pairs.sources, pairs.targets,
                                 max_source_length=cfg.source_length,
                                 max_target_length=cfg.target_length,
                                 lang=cfg.target_lang or (target if cfg.tagged else None),
                                 tag_style=cfg.tag_style if cfg.tagged else None, where=where))
    return encoded


def read_encoded(cfg: TranslationConfig, path, tokenizer: Tokenizer) -> tr.Encoded:
    return encode_split(cfg, read_split(cfg, path), tokenizer)


def training_texts(split: list[tuple[str, ParallelData]]) -> Iterator[str]:
    """Both sides of every training pair (the sources once): the text a from-scratch vocabulary
    is trained on."""
    for i, (_, pairs) in enumerate(split):
        yield from (pairs.sources if i == 0 else ())
        yield from pairs.targets


def scratch_tokenizer(cfg: TranslationConfig, run_dir: Path,
                      train: list[tuple[str, ParallelData]]) -> Tokenizer:
    """The shared Unigram vocabulary of a from-scratch run, with the language tags as special
    tokens (or the `tokenizer` given); kept in RUN_DIR/tokenizer, which a resumed run reads
    back — `tokenizers`' Unigram training does not give the same pieces every time."""
    saved = run_dir / TOKENIZER_DIR
    if (saved / "tokenizer.json").is_file():
        return Tokenizer.from_pretrained(saved)
    if cfg.scratch.tokenizer is not None:
        return Tokenizer.from_pretrained(cfg.scratch.tokenizer)
    _, targets = cfg.fields()
    tags = [tr.language_tag(lang) for lang in targets] if cfg.tagged else []
    return Tokenizer.train_unigram(iterator=training_texts(train),
                                   vocab_size=cfg.scratch.vocab_size,
                                   extra_special_tokens=tags, extra_ids=0)


def scratch_model(cfg: TranslationConfig, tokenizer: Tokenizer) -> T5ForConditionalGeneration:
    shape = cfg.scratch
    config = T5Config(
        vocab_size=tokenizer.vocab_size, d_model=shape.d_model, d_kv=shape.d_kv,
        d_ff=shape.d_ff, num_layers=shape.num_layers,
        num_decoder_layers=shape.num_decoder_layers, num_heads=shape.num_heads,
        relative_attention_num_buckets=shape.relative_attention_num_buckets,
        relative_attention_max_distance=shape.relative_attention_max_distance,
        dropout_rate=shape.dropout_rate, feed_forward_proj=shape.feed_forward_proj,
        tie_word_embeddings=shape.tie_word_embeddings, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
        n_positions=max(cfg.source_length, cfg.target_length))
    return T5ForConditionalGeneration(config)


def pretrained_model(cfg: TranslationConfig) -> tuple[T5ForConditionalGeneration, Tokenizer, Path]:
    model_dir = resolve_model(cfg.model)
    model_type = read_config(model_dir).get("model_type")
    if model_type != "t5":
        raise ConfigError(f"model: {model_dir} holds a {model_type} model; translation needs an "
                          "encoder–decoder (T5), or the scratch keys to build one")
    model = from_pretrained(model_dir)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    check_model(cfg, model, tokenizer, model_dir)
    return model, tokenizer, model_dir


def check_model(cfg: TranslationConfig, model, tokenizer: Tokenizer, where) -> None:
    if not isinstance(model, T5ForConditionalGeneration):
        raise ConfigError(f"model: {where} holds a {type(model).__name__}; translation needs an "
                          "encoder–decoder (T5)")
    limit = model.config.n_positions
    for name, value in (("max_source_length", cfg.source_length),
                        ("max_target_length", cfg.target_length)):
        if value > limit:
            raise ConfigError(f"{name} {value} exceeds the model's n_positions ({limit})")
    tokenizer.check_fits(model.config.vocab_size, where=where)
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ConfigError(f"model: {where}: its tokenizer needs an EOS and a pad token")
    if cfg.tagged:
        for lang in cfg.fields()[1]:
            tr.tag_id(tokenizer, lang)


# -- translating ---------------------------------------------------------------------------------
def decoded_text(tokenizer: Tokenizer, sequence: list[int]) -> str:
    """The text of one generated decoder sequence: after the start token, up to EOS."""
    ids = sequence[1:]
    if tokenizer.eos_token_id in ids:
        ids = ids[:ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


@torch.inference_mode()
def translate_ids(model, tokenizer: Tokenizer, sources: list[np.ndarray], *, num_beams: int,
                  max_new_tokens: int, batch_size: int,
                  forced_bos_token_id: int | None = None) -> list[str]:
    """Beam-search translations of encoded sources (length-sorted batches), in their order. On
    the CPU the batches run side by side, one per core (`generation.side_by_side`)."""
    device = next(model.parameters()).device
    budget = min(max_new_tokens, model.config.n_positions - 1)
    knobs: dict[str, Any] = {"num_beams": num_beams, "max_new_tokens": budget}
    if forced_bos_token_id is not None:
        knobs["forced_bos_token_id"] = forced_bos_token_id

    def translate_batch(rows: np.ndarray) -> list[str]:
        chosen = [sources[i] for i in rows]
        ids = pad_rows(chosen, tokenizer.pad_token_id).to(device)
        mask = pad_rows([np.ones(len(s), np.int64) for s in chosen], 0).to(device)
        sequences = generate(model, None, source_ids=ids, source_mask=mask,
                             eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **knobs)
        return [decoded_text(tokenizer, sequence) for sequence in sequences.tolist()]

    batches = length_sorted_batches([len(s) for s in sources], batch_size)
    out = [""] * len(sources)
    for rows, texts in zip(batches, side_by_side(translate_batch, batches, device=device)):
        for row, text in zip(rows, texts):
            out[row] = text
    return out


def translator(tokenizer: Tokenizer, *, num_beams: int, max_new_tokens: int,
               batch_size: int) -> tr.Translate:
    """The task's `translate`: the model's beam-search translations of encoded sources."""
    def translate(model, sources, *, forced_bos_token_id=None):
        was_training = model.training
        model.eval()
        try:
            return translate_ids(model, tokenizer, sources, num_beams=num_beams,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 forced_bos_token_id=forced_bos_token_id)
        finally:
            model.train(was_training)
    return translate


def load_translator(path: str | Path, *, device: torch.device | None = None
                    ) -> tuple[T5ForConditionalGeneration, Tokenizer, Languages]:
    """The encoder–decoder of a model directory (on `device`), its tokenizer and languages —
    or a one-line error naming --model."""
    directory = Path(path)
    if is_adapter(directory):
        raise ConfigError(f"--model {path}: a LoRA adapter (a run with lora keys); translate "
                          f"reads a full model: lmlab lora merge --adapter {path} --out DIR, "
                          f"then copy {META_FILE} into DIR")
    if not (directory / "config.json").is_file():
        raise ConfigError(f"--model {path}: not a model directory (no config.json)")
    model = from_pretrained(directory, device=device)
    if not isinstance(model, T5ForConditionalGeneration):
        raise ConfigError(f"--model {path}: a {type(model).__name__}, not an encoder–decoder; "
                          "translate needs one (T5: lmlab finetune translation)")
    tokenizer = Tokenizer.from_pretrained(directory)
    tokenizer.check_fits(model.config.vocab_size, where=directory)
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ConfigError(f"--model {path}: its tokenizer needs an EOS and a pad token")
    return model.eval(), tokenizer, Languages.load(directory, model)


@dataclass
class LineStats:
    """What `translate_lines` met: lines read, empty ones, sources cut to the model's length."""

    lines: int = 0
    empty: int = 0
    truncated: int = 0


def translate_lines(model, tokenizer: Tokenizer, languages: Languages, lines: Iterable[str], *,
                    to: str | None = None, num_beams: int = 5, max_new_tokens: int | None = None,
                    batch_size: int = 32, stats: LineStats | None = None) -> Iterator[str]:
    """Translations of `lines` in their order, yielded as they are done (an empty line stays
    empty, and is counted in `stats`, as are sources cut to the model's length). On the CPU,
    lines are read one batch per core at a time, for the batches to run side by side; a batch
    of 1 (a terminal, a line at a time) goes alone."""
    lang = languages.direction(to)
    stats = stats if stats is not None else LineStats()
    if batch_size < 1 or num_beams < 1:
        raise ConfigError("--batch-size and --num-beams must be at least 1")
    budget = max_new_tokens or languages.max_target_length
    device = next(model.parameters()).device
    lines_at_once = batch_size * (batches_at_once(device) if batch_size > 1 else 1)
    batch: list[str] = []

    def flush() -> list[str]:
        texts = [line for line in batch if line]
        encoded = tr.encode(tokenizer, texts, None, max_source_length=languages.max_source_length,
                            max_target_length=languages.max_target_length, lang=lang,
                            tag_style=languages.tag_style if lang else None)
        stats.truncated += encoded.truncated_sources
        forced = int(encoded.labels[0][0]) if texts and encoded.forced_bos else None
        done = iter(translate_ids(model, tokenizer, encoded.sources, num_beams=num_beams,
                                  max_new_tokens=budget, batch_size=batch_size,
                                  forced_bos_token_id=forced) if texts else [])
        return [next(done) if line else "" for line in batch]

    for line in lines:
        line = line.rstrip("\r\n").strip()
        stats.lines += 1
        stats.empty += not line
        batch.append(line)
        if len(batch) == lines_at_once:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


# -- the run -------------------------------------------------------------------------------------
@run_steps.undo_on_failure
def finetune_translation(cfg: TranslationConfig, *, run_dir: str | Path, resume: bool = False,
                         progress: bool = True) -> FinetuneResult:
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    for name in ("train", "validation"):
        if getattr(cfg, name) is None:
            raise ConfigError(f"{name}: no {name} file; pass --{name} FILE")
    if cfg.model is None and cfg.scratch is None:
        raise ConfigError("model: no model; pass --model DIR (a T5 to fine-tune) or the scratch "
                          "keys (e.g. --d_model 256) to build one")
    source, targets = cfg.fields()
    run_steps.check_run_dir(run_dir, resume=resume)
    run_steps.seed_everything(cfg.optim.seed)
    model, tokenizer, model_dir, (train_data, val, test) = model_and_data(cfg, run_dir)
    log.info("model: %s, %d parameters; %d training examples (%s → %s)",
             model_dir or "T5 from scratch", model.num_parameters(), len(train_data), source,
             ", ".join(targets))
    dist, device = from_environment("ddp", cfg.optim.device)
    model = dist.place(adapt(cfg, model), device)
    translate = translator(tokenizer, num_beams=cfg.num_beams, max_new_tokens=cfg.target_length,
                           batch_size=cfg.eval_size)
    task = tr.TranslationTask(train=train_data, val=val, plan=cfg.plan(train_data.lengths, dist),
                              translate=translate, device=device,
                              pad_id=tokenizer.pad_token_id,
                              label_smoothing=cfg.label_smoothing, eval_batch_size=cfg.eval_size,
                              bleu_examples=cfg.bleu_examples)
    if cfg.scratch is not None and dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(run_dir / TOKENIZER_DIR)
    result = train_epochs(cfg, model, task, recipe="translation", run_dir=run_dir,
                          device=device, dist=dist, resume=resume, progress=progress)
    if not dist.is_main:  # under torchrun rank 0 alone saves and reports
        return finish(run_dir, result, started=t0, test=None, predictions=None, write=False)
    run_steps.save_model(model, tokenizer, run_dir, max_length=cfg.source_length,
                         base=model_dir)
    Languages(source=source, targets=targets, tag_style=cfg.tag_style if cfg.tagged else None,
              max_source_length=cfg.source_length,
              max_target_length=cfg.target_length).save(run_dir)
    split, data = ("test", test) if test else ("validation", val)
    # Without a test split the report is on validation, which the final evaluation has just
    # translated — with the weights now in the model if the best step was the last one.
    known = task.last_hypotheses if not test and result.best_step == result.steps else None
    model.eval()
    hypotheses = known or tr.translate_all(translate, model, data)
    scores, signatures = tr.score(hypotheses, data)
    predictions = run_steps.write_jsonl(run_dir / f"translations_{split}.jsonl",
                                        translation_rows(data, hypotheses, tagged=cfg.tagged))
    for key, line in signatures.items():
        log.info("%s %s: %s", split, key, line)
    return finish(run_dir, result, started=t0, test=scores if test else None,
                  predictions=predictions,
                  extra={f"{split}_scores": {**scores, "signatures": signatures}})


def model_and_data(cfg: TranslationConfig, run_dir: Path):
    """(model, tokenizer, the pretrained model's directory or None, (train, validation, test)
    encoded) — the model built from scratch on a vocabulary trained on the training pairs, or
    read from `model`. Everything that can fail on the input fails here, before RUN_DIR is
    written."""
    train_pairs = read_split(cfg, cfg.train)
    if cfg.scratch is not None:
        tokenizer = scratch_tokenizer(cfg, run_dir, train_pairs)
        model, model_dir = scratch_model(cfg, tokenizer), None
        check_model(cfg, model, tokenizer, "the scratch model")
    else:
        model, tokenizer, model_dir = pretrained_model(cfg)
    data = (encode_split(cfg, train_pairs, tokenizer), read_encoded(cfg, cfg.validation, tokenizer),
            read_encoded(cfg, cfg.test, tokenizer) if cfg.test else None)
    return model, tokenizer, model_dir, data


def translation_rows(data: tr.Encoded, hypotheses: list[str], *,
                     tagged: bool) -> list[dict[str, str]]:
    """source, reference and hypothesis of each example (and its target language `to`)."""
    return [{"source": text, "reference": reference, "hypothesis": hypothesis,
             **({"to": lang} if tagged else {})}
            for text, reference, hypothesis, lang in zip(data.texts, data.references,
                                                         hypotheses, data.langs)]


# -- a fine-tuned run: evaluate and predict ------------------------------------------------------
def _run_translations(run: FinetunedRun, data: Path) -> tuple[tr.Encoded, list[str]]:
    cfg = run.cfg
    encoded = read_encoded(cfg, data, run.tokenizer)
    translate = translator(run.tokenizer, num_beams=cfg.num_beams,
                           max_new_tokens=cfg.target_length, batch_size=cfg.eval_size)
    return encoded, tr.translate_all(translate, run.model, encoded)


def evaluate_run(run: FinetunedRun, data: Path) -> dict[str, float]:
    """BLEU, chrF and tokenised BLEU (per target language when several) of a pairs file."""
    encoded, hypotheses = _run_translations(run, data)
    return tr.score(hypotheses, encoded)[0]


def predict_run(run: FinetunedRun, data: Path, out: Path) -> Path:
    """Every pair's source, reference and translation."""
    encoded, hypotheses = _run_translations(run, data)
    return run_steps.write_jsonl(out, translation_rows(encoded, hypotheses,
                                                       tagged=run.cfg.tagged))


register_recipe(Recipe(
    name="translation", command="finetune", config=TranslationConfig, run=finetune_translation,
    models=(T5ForConditionalGeneration,), evaluate=evaluate_run, predict=predict_run,
    help="machine translation with a T5 (fine-tuned, or from scratch), one or several target "
         "languages, beam-search BLEU each epoch",
))
