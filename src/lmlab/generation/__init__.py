"""Decoding: prefill / one-step decode around an explicit KV cache, and the strategies on top."""

from lmlab.generation.config import GenerationConfig
from lmlab.generation.decode import generate, generate_tokens

__all__ = ["GenerationConfig", "generate", "generate_tokens"]
