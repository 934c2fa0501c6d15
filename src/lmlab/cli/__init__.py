"""The command line: a thin table from subcommand name to a module with `add_arguments`/`run`.

Errors that are the user's (lmlab.errors.LmlabError, bad flags) become one clear line on stderr
and exit status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lmlab.errors import LmlabError

# subcommand -> (module, one-line help)
COMMANDS = {
    "demo": ("lmlab.cli.demo", "train a small GPT on the Python standard library and sample it"),
    "prepare": ("lmlab.cli.prepare", "tokenize text into a memory-mapped dataset"),
    "pretrain": ("lmlab.cli.pretrain",
                 "pretrain a GPT or a BERT (--objective) with a YAML config and overrides"),
    "finetune": ("lmlab.cli.finetune", "fine-tune a pretrained model: classification, extractive QA, SFT (+ LoRA)"),
    "evaluate": ("lmlab.cli.evaluate", "score a fine-tuned model on a labelled file"),
    "predict": ("lmlab.cli.predict", "write a fine-tuned model's predictions for a file"),
    "generate": ("lmlab.cli.generate", "continue prompts with a trained model"),
    "lora": ("lmlab.cli.lora", "LoRA adapters: merge one into its base model"),
    "chat": ("lmlab.cli.chat", "talk with a causal language model in the terminal"),
    "serve": ("lmlab.cli.serve", "an OpenAI-compatible HTTP server with continuous batching"),
    "plot": ("lmlab.cli.plot", "draw RUN_DIR/loss.png from RUN_DIR/metrics.jsonl"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="lmlab",
        description="Pretrain, fine-tune, decode and serve transformer language models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "_accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return args._run(args) or 0
    except LmlabError as err:
        print(f"lmlab {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmlab {args.command}: interrupted", file=sys.stderr)
        return 130
