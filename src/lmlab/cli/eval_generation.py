"""`lmlab eval generation`: the same prompts through several decoding strategies, with quality
signals and speed — a table (printed, and Markdown + CSV in --out) and a quality-vs-speed plot.
The work is lmlab.evaluation.strategies'."""

from __future__ import annotations

import json
from pathlib import Path

from lmlab.errors import ConfigError, DataError
from lmlab.evaluation.strategies import (DEFAULT_STRATEGIES, SPECULATIVE, check_strategy,
                                         compare_strategies, markdown_table, parse_strategies,
                                         write_report)


def add_arguments(parser) -> None:
    from lmlab.cli.generate import add_device_argument

    parser.add_argument("--model", required=True, help="model directory (config.json + weights)")
    parser.add_argument("--prompts", metavar="FILE",
                        help='JSONL, one prompt per line: a JSON string or {"prompt": …} '
                             "(JSON, so that a prompt can hold newlines)")
    parser.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    parser.add_argument("--strategies", nargs="+", metavar="NAME=JSON",
                        help="strategies to compare instead of the default set, e.g. greedy={} "
                             "'nucleus={\"do_sample\": true, \"top_p\": 0.9}'; "
                             "'spec={\"speculative\": true}' decodes with --draft-model")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="new tokens per prompt (default 64)")
    parser.add_argument("--seed", type=int, default=0,
                        help="sampling strategies sample prompt i with seed S + i (default 0)")
    parser.add_argument("--draft-model", metavar="DIR",
                        help="a smaller model sharing the tokenizer: adds greedy speculative "
                             "decoding to the default set")
    parser.add_argument("--out", metavar="DIR",
                        help="write table.md, table.csv, quality_vs_speed.png and samples.jsonl")
    add_device_argument(parser)


def read_prompts_file(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise DataError(f"--prompts {file}: file not found")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"--prompts {file}: not UTF-8 text (byte {err.start})") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            value = value.get("prompt")
        if not isinstance(value, str) or not value:
            raise DataError(f'--prompts {file} line {number}: expected a non-empty JSON string or '
                            f'an object with a "prompt" string, got {line[:60]!r}')
        prompts.append(value)
    if not prompts:
        raise DataError(f"--prompts {file}: no prompts (the file is empty)")
    return prompts


def run(args) -> int:
    from lmlab.cli.generate import load_decoder
    from lmlab.tokenizer import Tokenizer
    from lmlab.training.runtime import pick_device

    prompts = list(args.prompt or [])
    if args.prompts:
        prompts += read_prompts_file(args.prompts)
    if not prompts or not all(prompts):
        raise ConfigError("--prompt: no prompts (or an empty one); give --prompts FILE or --prompt")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    try:  # before any model is loaded
        strategies = (parse_strategies(args.strategies) if args.strategies else
                      {**DEFAULT_STRATEGIES, **(SPECULATIVE if args.draft_model else {})})
        for name, knobs in strategies.items():
            check_strategy(name, knobs, max_new_tokens=args.max_new_tokens,
                           has_draft=args.draft_model is not None)
    except ValueError as err:
        raise ConfigError(f"--strategies {err}".replace("strategy ", "", 1)) from None

    device = pick_device(args.device, flag="--device")
    model = load_decoder(args.model, device=device)
    tokenizer = Tokenizer.from_pretrained(args.model)
    tokenizer.check_fits(model.config.vocab_size, where=args.model)
    draft = (load_decoder(args.draft_model, flag="--draft-model", device=device)
             if args.draft_model else None)
    try:
        results = compare_strategies(model, tokenizer, prompts, strategies=strategies,
                                     max_new_tokens=args.max_new_tokens, seed=args.seed,
                                     draft_model=draft)
    except ValueError as err:  # e.g. a prompt too long for the context window
        raise ConfigError(str(err)) from None
    print(f"{len(prompts)} prompts × {args.max_new_tokens} new tokens, seed {args.seed}; "
          "text signals on whitespace words, log-prob in nats/token\n")
    print(markdown_table(results), end="")
    if args.out:
        paths = write_report(results, Path(args.out), prompts=prompts,
                             title=f"{Path(args.model).resolve().name}: {len(prompts)} prompts × "
                                   f"{args.max_new_tokens} new tokens")
        print("\nwrote " + ", ".join(str(p) for p in paths))
    return 0
