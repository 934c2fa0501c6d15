"""The decoder protocol: everything lmlab.generation needs from a model, and nothing more.

Any model with these few members decodes through the engine — greedy, sampling, beam search,
speculative — lmlab's GPT today, an encoder–decoder next. Generation reads nothing else of a
model: no config field, no module name, no class.

    model.context_window                   positions a sequence may use (prompt + new tokens);
                                           None for no limit
    model.new_cache(rows, max_len)         a cache for `rows` sequences of up to `max_len`
                                           tokens each (lmlab.models.kv_cache.KVCache, or any
                                           object with the DecodeCache members below)
    model(input_ids, cache=cache,          logits (B, T, V) of T new tokens per row, each row
          attention_mask=None,             continuing its own row of the cache at its own
          last_only=False)                 length; `attention_mask` (B, T) marks new tokens
                                           that are padding (0), `last_only` asks for the last
                                           position's logits only
    model.config.eos_token_id / .pad_token_id   optional defaults for generate()

An encoder–decoder adds `model.encode(source_ids, attention_mask=None, cache=cache)`, which
fills the cache's per-row `extras` (the encoder's output, or the cross-attention keys and values
computed once per source; allocated by its `new_cache`); the cache carries them along whenever
its rows are viewed or copied, and the decoder's forward reads them there. The engine calls it
for the sources given to `Engine.add(..., source_ids=...)`. Its cache's `copy_rows` also takes
`extras=False`, which beam search passes when beams continue beams of the same source.
"""

from __future__ import annotations

import logging
from typing import Protocol, runtime_checkable

import torch

log = logging.getLogger(__name__)
_warned_moves: set[tuple[str, str]] = set()


@runtime_checkable
class DecodeCache(Protocol):
    """Per-row decoding state: each row has its own length (tokens written)."""

    @property
    def lengths(self) -> list[int]: ...

    def rows(self, start: int, stop: int) -> DecodeCache:
        """A view of rows [start, stop) that writes through to this cache."""
        ...

    def copy_rows(self, source, target) -> None:
        """Row target[i] becomes a copy of row source[i] (beam search, compaction)."""
        ...

    def truncate(self, lengths: int | list[int]) -> None:
        """Forget each row's tokens from lengths[r] on (speculative decoding's rollback)."""
        ...

    def reset(self, rows: list[int] | None = None) -> None:
        """Empty rows for new sequences."""
        ...


@runtime_checkable
class Decoder(Protocol):
    @property
    def context_window(self) -> int | None: ...

    def new_cache(self, batch_size: int, max_len: int | None = None) -> DecodeCache: ...

    def __call__(self, input_ids: torch.Tensor, *, cache: DecodeCache,
                 attention_mask: torch.Tensor | None = None,
                 last_only: bool = False) -> torch.Tensor: ...


def check_decoder(model, *, role: str = "model") -> None:
    """A clear error, naming what is missing, for a model generation cannot drive (a BERT
    classifier, say) — instead of an AttributeError from deep inside the engine."""
    missing = [name for name in ("context_window", "new_cache") if not hasattr(model, name)]
    if missing or not callable(model):
        raise TypeError(f"the {role} ({type(model).__name__}) cannot generate text: it lacks "
                        f"{', '.join(missing) or '__call__'} of lmlab.generation's decoder "
                        "protocol (a causal language model such as lmlab's GPT has them)")


def default_token_id(model, name: str) -> int | None:
    """config.eos_token_id / pad_token_id where the model has them (a list: its first id)."""
    value = getattr(getattr(model, "config", None), name, None)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value


def model_device(model) -> torch.device:
    """Where the model's weights are (CPU for a model without parameters)."""
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if parameters is not None else None
    return first.device if first is not None else torch.device("cpu")


def follow_model(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`input_ids` and `attention_mask` on the model's device. A prompt built on the CPU for a
    model on a GPU — `torch.tensor(...)` then `model.to("cuda")`, the usual pattern — follows
    the model, as in transformers, with a warning once per pair of devices."""
    device = model_device(model)
    if input_ids.device != device:
        key = (str(input_ids.device), str(device))
        if key not in _warned_moves:
            _warned_moves.add(key)
            log.warning("input_ids are on %s, the model on %s: moving them to the model's "
                        "device (create them there to skip the copy)", *key)
        input_ids = input_ids.to(device)
    if attention_mask is not None and attention_mask.device != device:
        attention_mask = attention_mask.to(device)
    return input_ids, attention_mask
