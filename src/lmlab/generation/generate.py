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


def _prepare(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """Inputs on the model's device (a prompt built on the CPU for a model on a GPU, the usual
    pattern, follows the model as in transformers, with a warning once)."""
    check_decoder(model)
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    return follow_model(model, input_ids, attention_mask)


def _decode(model, input_ids, config: GenerationConfig, *, attention_mask, tokenizer,
            cpu_kernels: bool, stream_text: bool = False) -> tuple[Engine, list[Row]]:
    """An engine sized for one call's rows, and those rows, added (not yet decoded)."""
    input_ids, attention_mask = _prepare(model, input_ids, attention_mask)
    prompt_len = input_ids.shape[1]
    rows_per_prompt = max(config.num_beams, config.num_return_sequences)
    engine = Engine(model, max_rows=len(input_ids) * rows_per_prompt,
                    max_len=prompt_len + config.budget(prompt_len, model=model),
                    tokenizer=tokenizer, cpu_kernels=cpu_kernels)
    return engine, engine.add(input_ids, config, attention_mask=attention_mask,
                              stream_text=stream_text)


def generate_tokens(
    model,
    input_ids: torch.Tensor,
    config: GenerationConfig,
    *,
    attention_mask: torch.Tensor | None = None,
    tokenizer=None,
    cpu_kernels: bool = True,
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
                           tokenizer=tokenizer, cpu_kernels=cpu_kernels)
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
) -> Iterator[StreamStep]:
    """generate_tokens, with each row's incrementally decoded text (what the CLI prints)."""
    if config.num_beams > 1:
        raise ValueError("stream decodes greedily or by sampling; use generate() for beam search")
    engine, rows = _decode(model, input_ids, config, attention_mask=attention_mask,
                           tokenizer=tokenizer, cpu_kernels=cpu_kernels, stream_text=True)

    def steps() -> Iterator[StreamStep]:
        for events in _steps(engine, rows):
            yield StreamStep(token_ids=[config.pad_id if e is None else e.token for e in events],
                             texts=["" if e is None else e.text for e in events])
        tail = [row.text.flush() for row in rows]
        if any(tail):
            yield StreamStep(token_ids=[], texts=tail)

    return steps()


def beam_search(model, input_ids: torch.Tensor, config: GenerationConfig, *,
                attention_mask: torch.Tensor | None = None,
                cpu_kernels: bool = True) -> torch.Tensor:
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
                           tokenizer=None, cpu_kernels=cpu_kernels)
    engine.run()
    if not rows[0].tokens:  # nothing to generate: the prompts, once per returned sequence
        return rows[0].group.input_ids.repeat_interleave(config.num_return_sequences, dim=0)
    return rows[0].group.output()


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
    """
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
        if config.num_beams > 1:
            raise ValueError("speculative decoding (draft_model) does not combine with "
                             "num_beams > 1")
        return speculative_generate(model, draft_model, input_ids, config,
                                    attention_mask=attention_mask,
                                    num_draft_tokens=num_draft_tokens, stats=stats,
                                    cpu_kernels=cpu_kernels)
    if config.num_beams > 1:
        return beam_search(model, input_ids, config, attention_mask=attention_mask,
                           cpu_kernels=cpu_kernels)
    engine, rows = _decode(model, input_ids, config, attention_mask=attention_mask,
                           tokenizer=tokenizer, cpu_kernels=cpu_kernels)
    engine.run()
    prompts = rows[0].group.input_ids  # each prompt once per returned sequence
    width = max(len(row.tokens) for row in rows)
    new = torch.full((len(rows), width), config.pad_id, dtype=torch.long, device=prompts.device)
    for i, row in enumerate(rows):
        if row.tokens:
            new[i, :len(row.tokens)] = torch.tensor(row.tokens, device=prompts.device)
    return torch.cat([prompts, new], dim=1)
