from __future__ import annotations

import sys

import torch

from lmlab.errors import ConfigError
from lmlab.generation import GenerationConfig, generate_tokens
from lmlab.models import from_pretrained
from lmlab.tokenizer import Tokenizer


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model directory (config.json + weights)")
    parser.add_argument("--prompt", help="prompt text; read from stdin when omitted")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible)")


def run(args) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise ConfigError("--prompt: empty prompt")
    model = from_pretrained(args.model)
    tokenizer = Tokenizer.from_pretrained(args.model)
    try:
        config = GenerationConfig(
            max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            eos_token_id=[] if model.config.eos_token_id is None else [model.config.eos_token_id],
            seed=args.seed,
        )
    except ValueError as err:
        raise ConfigError(str(err).replace("do_sample=True", "--do-sample")) from None
    ids = tokenizer.encode(prompt)
    if len(ids) + args.max_new_tokens > model.config.n_positions:
        raise ConfigError(
            f"--prompt is {len(ids)} tokens; with --max-new-tokens {args.max_new_tokens} that "
            f"exceeds the model's context window of {model.config.n_positions} tokens"
        )
    stream = tokenizer.stream_decoder(skip_special_tokens=True)
    sys.stdout.write(prompt)
    for token in generate_tokens(model, torch.tensor([ids]), config):
        sys.stdout.write(stream.push(int(token[0])))
        sys.stdout.flush()
    sys.stdout.write(stream.flush() + "\n")
    return 0
