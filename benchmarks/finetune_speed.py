"""Fine-tuning speed: MiniLM on SST-2 with lmlab against transformers' Trainer, in one process.

Same model (all-MiniLM-L6-v2 + a fresh 2-way head), same data (the 6,920 SST-2 training sentences,
max_length 128), same hyper-parameters (AdamW lr 5e-5, weight decay 0.01 on matrices, linear
decay after 22 warmup steps, batch 32, one epoch = 217 steps, gradient clipping 1.0, dropout 0.1,
seed 42, fp32), accuracy on the 872 validation sentences. Each side runs as a user would:

- lmlab: `lmlab.recipes.classification.finetune_classification` — its defaults batch by length
  (sorted within 50-batch chunks) with dynamic padding;
- Trainer: tokenized with transformers' tokenizer, `DataCollatorWithPadding` (dynamic padding to
  the longest in each random batch, the Trainer's default), `trainer.train()`, `trainer.predict()`;
- Trainer with `train_sampling_strategy="group_by_length"` (transformers 4's
  `group_by_length=True`): the same batching idea as lmlab's, as a second peer row,
  so that what the batching buys and what the rest buys can be told apart.

Wall time is everything from loading the model to knowing the accuracy (tokenization, training,
evaluation, saving the model); "train" is the optimizer steps alone (lmlab's TrainResult, the
Trainer's train_runtime). With --rounds > 1 the order rotates every round; medians are reported.

    python benchmarks/finetune_speed.py [--rounds 1] [--steps 217] [--write]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, median, update_section  # noqa: E402

from lmlab.tasks import classification as clf  # noqa: E402
from lmlab.config import from_dict  # noqa: E402
from lmlab.recipes.classification import (FinetuneClassificationConfig,  # noqa: E402
                                          finetune_classification)
from lmlab.recipes.finetuning import resolve_model  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sst2"
HP = dict(lr=5e-5, weight_decay=0.01, batch_size=32, max_length=128, seed=42, warmup_ratio=0.1,
          grad_clip=1.0)


def run_lmlab(steps: int, out: Path) -> dict:
    epochs = steps / 217  # 6,920 / 32 rounded up
    cfg = from_dict(FinetuneClassificationConfig, dict(  # flat keys, as a YAML file has them
        model="minilm", train=str(DATA / "train.jsonl"), validation=str(DATA / "validation.jsonl"),
        text_field="sentence", epochs=epochs, lr_schedule="linear", log_every=50, **HP))
    t0 = time.perf_counter()
    result = finetune_classification(cfg, run_dir=out, progress=False)
    wall = time.perf_counter() - t0
    return {"accuracy": result.validation["val_accuracy"], "wall": wall,
            "train": result.train.train_seconds, "steps": result.train.steps}


def run_trainer(steps: int, out: Path, *, group_by_length: bool) -> dict:
    from transformers import (AutoTokenizer, BertForSequenceClassification,
                              DataCollatorWithPadding, Trainer, TrainingArguments)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()
    model_dir = str(resolve_model("minilm"))
    tok = AutoTokenizer.from_pretrained(model_dir)

    def dataset(split: str) -> list[dict]:
        examples = clf.read_examples(DATA / f"{split}.jsonl", text_field="sentence",
                                     text_pair_field=None, label_field="label")
        enc = tok([e.text for e in examples], truncation=True, max_length=HP["max_length"])
        return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                 "token_type_ids": enc["token_type_ids"][i], "labels": int(e.label)}
                for i, e in enumerate(examples)]

    train, val = dataset("train"), dataset("validation")
    torch.manual_seed(HP["seed"])
    model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=HP["batch_size"],
        per_device_eval_batch_size=2 * HP["batch_size"], learning_rate=HP["lr"],
        weight_decay=HP["weight_decay"], lr_scheduler_type="linear",
        warmup_steps=round(HP["warmup_ratio"] * steps), max_steps=steps,
        max_grad_norm=HP["grad_clip"], seed=HP["seed"], logging_steps=50, save_strategy="no",
        eval_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      data_collator=DataCollatorWithPadding(tok))
    train_out = trainer.train()
    predictions = trainer.predict(val)
    trainer.save_model(str(out / "model"))
    wall = time.perf_counter() - t0
    accuracy = float((predictions.predictions.argmax(-1) == predictions.label_ids).mean())
    return {"accuracy": accuracy, "wall": wall, "train": train_out.metrics["train_runtime"],
            "steps": train_out.global_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=217, help="optimizer steps (217 = 1 epoch)")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()

    contenders = {
        "lmlab (length-grouped, its default)": lambda out: run_lmlab(args.steps, out),
        "Trainer (random batches, its default)": lambda out: run_trainer(args.steps, out, group_by_length=False),
        "Trainer, group_by_length sampling": lambda out: run_trainer(args.steps, out, group_by_length=True),
    }
    names = list(contenders)
    results: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            with tempfile.TemporaryDirectory() as tmp:
                r = contenders[name](Path(tmp))
            results[name].append(r)
            print(f"round {round_ + 1}: {name}: accuracy {100 * r['accuracy']:.2f}%, "
                  f"wall {r['wall']:.1f} s, train {r['train']:.1f} s, {r['steps']} steps", flush=True)

    ours = results[names[0]]
    lines = [
        f"MiniLM (all-MiniLM-L6-v2) fine-tuned on SST-2 train, {args.steps} steps of batch 32, "
        f"lr 5e-5 linear, max_length 128, seed 42, fp32; accuracy on SST-2 validation (872). "
        f"{args.rounds} round(s), order rotated, medians. Measured {date.today()} on {machine()}, "
        "a 2-core VM shared with other jobs.",
        "",
        "| run | validation accuracy | wall s | train s | lmlab wall / this | lmlab train / this |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        rs = results[name]
        acc = median([r["accuracy"] for r in rs])
        wall, trn = median([r["wall"] for r in rs]), median([r["train"] for r in rs])
        ratio_wall = median([r["wall"] for r in ours]) / wall
        ratio_train = median([r["train"] for r in ours]) / trn
        lines.append(f"| {name} | {100 * acc:.2f}% | {wall:.1f} | {trn:.1f} | "
                     f"{ratio_wall:.2f}× | {ratio_train:.2f}× |")
    body = "\n".join(lines)
    print(body)
    if args.write:
        update_section("finetune_speed", body)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
