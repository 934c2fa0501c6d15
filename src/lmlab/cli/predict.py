"""`lmlab predict RUN_DIR --data FILE --out FILE`: a fine-tuned model's predictions as JSONL."""

from __future__ import annotations

from lmlab.cli.generate import add_device_argument
from lmlab.config import parse_overrides
from lmlab.recipes.finetuning import predict


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="a fine-tuned model directory (lmlab finetune --out)")
    parser.add_argument("--data", required=True, help="texts (JSONL/CSV) or SQuAD-format JSON")
    parser.add_argument("--out", required=True, help="the predictions file to write (JSONL)")
    add_device_argument(parser)
    parser.epilog = ("Data settings default to the run's train_config.yaml; override them with "
                     "--text_field NAME …")
    parser.set_defaults(_accepts_overrides=True)


def run(args) -> int:
    out = predict(args.run_dir, data=args.data, out=args.out,
                  overrides=parse_overrides(args.overrides), device=args.device)
    print(f"predictions: {out}")
    return 0
