"""Decoding speed: lmlab.generate against transformers.generate, same weights, same prompts.

Two shapes with random weights: (a) the 6-layer, width-384, vocab-8192 GPT, (b) a GPT-2-124M
shape (12 × 768, vocab 50257). Rows: greedy batch 1, 16 and 64 (32-token prompts, 128 new
tokens), beam 5 with no_repeat_ngram_size 2 and early_stopping, and top-k 50 / top-p 0.95 /
temperature 0.8 sampling. EOS is disabled so every call produces exactly 128 tokens per row.
Calls alternate A/B in one process; medians. Greedy and beam outputs are checked token-identical
before timing. For every greedy row the machine's bound per step is printed: max(weight bytes
/ measured memory bandwidth, batch × FLOPs per token / measured matmul peak) — the weights are
read once per step whatever the batch, the arithmetic grows with it.

    python benchmarks/generate_speed.py [--rounds 3] [--shapes small,124m] [--write]
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import date

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import (  # noqa: E402
    alternate, machine, matmul_peak_gflops, median, memory_bandwidth_gbs, update_section,
)

import lmlab
from lmlab.models.gpt import GPT, GPTConfig  # noqa: E402
from lmlab.models.hf import gpt2_state_dict_from_hf  # noqa: E402

SHAPES = {
    "small": dict(n_layer=6, n_head=6, n_embd=384, n_positions=256, vocab_size=8192),
    "124m": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257),
}
PROMPT, NEW = 32, 128
ROWS = {
    "greedy, batch 1": (1, dict()),
    "greedy, batch 16": (16, dict()),
    "greedy, batch 64": (64, dict()),
    "beam 5, no_repeat_ngram 2, early_stopping": (1, dict(num_beams=5, no_repeat_ngram_size=2,
                                                         early_stopping=True)),
    "sampling top-k 50, top-p 0.95, T 0.8": (1, dict(do_sample=True, top_k=50, top_p=0.95,
                                                    temperature=0.8)),
}


def build(shape):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**shape, bos_token_id=0, eos_token_id=0)).eval()
    ours = GPT(GPTConfig(**shape)).eval()
    state = gpt2_state_dict_from_hf(hf.state_dict(), "hf")
    state.pop("lm_head.weight", None)
    ours.load_state_dict(state, strict=False)
    return hf, ours


def bench_shape(name, shape, rounds):
    hf, ours = build(shape)
    g = torch.Generator().manual_seed(1)
    results = []
    for row, (batch, knobs) in ROWS.items():
        ids = torch.randint(0, shape["vocab_size"], (batch, PROMPT), generator=g)
        common = dict(max_new_tokens=NEW)

        def run_hf():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), eos_token_id=None,
                               pad_token_id=0, **common, **knobs,
                               **({} if knobs.get("do_sample") else {"do_sample": False}))

        def run_ours():
            return lmlab.generate(ours, ids, eos_token_id=[], pad_token_id=0, **common, **knobs)

        if not knobs.get("do_sample"):
            with torch.inference_mode():
                a, b = run_hf(), run_ours()
            assert torch.equal(a, b), f"{name} {row}: lmlab and transformers outputs differ"
        times = alternate({"transformers": run_hf, "lmlab": run_ours}, rounds=rounds, warmup=1)
        tokens = batch * NEW
        hf_tps, our_tps = tokens / median(times["transformers"]), tokens / median(times["lmlab"])
        results.append((row, batch, hf_tps, our_tps))
        print(f"{name:6s} {row:45s} transformers {hf_tps:8.1f} tok/s  lmlab {our_tps:8.1f} tok/s"
              f"  ×{our_tps / hf_tps:.2f}", flush=True)
    return ours, results


def bench_speculative(shape, rounds, draft_layers: int = 2, k: int = 4):
    """Greedy batch 1 with and without a draft made of the target's own first layers
    (self-speculative decoding: a good draft by construction, no second training run)."""
    _, target = build(shape)
    draft = GPT(GPTConfig(**{**shape, "n_layer": draft_layers})).eval()
    state = {k_: v for k_, v in target.state_dict().items()
             if not k_.startswith("h.") or int(k_.split(".")[1]) < draft_layers}
    draft.load_state_dict(state)
    ids = torch.randint(0, shape["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(2))
    stats: dict = {}
    plain = lambda: lmlab.generate(target, ids, max_new_tokens=NEW, eos_token_id=[])
    spec = lambda: lmlab.generate(target, ids, max_new_tokens=NEW, eos_token_id=[], draft_model=draft,
                                   num_draft_tokens=k, stats=stats)
    assert torch.equal(plain(), spec()), "speculative greedy must equal plain greedy"
    times = alternate({"plain": plain, "speculative": spec}, rounds=rounds, warmup=1)
    return NEW / median(times["plain"]), NEW / median(times["speculative"]), stats["acceptance_rate"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shapes", default="small,124m")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    bandwidth, peak = memory_bandwidth_gbs(), matmul_peak_gflops()
    lines = [
        f"Decoding, random weights, {PROMPT}-token prompts, {NEW} new tokens per row (EOS off), "
        f"fp32; median of {args.rounds} alternating calls; {machine()}; measured "
        f"{date.today().isoformat()}; memory bandwidth measured {bandwidth:.1f} GB/s, matmul peak "
        f"{peak:.0f} GFLOP/s.", "",
        "| model | row | transformers tok/s | lmlab tok/s | lmlab / transformers |",
        "|---|---|---:|---:|---:|",
    ]
    notes = []
    for name in args.shapes.split(","):
        ours, results = bench_shape(name, SHAPES[name], args.rounds)
        for row, _, hf_tps, our_tps in results:
            lines.append(f"| {name} | {row} | {hf_tps:,.1f} | {our_tps:,.1f} | **{our_tps / hf_tps:.2f}×** |")
        # The bound of one greedy step: every weight read once (the position table only one
        # row), or the batch's FLOPs at the matmul peak, whichever is slower.
        n = ours.num_parameters() - ours.wpe.weight.numel()
        bytes_bound = n * 4 / (bandwidth * 1e9)
        for row, batch, _, our_tps in results:
            if not row.startswith("greedy"):
                continue
            flops_bound = batch * 2 * n / (peak * 1e9)
            bound = max(bytes_bound, flops_bound)
            ms = 1000 * batch / our_tps
            notes.append(f"- {name}, {row}: {ms:.2f} ms per step; bound {bound * 1000:.2f} ms "
                         f"(weights {n * 4 / 1e6:.0f} MB / {bandwidth:.1f} GB/s = "
                         f"{bytes_bound * 1000:.2f} ms; {batch} × {2 * n / 1e9:.2f} GFLOP / "
                         f"{peak:.0f} GFLOP/s = {flops_bound * 1000:.2f} ms): "
                         f"**{ms / (bound * 1000):.2f}× the bound**")
    if "small" in args.shapes.split(","):
        plain, spec, rate = bench_speculative(SHAPES["small"], args.rounds)
        notes.append(f"- speculative decoding, small model, greedy batch 1, draft = the target's first 2 "
                     f"of 6 layers, 4 draft tokens per round: {plain:.1f} → {spec:.1f} tok/s "
                     f"(**{spec / plain:.2f}×**), acceptance rate {rate:.0%}; output identical to "
                     "plain greedy")
    report = "\n".join(lines + [""] + notes + ["", "Reproduce: `python benchmarks/generate_speed.py --write`"])
    print(report)
    if args.write:
        update_section("generate_speed", report)


if __name__ == "__main__":
    main()
