"""`generate`, `generate_tokens` and `stream`: decoding calls, all run on the engine.

`generate_tokens` is the one token iterator the CLI streams from; `stream` adds each row's
incrementally decoded text; `generate` collects prompt + new tokens, padded like transformers'
output, for greedy decoding, sampling, beam search — and speculative decoding, which runs two
models' caches side by side (lmlab.generation.speculative).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import torch

from lmlab.generation.config import GenerationConfig
from lmlab.generation.engine import Engine, Event, Row
from lmlab.generation.protocol import check_decoder, default_token_id, follow_model
from lmlab.generation.speculative import speculative_generate

log = logging.getLogger(__name__)


def _prepare(model, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
             source: tuple | None = None):
    """Inputs on the model's device (a prompt built on the CPU for a model on a GPU, the usual
    pattern, follows the model as in transformers, with a warning once). An encoder–decoder's
    decoder prompt defaults to its start token, one per source."""
    check_decoder(model)
    if input_ids is None:
        if source is None:
            raise ValueError("input_ids is required (None only with source_ids, for an "
                             "encoder–decoder's start token)")
        start = default_token_id(model, "decoder_start_token_id")
        if start is None:
            raise ValueError("the model's config has no decoder_start_token_id: pass input_ids")
        input_ids = torch.full((len(source[0]), 1), start, dtype=torch.long)
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    return follow_model(model, input_ids, attention_mask)


def _source(source_ids, source_mask) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """An encoder–decoder's sources as (B, S) tensors (one 1-D source is a batch of one)."""
    if source_ids is None:
        if source_mask is not None:
            raise ValueError("source_mask given without source_ids")
        return None
    source_ids = torch.as_tensor(source_ids)
    if source_ids.dim() == 1:
        source_ids = source_ids[None]
        source_mask = None if source_mask is None else torch.as_tensor(source_mask)[None]
    return source_ids, source_mask


def _decode(model, input_ids, config: GenerationConfig, *, attention_mask, tokenizer,
            cpu_kernels: bool, stream_text: bool = False,
            source: tuple | None = None) -> tuple[Engine, list[Row]]:
    """An engine sized for one call's rows, and those rows, added (not yet decoded)."""
    input_ids, attention_mask = _prepare(model, input_ids, attention_mask, source)
    prompt_len = input_ids.shape[1]
    rows_per_prompt = max(config.num_beams, config.num_return_sequences)
    engine = Engine(model, max_rows=len(input_ids) * rows_per_prompt,
                    max_len=prompt_len + config.budget(prompt_len, model=model),
                    tokenizer=tokenizer, cpu_kernels=cpu_kernels,
                    source_len=None if source is None else source[0].shape[1])
    source_ids, source_mask = source if source is not None else (None, None)
    if source_ids is not None:
        source_ids, source_mask = follow_model(model, source_ids, source_mask)
    return engine, engine.add(input_ids, config, attention_mask=attention_mask,
                              stream_text=stream_text, source_ids=source_ids,
                              source_mask=source_mask)


def generate_tokens(
    model,
    input_ids: torch.Tensor,
    config: GenerationConfig,
    *,
    attention_mask: torch.Tensor | None = None,
    tokenizer=None,
    cpu_kernels: bool = True,
    source_ids: torch.Tensor | None = None,
    source_mask: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), one step at a time (greedy or sampling).

    Rows that are done (EOS, a stop string) get `pad_token_id` afterwards; the iterator stops when
    every row is done or the length budget is spent. Lengths are checked here, at the call, not
    at the first `next()`.
    """
    if config.num_beams > 1:
        raise ValueError("generate_tokens streams greedy decoding or sampling; beam search's "
                         "tokens are final only at its end — use generate()")
    engine, rows = _decode(model, input_ids, config, attention_mask=attention_mask,
                           tokenizer=tokenizer, cpu_kernels=cpu_kernels,
                           source=_source(source_ids, source_mask))
    return _token_steps(engine, rows, config.pad_id)


def _token_steps(engine: Engine, rows: list[Row], pad: int) -> Iterator[torch.Tensor]:
    for events in _steps(engine, rows):
        yield torch.tensor([pad if e is None else e.token for e in events], dtype=torch.long,
                           device=engine.device)


def _steps(engine: Engine, rows: list[Row]) -> Iterator[list[Event | None]]:
    """Step the engine to the end; after each step that produced tokens, each of `rows`'
    event in their order (None for a row that is done)."""
    position = {id(row): i for i, row in enumerate(rows)}
    while engine.busy:
        events = engine.step()
        if not events:
            continue
        by_row: list[Event | None] = [None] * len(rows)
        for event in events:
            by_row[position[id(event.row)]] = event
        yield by_row


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
    cpu_kernels: bool = True,
    source_ids: torch.Tensor | None = None,
    source_mask: torch.Tensor | None = None,
) -> Iterator[StreamStep]:
    """generate_tokens, with each row's incrementally decoded text (what the CLI prints)."""
    if config.num_beams > 1:
        raise ValueError("stream decodes greedily or by sampling; use generate() for beam search")
    engine, rows = _decode(model, input_ids, config, attention_mask=attention_mask,
                           tokenizer=tokenizer, cpu_kernels=cpu_kernels, stream_text=True,
                           source=_source(source_ids, source_mask))

    def steps() -> Iterator[StreamStep]:
        for events in _steps(engine, rows):
            yield StreamStep(token_ids=[config.pad_id if e is None else e.token for e in events],
                             texts=["" if e is None else e.text for e in events])
        tail = [row.text.flush() for row in rows]
        if any(tail):
            yield StreamStep(token_ids=[], texts=tail)

    return steps()


def beam_search(model, input_ids: torch.Tensor | None, config: GenerationConfig, *,
                attention_mask: torch.Tensor | None = None,
                cpu_kernels: bool = True, source_ids: torch.Tensor | None = None,
                source_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Prompt + generated tokens, (B · num_return_sequences, prompt_len + L), the best hypotheses
    of each prompt first; shorter hypotheses are padded with `config.beam_pad_id` (transformers'
    `pad_token_id or eos_token_id[0]`: a pad id of 0 pads with the first EOS).

    `attention_mask` (B, prompt_len) marks left padding with 0. With `do_sample=True` this is
    transformers' beam sampling: candidates are drawn from the processed and warped scores.
    """
    if config.num_beams < 2:
        raise ValueError(f"beam_search needs num_beams >= 2, got {config.num_beams}; use "
                         "generate_tokens for greedy decoding or sampling")
    engine, rows = _decode(model, input_ids, config, attention_mask=attention_mask,
                           tokenizer=None, cpu_kernels=cpu_kernels,
                           source=_source(source_ids, source_mask))
    engine.run()
    if not rows[0].tokens:  # nothing to generate: the prompts, once per returned sequence
        return rows[0].group.input_ids.repeat_interleave(config.num_return_sequences, dim=0)
    return rows[0].group.output()


def generate(
    model,
    input_ids: torch.Tensor | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    source_ids: torch.Tensor | None = None,
    source_mask: torch.Tensor | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    tokenizer=None,
    draft_model=None,
    num_draft_tokens: int = 4,
    stats: dict | None = None,
    cpu_kernels: bool = True,
    **knobs,
) -> torch.Tensor:
    """Prompt + generated tokens, padded like transformers' output.

    `knobs` are GenerationConfig's fields (transformers' names: max_new_tokens, do_sample, top_p,
    num_beams, …); an unknown name is a TypeError. `eos_token_id` and `pad_token_id` default to
    the model config's; pass eos_token_id=[] to never stop early. `tokenizer` is needed for
    `stop_strings`; `draft_model` turns on speculative decoding (`num_draft_tokens` proposals per
    round; a dict passed as `stats` receives the acceptance rate). `cpu_kernels=False` keeps the
    CPU speed layer off. The output is on the model's device.

    An encoder–decoder (T5) takes its sources as `source_ids` (B, S), with `source_mask` marking
    padding; `input_ids` is then the decoder's prompt, by default the start token of each row,
    and the output is the decoder's sequences, as transformers returns them.
    """
    source = _source(source_ids, source_mask)
    if eos_token_id is None:
        eos_token_id = default_token_id(model, "eos_token_id")
    if pad_token_id is None:
        pad_token_id = default_token_id(model, "pad_token_id")
    config = GenerationConfig(
        eos_token_id=[] if eos_token_id is None else eos_token_id,
        pad_token_id=pad_token_id,
        **knobs,
    )
    if draft_model is not None:
        if source is not None:
            raise ValueError("speculative decoding (draft_model) is for decoder-only models; "
                             "it does not take source_ids")
        if config.num_beams > 1:
            raise ValueError("speculative decoding (draft_model) does not combine with "
                             "num_beams > 1")
        return speculative_generate(model, draft_model, input_ids, config,
                                    attention_mask=attention_mask,
                                    num_draft_tokens=num_draft_tokens, stats=stats,
                                    cpu_kernels=cpu_kernels)
    if config.num_beams > 1:
        return beam_search(model, input_ids, config, attention_mask=attention_mask,
                           cpu_kernels=cpu_kernels, source_ids=source_ids,
                           source_mask=source_mask)
    engine, rows = _decode(model, input_ids, config, attention_mask=attention_mask,
                           tokenizer=tokenizer, cpu_kernels=cpu_kernels, source=source)
    engine.run()
    prompts = rows[0].group.input_ids  # each prompt once per returned sequence
    width = max(len(row.tokens) for row in rows)
    new = torch.full((len(rows), width), config.pad_id, dtype=torch.long, device=prompts.device)
    for i, row in enumerate(rows):
        if row.tokens:
            new[i, :len(row.tokens)] = torch.tensor(row.tokens, device=prompts.device)
    return torch.cat([prompts, new], dim=1)
