"""`lmlab generate`: every decoding knob on the command line; streams greedy and sampled text.

Prompts come from --prompt (repeatable), --prompt-file (one per line) or standard input.
`--compare [NAME=KNOBS …]` runs several strategies on the same prompts and prints them side by
side with `lmlab eval generation`'s table (tokens/s and quality signals; the same code).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

import torch

from lmlab.errors import ConfigError, DataError
from lmlab.generation import GenerationConfig, generate, stream
from lmlab.generation.config import DEFAULT_MAX_NEW_TOKENS
from lmlab.generation.protocol import check_decoder, model_device
from lmlab.models import from_pretrained
from lmlab.tokenizer import Tokenizer
from lmlab.training.runtime import DEVICE_HELP, pick_device


def _json(flag):
    def parse(text):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{flag}: not valid JSON ({err.msg}): {text!r}") from None
    return parse


def _flag_type(parse):
    """An argparse type from a parser raising ConfigError: argparse then shows our message."""
    def convert(text):
        try:
            return parse(text)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err).split(": ", 1)[-1]) from None
    return convert


def _early_stopping(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "never":
        return "never"
    raise ConfigError(f"--early-stopping: expected true, false or never, got {text!r}")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--eos-token-id: expected comma-separated integers, got {text!r}") from None


# GenerationConfig field -> (type on the command line, help). The flag is --field-with-dashes.
KNOBS = {
    "max_new_tokens": (int, f"number of tokens to generate (default {DEFAULT_MAX_NEW_TOKENS}, "
                            "the library's)"),
    "max_length": (int, "prompt + new tokens, instead of --max-new-tokens"),
    "min_new_tokens": (int, "EOS is forbidden before this many new tokens"),
    "num_beams": (int, "beam search with this many beams"),
    "num_return_sequences": (int, "outputs per prompt (beams or samples)"),
    "temperature": (float, "sampling temperature"),
    "top_k": (int, "sample from the k most likely tokens"),
    "top_p": (float, "nucleus sampling: smallest set of tokens with this much probability"),
    "min_p": (float, "drop tokens below min_p × the top token's probability"),
    "typical_p": (float, "locally typical sampling"),
    "epsilon_cutoff": (float, "drop tokens with probability below epsilon"),
    "eta_cutoff": (float, "eta sampling"),
    "repetition_penalty": (float, "divide (multiply) the scores of seen tokens, CTRL-style"),
    "no_repeat_ngram_size": (int, "never repeat an n-gram of this size"),
    "bad_words_ids": (_json("--bad-words-ids"), "JSON list of banned token sequences"),
    "sequence_bias": (_json("--sequence-bias"), 'JSON [[[ids…], bias], …]'),
    "frequency_penalty": (float, "OpenAI: subtract penalty × count of the token so far"),
    "presence_penalty": (float, "OpenAI: subtract penalty once the token has appeared"),
    "logit_bias": (_json("--logit-bias"), 'OpenAI: JSON {"token_id": bias}'),
    "length_penalty": (float, "beam search: score / length ** length_penalty"),
    "early_stopping": (_early_stopping, "beam search: true, false or never"),
    "eos_token_id": (_int_list, "comma-separated EOS ids (default: the model's)"),
    "pad_token_id": (int, "id written after a row has finished"),
    "seed": (int, "seed for sampling (reproducible, per call)"),
}


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model directory (config.json + weights)")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--prompt-file", help="a file with one prompt per line")
    parser.add_argument("--draft-model", help="a smaller model for speculative decoding")
    add_device_argument(parser)
    parser.add_argument("--compare", nargs="*", metavar="NAME=JSON",
                        help="compare strategies side by side (default: a standard set), e.g. "
                             "greedy={} 'nucleus={\"do_sample\": true, \"top_p\": 0.9}'")
    add_knob_arguments(parser)


def add_knob_arguments(parser, *, helps: dict[str, str] | None = None) -> None:
    """--do-sample, --stop and a flag per KNOBS entry: the decoding knobs every command that
    decodes (generate, chat) takes alike; `knobs_from` reads them back. `helps` replaces the
    help of some knobs (a command with another default says so)."""
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy/beam")
    parser.add_argument("--stop", action="append", dest="stop_strings", metavar="TEXT",
                        help="stop when this text is generated (repeatable)")
    for name, (kind, help_text) in KNOBS.items():
        help_text = (helps or {}).get(name, help_text)
        kind = kind if kind in (int, float) else _flag_type(kind)
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=help_text)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise DataError(f"--prompt-file {path}: file not found")
        try:
            prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as err:
            raise DataError(f"--prompt-file {path}: not UTF-8 text (byte {err.start})") from None
    if not prompts and not sys.stdin.isatty():
        text = sys.stdin.read()
        prompts = [text] if text else []
    if not prompts or any(not p for p in prompts):
        raise ConfigError("--prompt: empty prompt; give --prompt TEXT, --prompt-file or stdin")
    return prompts


def knobs_from(args, model) -> dict:
    knobs = {name: getattr(args, name) for name in KNOBS if getattr(args, name) is not None}
    if args.do_sample:
        knobs["do_sample"] = True
    if args.stop_strings:
        knobs["stop_strings"] = args.stop_strings
    if "sequence_bias" in knobs:
        try:
            knobs["sequence_bias"] = {tuple(ids): float(b) for ids, b in knobs["sequence_bias"]}
        except (TypeError, ValueError):
            raise ConfigError('--sequence-bias: expected JSON [[[ids…], bias], …]') from None
    if "logit_bias" in knobs:
        try:
            knobs["logit_bias"] = {int(k): float(v) for k, v in knobs["logit_bias"].items()}
        except (AttributeError, TypeError, ValueError):
            raise ConfigError('--logit-bias: expected JSON {"token_id": bias, …}') from None
    if "eos_token_id" not in knobs:
        knobs["eos_token_id"] = [] if model.config.eos_token_id is None else [model.config.eos_token_id]
    return knobs


# The library's errors name GenerationConfig's parameters; the command line says its flags.
FLAGS = {"do_sample": "--do-sample", "stop_strings": "--stop",
         **{name: "--" + name.replace("_", "-") for name in KNOBS}}


def in_flag_words(message: str) -> str:
    """A library message in the command line's words: each parameter it names becomes its flag
    (`top_p` → `--top-p`, `do_sample=True` → `--do-sample`); other words stay as they are."""
    message = message.replace("do_sample=True", "do_sample")
    return re.sub(r"(?<![\w-])[a-z]+(?:_[a-z]+)*\b", lambda m: FLAGS.get(m[0], m[0]), message)


def _config_error(err: ValueError) -> ConfigError:
    return ConfigError(in_flag_words(str(err)))


def add_device_argument(parser) -> None:
    """--device: where every command that runs a model runs it (lmlab.training.runtime's rule)."""
    parser.add_argument("--device", default="auto", help=f"where the model runs: {DEVICE_HELP} "
                        "(default auto)")


def load_decoder(path: str, *, flag: str = "--model", device: torch.device | None = None):
    """A model that can generate text (on `device`, the CPU by default), or a one-line error
    naming the flag."""
    model = from_pretrained(path, device=device)
    try:
        check_decoder(model)
    except TypeError as err:
        raise ConfigError(f"{flag} {path}: {err}") from None
    return model


def run(args) -> int:
    prompts = read_prompts(args)
    device = pick_device(args.device, flag="--device")
    model = load_decoder(args.model, device=device)
    tokenizer = Tokenizer.from_pretrained(args.model)
    tokenizer.check_fits(model.config.vocab_size, where=args.model)
    knobs = knobs_from(args, model)
    if args.compare is not None:
        return run_compare(args, model, tokenizer, prompts, knobs)
    try:
        config = GenerationConfig(**knobs)
    except ValueError as err:
        raise _config_error(err) from None
    draft = (load_decoder(args.draft_model, flag="--draft-model", device=device)
             if args.draft_model else None)
    for prompt in prompts:
        ids = torch.tensor([tokenizer.encode(prompt)])
        try:
            new = config.new_tokens_for(ids.shape[1])
        except ValueError as err:
            raise ConfigError(f"--max-length: {err}") from None
        config, knobs = fit_default_length(config, knobs, ids.shape[1], model, args)
        try:  # the library's one context-window check, said in the command line's words
            config.budget(ids.shape[1], model=model)
        except ValueError:
            budget = (f"--max-length {config.max_length}" if config.max_new_tokens is None
                      else f"--max-new-tokens {new}" if args.max_new_tokens is not None
                      else f"the default of {new} new tokens")
            raise ConfigError(f"--prompt is {ids.shape[1]} tokens; with {budget} that exceeds "
                              f"the model's context window of {model.context_window} tokens"
                              ) from None
        streamable = config.num_beams == 1 and config.num_return_sequences == 1 and draft is None
        if streamable:  # one token iterator feeds the terminal as it goes
            sys.stdout.write(prompt)
            for step in stream(model, ids, config, tokenizer=tokenizer):
                sys.stdout.write(step.texts[0])
                sys.stdout.flush()
            sys.stdout.write("\n")
            continue
        try:
            out = generate(model, ids, tokenizer=tokenizer, draft_model=draft, **knobs)
        except ValueError as err:
            raise _config_error(err) from None
        for row in out:
            print(prompt + tokenizer.decode(row[ids.shape[1]:].tolist(), skip_special_tokens=True))
    return 0


def fit_default_length(config: GenerationConfig, knobs: dict, prompt_len: int, model, args):
    """The default length budget adapts to the model at hand: with no --max-new-tokens or
    --max-length, a prompt that leaves less room than the default in the context window gets
    the room left (said once on stderr), instead of an error about a number the user never set.
    An explicit length is honoured or refused, never changed."""
    window = getattr(model, "context_window", None)
    if (args.max_new_tokens is not None or args.max_length is not None or window is None
            or prompt_len + config.max_new_tokens <= window or prompt_len >= window):
        return config, knobs
    room = window - prompt_len
    if not getattr(args, "_told_about_length", False):
        print(f"lmlab generate: note: {room} new tokens (the room left in the model's context "
              f"window of {window} after a {prompt_len}-token prompt) instead of the default "
              f"{config.max_new_tokens}", file=sys.stderr)
        args._told_about_length = True
    return dataclasses.replace(config, max_new_tokens=room), {**knobs, "max_new_tokens": room}


def run_compare(args, model, tokenizer, prompts, knobs) -> int:
    """Every continuation, then the table of `lmlab eval generation` (the same code: that
    command adds the CSV, the plot and the default strategies' full set)."""
    from lmlab.evaluation.strategies import (DEFAULT_STRATEGIES, compare_strategies,
                                             markdown_table, parse_strategies)

    try:
        strategies = parse_strategies(args.compare) if args.compare else dict(DEFAULT_STRATEGIES)
    except ValueError as err:
        raise ConfigError(f"--compare {err}".replace("strategy ", "", 1)) from None
    draft = (load_decoder(args.draft_model, flag="--draft-model", device=model_device(model))
             if args.draft_model else None)
    try:
        results = compare_strategies(
            model, tokenizer, prompts, strategies=strategies,
            max_new_tokens=knobs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS,
            seed=knobs.get("seed", 0), eos_token_id=knobs["eos_token_id"], draft_model=draft,
        )
    except ValueError as err:
        raise ConfigError(f"--compare {err}".replace("strategy ", "", 1)) from None
    for i, prompt in enumerate(prompts):
        print(f"\n### prompt {i + 1}: {prompt!r}")
        for r in results:
            print(f"--- {r.name} {json.dumps(r.knobs)}\n{prompt}{r.texts[i]}")
    print()
    print(markdown_table(results), end="")
    return 0
