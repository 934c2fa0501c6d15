"""Run several decoding strategies on the same prompts and measure speed and quality side by side."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from lmlab.evaluation.text_metrics import distinct_n, mean_token_logprob, repeated_ngram_rate
from lmlab.generation.generate import generate
from lmlab.generation.protocol import model_device

# What `lmlab generate --compare` runs when no strategies are named.
DEFAULT_STRATEGIES: dict[str, dict[str, Any]] = {
    "greedy": {},
    "beam4": {"num_beams": 4, "no_repeat_ngram_size": 3},
    "top_k50": {"do_sample": True, "top_k": 50},
    "top_p0.9": {"do_sample": True, "top_p": 0.9, "temperature": 0.8},
    "min_p0.05": {"do_sample": True, "min_p": 0.05},
    "rep1.3": {"repetition_penalty": 1.3},
}


@dataclass
class StrategyResult:
    name: str
    knobs: dict[str, Any]
    texts: list[str] = field(default_factory=list)
    tokens_per_s: float = 0.0
    mean_logprob: float = 0.0  # under the model itself: how "safe" the text is
    distinct_2: float = 0.0  # diversity across the outputs
    repeated_3gram_rate: float = 0.0  # degenerate repetition inside an output


def compare_strategies(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    strategies: dict[str, dict[str, Any]],
    max_new_tokens: int,
    seed: int = 0,
    eos_token_id: list[int] | None = None,
) -> list[StrategyResult]:
    results = []
    for name, knobs in strategies.items():
        knobs = dict(knobs)
        if knobs.get("do_sample"):
            knobs.setdefault("seed", seed)
        result = StrategyResult(name=name, knobs=knobs)
        outputs, new_tokens, seconds, logprobs, repeats = [], 0, 0.0, [], []
        for prompt in prompts:
            ids = torch.tensor([tokenizer.encode(prompt)], device=model_device(model))
            t0 = time.perf_counter()
            out = generate(model, ids, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                           **knobs)
            seconds += time.perf_counter() - t0
            new = out[0, ids.shape[1]:].tolist()
            new_tokens += len(new)
            outputs.append(new)
            result.texts.append(tokenizer.decode(new, skip_special_tokens=True))
            logprobs.append(mean_token_logprob(model, ids[0].tolist(), new))
            repeats.append(repeated_ngram_rate(new, 3))
        result.tokens_per_s = new_tokens / seconds if seconds else 0.0
        result.mean_logprob = sum(logprobs) / len(logprobs)
        result.distinct_2 = distinct_n(outputs, 2)
        result.repeated_3gram_rate = sum(repeats) / len(repeats)
        results.append(result)
    return results
