"""Decoding: the decoder protocol a model implements, the engine that decodes rows with their
own state, and the strategies on it (greedy, sampling, beam search, speculative decoding)."""

from lmlab.generation.config import GenerationConfig
from lmlab.generation.engine import Engine, Event, Row
from lmlab.generation.generate import StreamStep, generate, generate_tokens, stream
from lmlab.generation.side_by_side import side_by_side

__all__ = ["Engine", "Event", "GenerationConfig", "Row", "StreamStep", "generate",
           "generate_tokens", "side_by_side", "stream"]
