"""T5 speed: lmlab's T5 against transformers' T5ForConditionalGeneration, same weights, same inputs.

Two measurements, each alternating lmlab and transformers calls in one process (medians):

1. Training step (forward + backward + AdamW step, fp32, CPU, all torch threads) of a
   translation-sized T5 — d_model 256, d_kv 32, 8 heads, d_ff 1024, 3 + 3 layers, the vocabulary
   of the tokenizer (8,000) — as T5 v1.0 (ReLU, tied head) and v1.1 (gated GELU, untied head), on
   one batch of 64 Multi30k en→de training pairs. Loss: mean cross-entropy over the target
   tokens, -100 at padding, on both sides. lmlab's optimizer is the one its training loop builds
   (`lmlab.training.optim.build_optimizer`); transformers' model gets torch's fused AdamW, the
   same two groups (weight decay on matrices). Tokens/s counts the real source and target tokens.
   lmlab's model runs with the dropout in C that its training loop swaps in
   (`lmlab.kernels.native_dropout`). Then, alternating in a pairing of their own, lmlab's model
   against a copy with torch's `nn.Dropout` in place of its own: what lmlab's masks are worth.
2. Beam-5 translation of the Multi30k test sentences (1,000) in batches of 32 (file order),
   `lmlab.generate(model, source_ids=, source_mask=)` against `transformers`' `generate`, each
   two ways: one batch after another, all torch threads on each (what a loop over batches
   does), and batches side by side, one per core at one thread each
   (`lmlab.generation.side_by_side`, which `lmlab translate` and the translation recipe use for
   lmlab; the same helper around transformers' `generate` shows what the trick alone is worth).
   Every output is checked identical to transformers' one-after-another output, then
   sentences/s. The four ways take turns `--chunk` batches at a time, each leading in turn.

The model of (2) is `--model DIR` (a T5 directory with its tokenizer: a `lmlab finetune
translation` run directory, say); without it, a v1.0 model from scratch, trained here for
`--train-steps` steps on the training pairs so that beams stop at EOS as a real model's do (with
random weights every beam runs to max_new_tokens). The tokenizer without `--model`: a Unigram
vocabulary of 8,000 trained on both sides of the training pairs (`Tokenizer.train_unigram`).

    python benchmarks/t5_speed.py [--model DIR] [--rounds 10] [--sentences 1000] [--write]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import alternate, machine, median, update_section  # noqa: E402

import lmlab  # noqa: E402
from lmlab.generation.side_by_side import side_by_side  # noqa: E402
from lmlab.kernels import native_dropout, unavailable_reason  # noqa: E402
from lmlab.models.layers import Dropout  # noqa: E402
from lmlab.models.t5 import T5Config, T5ForConditionalGeneration  # noqa: E402
from lmlab.tokenizer import Tokenizer, unigram  # noqa: E402
from lmlab.training.optim import build_optimizer  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "multi30k_en_de"
SHAPE = dict(d_model=256, d_kv=32, num_heads=8, d_ff=1024, num_layers=3, n_positions=128)
VARIANTS = {"v1.0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
            "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)}
LR, WEIGHT_DECAY, BETAS = 1e-4, 0.01, (0.9, 0.999)


def read_pairs(path: Path) -> list[tuple[str, str]]:
    with path.open() as lines:
        return [(r["en"], r["de"]) for r in map(json.loads, lines)]


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([row + [value] * (width - len(row)) for row in rows])


def encode(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """`ids EOS` per text, as lmlab's translation task encodes sources and targets."""
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer.encode_batch(texts)]


def sources_batch(tokenizer, texts):
    ids = encode(tokenizer, texts)
    return pad(ids, tokenizer.pad_token_id), pad([[1] * len(r) for r in ids], 0)


def hf_twin(model: T5ForConditionalGeneration, tokenizer: Tokenizer | None = None):
    """transformers' T5ForConditionalGeneration loaded from `model` saved in the HF layout."""
    from transformers import T5ForConditionalGeneration as HFT5
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, tokenizer=tokenizer)
        return HFT5.from_pretrained(tmp)


def scratch(tokenizer: Tokenizer, variant: str, seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
        **SHAPE, **VARIANTS[variant]))


def loss_of(ours, source, mask, labels) -> torch.Tensor:
    """Mean cross-entropy over the target tokens, as lmlab's translation task computes it:
    the output layer only at the real target positions (`only=`)."""
    keep = labels != -100
    logits = ours(ours.shift_right(labels), encoder_hidden=ours.encode(source, attention_mask=mask),
                  encoder_mask=mask, only=keep)
    return F.cross_entropy(logits, labels[keep])


def groups(model) -> list[dict]:
    params = list({id(p): p for p in model.parameters()}.values())
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


# -- 1. training step ------------------------------------------------------------------------------
def bench_training(tokenizer, pairs, variant: str, *, batch: int, rounds: int) -> dict:
    rows = random.Random(0).sample(pairs, batch)
    source, mask = sources_batch(tokenizer, [en for en, _ in rows])
    labels = pad(encode(tokenizer, [de for _, de in rows]), -100)
    tokens = int(mask.sum() + (labels != -100).sum())
    ours = scratch(tokenizer, variant)
    hf = hf_twin(ours)
    ours.eval(), hf.eval()
    with torch.no_grad():  # same weights, same loss (dropout off for the check)
        a = float(loss_of(ours, source, mask, labels))
        b = float(hf(input_ids=source, attention_mask=mask, labels=labels).loss)
    assert abs(a - b) < 1e-4 * max(1.0, abs(b)), f"{variant}: losses differ: lmlab {a}, hf {b}"
    torch_dropout = with_torch_dropout(ours)
    ours.train(), hf.train(), torch_dropout.train()
    hf_opt = torch.optim.AdamW(groups(hf), lr=LR, betas=BETAS, fused=True)

    def lmlab_step(model):
        optimizer = build_optimizer(model, lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS)

        def step():
            loss_of(model, source, mask, labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    def step_hf():
        hf(input_ids=source, attention_mask=mask, labels=labels).loss.backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    step_ours = lmlab_step(ours)
    with native_dropout(ours) as swapped:  # as lmlab's training loop runs it
        assert swapped, f"the C dropout did not apply: {unavailable_reason()}"
        times = alternate({"transformers": step_hf, "lmlab": step_ours}, rounds=rounds, warmup=2)
        hf_s, ours_s = median(times["transformers"]), median(times["lmlab"])
        print(f"train {variant}: transformers {1000 * hf_s:.0f} ms, lmlab {1000 * ours_s:.0f} ms "
              f"per step; ×{hf_s / ours_s:.2f}", flush=True)
        # The dropout mask's worth, in a pairing of its own (the peer's pairing stays as it was)
        times = alternate({"lmlab": step_ours, "lmlab, nn.Dropout": lmlab_step(torch_dropout)},
                          rounds=rounds, warmup=1)
    dropout_gain = median(times["lmlab, nn.Dropout"]) / median(times["lmlab"])
    print(f"train {variant}: lmlab's dropout ×{dropout_gain:.2f} against nn.Dropout", flush=True)
    return {"variant": variant, "tokens": tokens, "source_len": source.shape[1],
            "target_len": labels.shape[1], "hf_s": hf_s, "ours_s": ours_s,
            "dropout_gain": dropout_gain, "parameters": ours.num_parameters()}


def with_torch_dropout(model: T5ForConditionalGeneration) -> T5ForConditionalGeneration:
    """A copy of `model` whose dropout layers are torch's `nn.Dropout` (same p)."""
    twin = copy.deepcopy(model)
    for module in list(twin.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Dropout):
                setattr(module, name, nn.Dropout(child.p))
    return twin


# -- 2. beam-5 translation ---------------------------------------------------------------------------
def train_briefly(model, tokenizer, pairs, *, steps: int, batch: int) -> float:
    """A few hundred steps of lmlab training at a high rate: enough to end sentences with EOS."""
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.0, betas=BETAS)
    rng = random.Random(1)
    model.train()
    loss = float("nan")
    for _ in range(steps):
        rows = rng.sample(pairs, batch)
        source, mask = sources_batch(tokenizer, [en for en, _ in rows])
        labels = pad(encode(tokenizer, [de for _, de in rows]), -100)
        loss = loss_of(model, source, mask, labels)
        loss.backward()
        loss = loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return loss


WAYS = {  # the translation bench's four ways, in the order of the first chunk
    "transformers": "transformers' `generate`, one batch after another (all threads on each)",
    "transformers_side": "transformers' `generate`, batches side by side (`side_by_side`)",
    "lmlab": "`lmlab.generate`, one batch after another (all threads on each)",
    "lmlab_side": "`lmlab.generate`, batches side by side (`side_by_side`, as `lmlab translate` "
                  "and the translation recipe run them)",
}


def bench_translation(ours, hf, tokenizer, texts, *, batch: int, chunk: int, knobs: dict) -> dict:
    ours.eval(), hf.eval()
    ids, mask = sources_batch(tokenizer, texts[:4])
    with torch.inference_mode():  # warm-up: first calls pay one-off costs
        hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, **knobs)
        lmlab.generate(ours, source_ids=ids, source_mask=mask, **knobs)
    batches = [sources_batch(tokenizer, texts[first:first + batch])
               for first in range(0, len(texts), batch)]
    one = {
        "transformers": lambda b: hf.generate(input_ids=b[0], attention_mask=b[1],
                                              do_sample=False, **knobs),
        "lmlab": lambda b: lmlab.generate(ours, source_ids=b[0], source_mask=b[1], **knobs),
    }
    ways = {
        "transformers": lambda group: [one["transformers"](b) for b in group],
        "transformers_side": lambda group: side_by_side(one["transformers"], group),
        "lmlab": lambda group: [one["lmlab"](b) for b in group],
        "lmlab_side": lambda group: side_by_side(one["lmlab"], group),
    }
    times = dict.fromkeys(ways, 0.0)
    steps, finished = 0, 0
    for number, first in enumerate(range(0, len(batches), chunk)):
        group = batches[first:first + chunk]
        names = list(ways)
        order = names[number % len(names):] + names[:number % len(names)]  # each way leads once
        out = {}
        for name in order:
            with torch.inference_mode():
                t0 = time.perf_counter()
                out[name] = ways[name](group)
                times[name] += time.perf_counter() - t0
        reference = out["transformers"]
        for name, got in out.items():
            for i, (a, b) in enumerate(zip(reference, got)):
                if not torch.equal(a, b):
                    raise AssertionError(f"batch {first + i + 1}: {name}'s beam output differs "
                                         "from transformers' generate")
        steps += sum(a.shape[1] - 1 for a in reference)
        finished += sum(int((a == tokenizer.eos_token_id).any(-1).sum()) for a in reference)
        print(f"  batches {first + 1}-{first + len(group)}: identical; seconds so far: "
              + ", ".join(f"{name} {times[name]:.1f}" for name in ways), flush=True)
    return {"sentences": len(texts), "seconds": times, "mean_steps": steps / len(batches),
            "finished": finished}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="a T5 directory with its tokenizer for the translation bench")
    parser.add_argument("--variants", default="v1.0,v1.1", help="training bench: v1.0, v1.1")
    parser.add_argument("--rounds", type=int, default=10, help="training steps timed per side")
    parser.add_argument("--batch", type=int, default=64, help="pairs per training step")
    parser.add_argument("--sentences", type=int, default=1000, help="test sentences to translate")
    parser.add_argument("--beam-batch", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=8,
                        help="batches per turn of each way (the ways alternate chunk by chunk)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="default: 64, or the model's window less the start token if smaller")
    parser.add_argument("--train-steps", type=int, default=100,
                        help="without --model: steps to train the from-scratch model first")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()

    train_pairs = read_pairs(DATA / "train.jsonl")
    tests = [en for en, _ in read_pairs(DATA / "test.jsonl")][:args.sentences]
    if args.model is not None:
        tokenizer = Tokenizer.from_pretrained(args.model)
    else:
        tokenizer = Tokenizer.train_unigram(
            iterator=unigram.jsonl_texts(DATA / "train.jsonl", ["en", "de"]), vocab_size=8000)

    training = [bench_training(tokenizer, train_pairs, v, batch=args.batch, rounds=args.rounds)
                for v in args.variants.split(",") if v]

    if args.model is not None:
        ours = lmlab.from_pretrained(args.model)
        origin = f"the model of `{args.model.name}`"
    else:
        ours = scratch(tokenizer, "v1.0")
        loss = train_briefly(ours, tokenizer, train_pairs, steps=args.train_steps, batch=args.batch)
        origin = (f"a v1.0 model of the training shape trained here for {args.train_steps} steps "
                  f"of 64 pairs (lr 1e-3; final loss {loss:.2f}) — a stand-in for a trained model"
                  if args.train_steps else "random weights (beams run to max_new_tokens)")
    hf = hf_twin(ours, tokenizer)
    if args.max_new_tokens is None:
        args.max_new_tokens = min(64, ours.config.n_positions - 1)
    knobs = dict(num_beams=5, max_new_tokens=args.max_new_tokens)
    print(f"translating {len(tests)} sentences with {origin}", flush=True)
    tr = bench_translation(ours, hf, tokenizer, tests, batch=args.beam_batch, chunk=args.chunk,
                           knobs=knobs)
    seconds, n = tr["seconds"], tr["sentences"]

    lines = [
        f"T5 on Multi30k en→de, fp32, {machine()}; measured {date.today().isoformat()}.", "",
        f"Training step (forward + backward + AdamW), one batch of {args.batch} training pairs, "
        f"d_model 256, d_kv 32, 8 heads, d_ff 1024, 3 + 3 layers, vocabulary "
        f"{tokenizer.vocab_size}; median of {args.rounds} alternating steps:", "",
        "| variant | parameters | batch (source × target) | transformers tokens/s | "
        "lmlab tokens/s | lmlab / transformers | lmlab's dropout / nn.Dropout |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in training:
        lines.append(f"| {r['variant']} | {r['parameters'] / 1e6:.1f} M | {args.batch} × "
                     f"({r['source_len']}, {r['target_len']}) | {r['tokens'] / r['hf_s']:,.0f} | "
                     f"{r['tokens'] / r['ours_s']:,.0f} | **{r['hf_s'] / r['ours_s']:.2f}×** | "
                     f"{r['dropout_gain']:.2f}× |")
    lines += [
        "",
        f"Beam-5 translation of {n} test sentences, batches of {args.beam_batch} (file order), "
        f"max_new_tokens {args.max_new_tokens}, {origin}, {torch.get_num_threads()} threads; "
        f"four ways, alternating {args.chunk} batches at a time; every output identical to "
        f"transformers' ({tr['finished']} of {n} end with EOS; {tr['mean_steps']:.1f} decoder "
        "steps per batch on average):", "",
        "| way | sentences/s | / transformers' `generate` |",
        "|---|---:|---:|",
        *[f"| {WAYS[name]} | {n / seconds[name]:.1f} | "
          + (f"**{seconds['transformers'] / seconds[name]:.2f}×** |" if name == "lmlab_side" else
             f"{seconds['transformers'] / seconds[name]:.2f}× |") for name in WAYS],
        "",
        f"lmlab's two ways against transformers' same way: one batch after another "
        f"{seconds['transformers'] / seconds['lmlab']:.2f}×, side by side "
        f"{seconds['transformers_side'] / seconds['lmlab_side']:.2f}×.",
        "",
        "Reproduce: `python benchmarks/t5_speed.py --write` (`--model DIR` for a trained model)",
    ]
    report = "\n".join(lines)
    print(report)
    if args.write:
        update_section("t5_speed", report)


if __name__ == "__main__":
    main()
