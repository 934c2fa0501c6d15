"""Decoding as a few plain functions around an explicit KV cache.

`prefill` runs the prompt once and fills the cache; `decode_one_token` feeds one token per row;
`generate_tokens` is the one token iterator that the CLI (and later the server) stream from;
`generate` collects it into prompt + new tokens, padded like transformers' output.

The model only needs the decoder protocol `model(ids, positions=..., cache=..., attention_mask=...)
-> logits` and `model.new_cache(batch, max_len)`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from lmlab.generation.config import GenerationConfig
from lmlab.generation.processors import apply_processors
from lmlab.generation.stopping import EosCriterion, StopStringCriterion
from lmlab.models.layers import packed_inference


def prefill(model, input_ids, cache, attention_mask=None) -> torch.Tensor:
    """Run the whole prompt once, filling the cache; return last-position logits (B, V)."""
    return model(input_ids, cache=cache, attention_mask=attention_mask, last_only=True)[:, -1, :]


def decode_one_token(model, token, cache, attention_mask=None) -> torch.Tensor:
    """Feed one token per row (B, 1) at the cache's next position; return logits (B, V).
    A model with a `decode_step` (lmlab's GPT: the same numbers, less overhead) is run by it."""
    step = getattr(model, "decode_step", None)
    if step is not None:
        return step(token, cache, attention_mask)
    return model(token, cache=cache, attention_mask=attention_mask)[:, -1, :]


class TokenSampler:
    """Picks the next token of every row: argmax, or a draw from softmax(scores).

    With a seed, each row draws from its own generator seeded from (seed, row), so a row's
    samples do not change when other rows join the batch (batch invariance). Without a seed, all
    rows draw from torch's global RNG in one call, as transformers does.
    """

    def __init__(self, *, do_sample: bool, seed: int | None, batch_size: int, device):
        self.do_sample = do_sample
        self.generators = None
        if do_sample and seed is not None:
            self.generators = []
            for row in range(batch_size):
                generator = torch.Generator(device=device)
                generator.manual_seed(seed + 1_000_003 * row)
                self.generators.append(generator)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        if not self.do_sample:
            return scores.argmax(dim=-1)
        probs = torch.softmax(scores, dim=-1)
        if self.generators is None:
            return torch.multinomial(probs, num_samples=1).squeeze(-1)
        return torch.cat([torch.multinomial(p, num_samples=1, generator=g)
                          for p, g in zip(probs, self.generators)])


def generate_tokens(
    model,
    input_ids: torch.Tensor,
    config: GenerationConfig,
    *,
    attention_mask: torch.Tensor | None = None,
    tokenizer=None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), one step at a time (greedy or sampling).

    Rows that are done (EOS, a stop string) get `pad_token_id` afterwards; the iterator stops when
    every row is done or the length budget is spent. Lengths are checked here, at the call, not
    at the first `next()`.
    """
    new_tokens = config.budget(input_ids.shape[1], model=model)
    if config.stop_strings and tokenizer is None:
        raise ValueError("stop_strings needs the tokenizer: generate(..., tokenizer=tok)")
    return _generate_tokens(model, input_ids, config, new_tokens, attention_mask, tokenizer)


@dataclass
class StreamStep:
    """One step of a text stream: each row's new token, and the text it completed.

    A byte-level token can end in the middle of a UTF-8 character; its text is then held back
    ('') until the character is complete, so no chunk ever contains a broken character. The last
    step may carry no tokens, only the text still held back when decoding ended.
    """

    token_ids: list[int]
    texts: list[str]


def stream(
    model,
    input_ids: torch.Tensor,
    config: GenerationConfig,
    *,
    tokenizer,
    attention_mask: torch.Tensor | None = None,
) -> Iterator[StreamStep]:
    """generate_tokens, with each row's incrementally decoded text (what the CLI prints)."""
    tokens = generate_tokens(model, input_ids, config, attention_mask=attention_mask,
                             tokenizer=tokenizer)
    decoders = [tokenizer.stream_decoder(skip_special_tokens=True) for _ in range(len(input_ids))]
    done = [False] * len(input_ids)
    so_far = [""] * len(input_ids)
    stops = config.stop_strings or []

    def rows():
        for token in tokens:
            ids = token.tolist()
            texts = []
            for row, token_id in enumerate(ids):
                texts.append("" if done[row] else decoders[row].push(token_id))
                so_far[row] += texts[-1]
                # A finished row (EOS, stop string) only receives padding from now on, which
                # must not reach its text.
                done[row] = (done[row] or token_id in config.eos_token_id
                             or any(stop in so_far[row] for stop in stops))
            yield StreamStep(token_ids=ids, texts=texts)
        tail = [d.flush() for d in decoders]
        if any(tail):
            yield StreamStep(token_ids=[], texts=tail)

    return rows()


def stopping_criteria(config: GenerationConfig, *, batch_size: int, device, tokenizer) -> list:
    criteria = []
    if config.eos_token_id:
        criteria.append(EosCriterion(config.eos_token_id, device=device))
    if config.stop_strings:
        criteria.append(StopStringCriterion(config.stop_strings, tokenizer, batch_size=batch_size))
    return criteria


def _generate_tokens(model, input_ids, config, new_tokens, attention_mask, tokenizer):
    if new_tokens == 0:
        return
    with torch.inference_mode(), packed_inference(model):
        yield from _decode_loop(model, input_ids, config, new_tokens, attention_mask, tokenizer)


def _decode_loop(model, input_ids, config, new_tokens, attention_mask, tokenizer):
    batch, prompt_len = input_ids.shape
    total = prompt_len + new_tokens
    device = input_ids.device
    processors = config.logits_processors(prompt_len=prompt_len, attention_mask=attention_mask)
    criteria = stopping_criteria(config, batch_size=batch, device=device, tokenizer=tokenizer)
    sampler = TokenSampler(do_sample=config.do_sample, seed=config.seed, batch_size=batch,
                           device=device)
    pad = torch.tensor(config.pad_id, device=device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    # The whole sequence lives in one preallocated buffer; processors see a view of it.
    sequence = torch.empty(batch, total, dtype=torch.long, device=device)
    sequence[:, :prompt_len] = input_ids

    cache = model.new_cache(batch, total)
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: the plain causal path is faster
    mask = None
    if attention_mask is not None:
        mask = torch.ones(batch, total, dtype=attention_mask.dtype, device=device)
        mask[:, :prompt_len] = attention_mask
    scores = prefill(model, input_ids, cache, None if mask is None else mask[:, :prompt_len])
    for step in range(new_tokens):
        length = prompt_len + step
        if processors:
            scores = apply_processors(processors, sequence[:, :length], scores.float())
        token = sampler(scores)
        if criteria:
            token = torch.where(unfinished, token, pad)
        sequence[:, length] = token
        yield token
        if criteria:
            for criterion in criteria:
                unfinished &= ~criterion(sequence[:, : length + 1], token)
            if not bool(unfinished.any()):
                return
        if step + 1 == new_tokens:
            return
        step_mask = None if mask is None else mask[:, : length + 1]
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
    num_draft_tokens: int = 4,
    stats: dict | None = None,
    **knobs,
) -> torch.Tensor:
    """Prompt + generated tokens, padded like transformers' output.

    `knobs` are GenerationConfig's fields (transformers' names: max_new_tokens, do_sample, top_p,
    num_beams, …); an unknown name is a TypeError. `eos_token_id` and `pad_token_id` default to
    the model config's; pass eos_token_id=[] to never stop early. `tokenizer` is needed for
    `stop_strings`; `draft_model` turns on speculative decoding (`num_draft_tokens` proposals per
    round; a dict passed as `stats` receives the acceptance rate).
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
    with packed_inference(model), (packed_inference(draft_model) if draft_model is not None
                                   else contextlib.nullcontext()):
        return _dispatch(model, input_ids, config, attention_mask=attention_mask,
                         tokenizer=tokenizer, draft_model=draft_model,
                         num_draft_tokens=num_draft_tokens, stats=stats)


def _dispatch(model, input_ids, config, *, attention_mask, tokenizer, draft_model,
              num_draft_tokens, stats) -> torch.Tensor:
    if config.num_beams > 1:
        if draft_model is not None:
            raise ValueError("speculative decoding (draft_model) does not combine with num_beams > 1")
        from lmlab.generation.beam import beam_search

        return beam_search(model, input_ids, config, attention_mask=attention_mask)
    if draft_model is not None:
        from lmlab.generation.speculative import speculative_generate

        return speculative_generate(model, draft_model, input_ids, config,
                                    attention_mask=attention_mask,
                                    num_draft_tokens=num_draft_tokens, stats=stats)
    if config.num_return_sequences > 1:  # sampled: each prompt repeated, as transformers does
        input_ids = input_ids.repeat_interleave(config.num_return_sequences, dim=0)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(config.num_return_sequences, dim=0)
    tokens = list(generate_tokens(model, input_ids, config, attention_mask=attention_mask,
                                  tokenizer=tokenizer))
    if not tokens:
        return input_ids
    return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)
