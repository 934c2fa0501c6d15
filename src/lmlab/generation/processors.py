"""Logits processors: small callables with one signature, `(input_ids, scores) -> scores`.

`input_ids` is (B, S) — everything generated so far, prompt included — and `scores` the (B, V)
next-token logits. Each is validated when built, with a message that says how to fix it, and the
semantics are those of the processors of the same name in `transformers`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TemperatureWarper:
    def __init__(self, temperature: float):
        if not temperature > 0:
            raise ValueError(
                f"temperature must be > 0, got {temperature}; use do_sample=False for greedy"
            )
        self.temperature = float(temperature)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


def _check_min_tokens_to_keep(value) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"min_tokens_to_keep must be a positive integer, got {value!r}")


class TopKWarper:
    """Keep the k highest-scoring tokens (ties at the k-th score are all kept)."""

    def __init__(self, top_k: int, *, min_tokens_to_keep: int = 1):
        if not isinstance(top_k, int) or top_k <= 0:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        _check_min_tokens_to_keep(min_tokens_to_keep)
        self.top_k = max(top_k, min_tokens_to_keep)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        return scores.masked_fill(scores < kth, float("-inf"))


class TopPWarper:
    """Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches
    top_p — including the token that crosses the threshold — and at least min_tokens_to_keep."""

    def __init__(self, top_p: float, *, min_tokens_to_keep: int = 1):
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        _check_min_tokens_to_keep(min_tokens_to_keep)
        self.top_p = float(top_p)
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sorted_scores, sorted_idx = torch.sort(scores, descending=False, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        # Ascending order: drop the low tail whose total mass is at most 1 - top_p.
        remove = cumulative <= (1 - self.top_p)
        remove[..., -self.min_tokens_to_keep :] = False
        remove = remove.scatter(-1, sorted_idx, remove)
        return scores.masked_fill(remove, float("-inf"))


def apply_processors(
    processors: Sequence[LogitsProcessor], input_ids: torch.Tensor, scores: torch.Tensor
) -> torch.Tensor:
    for processor in processors:
        scores = processor(input_ids, scores)
    return scores


def build_logits_processors(config, *, prompt_len: int) -> list[LogitsProcessor]:
    """The processors a GenerationConfig asks for, in transformers' order; warpers last."""
    out: list[LogitsProcessor] = []
    if config.do_sample:
        if config.temperature != 1.0:
            out.append(TemperatureWarper(config.temperature))
        if config.top_k is not None:
            out.append(TopKWarper(config.top_k))
        if config.top_p is not None:
            warper = TopPWarper(config.top_p)  # validates top_p even when it filters nothing
            if config.top_p < 1.0:
                out.append(warper)
    return out
