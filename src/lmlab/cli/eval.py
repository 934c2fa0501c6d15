"""`lmlab eval ACTION …`: the numbers models and decoding strategies are chosen by. A table from
action to the module that implements it (`add_arguments` and `run`, like the top-level commands)."""

from __future__ import annotations

import importlib

# action -> (module, one-line help)
ACTIONS: dict[str, tuple[str, str]] = {
    "perplexity": ("lmlab.cli.eval_perplexity", "sliding-window perplexity (pseudo-perplexity "
                   "for a masked LM) of a corpus, per token, word and byte"),
    "generation": ("lmlab.cli.eval_generation", "decoding strategies on the same prompts: "
                   "quality signals and speed, as a table and a plot"),
    "harness": ("lmlab.cli.eval_harness", "lm-evaluation-harness tasks on an lmlab model"),
    "translation": ("lmlab.cli.eval_translation", "sacreBLEU BLEU, chrF and tokenised BLEU of "
                    "translations with their signatures; a paired bootstrap against a baseline"),
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, parser_class=type(parser))
    for name, (module_name, help_text) in ACTIONS.items():
        importlib.import_module(module_name).add_arguments(
            sub.add_parser(name, help=help_text, description=help_text))


def run(args) -> int:
    return importlib.import_module(ACTIONS[args.action][0]).run(args)
