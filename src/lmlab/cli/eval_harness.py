"""`lmlab eval harness --model DIR --tasks T1,T2 …`: lm-evaluation-harness tasks on an lmlab model.

The shipped tasks (sst2_lmlab, ag_news_lmlab, wikitext2_lmlab) read ../shared/data (or
--data-root) offline; --include-path adds folders of your own task YAMLs. Prints the harness's
table; --output writes its full results as JSON. Scores never depend on --batch-size.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lmlab.cli.generate import add_device_argument
from lmlab.errors import ConfigError
from lmlab.training.runtime import pick_device


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="an lmlab GPT-family model directory")
    parser.add_argument("--tasks", required=True, help="comma-separated task names")
    parser.add_argument("--include-path", action="append", default=[], metavar="DIR",
                        help="a folder of extra task YAMLs (repeatable)")
    parser.add_argument("--data-root", default="../shared/data",
                        help="folder with sst2/, ag_news/, wikitext2/ (default ../shared/data)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="rows per forward pass; speed only, never the scores (default 8)")
    parser.add_argument("--limit", type=int, help="score only the first N documents of each task")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt")
    parser.add_argument("--builtin-tasks", action="store_true",
                        help="also index the harness's own tasks (their data must be cached)")
    parser.add_argument("--output", help="write the harness's results as JSON to this file")
    add_device_argument(parser)


class _Quiet(logging.Filter):
    """Drops the harness's per-task advice about --metadata, which lmlab's tasks answer."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def run(args) -> int:
    try:
        from lmlab.evaluation import harness
    except ImportError as err:
        raise ConfigError(str(err)) from None
    from lm_eval.utils import handle_non_serializable, make_table

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Quiet())
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = harness.evaluate_tasks(
        args.model, tasks=tasks, include_paths=args.include_path, data_root=args.data_root,
        batch_size=args.batch_size, limit=args.limit, num_fewshot=args.num_fewshot,
        device=str(pick_device(args.device, flag="--device")), builtin=args.builtin_tasks)
    print(f"model {args.model}, batch size {args.batch_size}, limit {args.limit}, "
          f"num_fewshot {args.num_fewshot}")
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2, default=handle_non_serializable)
                                     + "\n", encoding="utf-8")
    return 0
