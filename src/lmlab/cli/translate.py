"""`lmlab translate --model DIR [--to de] [FILE]`: translate lines (FILE, else standard input)
with an encoder–decoder, printing each translation as soon as its batch is done (on the CPU,
batches of the next lines run side by side, one per core), in input order.

One input line is one source text; an empty line gives an empty line (and is counted on stderr),
so the output stays line-aligned with the input. A source longer than the model's
max_source_length is truncated, with a warning. Multilingual models need `--to LANG`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from lmlab.cli.generate import add_device_argument
from lmlab.errors import DataError
from lmlab.recipes.translation import LineStats, load_translator, translate_lines
from lmlab.training.runtime import pick_device


def add_arguments(parser) -> None:
    parser.add_argument("file", nargs="?", help="text to translate, one source per line "
                        "(default: standard input)")
    parser.add_argument("--model", required=True, help="a translation model directory (lmlab "
                        "finetune translation --out, or a T5 checkpoint)")
    parser.add_argument("--to", metavar="LANG", help="the target language of a multilingual "
                        "model (its translation.json lists them)")
    parser.add_argument("--num-beams", type=int, default=5, help="beam search width (default 5; "
                        "1 = greedy)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="longest translation in "
                        "tokens (default: the model's max_target_length)")
    parser.add_argument("--batch-size", type=int, default=32, help="lines translated together "
                        "(default 32; on the CPU one batch per core at a time; from a terminal, "
                        "each line as it is typed)")
    add_device_argument(parser)


def _lines(path: str | None) -> Iterator[str]:
    if path is None:
        yield from sys.stdin
        return
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{path}: no such file")
    with file.open(encoding="utf-8") as handle:
        try:
            yield from handle
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start} of a "
                            "read block)") from None


def run(args) -> int:
    device = pick_device(args.device, flag="--device")
    model, tokenizer, languages = load_translator(args.model, device=device)
    interactive = args.file is None and sys.stdin.isatty()
    stats = LineStats()
    for text in translate_lines(model, tokenizer, languages, _lines(args.file), to=args.to,
                                num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                                batch_size=1 if interactive else args.batch_size, stats=stats):
        print(text, flush=True)
    if stats.empty:
        print(f"lmlab translate: {stats.empty} of {stats.lines} input lines were empty (left "
              "empty in the output)", file=sys.stderr)
    return 0
