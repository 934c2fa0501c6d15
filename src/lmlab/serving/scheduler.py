"""Continuous batching: one thread owns the decoding engine; requests join and leave between steps.

HTTP handlers (on the asyncio loop) `submit` jobs — one prompt each, decoded as `n` rows that
share one config — into a bounded queue (full: `QueueFull`, a 429). The engine's thread moves
queued jobs into the engine while the running rows stay under `max_running`, runs one step (a
token for every running row, the first for the rows that join), and hands each job its rows'
events. A job whose client went away is `cancel`led: its rows leave the batch at the next step
(`Engine.cancel`), freeing their cache rows for the queue. Nothing but this thread touches the
engine, so no HTTP handler ever waits for a step.

Every row keeps its own processors and generator in the engine (seed + 1,000,003 · row), so a
seeded or greedy job decodes the same tokens alone or among any others — and the same as
`lmlab.generate` offline on that prompt with those knobs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from lmlab.generation import Engine, GenerationConfig
from lmlab.serving.metrics import Metrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue of waiting jobs is at its bound."""


@dataclass
class Token:
    """One row's token from one step, as the HTTP layer reads it: `choice` is the row's place
    in the response; `text` the text it completed (plus, on its last token, what the stream
    decoder still held); `finish_reason` on its last token ("stop", "length")."""

    choice: int
    token: int
    text: str
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass(eq=False)
class Job:
    """One prompt decoded as `n` rows with one config. Its tokens go to `out` (an asyncio
    queue of lists of Token, one list per step; an Exception when decoding failed) on `loop`;
    its rows are choices `first_choice` .. `first_choice + n - 1` of its response."""

    ids: list[int]
    n: int
    config: GenerationConfig
    out: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    first_choice: int = 0
    logprobs: int | None = None
    rows: list = field(default_factory=list)  # the engine's rows, once admitted
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)
    last_token: float | None = None
    finished_rows: int = 0

    def deliver(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


class EngineLoop:
    """The engine's thread: see the module's docstring."""

    def __init__(self, model, tokenizer, *, max_running: int, max_queue: int,
                 metrics: Metrics, max_len: int | None = None):
        if max_running < 1 or max_queue < 0:
            raise ValueError(f"max_running must be >= 1 and max_queue >= 0, got {max_running}, "
                             f"{max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.max_running, self.max_queue = max_running, max_queue
        self.max_len = max_len or model.context_window
        self.metrics = metrics
        self.engine = self._new_engine()
        self.queue: deque[Job] = deque()
        self.active: dict[int, Job] = {}  # id(engine group) -> job
        self.rows_in_use = 0
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="lmlab-engine", daemon=True)
        metrics.gauges["lmlab_queue_length"] = ("Jobs (prompt × n rows) waiting for rows.",
                                                lambda: len(self.queue))
        metrics.gauges["lmlab_running_rows"] = ("Rows being decoded now.",
                                                lambda: self.rows_in_use)

    def _new_engine(self) -> Engine:
        return Engine(self.model, max_rows=self.max_running, max_len=self.max_len,
                      tokenizer=self.tokenizer)

    # -- called from the HTTP handlers ------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def submit(self, jobs: list[Job]) -> None:
        """Queue a request's jobs, all or none: QueueFull when they do not fit the bound."""
        with self._wake:
            if len(self.queue) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self.queue)} requests are waiting (the bound is "
                                f"{self.max_queue}); retry later")
            self.queue.extend(jobs)
            self._wake.notify()

    def cancel(self, jobs: list[Job]) -> None:
        """The client went away: the jobs' rows leave the batch at the next step."""
        with self._wake:
            for job in jobs:
                job.cancelled = True
            self._wake.notify()

    # -- the engine's thread ------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self._stopping and not self._work():
                    self._wake.wait()
                if self._stopping:
                    return
                self._drop_cancelled()
                self._admit()
            if not self.engine.busy:
                continue
            try:
                events = self.engine.step()
            except Exception as error:  # a bug, not a client's mistake: fail its jobs, go on
                log.exception("decoding step failed; failing the running requests")
                self._fail_all(error)
                continue
            self._dispatch(events)

    def _work(self) -> bool:
        return (bool(self.queue) or self.engine.busy
                or any(job.cancelled for job in self.active.values()))

    def _drop_cancelled(self) -> None:
        for job in [job for job in self.queue if job.cancelled]:
            self.queue.remove(job)
        for key, job in list(self.active.items()):
            if job.cancelled:
                rows = [row for row in job.rows if not row.finished]
                for row in rows:
                    self.engine.cancel(row)
                self.metrics.cancelled(len(rows))
                self._release(key, job)

    def _admit(self) -> None:
        """Queued jobs into the engine, in order of arrival, while their rows fit."""
        while self.queue and self.rows_in_use + self.queue[0].n <= self.max_running:
            job = self.queue.popleft()
            ids = torch.tensor([job.ids] * job.n, dtype=torch.long)
            try:
                job.rows = self.engine.add(ids, job.config, stream_text=True,
                                           logprobs=job.logprobs)
            except ValueError as error:  # checked by the HTTP layer before; say so if not
                job.deliver(error)
                continue
            self.rows_in_use += job.n
            self.active[id(job.rows[0].group)] = job

    def _release(self, key: int, job: Job) -> None:
        del self.active[key]
        self.rows_in_use -= job.n

    def _dispatch(self, events) -> None:
        now = time.perf_counter()
        by_job: dict[int, list[Token]] = {}
        for event in events:
            row = event.row
            job = self.active.get(id(row.group))
            if job is None:
                continue
            text = event.text
            if event.finish_reason is not None:
                text += row.text.flush()
                job.finished_rows += 1
            by_job.setdefault(id(row.group), []).append(Token(
                choice=job.first_choice + row.index, token=event.token, text=text,
                finish_reason=event.finish_reason, logprob=event.logprob,
                top_logprobs=event.top_logprobs))
        for key, tokens in by_job.items():
            job = self.active[key]
            if job.last_token is None:
                self.metrics.first_token(now - job.arrived)
            else:
                self.metrics.token_interval(now - job.last_token)
            job.last_token = now
            self.metrics.tokens(generated=len(tokens))
            job.deliver(tokens)
            if job.finished_rows == job.n:
                self._release(key, job)

    def _fail_all(self, error: Exception) -> None:
        with self._wake:
            for key, job in list(self.active.items()):
                job.deliver(error)
                self._release(key, job)
            self.engine = self._new_engine()
