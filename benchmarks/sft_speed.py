"""SFT speed: lmlab's `sft` recipe against TRL's SFTTrainer (and, with LoRA, TRL + PEFT) on the
same model, data, batch and sequence length, alternating in one run.

Setup, identical for both sides:
- data: the 899 Alpaca demo training examples (../shared/data/alpaca_demo), each rendered as a
  prompt (the user turn in lmlab's default chat template, with the generation prompt) and a
  completion (the reply); loss on the completion and the EOS that ends it, as TRL's
  prompt-completion datasets do; max_length 256 (longer examples truncated); batch 8; one
  epoch; AdamW, linear decay after 10% warmup, gradient clipping 1.0, fp32, no dropout;
- model: a GPT-2-layout model saved once (--model DIR, e.g. a base lmlab pretrained, or by
  default a 4-layer, width-256 GPT-2 with a 4,096-token BPE trained on the training texts) —
  both sides start from the same weights;
- LoRA: r 16, alpha 32, on c_attn, c_proj and c_fc, lr 2e-3 (full fine-tuning: 5e-4).

Each contender runs in its own process (the run's peak RSS is its peak memory), and the order
alternates every round. tokens/s = the epoch's real (non-padding) tokens / training seconds
(the optimizer steps alone: lmlab's TrainResult.train_seconds, TRL's train_runtime). Eval loss
is the mean loss per completion token on the 50 validation examples, measured for both final
models by the same code (lmlab's evaluator on the saved weights).

    python benchmarks/sft_speed.py [--rounds 2] [--model DIR] [--write]
    python benchmarks/sft_speed.py --memory [--model DIR] [--write]   # peak memory, full vs LoRA
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, median, update_section  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "alpaca_demo"
HP = dict(max_length=256, batch_size=8, seed=42, warmup_ratio=0.1, grad_clip=1.0)
LR = {"full": 5e-4, "lora": 2e-3}
LORA = dict(r=16, alpha=32, dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"])
CONTENDERS = ("lmlab-full", "trl-full", "lmlab-lora", "trl-lora")


# -- shared setup --------------------------------------------------------------------------------
def prepare(work: Path, model: str | None) -> Path:
    """work/base (model + tokenizer) and work/{train,validation}.jsonl as prompt/completion."""
    import torch

    from lmlab.models.gpt import GPT, GPTConfig
    from lmlab.tasks.sft import read_examples
    from lmlab.tokenizer import Tokenizer
    from lmlab.tokenizer.chat import render_chat

    base = work / "base"
    if model is not None:
        base = Path(model)
        tok = Tokenizer.from_pretrained(base)
    else:
        texts = [m["content"] for e in read_examples(DATA / "train.jsonl") for m in e.messages]
        tok = Tokenizer.train_bpe(iterator=texts, vocab_size=4096)
        torch.manual_seed(0)
        gpt = GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=512, n_embd=256, n_layer=4,
                            n_head=4, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id))
        gpt.save_pretrained(base, tokenizer=tok)
    for split in ("train", "validation"):
        rows = []
        for example in read_examples(DATA / f"{split}.jsonl"):
            *context, reply = example.messages
            rows.append({"prompt": render_chat(tok, context, add_generation_prompt=True),
                         "completion": reply["content"]})
        (work / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return base


def eval_loss(model_dir: Path, work: Path, adapter: Path | None = None) -> dict:
    """Mean loss per completion token on the validation file, and the epoch's real tokens."""
    import torch

    from lmlab.models.hf import from_pretrained
    from lmlab.tasks import sft
    from lmlab.tokenizer import Tokenizer

    model = from_pretrained(model_dir).eval()
    if adapter is not None:
        from lmlab.models.hf.peft import load_adapter
        model = load_adapter(model, adapter).eval()
    tok = Tokenizer.from_pretrained(model_dir)
    encode = lambda split: sft.encode_examples(  # noqa: E731
        tok, sft.read_examples(work / f"{split}.jsonl"), max_length=HP["max_length"])
    val = encode("validation")
    loss = sft.evaluate_loss(model, val, batch_size=16, pad_id=tok.pad_token_id,
                             device=torch.device("cpu"), prefix="")["loss"]
    return {"eval_loss": loss, "tokens": int(sum(len(e.ids) for e in encode("train")))}


# -- one contender, in its own process ------------------------------------------------------------
def run_lmlab(work: Path, base: Path, lora: bool, epochs: float = 1.0,
              score: bool = True) -> dict:
    from lmlab.config import from_dict
    from lmlab.recipes.sft import SFTConfig, finetune_sft

    out = Path(tempfile.mkdtemp(dir=work))
    values = dict(model=str(base), train=str(work / "train.jsonl"),
                  validation=str(work / "validation.jsonl"), epochs=epochs, samples=0,
                  lr=LR["lora" if lora else "full"], lr_schedule="linear", weight_decay=0.0,
                  log_every=50, keep_best=False, restore_best=False, **HP)
    if lora:
        values["lora"] = dict(LORA)
    result = finetune_sft(from_dict(SFTConfig, values), run_dir=out, progress=False)
    if not score:  # memory only: loading the result again would add to the peak
        return {"train_seconds": result.train.train_seconds, "steps": result.train.steps}
    scored = eval_loss(base, work, adapter=out) if lora else eval_loss(out, work)
    return {**scored, "train_seconds": result.train.train_seconds, "steps": result.train.steps}


def run_trl(work: Path, base: Path, lora: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging
    from trl import SFTConfig, SFTTrainer

    hf_logging.set_verbosity_error()
    torch.manual_seed(HP["seed"])
    out = Path(tempfile.mkdtemp(dir=work))
    tok = AutoTokenizer.from_pretrained(base)
    model = GPT2LMHeadModel.from_pretrained(base)
    train = Dataset.from_list(
        [json.loads(line) for line in (work / "train.jsonl").read_text().splitlines()])
    args = SFTConfig(
        output_dir=str(out), per_device_train_batch_size=HP["batch_size"], num_train_epochs=1,
        learning_rate=LR["lora" if lora else "full"], lr_scheduler_type="linear",
        warmup_steps=round(HP["warmup_ratio"] * math.ceil(len(train) / HP["batch_size"])),
        max_grad_norm=HP["grad_clip"], weight_decay=0.0,
        max_length=HP["max_length"], seed=HP["seed"], logging_steps=50, save_strategy="no",
        eval_strategy="no", report_to="none", use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True)
    peft_config = None
    if lora:
        from peft import LoraConfig
        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                 target_modules=LORA["target_modules"], fan_in_fan_out=True,
                                 task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=train,
                         processing_class=tok, peft_config=peft_config)
    metrics = trainer.train().metrics
    trainer.model.save_pretrained(out)  # the adapter (LoRA) or the whole model
    if not lora:
        tok.save_pretrained(out)
    scored = eval_loss(base, work, adapter=out) if lora else eval_loss(out, work)
    return {**scored, "train_seconds": metrics["train_runtime"],
            "steps": trainer.state.global_step}


def one(name: str, work: Path, base: Path) -> dict:
    side, mode = name.split("-")
    t0 = time.perf_counter()
    result = (run_lmlab if side == "lmlab" else run_trl)(work, base, mode == "lora")
    result["wall"] = time.perf_counter() - t0
    result["tokens_per_s"] = result["tokens"] / result["train_seconds"]
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


# -- the run ----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", help="a GPT-2-layout base model directory")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one contender
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true",
                        help="instead: peak memory of full and LoRA SFT at GPT-2-small size")
    args = parser.parse_args()
    if args.one == "memory":  # internal: a few steps of a large model, for peak memory only
        work = Path(args.work)
        result = run_lmlab(work, work / "large", args.lora, epochs=MEMORY_STEPS / 113,
                           score=False)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    if args.one:
        work = Path(args.work)
        print(json.dumps(one(args.one, work, Path((work / "base_path").read_text()))))
        return
    work = Path(tempfile.mkdtemp(prefix="sft_speed_"))
    base = prepare(work, args.model)
    (work / "base_path").write_text(str(base))
    if args.memory:
        table = memory_table(work)
        print(table)
        if args.write:
            update_section("sft_memory", table)
        return
    results: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
    for round_ in range(args.rounds):
        order = CONTENDERS if round_ % 2 == 0 else CONTENDERS[::-1]
        for name in order:
            out = subprocess.run([sys.executable, __file__, "--one", name, "--work", str(work)],
                                 capture_output=True, text=True, check=True)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = results[name][-1]
            print(f"round {round_ + 1} {name:10s}: {r['tokens_per_s']:8.0f} tok/s, eval loss "
                  f"{r['eval_loss']:.4f}, {r['train_seconds']:.1f} s train, "
                  f"{r['peak_rss_mb']:.0f} MB peak RSS", flush=True)
    table = report(results)
    print(table)
    if args.write:
        update_section("sft_speed", table)


MEMORY_STEPS = 10


def memory_table(work: Path) -> str:
    """Peak RSS of lmlab's full and LoRA SFT on a GPT-2-small-shaped model (12 layers, width
    768, the base's vocabulary; random weights), MEMORY_STEPS steps each in its own process:
    where the gradients and AdamW moments LoRA does not keep are large enough to see."""
    import torch

    from lmlab.models.gpt import GPT, GPTConfig
    from lmlab.tokenizer import Tokenizer

    base = Path((work / "base_path").read_text())
    tok = Tokenizer.from_pretrained(base)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=256, n_embd=768, n_layer=12,
                          n_head=12, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model.save_pretrained(work / "large", tokenizer=tok)
    params = sum(p.numel() for p in model.parameters())
    del model
    rows = {}
    for lora in (False, True):
        out = subprocess.run([sys.executable, __file__, "--one", "memory", "--work", str(work),
                              *(["--lora"] if lora else [])], capture_output=True, text=True,
                             check=True)
        rows[lora] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"memory {'lora' if lora else 'full'}: {rows[lora]['peak_rss_mb']:.0f} MB peak RSS",
              flush=True)
    return "\n".join([
        f"Peak memory at GPT-2-small size (12 layers, width 768, {params / 1e6:.0f}M parameters, "
        f"random weights), {MEMORY_STEPS} steps of the same SFT, each in its own process:", "",
        "| lmlab full SFT | lmlab LoRA SFT | LoRA / full |", "|---:|---:|---:|",
        f"| {rows[False]['peak_rss_mb']:,.0f} MB | {rows[True]['peak_rss_mb']:,.0f} MB | "
        f"{rows[True]['peak_rss_mb'] / rows[False]['peak_rss_mb']:.2f}× |"])


def report(results: dict[str, list[dict]]) -> str:
    med = {name: {key: median([r[key] for r in rows]) for key in rows[0]}
           for name, rows in results.items()}
    lines = [
        f"`python benchmarks/sft_speed.py --rounds {len(results['lmlab-full'])}` on {machine()}, "
        f"{date.today()}: Alpaca demo (899 examples, 1 epoch, max_length {HP['max_length']}, "
        f"batch {HP['batch_size']}), loss on completions, fp32; medians over rounds, each run in "
        "its own process, order alternating.", "",
        "| mode | lmlab tok/s | TRL tok/s | ratio | lmlab eval loss | TRL eval loss | "
        "lmlab peak RSS | TRL peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in ("full", "lora"):
        a, b = med[f"lmlab-{mode}"], med[f"trl-{mode}"]
        peer = "TRL SFTTrainer" if mode == "full" else "TRL + PEFT"
        lines.append(f"| {mode} ({peer}) | {a['tokens_per_s']:,.0f} | {b['tokens_per_s']:,.0f} | "
                     f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}× | {a['eval_loss']:.4f} | "
                     f"{b['eval_loss']:.4f} | {a['peak_rss_mb']:,.0f} MB | "
                     f"{b['peak_rss_mb']:,.0f} MB |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
