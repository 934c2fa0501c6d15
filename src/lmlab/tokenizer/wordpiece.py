"""BERT's WordPiece pipeline on a `tokenizers.Tokenizer`: build it, train it, read and write vocab.txt.

The pipeline is exactly the one transformers' `BertTokenizer(Fast)` assembles from a vocab.txt:
`BertNormalizer` (clean control characters, space out CJK characters, lowercase and — unless told
otherwise — strip accents when lowercasing), `BertPreTokenizer` (split on whitespace and
punctuation), the greedy longest-match-first `WordPiece` model with "##" continuations and at
most 100 characters per word (longer words become [UNK]), and the `[CLS] A [SEP] B [SEP]`
template with token types 0 then 1.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmlab.errors import CheckpointError, ConfigError

BERT_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
PREFIX = "##"  # marks a WordPiece that continues the previous piece's word
MAX_CHARS_PER_WORD = 100  # BERT's (and transformers') limit; a longer word is one [UNK]


def bert_pipeline(backend: Backend, *, lowercase: bool, strip_accents: bool | None,
                  chinese_chars: bool, cls_token: str, sep_token: str) -> Backend:
    """Set BERT's normalizer, pre-tokenizer, decoder and [CLS]/[SEP] template on `backend`."""
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=chinese_chars, strip_accents=strip_accents,
        lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix=PREFIX)
    ids = {token: backend.token_to_id(token) for token in (cls_token, sep_token)}
    missing = [token for token, i in ids.items() if i is None]
    if missing:
        raise ConfigError(f"{', '.join(missing)} not in the WordPiece vocabulary; BERT's"
                          " [CLS] A [SEP] B [SEP] template needs both")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls_token}:0 $A:0 {sep_token}:0",
        pair=f"{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1",
        special_tokens=list(ids.items()))
    return backend


def train_backend(paths: Sequence[Path] | None, iterator: Iterable[str] | None, *,
                  vocab_size: int, min_frequency: int, lowercase: bool,
                  strip_accents: bool | None, specials: Sequence[str], unk_token: str,
                  limit_alphabet: int | None, show_progress: bool) -> Backend:
    """Train a WordPiece vocabulary (specials get the first ids) with BERT's normalization.

    Raises whatever `tokenizers` raises; the caller names the input at fault."""
    backend = Backend(models.WordPiece(unk_token=unk_token, continuing_subword_prefix=PREFIX,
                                       max_input_chars_per_word=MAX_CHARS_PER_WORD))
    # Normalizer and pre-tokenizer must be in place before training: the vocabulary is learnt
    # from normalized words. The template is set after, once [CLS]/[SEP] have ids.
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=strip_accents,
        lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    options: dict[str, Any] = {} if limit_alphabet is None else {"limit_alphabet": limit_alphabet}
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(specials),
        continuing_subword_prefix=PREFIX, show_progress=show_progress, **options)
    if paths is not None:
        backend.train([str(p) for p in paths], trainer=trainer)
    else:
        backend.train_from_iterator(iterator, trainer=trainer)
    return backend


def read_vocab_txt(path: Path) -> dict[str, int]:
    """vocab.txt: one token per line, its id the line number (as transformers' load_vocab)."""
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{path}: not UTF-8 text ({error})") from error
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last token, it does not start another
    vocab: dict[str, int] = {}
    for index, token in enumerate(lines):
        token = token.rstrip("\r")
        if token in vocab:  # transformers keeps the later id; say so rather than guess
            raise CheckpointError(f"{path} line {index + 1}: token {token!r} repeats line"
                                  f" {vocab[token] + 1}")
        vocab[token] = index
    if not vocab:
        raise CheckpointError(f"{path}: empty vocabulary")
    return vocab


def load_vocab_txt(directory: Path, config: dict[str, Any]) -> Backend:
    """A BERT tokenizer from vocab.txt and tokenizer_config.json's options (BERT's defaults for
    those it does not set: lowercase, accents stripped when lowercasing, CJK characters split)."""
    vocab = read_vocab_txt(directory / "vocab.txt")
    names = {role: _name(config.get(f"{role}_token"), default) for role, default in
             BERT_SPECIALS.items()}
    if names["unk"] not in vocab:
        raise CheckpointError(f"{directory / 'vocab.txt'}: unk_token {names['unk']!r} is not in"
                              " the vocabulary")
    lowercase = config.get("do_lower_case", True)
    strip_accents = config.get("strip_accents")
    chinese = config.get("tokenize_chinese_chars", True)
    for key, value in (("do_lower_case", lowercase), ("tokenize_chinese_chars", chinese),
                       ("strip_accents", strip_accents)):
        if not isinstance(value, bool) and not (key == "strip_accents" and value is None):
            raise CheckpointError(f"{directory / 'tokenizer_config.json'}: {key} must be true or"
                                  f" false, got {value!r}")
    backend = Backend(models.WordPiece(vocab, unk_token=names["unk"],
                                       continuing_subword_prefix=PREFIX,
                                       max_input_chars_per_word=MAX_CHARS_PER_WORD))
    return bert_pipeline(backend, lowercase=lowercase, strip_accents=strip_accents,
                         chinese_chars=chinese, cls_token=names["cls"], sep_token=names["sep"])


def _name(value: Any, default: str) -> str:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else default


def vocab_lines(backend: Backend) -> str:
    """vocab.txt's text: every token (added ones included) in id order; ids must be 0..n-1."""
    by_id = {i: token for token, i in backend.get_vocab(with_added_tokens=True).items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise CheckpointError("cannot write vocab.txt: the vocabulary's ids are not 0..n-1")
    return "".join(by_id[i] + "\n" for i in range(len(by_id)))


def normalizer_options(backend: Backend) -> dict[str, Any]:
    """transformers' BertTokenizer options matching the backend's BertNormalizer (none if the
    normalizer is something else), for tokenizer_config.json."""
    spec = json.loads(backend.to_str()).get("normalizer") or {}
    if spec.get("type") != "BertNormalizer":
        return {}
    return {"do_lower_case": spec["lowercase"], "strip_accents": spec["strip_accents"],
            "tokenize_chinese_chars": spec["handle_chinese_chars"]}
