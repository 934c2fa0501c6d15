"""Training-step throughput: lmlab's GPT against transformers.GPT2LMHeadModel.

Same config (6 layers, 6 heads, width 384, context 256, vocab 8192), same weights, same batches
(8 × 256), AdamW + gradient clipping, fp32, one process, steps alternated A/B. Each side uses its
usual stack: transformers' model with torch's default AdamW (what the Trainer uses), lmlab's model
with lmlab's task loss and optimizer (fused AdamW). Reports tokens/s, the ratio, and model FLOPs
utilisation against the matmul peak measured here.

    python benchmarks/train_throughput.py [--rounds 8] [--write]
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import date

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import alternate, machine, matmul_peak_gflops, median, update_section  # noqa: E402

from lmlab.models.gpt import GPT, GPTConfig  # noqa: E402
from lmlab.models.hf import gpt2_state_dict_from_hf  # noqa: E402
from lmlab.tasks.causal_lm import CausalLMTask  # noqa: E402
from lmlab.training.optim import build_optimizer  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()

    hf, ours = build_pair()
    x = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    inputs, labels = x[:, :-1], x[:, 1:]
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.1)
    our_opt = build_optimizer(ours, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.999))
    task = CausalLMTask(train_tokens=None, val_tokens=None, block_size=SEQ, batch_size=BATCH,
                        seed=0, device=torch.device("cpu"))
    batch = {"input_ids": inputs, "labels": labels}

    def hf_step():
        loss = hf(input_ids=inputs, labels=inputs).loss  # HF shifts labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    def our_step():
        loss = task.loss(ours, batch) / labels.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
        our_opt.step()
        our_opt.zero_grad(set_to_none=True)

    # Same weights, same batch: the two models compute the same function.
    with torch.no_grad():
        torch.testing.assert_close(ours(inputs), hf(input_ids=inputs).logits, atol=1e-4, rtol=0)

    peak = matmul_peak_gflops()
    times = alternate({"transformers": hf_step, "lmlab": our_step}, rounds=args.rounds)
    tokens = BATCH * SEQ
    flops_per_token = ours.flops_per_token(SEQ)
    rows = []
    for name in ("transformers", "lmlab"):
        tps = tokens / median(times[name])
        mfu = tps * flops_per_token / (peak * 1e9)
        rows.append((name, tps, mfu))
    ratio = rows[1][1] / rows[0][1]
    lines = [
        f"Training step, GPT {SHAPE['n_layer']}×{SHAPE['n_embd']} (vocab {SHAPE['vocab_size']}, "
        f"{ours.num_parameters() / 1e6:.1f}M parameters), batch {BATCH}×{SEQ}, fp32, AdamW + "
        f"clipping. Median of {args.rounds} alternating steps; {machine()}; measured "
        f"{date.today().isoformat()}; matmul peak measured {peak:.0f} GFLOP/s; "
        f"{flops_per_token / 1e6:.1f} MFLOP per token (6N + 12·L·d·T).",
        "",
        "| | tokens/s | MFU |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {tps:,.0f} | {mfu:.0%} |" for name, tps, mfu in rows]
    lines += ["", f"**lmlab / transformers: {ratio:.2f}×**",
              "", "Reproduce: `python benchmarks/train_throughput.py --write`"]
    report = "\n".join(lines)
    print(report)
    if args.write:
        update_section("train_throughput", report)


if __name__ == "__main__":
    main()
