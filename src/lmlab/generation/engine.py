"""The decoding engine: sequences that each carry their own state, decoded together.

A *row* is one sequence being decoded. It has its own slot in the KV cache (its own length and
positions), its own knobs (a GenerationConfig), logits processors, random generator, stop
criteria and text stream. Rows are added in *groups* — one `add` call: a prompt, or a batch of
prompts that share one config — join the running batch at the next `step`, and leave it when
they finish, without disturbing the others: every row's numbers depend on its own prompt, knobs
and seed only (with the CPU kernels, bit for bit; on other paths up to the rounding of a
different batch shape). That is what lets a server add requests to a running batch and drop
those whose client left (continuous batching), and what `generate()` — greedy, sampling and
beam search — and `generate_tokens()` run on.

    engine = Engine(model, max_rows=16, max_len=256)
    rows = engine.add(input_ids, GenerationConfig(max_new_tokens=32))
    while engine.busy:
        for event in engine.step():      # one token for every running row
            ...                          # event.row, event.token, event.text, event.finish_reason

One `step` runs one forward pass for every running row together (a token each), plus one
prefill per group that joins. Beam search is a group whose rows choose their tokens jointly
and whose cache rows are copied onto each other; its tokens are final only when it finishes.

`ModelRunner` is the one place where the model is called during decoding: it owns the KV cache
and, where the CPU speed layer applies (lmlab.kernels), the fused C step — so every piece of
mutable decoding state belongs to one engine, never to the shared model. An engine serialises
its own methods with a lock: two threads may share one (each step advances every row), and
two engines on one model never touch each other's state.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from lmlab import kernels
from lmlab.generation.beam import BeamState, CandidateSampler
from lmlab.generation.config import GenerationConfig
from lmlab.generation.processors import apply_processors, leading_pads
from lmlab.generation.protocol import check_decoder, model_device
from lmlab.generation.sampling import pick_tokens, row_generator
from lmlab.generation.stopping import StopStrings


class ModelRunner:
    """One model's forward passes during decoding, over its own KV cache of `rows` rows."""

    def __init__(self, model, *, rows: int, max_len: int, cpu_kernels: bool = True,
                 role: str = "model", source_len: int | None = None):
        check_decoder(model, role=role)
        self.model = model
        self.rows = rows
        # an encoder–decoder's cache also holds each row's source: as wide as the longest one
        self.cache = (model.new_cache(rows, max_len) if source_len is None
                      else model.new_cache(rows, max_len, source_len=source_len))
        self.fused = kernels.decoding_adapter(model) if cpu_kernels else None
        self.device = model_device(model)

    def _rows(self, start: int, count: int):
        """Cache rows start .. start + count: the cache itself when that is all of it."""
        if start == 0 and count == self.rows:
            return self.cache
        return self.cache.rows(start, start + count)

    def encode(self, source_ids: torch.Tensor, source_mask: torch.Tensor | None, *,
               start: int = 0) -> None:
        """An encoder–decoder's sources, one per cache row from `start`: the model keeps what
        its decoder reads (the encoder's output) in those rows' `extras`."""
        self.model.encode(source_ids, attention_mask=source_mask,
                          cache=self._rows(start, len(source_ids)))

    def forward(self, input_ids: torch.Tensor, *, start: int = 0,
                attention_mask: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V) — (B, 1, V) with `last_only` — of `input_ids` (B, T) continuing
        cache rows start .. start + B, each at its own length."""
        cache = self._rows(start, len(input_ids))
        if self.fused is not None:
            logits = self.fused.forward(input_ids, cache=cache, attention_mask=attention_mask)
            if logits is not None:
                return logits[:, -1:] if last_only else logits
        return self.model(input_ids, cache=cache, attention_mask=attention_mask,
                          last_only=last_only)


@dataclass(eq=False)
class Row:
    """One sequence being decoded: what it was given, what it has produced, and how it ends."""

    group: _Group = field(repr=False)
    index: int  # its place in its group: output order, and its seed (seed + 1_000_003 · index)
    budget: int  # new tokens it may produce
    tokens: list[int] = field(default_factory=list)  # produced so far
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "cancelled"
    slot: int = -1  # its row of the KV cache while it runs
    generator: torch.Generator | None = field(default=None, repr=False)
    stop: StopStrings | None = field(default=None, repr=False)
    text: object | None = field(default=None, repr=False)  # a tokenizer's StreamDecoder

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Event:
    """What one step produced for one row: its token, the text it completed (when the row
    streams text; a broken UTF-8 character is held back until complete), on its last token why
    it finished, and (when its group asked for log-probs) the token's log-probability under the
    model — log_softmax of the raw logits, before any processor or warper — with the
    `top_logprobs` most likely tokens' as (token, log-prob) pairs."""

    row: Row
    token: int
    text: str = ""
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class _Group:
    """Rows added together: one config, one prompt length (left padding included)."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 config: GenerationConfig, budget: int, rows: int,
                 source: tuple[torch.Tensor, torch.Tensor | None] | None = None):
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.source = source  # an encoder–decoder's (source_ids, source_mask), one per prompt
        self.config = config
        self.prompt_len = input_ids.shape[1]
        self.budget = budget
        self.rows = [Row(group=self, index=i, budget=budget) for i in range(rows)]
        self.done = False
        self.logprobs: int | None = None  # events carry log-probs (and this many top ones)

    def expand(self) -> list[int] | None:
        """After prefill: for each row, the prefilled row it starts as a copy of (None: each
        row is its own)."""
        return None

    def cancelled_with(self, row: Row) -> list[Row]:
        """The rows that leave when `row` is cancelled."""
        return [row]


class _SamplingGroup(_Group):
    """Greedy decoding or sampling: each row picks its own token."""

    def __init__(self, input_ids, attention_mask, config, budget, *, device, tokenizer,
                 stream_text: bool, source=None):
        super().__init__(input_ids, attention_mask, config, budget, rows=len(input_ids),
                         source=source)
        self.eos = set(config.eos_token_id)
        # Prompt + produced tokens of every row, what the processors see (rows in lockstep).
        self.sequence = torch.empty(len(input_ids), self.prompt_len + budget, dtype=torch.long,
                                    device=device)
        self.sequence[:, :self.prompt_len] = input_ids
        self.length = self.prompt_len
        pads = leading_pads(attention_mask)
        padding = [0] * len(input_ids) if pads is None else pads.tolist()
        # A row's processors depend on its config and prompt only; rows whose left padding
        # does not matter to them (no repetition penalty) share one chain, called once.
        key = (lambda row: padding[row]) if config.repetition_penalty != 1.0 else (lambda row: 0)
        self.chain_key = [key(i) for i in range(len(input_ids))]
        self.chains = {k: config.logits_processors(prompt_len=self.prompt_len, padding=k)
                       for k in set(self.chain_key)}
        for row in self.rows:
            if config.do_sample and config.seed is not None:
                row.generator = row_generator(config.seed, row.index, device)
            if config.stop_strings:
                row.stop = StopStrings(config.stop_strings, tokenizer)
            if stream_text:
                row.text = tokenizer.stream_decoder(skip_special_tokens=True)

    def choose(self, rows: list[Row], scores: torch.Tensor) -> tuple[torch.Tensor, None]:
        """The next token of each of `rows` (this group's running rows) from their scores."""
        index = [row.index for row in rows]
        everyone = index == list(range(len(self.rows)))
        if any(self.chains.values()):
            ids = self.sequence[:, :self.length]
            if not everyone:
                ids = ids[torch.tensor(index, device=ids.device)]
            scores = scores.float()
            if len(self.chains) == 1:
                scores = apply_processors(next(iter(self.chains.values())), ids, scores)
            else:  # rows whose left padding differs, under a repetition penalty
                scores = scores.clone()
                for key, chain in self.chains.items():
                    part = [i for i, r in enumerate(index) if self.chain_key[r] == key]
                    part = torch.tensor(part, dtype=torch.long, device=scores.device)
                    if part.numel():
                        scores[part] = apply_processors(chain, ids[part], scores[part])
        generators = None if self.config.seed is None else [row.generator for row in rows]
        tokens = pick_tokens(scores, do_sample=self.config.do_sample, generators=generators)
        column = self.sequence[:, self.length]
        if everyone:
            column.copy_(tokens)
        else:
            column[torch.tensor(index, device=column.device)] = tokens
        self.length += 1
        return tokens, None

    def record(self, rows: list[Row], tokens: list[int]) -> list[Event]:
        """Each row's new token, its text and whether it finished; an event each."""
        events = []
        for row, token in zip(rows, tokens):
            row.tokens.append(token)
            text = row.text.push(token) if row.text is not None else ""
            row.finish_reason = self.finish_reason(row, token)
            events.append(Event(row=row, token=token, text=text, finish_reason=row.finish_reason))
        self.done = all(row.finished for row in self.rows)
        return events

    def finish_reason(self, row: Row, token: int) -> str | None:
        if token in self.eos:
            return "stop"
        if row.stop is not None and row.stop.push(token):
            return "stop"
        if len(row.tokens) >= row.budget:
            return "length"
        return None


class _BeamGroup(_Group):
    """Beam search over B prompts: B · num_beams rows that choose their tokens together."""

    def __init__(self, input_ids, attention_mask, config, budget, *, device, source=None):
        batch, nb = len(input_ids), config.num_beams
        super().__init__(input_ids, attention_mask, config, budget, rows=batch * nb,
                         source=source)
        self.state = BeamState(input_ids, config, total=self.prompt_len + budget)
        self.draw = (CandidateSampler(config, batch=batch, device=device) if config.do_sample
                     else None)
        beam_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            beam_mask = attention_mask.repeat_interleave(nb, dim=0)
        # With the per-beam prompt mask, so that the repetition penalty skips left padding.
        self.processors = config.logits_processors(prompt_len=self.prompt_len,
                                                   attention_mask=beam_mask)
        self.cur_len = self.prompt_len
        self.log_prob_buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # _log_probs

    def expand(self) -> list[int]:
        # All beams of a prompt start equal: one prefill per prompt, then copies.
        return [row // self.config.num_beams for row in range(len(self.rows))]

    def choose(self, rows: list[Row], scores: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The next token of each of `rows` (the running beams), and for each the index in
        `rows` of the beam it continues (the cache rows the engine copies before the next
        step). The beams of prompts whose search is over have left (`record`): the state, which
        keeps every prompt, gets zeros for them, which change nothing it outputs."""
        everyone = len(rows) == len(self.rows)
        index = (None if everyone else
                 torch.tensor([row.index for row in rows], device=scores.device))
        log_probs = self._log_probs(rows, index, scores)
        if self.processors:
            log_probs = apply_processors(self.processors, self.state.flat_running(self.cur_len),
                                         log_probs)
        source = self.state.step(log_probs, self.cur_len, self.draw)
        self.cur_len += 1
        self.done = not self.state.unfinished(self.cur_len)
        tokens = self.state.last_tokens(self.cur_len).reshape(-1)
        if everyone:
            return tokens, source.tolist()
        place = {row.index: i for i, row in enumerate(rows)}  # a beam continues one of its prompt's
        return tokens[index], [place[s] for s in source[index].tolist()]

    def _log_probs(self, rows: list[Row], index: torch.Tensor | None,
                   scores: torch.Tensor) -> torch.Tensor:
        """log_softmax of the scores of the running beams `rows` (`index`: their indices, None
        when all beams run), as (every beam, V) with zeros for the beams that have left —
        written into buffers kept for the whole search. A (beams, V)
        tensor is megabytes (160 × 8,000 floats: 5 MB); made afresh each step, the allocator
        hands its pages back to the system and every step pays the page faults again (the
        add on it measured 0.64 ms where the arithmetic takes 0.07). The caller may change the
        result in place: it is rewritten at the next step."""
        n, vocab = len(self.rows), scores.shape[-1]
        if self.log_prob_buffers is None:
            self.log_prob_buffers = tuple(
                torch.zeros(n, vocab, dtype=torch.float32, device=scores.device)
                for _ in range(2))
        out, part = self.log_prob_buffers
        if index is None:  # aten's out= variant: bit-identical to F.log_softmax
            return torch.ops.aten._log_softmax.out(scores.float(), -1, False, out=out)
        part = torch.ops.aten._log_softmax.out(scores.float(), -1, False, out=part[:len(rows)])
        # the beams that left: zeros again (the in-place beam step changed their rows too)
        left = sorted(set(range(n)) - {row.index for row in rows})
        out.index_fill_(0, torch.tensor(left, device=out.device), 0.0)
        return out.index_copy_(0, index, part)

    def record(self, rows: list[Row], tokens: list[int]) -> list[Event]:
        """No events: a beam's tokens are final only when the search ends (`output`). The beams
        of a prompt whose search is over leave the batch then (transformers decodes them on,
        without effect, until every prompt is done) — except under beam sampling, whose draws
        take the whole batch's scores."""
        for row, token in zip(rows, tokens):
            row.tokens.append(token)
        if self.done:
            for row in self.rows:
                row.finish_reason = "stop"
        elif self.draw is None:
            done = self.state.prompts_done()
            for row in rows:
                if done[row.index // self.config.num_beams]:
                    row.finish_reason = "stop"
        return []

    def cancelled_with(self, row: Row) -> list[Row]:
        return self.rows  # the beams of a search leave together

    def output(self) -> torch.Tensor:
        return self.state.output(self.config.num_return_sequences)


def _attach_logprobs(events: list[Event], log_probs: torch.Tensor, tokens: torch.Tensor,
                     top: int) -> None:
    """Each event's token's log-prob from its row of `log_probs` (B, V), and the `top` best."""
    chosen = log_probs.gather(1, tokens[:, None].to(log_probs.device))[:, 0].tolist()
    best = log_probs.topk(min(top, log_probs.shape[-1]), dim=-1) if top else None
    for i, event in enumerate(events):
        event.logprob = chosen[i]
        event.top_logprobs = ([] if best is None else
                              list(zip(best.indices[i].tolist(), best.values[i].tolist())))


class Engine:
    """Rows of any prompts and knobs, decoded together; see the module's docstring.

    `max_rows` is the most rows that run at once (rows added beyond it wait for a free slot),
    `max_len` the most tokens of one row, prompt included (default: the model's context
    window). `cpu_kernels=False` keeps the CPU speed layer off (lmlab/kernels/__init__.py has
    the rule by which it applies). An encoder–decoder's `source_len` is the longest source a
    row will hold (default: the model's own bound).
    """

    def __init__(self, model, *, max_rows: int, max_len: int | None = None, tokenizer=None,
                 cpu_kernels: bool = True, source_len: int | None = None):
        check_decoder(model)
        if max_len is None:
            max_len = model.context_window
        if not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be a positive integer, got {max_rows!r}")
        if max_len is None or max_len < 1:
            raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
        self.model, self.tokenizer = model, tokenizer
        self.max_rows, self.max_len = max_rows, max_len
        self.runner = ModelRunner(model, rows=max_rows, max_len=max_len, cpu_kernels=cpu_kernels,
                                  source_len=source_len)
        self.device = self.runner.device
        self.running: list[Row] = []  # in slot order: row i is in cache row i
        self.waiting: list[_Group] = []
        self._lock = threading.RLock()

    # -- adding and removing rows ----------------------------------------------------------------
    def add(self, input_ids: torch.Tensor | list[int], config: GenerationConfig, *,
            attention_mask: torch.Tensor | None = None, stream_text: bool = False,
            source_ids: torch.Tensor | None = None,
            source_mask: torch.Tensor | None = None,
            logprobs: int | None = None) -> list[Row]:
        """Queue a prompt (1-D, or (B, P) with `attention_mask` marking left padding) to decode
        with `config`; it joins the running batch at the next step. Returns its rows in order
        (for num_return_sequences > 1 with sampling, each prompt's samples follow each other;
        for beam search, every beam of every prompt). Lengths are checked here, before any
        work. `stream_text` gives each row's events their decoded text (needs the engine's
        tokenizer); `logprobs` (k >= 0) gives them each token's log-probability and the k most
        likely tokens' (see Event). An encoder–decoder takes one source per prompt (`source_ids`, with
        `source_mask` for padding), which its `encode` reads when the group joins; the prompt is
        then the decoder's start."""
        input_ids, attention_mask = self._tensors(input_ids, attention_mask,
                                                  ("input_ids", "attention_mask"))
        source = None
        if source_ids is not None:
            if not callable(getattr(self.model, "encode", None)):
                raise TypeError(f"source_ids given, but the model ({type(self.model).__name__}) "
                                "has no encode(): it is not an encoder–decoder")
            source = self._tensors(source_ids, source_mask, ("source_ids", "source_mask"))
            if len(source[0]) != len(input_ids):
                raise ValueError(f"{len(source[0])} sources for {len(input_ids)} prompts")
        if (config.stop_strings or stream_text) and self.tokenizer is None:
            what = "stop_strings" if config.stop_strings else "streamed text"
            raise ValueError(f"{what} needs the tokenizer: Engine(..., tokenizer=tok) or "
                             "generate(..., tokenizer=tok)")
        budget = config.budget(input_ids.shape[1], model=self.model)
        if input_ids.shape[1] + budget > self.max_len:
            raise ValueError(f"prompt ({input_ids.shape[1]} tokens) + {budget} new tokens "
                             f"exceeds this engine's max_len of {self.max_len}")
        group = self._group(input_ids, attention_mask, config, budget, source, stream_text)
        if logprobs is not None:
            if not isinstance(logprobs, int) or logprobs < 0:
                raise ValueError(f"logprobs must be an integer >= 0, got {logprobs!r}")
            if config.num_beams > 1:
                raise ValueError("log-probs are per streamed token: not with beam search")
            group.logprobs = logprobs
        if len(group.rows) > self.max_rows:
            raise ValueError(f"{len(group.rows)} rows (prompts × beams or samples) exceed this "
                             f"engine's max_rows of {self.max_rows}")
        with self._lock:
            if budget == 0:
                for row in group.rows:
                    row.finish_reason = "length"
                group.done = True
            else:
                self.waiting.append(group)
        return group.rows

    def _tensors(self, ids, mask, names: tuple[str, str]):
        """`ids` as a (B, T) long tensor on the model's device, and its checked mask."""
        name, mask_name = names
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"{name} must be a non-empty (batch, length) tensor, got shape "
                             f"{tuple(ids.shape)}")
        if mask is not None:
            if mask.shape != ids.shape:
                raise ValueError(f"{mask_name} must have the shape of {name} "
                                 f"{tuple(ids.shape)}, got {tuple(mask.shape)}")
            mask = mask.to(self.device)
        return ids.to(self.device), mask

    def _group(self, input_ids, attention_mask, config, budget, source, stream_text) -> _Group:
        if config.num_beams > 1:
            if config.stop_strings:
                raise ValueError("stop_strings are not supported with beam search yet; drop "
                                 "stop_strings or use num_beams=1")
            if stream_text:
                raise ValueError("beam search's tokens are final only at its end: it cannot "
                                 "stream text")
            return _BeamGroup(input_ids, attention_mask, config, budget, device=self.device,
                              source=source)
        n = config.num_return_sequences
        if n > 1:  # sampled: each prompt (and its source) repeated, as transformers does
            repeat = lambda t: None if t is None else t.repeat_interleave(n, dim=0)  # noqa: E731
            input_ids, attention_mask = repeat(input_ids), repeat(attention_mask)
            source = None if source is None else (repeat(source[0]), repeat(source[1]))
        return _SamplingGroup(input_ids, attention_mask, config, budget, device=self.device,
                              tokenizer=self.tokenizer, stream_text=stream_text, source=source)

    def cancel(self, row: Row) -> None:
        """Stop decoding `row` (a client that went away): it leaves at the next step. A beam
        search's rows leave together."""
        with self._lock:
            for r in row.group.cancelled_with(row):
                if not r.finished:
                    r.finish_reason = "cancelled"
            if all(r.finished for r in row.group.rows):
                row.group.done = True
            self.waiting = [g for g in self.waiting if not g.done]

    @property
    def busy(self) -> bool:
        """Whether any row is still to decode, running or waiting."""
        return bool(self.waiting) or any(not row.finished for row in self.running)

    # -- one step --------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """One token for every running row, and the first for the rows that join now; rows
        that finish (or were cancelled) leave the batch."""
        with self._lock, torch.inference_mode():
            self._retire()  # rows cancelled since the last step
            continuing = len(self.running)
            joining = self._admit()
            if not self.running:
                return []
            scores = []
            if continuing:
                last = torch.tensor([[row.tokens[-1]] for row in self.running[:continuing]],
                                    device=self.device)
                scores.append(self.runner.forward(last)[:, -1])
            for group in joining:
                scores.append(self._prefill(group))
            scores = torch.cat(scores) if len(scores) > 1 else scores[0]
            events = []
            for group, rows in self._running_groups():
                slots = [row.slot for row in rows]
                in_order = slots == list(range(slots[0], slots[-1] + 1))
                mine = (scores[slots[0]:slots[-1] + 1] if in_order
                        else scores[torch.tensor(slots, device=scores.device)])
                # Before choose: processors may change the scores in place.
                log_probs = (None if group.logprobs is None
                             else torch.log_softmax(mine.float(), dim=-1))
                tokens, source = group.choose(rows, mine)
                if source is not None:  # beams continue other beams: copy their cache rows
                    moves = [(rows[i].slot, slot) for i, slot in zip(source, slots)
                             if rows[i].slot != slot]
                    if moves and group.source is None:
                        self.runner.cache.copy_rows(*zip(*moves))
                    elif moves:  # the beams of one prompt share its source: not the extras
                        self.runner.cache.copy_rows(*zip(*moves), extras=False)
                new = group.record(rows, tokens.tolist())
                if log_probs is not None:
                    _attach_logprobs(new, log_probs, tokens, group.logprobs)
                events.extend(new)
            self._retire()
            return events

    def _running_groups(self) -> list[tuple[_Group, list[Row]]]:
        """Each group with its running rows in the group's own order (closing gaps moves rows
        between cache rows, so slot order is not theirs: beam search needs its beams in
        order)."""
        groups: dict[int, tuple[_Group, list[Row]]] = {}
        for row in self.running:
            groups.setdefault(id(row.group), (row.group, []))[1].append(row)
        for _, rows in groups.values():
            rows.sort(key=lambda row: row.index)
        return list(groups.values())

    def _admit(self) -> list[_Group]:
        """Move the waiting groups that fit into free cache rows (in order of arrival)."""
        joining = []
        while self.waiting and len(self.running) + len(self.waiting[0].rows) <= self.max_rows:
            group = self.waiting.pop(0)
            first = len(self.running)
            self.runner.cache.reset(list(range(first, first + len(group.rows))))
            for i, row in enumerate(group.rows):
                row.slot = first + i
            self.running.extend(group.rows)
            joining.append(group)
        return joining

    def _prefill(self, group: _Group) -> torch.Tensor:
        """Run a group's prompts through the model (filling its cache rows); the last
        position's scores of each of its rows."""
        first = group.rows[0].slot
        if group.source is not None:
            self.runner.encode(*group.source, start=first)
        logits = self.runner.forward(group.input_ids, start=first,
                                     attention_mask=group.attention_mask, last_only=True)[:, -1]
        expand = group.expand()
        if expand is not None:
            self.runner.cache.copy_rows([first + i for i in expand],
                                        [first + i for i in range(len(expand))])
            logits = logits[torch.tensor(expand, device=logits.device)]
        return logits

    def _retire(self) -> None:
        """Drop finished rows, and close the gaps they leave with rows from the end (copying
        their cache rows), so the running rows stay in cache rows 0 .. n - 1."""
        if not any(row.finished for row in self.running):
            return
        alive = [row for row in self.running if not row.finished]
        holes = [i for i, row in enumerate(self.running[:len(alive)]) if row.finished]
        movers = [row for row in self.running[len(alive):] if not row.finished]
        if movers:
            self.runner.cache.copy_rows([row.slot for row in movers], holes)
            for row, slot in zip(movers, holes):
                row.slot = slot
        for row in self.running:
            if row.finished:
                row.slot = -1
        self.running = sorted(alive, key=lambda row: row.slot)

    # -- running to the end ------------------------------------------------------------------------
    def run(self) -> None:
        """Step until every row has finished."""
        while self.busy:
            self.step()
