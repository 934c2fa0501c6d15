"""`lmlab serve`: the OpenAI-compatible HTTP server (lmlab.serving) on uvicorn.

Binds 127.0.0.1 unless told otherwise, and warns when started on another address without an
API key (--api-key, or the LMLAB_API_KEY environment variable). The model is loaded after the
server starts listening — /health and every route answer 503 until it is ready — with the
library's loaders only (safetensors, `weights_only` for .bin). --adapter merges a PEFT LoRA
adapter into the weights first, as `lmlab chat --adapter` does.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lmlab.cli.chat import with_adapter
from lmlab.cli.generate import add_device_argument, load_decoder
from lmlab.errors import ConfigError
from lmlab.tokenizer import Tokenizer
from lmlab.training.runtime import pick_device

log = logging.getLogger(__name__)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model directory (config.json + weights)")
    parser.add_argument("--adapter", metavar="DIR",
                        help="a LoRA adapter in PEFT's format, merged into --model")
    add_device_argument(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--api-key", metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on every route but /health "
                             "(default: $LMLAB_API_KEY; none if unset)")
    parser.add_argument("--model-name", metavar="NAME",
                        help="the model's id in the API (default: the --model folder's name)")
    parser.add_argument("--max-queue", type=int, default=256, metavar="N",
                        help="requests waiting for a row at most; more get 429 (default 256)")
    parser.add_argument("--max-running", type=int, default=16, metavar="N",
                        help="rows decoded together at most (default 16)")
    parser.add_argument("--max-tokens-cap", type=int, metavar="N",
                        help="the most new tokens one choice may ask for (default: the "
                             "context window)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="N",
                        help="request bodies above this size get 413 (default 1 MiB)")


def run(args) -> int:
    import uvicorn

    from lmlab.serving import ServerConfig, create_app

    for flag in ("max_running", "port", "max_body_bytes"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.max_queue < 0 or (args.max_tokens_cap is not None and args.max_tokens_cap < 1):
        raise ConfigError("--max-queue must be >= 0 and --max-tokens-cap >= 1")
    device = pick_device(args.device, flag="--device")  # refused before the server starts
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"--model {model_dir}: no config.json there")
    if args.adapter and not Path(args.adapter).is_dir():
        raise ConfigError(f"--adapter {args.adapter}: not a directory")
    api_key = args.api_key or os.environ.get("LMLAB_API_KEY") or None
    if args.host not in LOOPBACK and api_key is None:
        log.warning("lmlab serve: listening on %s without an API key: anyone who can reach "
                    "this address can use the model (set --api-key or LMLAB_API_KEY)", args.host)
    config = ServerConfig(model_name=args.model_name or model_dir.resolve().name,
                          api_key=api_key, max_queue=args.max_queue,
                          max_running=args.max_running, max_tokens_cap=args.max_tokens_cap,
                          max_body_bytes=args.max_body_bytes)

    failed: list[str] = []
    # A failed load is this command's one error line (at the end), not also the app's log line.
    app_log = logging.getLogger("lmlab.serving.app")
    app_log.setLevel(logging.CRITICAL)

    def load():
        try:
            model = load_decoder(args.model, device=device)
            if args.adapter:
                model = with_adapter(model, args.adapter)
            tokenizer = Tokenizer.from_pretrained(args.model)
            tokenizer.check_fits(model.config.vocab_size, where=args.model)
        except Exception as error:
            failed.append(str(error))
            server.should_exit = True
            raise
        app_log.setLevel(logging.NOTSET)  # loaded: the app reports its own errors again
        log.info("lmlab serve: %s ready as %r at http://%s:%d (chat page at /, API at /v1)",
                 args.model, config.model_name, args.host, args.port)
        return model.eval(), tokenizer

    app = create_app(config, load=load)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                           log_level="warning"))
    server.run()
    if failed:
        raise ConfigError(f"--model {args.model}: {failed[0]}")
    return 0
