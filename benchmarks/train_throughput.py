"""Training-step throughput: lmlab's GPT, eager and under torch.compile, against
transformers.GPT2LMHeadModel.

Same config (6 layers, 6 heads, width 384, context 256, vocab 8192), same weights, same batches
(8 × 256), AdamW + gradient clipping, fp32, one process, steps alternated A/B/C. Each side uses
its usual stack: transformers' model with torch's default AdamW (what the Trainer uses), lmlab's
model with lmlab's task loss, optimizer and clipping as the loop sets them up for one
process (FlatAdamW: fused AdamW over the flat parameter layout); "lmlab compiled" is the same
with the forward under `torch.compile` (what `compile: true` does in the loop). Reports tokens/s, the
ratios, and model FLOPs utilisation against the matmul peak that training measures
(lmlab.training.perf.matmul_peak_flops).

    python benchmarks/train_throughput.py [--rounds 8] [--no-compile] [--write]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from datetime import date

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import alternate, machine, matmul_peak_gflops, median, update_section  # noqa: E402

from lmlab import kernels  # noqa: E402
from lmlab.models.gpt import GPT, GPTConfig  # noqa: E402
from lmlab.models.hf import gpt2_state_dict_from_hf  # noqa: E402
from lmlab.tasks.causal_lm import CausalLMTask  # noqa: E402
from lmlab.training.optim import build_optimizer, clip_grad_norm_  # noqa: E402

SHAPE = dict(n_layer=6, n_head=6, n_embd=384, n_positions=256, vocab_size=8192)
BATCH, SEQ = 8, 256


def build_pair():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**SHAPE, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                    bos_token_id=0, eos_token_id=0)).train()
    ours = GPT(GPTConfig(**SHAPE)).train()
    state = gpt2_state_dict_from_hf(hf.state_dict(), "hf")
    state.pop("lm_head.weight", None)
    ours.load_state_dict(state, strict=False)
    return hf, ours


def lmlab_step(model: GPT, batch: dict[str, torch.Tensor], *, compile: bool):
    """One optimizer step of lmlab's stack on its own copy of the model, set up as the causal-LM
    recipe and the training loop set up a single process: the CPU speed layer where it applies
    (the C training step, FlatAdamW over the flat parameter layout, clipping through it)."""
    runnable = torch.compile(model) if compile else model
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.999))
    params = [p for p in model.parameters() if p.requires_grad]
    task = CausalLMTask(train_tokens=None, val_tokens=None, block_size=SEQ, batch_size=BATCH,
                        seed=0, device=torch.device("cpu"),
                        fast_loss=kernels.training_loss_adapter(model))
    n_targets = batch["labels"].numel()

    def step():
        loss = task.loss(runnable, batch) / n_targets
        loss.backward()
        clip_grad_norm_(params, 1.0, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled contender")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()

    hf, ours = build_pair()
    x = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    inputs, labels = x[:, :-1], x[:, 1:]
    batch = {"input_ids": inputs, "labels": labels}
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.1)

    def hf_step():
        loss = hf(input_ids=inputs, labels=inputs).loss  # HF shifts labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    # Same weights, same batch: the models compute the same function.
    with torch.no_grad():
        torch.testing.assert_close(ours(inputs), hf(input_ids=inputs).logits, atol=1e-4, rtol=0)
    steps = {"transformers": hf_step, "lmlab eager": lmlab_step(ours, batch, compile=False)}
    compile_seconds = None
    if not args.no_compile:
        compiled = copy.deepcopy(ours)
        with torch.no_grad():
            torch.testing.assert_close(torch.compile(compiled)(inputs), ours(inputs), atol=1e-4,
                                       rtol=0)
        steps["lmlab compiled"] = lmlab_step(compiled, batch, compile=True)
        t0 = time.perf_counter()
        steps["lmlab compiled"]()  # compilation of forward and backward
        compile_seconds = time.perf_counter() - t0

    peak = matmul_peak_gflops()
    times = alternate(steps, rounds=args.rounds)
    tokens = BATCH * SEQ
    flops_per_token = ours.flops_per_token(SEQ)
    rows = []
    for name in steps:
        tps = tokens / median(times[name])
        rows.append((name, tps, tps * flops_per_token / (peak * 1e9)))
    base = rows[0][1]
    lines = [
        f"Training step, GPT {SHAPE['n_layer']}×{SHAPE['n_embd']} (vocab {SHAPE['vocab_size']}, "
        f"{ours.num_parameters() / 1e6:.1f}M parameters), batch {BATCH}×{SEQ}, fp32, AdamW + "
        f"clipping. Median of {args.rounds} alternating steps; {machine()}; measured "
        f"{date.today().isoformat()}; matmul peak measured {peak:.0f} GFLOP/s "
        f"(lmlab.training.perf.matmul_peak_flops, 2048³ fp32); "
        f"{flops_per_token / 1e6:.1f} MFLOP per token (6N + 12·L·d·T).",
        "",
        "| | tokens/s | MFU | / transformers |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {name} | {tps:,.0f} | {mfu:.0%} | {tps / base:.2f}× |" for name, tps, mfu in rows]
    if compile_seconds is not None:
        eager, compiled_tps = rows[1][1], rows[2][1]
        lines += ["", f"torch.compile: first step (compilation) {compile_seconds:.0f} s; "
                  f"then compiled / eager **{compiled_tps / eager:.2f}×**."]
    lines += ["", "Reproduce: `python benchmarks/train_throughput.py --write`"]
    report = "\n".join(lines)
    print(report)
    if args.write:
        update_section("train_throughput", report)


if __name__ == "__main__":
    main()
