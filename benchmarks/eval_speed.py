"""Perplexity evaluation speed: `lmlab eval perplexity`'s sliding windows against the loop of
transformers' perplexity guide, same weights, same tokens, same context and stride.

The model is runs/english_base (a 4 × 256 GPT, BPE vocab 8192, context 256) when it is there,
else a random GPT of that shape with a BPE trained on the slice. It is saved with lmlab's
save_pretrained and loaded by transformers' GPT2LMHeadModel, so both sides hold the same weights.
The corpus is the first --chars characters of WikiText-2 test (../shared/data/wikitext2), joined
as `lmlab eval perplexity` joins documents (EOS after each). transformers runs the guide's loop
(lmlab.evaluation.perplexity.hf_recipe_perplexity: one window per forward, logits for every
position, the loss over the -100-masked labels); lmlab runs windows of one length as one (B, T)
forward and the LM head on the scored positions only. Calls alternate A/B in one process;
medians. Both perplexities are printed: they differ by the guide's weighting (docs/evaluation.md).

    python benchmarks/eval_speed.py [--rounds 3] [--chars 40000] [--stride 128] [--write]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import alternate, machine, median, update_section  # noqa: E402

import lmlab  # noqa: E402
from lmlab.evaluation.perplexity import (causal_token_nll, hf_recipe_perplexity,  # noqa: E402
                                         join_documents)

ROOT = Path(__file__).resolve().parent.parent
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.test.tokens"
RUN = ROOT / "runs" / "english_base"
SHAPE = dict(n_layer=4, n_head=4, n_embd=256, n_inner=1024, n_positions=256, vocab_size=8192)


def model_and_tokenizer(text: str):
    if (RUN / "config.json").exists():
        return lmlab.from_pretrained(RUN).eval(), lmlab.Tokenizer.from_pretrained(RUN), "english_base"
    tok = lmlab.Tokenizer.train_bpe(iterator=[text], vocab_size=SHAPE["vocab_size"])
    torch.manual_seed(0)
    model = lmlab.GPT(lmlab.GPTConfig(**{**SHAPE, "vocab_size": tok.vocab_size}))
    return model.eval(), tok, "random GPT of english_base's shape"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chars", type=int, default=40_000, help="characters of WikiText-2 test")
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if not WIKITEXT.exists():
        sys.exit(f"{WIKITEXT} is missing (the shared WikiText-2 copy)")
    text = WIKITEXT.read_text(encoding="utf-8")[:args.chars]
    model, tok, name = model_and_tokenizer(text)
    stream = join_documents([tok.encode(text)], tok.eos_token_id)
    context = model.config.n_positions
    from transformers import GPT2LMHeadModel

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        hf = GPT2LMHeadModel.from_pretrained(tmp).eval()
    ids = torch.tensor([stream])
    results = {}

    def run_hf():
        results["hf"] = hf_recipe_perplexity(lambda x, y: hf(x, labels=y).loss, ids,
                                             max_length=context, stride=args.stride)

    def run_lmlab():
        nll, _ = causal_token_nll(model, stream, context=context, stride=args.stride,
                                  batch_size=args.batch_size)
        results["lmlab"] = math.exp(float(nll.nanmean()))

    times = alternate({"transformers": run_hf, "lmlab": run_lmlab}, rounds=args.rounds, warmup=1)
    hf_tps = len(stream) / median(times["transformers"])
    our_tps = len(stream) / median(times["lmlab"])
    report = "\n".join([
        f"Perplexity evaluation, {name} (4 × 256, vocab {model.config.vocab_size}), the first "
        f"{args.chars:,} characters of WikiText-2 test = {len(stream):,} tokens, context "
        f"{context}, stride {args.stride}, fp32 CPU; median of {args.rounds} alternating calls; "
        f"{machine()}; measured {date.today().isoformat()} on a CPU shared with other jobs.", "",
        "| implementation | tokens/s | perplexity |", "|---|---:|---:|",
        f"| transformers GPT2LMHeadModel, the perplexity guide's loop | {hf_tps:,.0f} | "
        f"{results['hf'][0]:.4f} |",
        f"| lmlab `eval perplexity` (batch {args.batch_size}) | {our_tps:,.0f} | "
        f"{results['lmlab']:.4f} |", "",
        f"lmlab / transformers: **{our_tps / hf_tps:.2f}×**. The perplexities differ by the "
        "guide's weighting of windows after the first (docs/evaluation.md).", "",
        "Reproduce: `python benchmarks/eval_speed.py --write`",
    ])
    print(report)
    if args.write:
        update_section("eval_speed_perplexity", report)


if __name__ == "__main__":
    main()
