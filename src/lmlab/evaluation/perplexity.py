"""Perplexity over a whole corpus: sliding windows for causal LMs, pseudo-perplexity for masked LMs.

The corpus: documents as texts — the CLI reads files, folders and JSONL (a text field) through
lmlab.data.sources, where a file named explicitly is read whatever its suffix (WikiText's
`.tokens`, `.raw`) and a folder contributes its text files. For a causal LM the documents become ONE token
stream joined as lmlab's pretraining data is (lmlab.data.prepare): each document's tokens, then
the tokenizer's EOS (nothing where it has none). A masked LM scores each document on its own.

Causal LMs: windows of `context` tokens start every `stride` tokens. Window k scores the tokens
after the previous window's end, so every token is scored exactly once and, past the first
window, with at least `context - stride` tokens of left context; the first window scores all its
tokens but the stream's first, which has no context (so N stream tokens give N - 1 scored; with
stride = context — non-overlapping chunks — every chunk's first token goes unscored too). Only
the scored positions go through the LM head (the largest product when the stride is short), and
windows of one length run as one (B, T) forward.

Masked LMs: pseudo-perplexity (Salazar et al. 2020, "Masked Language Model Scoring"): every token
is masked in turn and scored by the model given all the others; a long document is cut into
windows of `context - 2` tokens, each wrapped in [CLS] … [SEP]; a window's masked copies run as
batches of `batch_size` rows.

Per token, per word (exp(total NLL / whitespace-separated words of the original text)) and per
byte (bits per byte = total NLL / ln 2 / UTF-8 bytes; byte perplexity = 2 ** bits per byte), so
models with different tokenizers compare on one corpus.

`hf_recipe_perplexity` transcribes the sliding-window loop of transformers' perplexity guide,
for the comparison docs/evaluation.md makes: it weighs each window after the first by one token
too few (`num_loss_tokens = num_valid_tokens - batch_size`, though only the first window loses
a label to the shift).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from lmlab.errors import ConfigError, DataError
from lmlab.generation.protocol import model_device
from lmlab.models.gpt import GPT


@dataclass(frozen=True)
class Corpus:
    """Token ids per document and the size of the original text."""

    documents: list[list[int]]
    words: int  # whitespace-separated words of the original text
    bytes: int  # its UTF-8 bytes
    source: str


@dataclass(frozen=True)
class Window:
    """Input ids [begin, end) of the stream; the tokens [score_from, end) are scored."""

    begin: int
    end: int
    score_from: int


@dataclass(frozen=True)
class PerplexityResult:
    """A corpus NLL with the settings it was measured under (printed next to every number)."""

    method: str  # "sliding-window" or "pseudo-perplexity"
    model: str
    data: str
    documents: int
    tokens: int  # tokens the model read (the stream, EOS included; for a masked LM, all tokens)
    scored: int  # tokens scored: not those without context (a causal stream's first)
    words: int
    bytes: int
    nll: float  # total negative log-likelihood of the scored tokens, in nats
    context: int
    stride: int | None
    windows: int
    batch_size: int
    device: str
    joined_with: str | None  # how documents were joined into one stream (causal LMs)

    @property
    def token_perplexity(self) -> float:
        return math.exp(self.nll / self.scored)

    @property
    def word_perplexity(self) -> float:
        return math.exp(self.nll / self.words)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    @property
    def byte_perplexity(self) -> float:
        return 2.0 ** self.bits_per_byte

    def as_dict(self) -> dict:
        return {**asdict(self), "token_perplexity": self.token_perplexity,
                "word_perplexity": self.word_perplexity, "bits_per_byte": self.bits_per_byte,
                "byte_perplexity": self.byte_perplexity}


# -- the corpus ----------------------------------------------------------------------------------
def read_corpus(texts: Iterable[str], *, tokenizer, source: str) -> Corpus:
    """Every document tokenized without special tokens, with its words and bytes counted; a
    DataError for a corpus without words. `texts` are the documents, e.g. the `.text` of
    lmlab.data.sources.iter_documents (which reports missing files and non-UTF-8 text)."""
    texts = list(texts)
    words = sum(len(text.split()) for text in texts)
    if words == 0:
        raise DataError(f"{source}: the corpus is empty (no words to score)")
    return Corpus(documents=[tokenizer.encode(text) for text in texts], words=words,
                  bytes=sum(len(text.encode("utf-8")) for text in texts), source=source)


def join_documents(documents: list[list[int]], eos_token_id: int | None) -> list[int]:
    """One stream: each document followed by EOS, as lmlab.data.prepare writes pretraining data."""
    stream: list[int] = []
    for ids in documents:
        stream.extend(ids)
        if eos_token_id is not None:
            stream.append(eos_token_id)
    return stream


# -- causal LMs: sliding windows -----------------------------------------------------------------
def check_window(*, context: int, stride: int, model_window: int) -> None:
    if context < 2:
        raise ConfigError(f"--context must be at least 2 (one token of context, one scored), "
                          f"got {context}")
    if context > model_window:
        raise ConfigError(f"--context {context} is larger than the model's context window "
                          f"({model_window})")
    if stride <= 0:
        raise ConfigError(f"--stride must be positive, got {stride}")
    if stride > context:
        raise ConfigError(f"--stride {stride} is larger than the window (--context {context}): "
                          "tokens between windows would never be scored")


def sliding_windows(n_tokens: int, *, context: int, stride: int) -> list[Window]:
    """Windows of `context` tokens every `stride` tokens, each scoring what the previous did
    not reach; the last ends at the stream's end. A window's first token has no context in it,
    so it is never scored: position 0, and with stride = context every window's first."""
    windows: list[Window] = []
    scored_to = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        windows.append(Window(begin, end, max(scored_to, begin + 1)))
        scored_to = end
        if end == n_tokens:
            break
    return windows


def _causal_logits(model, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Logits (n, vocab) of the positions `rows` (a (B, T) mask) only: the LM head runs on the
    scored rows, not on the context the windows overlap by."""
    if isinstance(model, GPT):
        return model.lm_head(model.hidden_states(x)[rows])
    return model(x)[rows]


@torch.inference_mode()
def causal_token_nll(model, stream: list[int] | torch.Tensor, *, context: int, stride: int,
                     batch_size: int = 16) -> tuple[torch.Tensor, list[Window]]:
    """(per-position NLL (N,) float64, windows); NaN where a token has no context in its window
    (position 0; with stride = context, every window's first). Windows of one length run
    together, `batch_size` at a time."""
    device = model_device(model)
    ids = torch.as_tensor(stream, dtype=torch.long)
    windows = sliding_windows(len(ids), context=context, stride=stride)
    nll = torch.full((len(ids),), float("nan"), dtype=torch.float64)
    groups: dict[int, list[Window]] = {}
    for w in windows:
        groups.setdefault(w.end - w.begin, []).append(w)
    for length, group in groups.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            x = torch.stack([ids[w.begin:w.end] for w in chunk])  # (B, T)
            # logits at position j predict token j + 1: the scored rows are score_from - 1 …
            first = torch.tensor([w.score_from - w.begin - 1 for w in chunk])[:, None]
            rows = torch.arange(length)[None, :] >= first
            rows[:, -1] = False  # the window's last position predicts past its end
            targets = torch.roll(x, -1, dims=1)[rows]
            logits = _causal_logits(model, x.to(device), rows.to(device))
            losses = F.cross_entropy(logits.float(), targets.to(device), reduction="none")
            where = (torch.tensor([w.begin for w in chunk])[:, None]
                     + torch.arange(length)[None, :] + 1)[rows]
            nll[where] = losses.double().cpu()
    return nll, windows


# -- masked LMs: pseudo-perplexity ---------------------------------------------------------------
def is_masked_lm(model) -> bool:
    return callable(getattr(model, "mlm_logits", None))


def masked_lm_windows(documents: list[list[int]], *, context: int) -> list[list[int]]:
    """Each document cut into pieces of at most `context - 2` tokens ([CLS] and [SEP] join)."""
    size = context - 2
    return [ids[i:i + size] for ids in documents for i in range(0, len(ids), size)]


@torch.inference_mode()
def pseudo_token_nll(model, pieces: list[list[int]], *, cls_id: int, sep_id: int, mask_id: int,
                     batch_size: int = 16) -> torch.Tensor:
    """NLL (n,) float64 of every token of every piece, masked in turn, the others visible."""
    device = model_device(model)
    out: list[torch.Tensor] = []
    for piece in pieces:
        x = torch.tensor([cls_id, *piece, sep_id])
        n = len(piece)
        for i in range(0, n, batch_size):
            positions = torch.arange(i, min(i + batch_size, n)) + 1  # after [CLS]
            rows = x.repeat(len(positions), 1)  # (b, n + 2)
            masked = torch.zeros_like(rows, dtype=torch.bool)
            masked[torch.arange(len(positions)), positions] = True
            targets = rows[masked]
            rows[masked] = mask_id
            logits = model.mlm_logits(model.bert(rows.to(device))[masked.to(device)])
            out.append(F.cross_entropy(logits.float(), targets.to(device),
                                       reduction="none").double().cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


# -- the whole evaluation ------------------------------------------------------------------------
def model_window(model) -> int:
    config = model.config
    return getattr(config, "n_positions", None) or config.max_position_embeddings


def evaluate_perplexity(model, tokenizer, texts: Iterable[str], *, context: int | None = None,
                        stride: int | None = None, batch_size: int = 16, data_name: str = "",
                        model_name: str = "") -> PerplexityResult:
    """Perplexity of a causal LM (sliding windows) or pseudo-perplexity of a masked LM on the
    documents `texts` (read lazily, after the settings are checked). context defaults to the
    model's window, stride to context // 2 (causal LMs only)."""
    if batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    masked = is_masked_lm(model)
    if not masked and not isinstance(model, GPT):
        raise ConfigError(f"--model {model_name or type(model).__name__}: a "
                          f"{type(model).__name__} has no language-model head; perplexity needs "
                          "a GPT, pseudo-perplexity a BERT with its masked-LM head "
                          "(BertForMaskedLM or BertForPreTraining)")
    window = model_window(model)
    context = window if context is None else context
    if masked:
        if stride is not None:
            raise ConfigError("--stride applies to causal LMs; a masked LM sees each window "
                              "whole and scores every token of it once")
        if context < 3 or context > window:
            raise ConfigError(f"--context must be in [3, {window}] for this masked LM "
                              f"([CLS] and [SEP] take two positions), got {context}")
        missing = [role for role in ("cls", "sep", "mask")
                   if getattr(tokenizer, f"{role}_token_id") is None]
        if missing:
            raise ConfigError(f"--model {model_name}: the tokenizer has no "
                              f"{'/'.join(missing)} token, which pseudo-perplexity needs")
    else:
        stride = context // 2 if stride is None else stride
        check_window(context=context, stride=stride, model_window=window)
    corpus = read_corpus(texts, tokenizer=tokenizer, source=data_name or "the corpus")
    tokenizer.check_fits(model.config.vocab_size, where=model_name or "the model")
    if masked:
        pieces = masked_lm_windows(corpus.documents, context=context)
        nll = pseudo_token_nll(model, pieces, cls_id=tokenizer.cls_token_id,
                               sep_id=tokenizer.sep_token_id, mask_id=tokenizer.mask_token_id,
                               batch_size=batch_size)
        tokens, n_windows, joined = len(nll), len(pieces), None
    else:
        stream = join_documents(corpus.documents, tokenizer.eos_token_id)
        if len(stream) < 2:
            raise DataError(f"{corpus.source}: {len(stream)} token(s); perplexity needs at "
                            "least 2 (the first has no context)")
        token_nll, windows = causal_token_nll(model, stream, context=context, stride=stride,
                                              batch_size=batch_size)
        nll = token_nll[~token_nll.isnan()]
        tokens, n_windows = len(stream), len(windows)
        joined = (f"each document followed by EOS {tokenizer.eos_token!r}"
                  if tokenizer.eos_token_id is not None else "documents concatenated (no EOS)")
    return PerplexityResult(
        method="pseudo-perplexity" if masked else "sliding-window", model=model_name,
        data=corpus.source, documents=len(corpus.documents), tokens=tokens, scored=len(nll),
        words=corpus.words, bytes=corpus.bytes, nll=float(nll.sum()), context=context,
        stride=stride, windows=n_windows, batch_size=batch_size,
        device=str(model_device(model)), joined_with=joined)


# -- the transformers guide's recipe, for comparison ---------------------------------------------
def hf_recipe_perplexity(loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                         input_ids: torch.Tensor, *, max_length: int, stride: int
                         ) -> tuple[float, float, int]:
    """(perplexity, nll_sum, n_tokens) by the loop of transformers' guide "Perplexity of
    fixed-length models" (docs/source/en/perplexity.md, after PR #18906 fixed issue #18887's
    short first window), transcribed line by line. `loss(input_ids, labels)` is
    `model(input_ids, labels=labels).loss`: the mean NLL over labels != -100 after the shift.
    input_ids: (1, N)."""
    seq_len = input_ids.size(1)
    nll_sum = 0.0
    n_tokens = 0
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        ids = input_ids[:, begin_loc:end_loc]
        target_ids = ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = loss(ids, target_ids)
        num_valid_tokens = (target_ids != -100).sum().item()
        batch_size = target_ids.size(0)
        num_loss_tokens = num_valid_tokens - batch_size  # "due to internal label shift"
        nll_sum += float(neg_log_likelihood) * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens), nll_sum, n_tokens
