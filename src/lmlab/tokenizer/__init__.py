"""Tokenizers: a thin wrapper over the `tokenizers` library (byte-level BPE, char-level, HF files)."""

from lmlab.tokenizer.tokenizer import StreamDecoder, Tokenizer

__all__ = ["StreamDecoder", "Tokenizer"]
