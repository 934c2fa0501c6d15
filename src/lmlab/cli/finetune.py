"""`lmlab finetune classification|qa --config FILE --out RUN_DIR [--key value …]`."""

from __future__ import annotations

from lmlab.config import dump_yaml, load_config, parse_overrides
from lmlab.training.finetune import (FinetuneClassificationConfig, FinetuneQAConfig,
                                     finetune_classification, finetune_qa)

TASKS = {
    "classification": (FinetuneClassificationConfig, finetune_classification),
    "qa": (FinetuneQAConfig, finetune_qa),
}


def add_arguments(parser) -> None:
    parser.add_argument("task", choices=sorted(TASKS), help="what to fine-tune for")
    parser.add_argument("--config", help="YAML preset, e.g. configs/finetune/sst2.yaml")
    parser.add_argument("--out", required=True, help="run directory (model, checkpoints, logs)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.epilog = ("Any config key can be overridden: --model DIR --train FILE --validation FILE "
                     "--test FILE --epochs 3 --lr 5e-5 …")
    parser.set_defaults(_accepts_overrides=True)


def run(args) -> int:
    config_class, finetune = TASKS[args.task]
    cfg = load_config(config_class, args.config, parse_overrides(args.overrides))
    print("resolved config:\n" + dump_yaml(cfg))
    out = finetune(cfg, run_dir=args.out, resume=args.resume, progress=not args.no_progress)
    r = out.train
    print(f"{r.steps} steps{' (stopped early)' if r.stopped_early else ''}, "
          f"{r.train_seconds:.1f} s training, {out.wall_seconds:.1f} s in all")
    print(f"best validation (step {r.best_step}): {format_metrics(out.validation)}")
    if out.test:
        print(f"test: {format_metrics(out.test)}")
    print(f"model: {out.run_dir} (lmlab.from_pretrained('{out.run_dir}'))")
    if out.predictions:
        print(f"predictions: {out.predictions}")
    return 0


def format_metrics(metrics: dict[str, float]) -> str:
    """accuracy-like figures in [0, 1] as percentages; SQuAD's are already percentages."""
    parts = []
    for key, value in metrics.items():
        name = key.removeprefix("val_")
        if name in ("accuracy", "macro_f1", "in_scope_accuracy", "exclude_recall"):
            parts.append(f"{name} {100 * value:.2f}%")
        elif name in ("exact_match", "f1"):
            parts.append(f"{name} {value:.2f}")
        else:
            parts.append(f"{name} {value:.4f}")
    return ", ".join(parts)
