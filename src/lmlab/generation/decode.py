"""Decoding as a few plain functions around an explicit KV cache.

`prefill` runs the prompt once and fills the cache; `decode_one_token` feeds one token per row;
`generate_tokens` is the one token iterator that the CLI (and later the server) stream from;
`generate` collects it into prompt + new tokens, padded like transformers' output.

The model only needs the decoder protocol `model(ids, positions=..., cache=..., attention_mask=...)
-> logits` and `model.new_cache(batch, max_len)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from lmlab.generation.processors import (
    LogitsProcessor,
    TemperatureWarper,
    TopKWarper,
    TopPWarper,
    apply_processors,
)


@dataclass
class GenerationConfig:
    """Validated decoding settings; names and meaning as in transformers' GenerationConfig."""

    max_new_tokens: int | None = None
    max_length: int | None = None  # prompt + new tokens; used when max_new_tokens is None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens is None and self.max_length is None:
            self.max_new_tokens = 20  # transformers' default length budget
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        sampling_knobs = {
            "temperature": self.temperature != 1.0,
            "top_k": self.top_k is not None,
            "top_p": self.top_p is not None,
            "seed": self.seed is not None,
        }
        if not self.do_sample and any(sampling_knobs.values()):
            used = ", ".join(k for k, v in sampling_knobs.items() if v)
            # transformers warns and decodes greedily; a silent strategy switch is worse.
            raise ValueError(f"{used} only apply to sampling; pass do_sample=True to sample")
        self.processors()  # validates the values

    def new_tokens_for(self, prompt_len: int) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.max_length < prompt_len:
            raise ValueError(
                f"max_length ({self.max_length}) is shorter than the prompt ({prompt_len} "
                "tokens); use max_new_tokens to set the number of new tokens"
            )
        return self.max_length - prompt_len

    def processors(self) -> list[LogitsProcessor]:
        """The sampling warpers in transformers' order: temperature, top-k, top-p."""
        if not self.do_sample:
            return []
        out: list[LogitsProcessor] = []
        if self.temperature != 1.0:
            out.append(TemperatureWarper(self.temperature))
        if self.top_k is not None:
            out.append(TopKWarper(self.top_k))
        if self.top_p is not None:
            warper = TopPWarper(self.top_p)  # validates top_p even when it filters nothing
            if self.top_p < 1.0:
                out.append(warper)
        return out


def prefill(model, input_ids, cache, attention_mask=None) -> torch.Tensor:
    """Run the whole prompt once, filling the cache; return last-position logits (B, V)."""
    logits = model(input_ids, cache=cache, attention_mask=attention_mask)
    return logits[:, -1, :]


def decode_one_token(model, token, cache, attention_mask=None) -> torch.Tensor:
    """Feed one token per row (B, 1) at the cache's next position; return logits (B, V)."""
    return model(token, cache=cache, attention_mask=attention_mask)[:, -1, :]


def select_next(scores: torch.Tensor, *, do_sample: bool, generator) -> torch.Tensor:
    if not do_sample:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores.float(), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def generate_tokens(
    model,
    input_ids: torch.Tensor,
    config: GenerationConfig,
    *,
    attention_mask: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), one step at a time.

    Rows that have produced an EOS token get `pad_token_id` afterwards; the iterator stops when
    every row is finished or the length budget is spent. The length is checked here, at the
    call, not at the first `next()`.
    """
    prompt_len = input_ids.shape[1]
    new_tokens = config.new_tokens_for(prompt_len)
    total = prompt_len + new_tokens
    if total > model.config.n_positions:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + {new_tokens} new tokens = {total} exceeds the "
            f"model's context window of {model.config.n_positions} tokens"
        )
    return _generate_tokens(model, input_ids, config, new_tokens, attention_mask)


@torch.inference_mode()
def _generate_tokens(model, input_ids, config, new_tokens, attention_mask):
    if new_tokens == 0:
        return
    batch, prompt_len = input_ids.shape
    total = prompt_len + new_tokens
    device = input_ids.device
    generator = None
    if config.do_sample and config.seed is not None:
        # A per-call generator: the seed makes this call reproducible without touching the
        # global RNG. Without a seed, sampling draws from the global RNG, as in transformers.
        generator = torch.Generator(device=device)
        generator.manual_seed(config.seed)
    processors = config.processors()
    eos = torch.tensor(config.eos_token_id, device=device, dtype=torch.long)
    pad = config.pad_token_id
    if pad is None:
        pad = config.eos_token_id[0] if config.eos_token_id else 0
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)

    cache = model.new_cache(batch, total)
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: the plain causal path is faster
    mask = None
    if attention_mask is not None:
        mask = torch.ones(batch, total, dtype=attention_mask.dtype, device=device)
        mask[:, :prompt_len] = attention_mask
    sequence = input_ids
    scores = prefill(model, input_ids, cache, None if mask is None else mask[:, :prompt_len])
    for step in range(new_tokens):
        scores = apply_processors(processors, sequence, scores.float())
        token = select_next(scores, do_sample=config.do_sample, generator=generator)
        token = torch.where(unfinished, token, torch.full_like(token, pad))
        yield token
        if len(eos):
            unfinished &= ~torch.isin(token, eos)
            if not bool(unfinished.any()):
                return
        if step + 1 == new_tokens:
            return
        sequence = torch.cat([sequence, token[:, None]], dim=1)
        step_mask = None if mask is None else mask[:, : sequence.shape[1]]
        scores = decode_one_token(model, token[:, None], cache, step_mask)


def generate(
    model,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Prompt + generated tokens (B, S + new), greedy unless do_sample=True.

    `eos_token_id` defaults to the model config's; pass [] to never stop early.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        max_length=max_length,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=[] if eos_token_id is None else eos_token_id,
        pad_token_id=pad_token_id if pad_token_id is not None else model.config.pad_token_id,
        seed=seed,
    )
    tokens = list(generate_tokens(model, input_ids, config, attention_mask=attention_mask))
    if not tokens:
        return input_ids
    return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)
