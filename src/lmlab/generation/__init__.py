"""Decoding: prefill / one-step decode around an explicit KV cache, and the strategies on top."""

from lmlab.generation.decode import GenerationConfig, generate, generate_tokens

__all__ = ["GenerationConfig", "generate", "generate_tokens"]
