"""`lmlab evaluate RUN_DIR --data FILE [--key value …]`: metrics of a fine-tuned model on a file."""

from __future__ import annotations

import json

from lmlab.cli.finetune import format_metrics
from lmlab.cli.generate import add_device_argument
from lmlab.config import parse_overrides
from lmlab.recipes.finetuning import evaluate


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="a fine-tuned model directory (lmlab finetune --out)")
    parser.add_argument("--data", required=True, help="a labelled file (JSONL/CSV, or SQuAD JSON)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_device_argument(parser)
    parser.epilog = ("Data settings default to the run's train_config.yaml; override them with "
                     "--text_field NAME --label_field NAME …")
    parser.set_defaults(_accepts_overrides=True)


def run(args) -> int:
    metrics = evaluate(args.run_dir, data=args.data, overrides=parse_overrides(args.overrides),
                       device=args.device)
    print(json.dumps(metrics) if args.json else f"{args.data}: {format_metrics(metrics)}")
    return 0
