"""Serving throughput: `lmlab serve` (continuous batching) against lmlab one request at a time
and against `transformers serve`, same weights, same requests.

Each server runs as a subprocess on a free loopback port; the clients are asyncio tasks in this
process. At each concurrency c, c clients send streamed /v1/completions requests back to back
(greedy, fixed prompts, a fixed max_tokens) until --requests have been answered. Reported:
requests/s, output tokens/s (from each response's usage), p50/p99 time to first token (the
first chunk with text) and p50/p99 time per output token ((latency - TTFT) / (tokens - 1),
vLLM's TPOT). Servers alternate within every round (all are up for the whole run, idle while
another is measured); every figure is the median over --rounds.

Contenders:
  lmlab       `lmlab serve --max-running <max(clients)>`: every client's row in one batch
  lmlab-1     `lmlab serve --max-running 1`: one request at a time (the engine, no batching)
  transformers  `transformers serve MODEL --continuous-batching --device cpu` (its paged-attention
              continuous batching runs on CPU; --transformers-mode default uses its sequential
              `generate` per request instead)

The model is --model (a GPT directory lmlab saves, which is also a transformers checkpoint), by
default a random 6-layer, width-384, 8192-vocabulary, 256-position GPT with a byte-level BPE
trained on AG News, built and saved first.

    python benchmarks/serve_throughput.py [--model DIR] [--clients 1,4,16,64] [--requests 64]
        [--max-tokens 64] [--rounds 3] [--servers lmlab,lmlab-1,transformers] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, median, update_section

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ag_news"
SHAPE = {"n_layer": 6, "n_head": 6, "n_embd": 384, "n_positions": 256, "vocab_size": 8192}
PROMPTS = [  # fixed; request i sends PROMPTS[i % len(PROMPTS)]
    "The stock market rallied on Tuesday after the central bank said",
    "Scientists in Australia have discovered a new species of",
    "The home team won the championship game last night when",
    "A new software update for the popular smartphone will",
    "Oil prices fell sharply this week as traders worried that",
    "The president met with foreign leaders to discuss the",
    "Researchers say the spacecraft will reach the outer planets by",
    "Shares of the technology company jumped after it reported",
]


# -- the model --------------------------------------------------------------------------------


def build_model(directory: Path) -> Path:
    """A random SHAPE GPT with a byte-level BPE of SHAPE's vocabulary, saved in `directory`."""
    import torch

    from lmlab.models.gpt import GPT, GPTConfig
    from lmlab.tokenizer import Tokenizer

    def texts():
        for name in ("train", "validation", "test"):
            with open(DATA / f"{name}.jsonl") as f:
                for line in f:
                    row = json.loads(line)
                    yield f"{row['title']}. {row['description']}"

    tok = Tokenizer.train_bpe(iterator=texts(), vocab_size=SHAPE["vocab_size"], min_frequency=1)
    if tok.vocab_size != SHAPE["vocab_size"]:
        raise SystemExit(f"the BPE reached {tok.vocab_size} tokens, not {SHAPE['vocab_size']}")
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPE, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model.save_pretrained(directory, tokenizer=tok)
    return directory


# -- the servers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    command: list[str]
    model_id: str  # what requests name in "model"
    port: int
    log: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "wb") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> None:
        import httpx2 as httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.name} exited ({self.process.returncode}); its log "
                                 f"({self.log}):\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            time.sleep(0.5)
        raise SystemExit(f"{self.name} was not ready after {timeout:.0f} s; log: {self.log}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()


def servers(names: list[str], model: Path, *, max_running: int, transformers_mode: str,
            logs: Path) -> list[Server]:
    out = []
    for name in names:
        port = free_port()
        if name in ("lmlab", "lmlab-1"):
            rows = 1 if name == "lmlab-1" else max_running
            command = [sys.executable, "-m", "lmlab", "serve", "--model", str(model),
                       "--model-name", "bench", "--port", str(port),
                       "--max-running", str(rows), "--max-queue", "1024"]
            out.append(Server(name, command, "bench", port, logs / f"{name}.log"))
        elif name == "transformers":
            cli = shutil.which("transformers", path=os.path.dirname(sys.executable))
            if cli is None:
                raise SystemExit("transformers serve: no `transformers` command beside "
                                 f"{sys.executable}")
            command = [cli, "serve", str(model), "--device", "cpu", "--host", "127.0.0.1",
                       "--port", str(port), "--log-level", "error"]
            if transformers_mode == "cb":
                command.append("--continuous-batching")
            out.append(Server(name, command, str(model), port, logs / f"{name}.log"))
        else:
            raise SystemExit(f"unknown server {name!r}; choose from lmlab, lmlab-1, transformers")
    return out


# -- the clients ------------------------------------------------------------------------------


@dataclass
class Result:
    ttft: float
    latency: float
    tokens: int


async def one_request(client, server: Server, prompt: str, max_tokens: int) -> Result:
    body = {"model": server.model_id, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens = None, None
    async with client.stream("POST", server.url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"{server.name}: {response.status_code} "
                             f"{(await response.aread()).decode()[:500]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and any(c.get("text") for c in chunk.get("choices") or []):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    if tokens is None:
        raise SystemExit(f"{server.name}: a stream without usage")
    return Result(ttft=latency if ttft is None else ttft, latency=latency, tokens=tokens)


async def load(server: Server, *, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` concurrent clients, back to back, until `requests` have been answered."""
    import httpx2 as httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    results: list[Result] = []
    next_request = iter(range(requests))
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker():
            for i in next_request:
                results.append(await one_request(client, server, PROMPTS[i % len(PROMPTS)],
                                                 max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    tpot = [(r.latency - r.ttft) / (r.tokens - 1) for r in results if r.tokens > 1]
    return {"req_s": len(results) / wall, "tok_s": sum(r.tokens for r in results) / wall,
            "ttft_p50": percentile([r.ttft for r in results], 50),
            "ttft_p99": percentile([r.ttft for r in results], 99),
            "tpot_p50": percentile(tpot, 50) if tpot else float("nan"),
            "tpot_p99": percentile(tpot, 99) if tpot else float("nan"),
            "tokens": sum(r.tokens for r in results)}


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile, linearly interpolated (numpy's default)."""
    xs = sorted(xs)
    at = (len(xs) - 1) * q / 100
    low = int(at)
    high = min(low + 1, len(xs) - 1)
    return xs[low] + (xs[high] - xs[low]) * (at - low)


# -- the report -------------------------------------------------------------------------------

KEYS = ("req_s", "tok_s", "ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99")


def report(table: dict, args, names: list[str], model_desc: str, notes: list[str]) -> str:
    lines = [
        (f"Streamed /v1/completions, greedy, {len(PROMPTS)} fixed prompts, max_tokens "
         f"{args.max_tokens}, {args.requests} requests per cell; {model_desc}; servers alternate "
         f"within each of {args.rounds} rounds, medians; clients are asyncio tasks over "
         f"loopback; {machine()}; measured {date.today().isoformat()}."), "",
        ("| clients | server | req/s | output tok/s | TTFT p50 / p99 (ms) "
         "| per-token p50 / p99 (ms) | tok/s vs lmlab-1 | tok/s vs transformers |"),
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for clients in args.clients:
        cell = {name: {k: median([run[k] for run in table[clients][name]]) for k in KEYS}
                for name in names}
        for name, m in cell.items():
            ratios = [f"{m['tok_s'] / cell[other]['tok_s']:.2f}×"
                      if other in cell and other != name else ""
                      for other in ("lmlab-1", "transformers")]
            lines.append(f"| {clients} | {name} | {m['req_s']:.2f} | {m['tok_s']:,.1f} | "
                         f"{m['ttft_p50'] * 1e3:.0f} / {m['ttft_p99'] * 1e3:.0f} | "
                         f"{m['tpot_p50'] * 1e3:.1f} / {m['tpot_p99'] * 1e3:.1f} | "
                         f"{ratios[0]} | {ratios[1]} |")
    command = "python benchmarks/serve_throughput.py --write"
    return "\n".join(lines + [""] + notes + ["", f"Reproduce: `{command}`"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a GPT directory (default: build the random 6×384 GPT)")
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--requests", type=int, default=64, help="requests per cell")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--servers", default="lmlab,lmlab-1,transformers")
    parser.add_argument("--transformers-mode", choices=("cb", "default"), default="cb",
                        help="cb: --continuous-batching (default); default: sequential generate")
    parser.add_argument("--ready-timeout", type=float, default=300)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    names = args.servers.split(",")

    work = Path(tempfile.mkdtemp(prefix="serve_throughput_"))
    if args.model:
        model = Path(args.model)
        config = json.loads((model / "config.json").read_text())
        model_desc = (f"model {model.name} ({config.get('n_layer')} layers, width "
                      f"{config.get('n_embd')}, vocab {config.get('vocab_size')})")
    else:
        model = build_model(work / "model")
        model_desc = ("random GPT, 6 layers, width 384, vocab 8192 (BPE on AG News), 256 "
                      "positions, fp32")
    fleet = servers(names, model, max_running=max(args.clients),
                    transformers_mode=args.transformers_mode, logs=work)
    notes = [(f"- lmlab: `lmlab serve --max-running {max(args.clients)}` (every client's row "
              "in one batch); lmlab-1: `--max-running 1`, one request at a time.")]
    if "transformers" in names:
        mode = ("`--continuous-batching` (its paged-attention continuous batching, which runs "
                "on CPU)" if args.transformers_mode == "cb" else
                "its default mode (one `generate` call per request, in turn)")
        notes.append(f"- transformers: `transformers serve MODEL --device cpu` with {mode}.")
    table: dict = {c: {n: [] for n in names} for c in args.clients}
    try:
        for server in fleet:
            server.start()
        for server in fleet:
            server.wait_ready(args.ready_timeout)
            asyncio.run(load(server, clients=1, requests=2, max_tokens=args.max_tokens))  # warm
        for r in range(args.rounds):
            for clients in args.clients:
                for server in fleet:
                    m = asyncio.run(load(server, clients=clients, requests=args.requests,
                                         max_tokens=args.max_tokens))
                    table[clients][server.name].append(m)
                    print(f"round {r + 1} clients {clients:3d} {server.name:12s} "
                          f"{m['req_s']:7.2f} req/s {m['tok_s']:9.1f} tok/s  TTFT p50 "
                          f"{m['ttft_p50'] * 1e3:7.0f} ms  TPOT p50 {m['tpot_p50'] * 1e3:6.1f} ms"
                          f"  ({m['tokens']} tokens)", flush=True)
    finally:
        for server in fleet:
            server.stop()
    counts = {n: table[args.clients[0]][n][0]["tokens"] for n in names}
    notes.append("- output tokens of the first cell, per server (equal when every server decodes "
                 "the same greedy tokens and stops alike): "
                 f"{', '.join(f'{n} {c}' for n, c in counts.items())}.")
    text = report(table, args, names, model_desc, notes)
    print(text)
    if args.write:
        update_section("serve_throughput", text)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
