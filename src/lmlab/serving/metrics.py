"""The server's counters, gauges and histograms, written in Prometheus' text format (0.0.4).

A few numbers do not justify a dependency: counters and histograms are plain dicts behind one
lock, updated by the HTTP handlers and the engine's thread, read by GET /metrics.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

# Seconds: the buckets of time to first token, and of the time between two tokens of a request.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # observations <= bucket (cumulative when written)
        self.total, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {self.total}")
        out.append(f"{name}_count {self.count}")
        return out


class Metrics:
    """What GET /metrics reports. `gauges` are read when the page is written (queue length and
    running rows come from the engine loop)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}  # (route, status) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.cancelled_rows = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def request(self, route: str, status: int) -> None:
        with self._lock:
            key = (route, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def tokens(self, *, prompt: int = 0, generated: int = 0) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.generation_tokens += generated

    def cancelled(self, rows: int) -> None:
        with self._lock:
            self.cancelled_rows += rows

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def token_interval(self, seconds: float) -> None:
        with self._lock:
            self.tpot.observe(seconds)

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP lmlab_requests_total HTTP requests by route and status.",
                     "# TYPE lmlab_requests_total counter"]
            for (route, status), count in sorted(self.requests.items()):
                lines.append(f'lmlab_requests_total{{route="{route}",status="{status}"}} {count}')
            for name, value, help_text in (
                ("lmlab_prompt_tokens_total", self.prompt_tokens, "Prompt tokens processed."),
                ("lmlab_generation_tokens_total", self.generation_tokens, "Tokens generated."),
                ("lmlab_cancelled_rows_total", self.cancelled_rows,
                 "Rows cancelled because their client went away."),
            ):
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter",
                          f"{name} {value}"]
            for name, (help_text, read) in self.gauges.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge",
                          f"{name} {read()}"]
            for name, histogram, help_text in (
                ("lmlab_time_to_first_token_seconds", self.ttft,
                 "From a request's arrival to its first token."),
                ("lmlab_time_per_output_token_seconds", self.tpot,
                 "Between two consecutive tokens of a request."),
            ):
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
                lines += histogram.lines(name)
        return "\n".join(lines) + "\n"
