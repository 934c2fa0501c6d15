"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM (what schedulers and preemptible machines
send before they kill a job).

While the loop trains, the first such signal only sets a flag; at the next step boundary the loop
writes the same checkpoint a regular save writes, so `--resume` continues bit for bit, and stops
by raising `lmlab.errors.Interrupted` (the CLI exits with 128 + the signal's number). A second
signal aborts at once (KeyboardInterrupt). The handlers are installed only while the loop trains,
only in the main thread (where Python delivers signals), and the previous ones come back after.

Under torchrun every rank must stop at the same step, or the collectives of the next step would
hang: at each step boundary the ranks sum their flags (one all-reduce of two numbers — small
beside a step's gradient reduction), so a signal that reaches any rank stops them all.
"""

from __future__ import annotations

import signal
import threading

import torch

from lmlab.training.distributed import Distributed

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """`install()` before the first step, `requested()` at each step boundary (every rank gets
    the same answer), `restore()` after the last step and on every way out (it is idempotent).
    `agreed` is the signal the run stops for."""

    def __init__(self, dist: Distributed, device: torch.device):
        self.dist, self.device = dist, device
        self.signum: int | None = None  # the first signal this process received
        self.agreed: int | None = None  # the signal every rank stops for
        self.previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread() and not self.previous:
            for sig in SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # the second one: abort now, without the checkpoint
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self) -> bool:
        """Whether to stop at this step boundary (collective under torchrun)."""
        if self.agreed is not None:
            return True
        if not self.dist.active:
            self.agreed = self.signum
            return self.agreed is not None
        flags = torch.tensor([self.signum == sig for sig in SIGNALS], dtype=torch.int64,
                             device=self.device)
        flags = self.dist.all_reduce_sum(flags).tolist()
        if any(flags):
            # A rank that was not signalled stops for the signal another rank received.
            self.agreed = self.signum or SIGNALS[flags.index(max(flags))]
        return self.agreed is not None
