"""Decoding as a few plain functions around an explicit KV cache.

`prefill` runs the prompt once and fills the cache; `decode_one_token` feeds one token per row;
`generate_tokens` is the one token iterator that the CLI (and later the server) stream from;
`generate` collects it into prompt + new tokens, padded like transformers' output.

The model only needs the decoder protocol `model(ids, positions=..., cache=..., attention_mask=...)
-> logits` and `model.new_cache(batch, max_len)`.
"""

from __future__ import annotations

from typing import Iterator

import torch

from lmlab.generation.config import GenerationConfig
from lmlab.generation.processors import apply_processors


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
    processors = config.logits_processors(prompt_len=prompt_len)
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
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    tokenizer=None,
    draft_model=None,
    **knobs,
) -> torch.Tensor:
    """Prompt + generated tokens, padded like transformers' output.

    `knobs` are GenerationConfig's fields (transformers' names: max_new_tokens, do_sample, top_p,
    num_beams, …); an unknown name is a TypeError. `eos_token_id` and `pad_token_id` default to
    the model config's; pass eos_token_id=[] to never stop early. `tokenizer` is needed for
    `stop_strings`; `draft_model` turns on speculative decoding.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id
    config = GenerationConfig(
        eos_token_id=[] if eos_token_id is None else eos_token_id,
        pad_token_id=pad_token_id,
        **knobs,
    )
    if config.stop_strings and tokenizer is None:
        raise ValueError("stop_strings needs the tokenizer: generate(..., tokenizer=tok)")
    if config.num_beams > 1:
        if draft_model is not None:
            raise ValueError("speculative decoding (draft_model) does not combine with num_beams > 1")
        from lmlab.generation.beam import beam_search

        return beam_search(model, input_ids, config, attention_mask=attention_mask)
    if draft_model is not None:
        from lmlab.generation.speculative import speculative_generate

        return speculative_generate(model, draft_model, input_ids, config,
                                    attention_mask=attention_mask)
    if config.num_return_sequences > 1:  # sampled: each prompt repeated, as transformers does
        input_ids = input_ids.repeat_interleave(config.num_return_sequences, dim=0)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(config.num_return_sequences, dim=0)
    tokens = list(generate_tokens(model, input_ids, config, attention_mask=attention_mask))
    if not tokens:
        return input_ids
    return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)
