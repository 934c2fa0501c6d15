"""Encoding texts and text pairs for an encoder: ids, token types, attention mask, offsets.

This is what BERT-style tasks feed the model — `[CLS] A [SEP] B [SEP]` with token types 0/1,
padding, truncation and, for extractive QA, the overflowing windows of a long second text with a
stride — with the same semantics as transformers' `tokenizer(texts, pairs, ...)`. `tokenizers`
does the work (in parallel, in Rust); truncation is set on the backend only for the duration of
one call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from tokenizers import Encoding as BackendEncoding
from tokenizers import Tokenizer as Backend

from lmlab.errors import ConfigError, DataError

Truncation = Literal["longest_first", "only_first", "only_second"]
Padding = Literal["longest", "max_length", "none"]


@dataclass(frozen=True)
class Encoding:
    """One encoded text or text pair.

    `offsets[i]` is token i's `(start, end)` character span in the text it came from (the first
    or the second, as `sequence_ids[i]` = 0 or 1 says); special and padding tokens have
    `(0, 0)` and sequence id None. `word_ids[i]` numbers the words (pre-tokenizer pieces) within
    each text; None for special and padding tokens.
    """

    input_ids: list[int]
    token_type_ids: list[int]
    attention_mask: list[int]
    offsets: list[tuple[int, int]]
    sequence_ids: list[int | None]
    word_ids: list[int | None]
    special_tokens_mask: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class EncodedBatch:
    """Rows of a batch, padded to one length. With `return_overflowing`, one input may give
    several rows (windows); `sample_index[row]` is the input each row came from."""

    rows: list[Encoding]
    sample_index: list[int]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Encoding:
        return self.rows[index]

    def column(self, name: str) -> list[list]:
        """One field of every row, e.g. `batch.column("input_ids")`."""
        return [getattr(row, name) for row in self.rows]

    def tensors(self, device=None) -> dict:
        """input_ids, token_type_ids and attention_mask as int64 tensors (rows, length)."""
        import torch  # only callers that want tensors pay for the import

        return {name: torch.tensor(self.column(name), dtype=torch.long, device=device)
                for name in ("input_ids", "token_type_ids", "attention_mask")}


def encode_pairs(backend: Backend, texts: Sequence[str], pairs: Sequence[str] | None, *,
                 add_special_tokens: bool, max_length: int | None, truncation: Truncation,
                 stride: int, return_overflowing: bool, padding: Padding,
                 pad_to_multiple_of: int | None, pad_id: int | None,
                 pad_token: str | None) -> EncodedBatch:
    """Encode `texts` (with `pairs` as second texts) in one parallel backend call."""
    _check_inputs(texts, pairs)
    _check_options(max_length=max_length, truncation=truncation, stride=stride,
                   return_overflowing=return_overflowing, padding=padding,
                   pad_to_multiple_of=pad_to_multiple_of)
    inputs = list(texts) if pairs is None else list(zip(texts, pairs, strict=True))
    if padding != "none" and pad_id is None:
        raise ConfigError("padding needs a pad token; this tokenizer has none (pass"
                          " padding='none', or load a tokenizer with a pad_token)")
    previous = backend.truncation
    try:
        if max_length is not None:
            # Special tokens count towards max_length, as in transformers.
            backend.enable_truncation(max_length, stride=stride, strategy=truncation)
        else:
            backend.no_truncation()
        encodings = backend.encode_batch(inputs, add_special_tokens=add_special_tokens)
    except Exception as error:  # tokenizers raises a bare Exception (e.g. pair cannot fit)
        raise DataError(f"cannot encode {'pairs' if pairs is not None else 'texts'} with"
                        f" max_length={max_length}, truncation={truncation!r}: {error}") from error
    finally:
        if previous is None:
            backend.no_truncation()
        else:
            backend.enable_truncation(**previous)
    rows: list[BackendEncoding] = []
    sample_index: list[int] = []
    for index, encoding in enumerate(encodings):
        windows = [encoding, *encoding.overflowing] if return_overflowing else [encoding]
        rows.extend(windows)
        sample_index.extend([index] * len(windows))
    if padding != "none":
        length = max_length if padding == "max_length" else max((len(r.ids) for r in rows),
                                                                default=0)
        if pad_to_multiple_of:
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
        for row in rows:
            row.pad(length, direction="right", pad_id=pad_id, pad_type_id=0, pad_token=pad_token)
    return EncodedBatch([_row(r) for r in rows], sample_index)


def _row(encoding: BackendEncoding) -> Encoding:
    special = encoding.special_tokens_mask
    return Encoding(
        input_ids=encoding.ids, token_type_ids=encoding.type_ids,
        attention_mask=encoding.attention_mask, offsets=encoding.offsets,
        sequence_ids=encoding.sequence_ids,
        # tokenizers numbers the words of special tokens too; transformers and we say None.
        word_ids=[None if s else w for w, s in zip(encoding.word_ids, special, strict=True)],
        special_tokens_mask=special)


def _check_inputs(texts: Sequence[str], pairs: Sequence[str] | None) -> None:
    for name, values in (("texts", texts), ("pairs", pairs)):
        if values is None:
            continue
        if isinstance(values, str):
            raise TypeError(f"{name} must be a list of str; wrap a single text in a list")
        bad = next((v for v in values if not isinstance(v, str)), None)
        if bad is not None:
            raise TypeError(f"{name}: can only encode str, got {type(bad).__name__}")
    if pairs is not None and len(pairs) != len(texts):
        raise ConfigError(f"got {len(texts)} texts but {len(pairs)} pairs; they must match")


def _check_options(*, max_length: int | None, truncation: str, stride: int,
                   return_overflowing: bool, padding: str,
                   pad_to_multiple_of: int | None) -> None:
    if truncation not in ("longest_first", "only_first", "only_second"):
        raise ConfigError("truncation must be 'longest_first', 'only_first' or 'only_second',"
                          f" got {truncation!r}")
    if padding not in ("longest", "max_length", "none"):
        raise ConfigError(f"padding must be 'longest', 'max_length' or 'none', got {padding!r}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ConfigError(f"max_length must be a positive int, got {max_length!r}")
    if padding == "max_length" and max_length is None:
        raise ConfigError("padding='max_length' needs max_length")
    if not isinstance(stride, int) or stride < 0:
        raise ConfigError(f"stride must be an int >= 0, got {stride!r}")
    if stride and (max_length is None or not return_overflowing):
        raise ConfigError("stride only applies to overflowing windows: pass max_length and"
                          " return_overflowing=True")
    if max_length is not None and stride >= max_length:
        raise ConfigError(f"stride ({stride}) must be smaller than max_length ({max_length})")
    if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int)
                                           or pad_to_multiple_of < 1):
        raise ConfigError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
