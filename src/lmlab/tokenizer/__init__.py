"""Tokenizers: a thin wrapper over the `tokenizers` library (byte-level BPE, WordPiece, T5's Unigram, char-level, HF files)."""

from lmlab.tokenizer.encoding import EncodedBatch, Encoding
from lmlab.tokenizer.tokenizer import StreamDecoder, Tokenizer

__all__ = ["EncodedBatch", "Encoding", "StreamDecoder", "Tokenizer"]
