"""Decoding: prefill / one-step decode around an explicit KV cache, and the strategies on top."""

from lmlab.generation.config import GenerationConfig
from lmlab.generation.decode import StreamStep, generate, generate_tokens, stream

__all__ = ["GenerationConfig", "StreamStep", "generate", "generate_tokens", "stream"]
