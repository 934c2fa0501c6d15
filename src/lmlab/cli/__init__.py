"""The command line: a thin table from subcommand name to a module with `add_arguments`/`run`.

Errors that are the user's (lmlab.errors.LmlabError, bad flags) become one clear line on stderr
and exit status 2 — never a traceback. Training stopped by SIGINT or SIGTERM (checkpointed at a
step boundary) is one line too, and exit status 128 + the signal's number (130, 143).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from lmlab.errors import Interrupted, LmlabError

# subcommand -> (module, one-line help)
COMMANDS = {
    "demo": ("lmlab.cli.demo", "train a small GPT on the Python standard library and sample it"),
    "prepare": ("lmlab.cli.prepare", "tokenize text into a memory-mapped dataset"),
    "pretrain": ("lmlab.cli.pretrain",
                 "pretrain a GPT or a BERT (--objective) with a YAML config and overrides"),
    "finetune": ("lmlab.cli.finetune", "fine-tune a model: classification, extractive QA, SFT (+ LoRA), translation"),
    "evaluate": ("lmlab.cli.evaluate", "score a fine-tuned model on a labelled file"),
    "predict": ("lmlab.cli.predict", "write a fine-tuned model's predictions for a file"),
    "generate": ("lmlab.cli.generate", "continue prompts with a trained model"),
    "lora": ("lmlab.cli.lora", "LoRA adapters: merge one into its base model"),
    "chat": ("lmlab.cli.chat", "talk with a causal language model in the terminal"),
    "serve": ("lmlab.cli.serve", "an OpenAI-compatible HTTP server with continuous batching"),
    "eval": ("lmlab.cli.eval", "perplexity, lm-evaluation-harness tasks, decoding strategies compared"),
    "qa": ("lmlab.cli.qa", "open-domain QA: index a corpus (BM25 + dense), answer questions from it"),
    "average": ("lmlab.cli.average",
                "average a run's last N checkpoints into one model (as MT systems do)"),
    "plot": ("lmlab.cli.plot", "draw RUN_DIR/loss.png from RUN_DIR/metrics.jsonl"),
    "translate": ("lmlab.cli.translate", "translate lines (a file or stdin) with an encoder–decoder, streaming"),
}


def add_resume_argument(parser: argparse.ArgumentParser) -> None:
    """--resume (strict: RUN_DIR must hold a checkpoint) or --resume auto (continue if it does,
    else start a new run), for the commands that train."""
    parser.add_argument("--resume", nargs="?", const=True, default=False, choices=["auto"],
                        metavar="auto",
                        help="continue from RUN_DIR's latest checkpoint (an error if it has "
                             "none); --resume auto: continue if there is one, else start afresh")


def rank_zero_speaks():
    """`print` on rank 0, a no-op on the other ranks under torchrun, whose log is cut to errors:
    the commands that train speak once for all their processes."""
    if int(os.environ.get("RANK", "0")) == 0:
        return print
    logging.getLogger().setLevel(logging.ERROR)
    return lambda *_: None


class ConfigKeysHelp(argparse.Action):
    """-h/--help that also lists the config keys: the recipe's when the command line has already
    picked one (`finetune sft --help`, `pretrain --objective mlm --help`), else an overview."""

    def __init__(self, option_strings, dest, *, command: str, choice: str, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.command, self.choice = command, choice

    def __call__(self, parser, namespace, values, option_string=None):
        from lmlab.recipes import recipes_for
        from lmlab.recipes.reference import key_help, overview

        recipe = recipes_for(self.command).get(getattr(namespace, self.choice, None))
        parser.print_help()
        print("\n" + (key_help(recipe) if recipe else overview(self.command)))
        parser.exit()


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
        # A command that runs a recipe names the argument that picks it (RECIPE_CHOICE): its
        # --help lists the recipe's config keys too.
        choice = getattr(module, "RECIPE_CHOICE", None)
        command = sub.add_parser(name, help=help_text, description=help_text,
                                 add_help=choice is None)
        if choice is not None:
            command.add_argument("-h", "--help", action=ConfigKeysHelp, command=name,
                                 choice=choice, help="show this help and the config keys, then exit")
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
    except Interrupted as stop:  # SIGINT/SIGTERM while training: checkpointed, then stopped
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
            how = "; continue with --resume" if hasattr(args, "resume") else ""
            print(f"lmlab {args.command}: {stop}{how}", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print(f"lmlab {args.command}: interrupted", file=sys.stderr)
        return 130
