"""`lmlab eval perplexity --model DIR --data FILE|FOLDER [--stride S] [--context N]`: perplexity
of a causal LM over a whole corpus by sliding windows, or pseudo-perplexity of a masked LM, per
token, per word and per byte, printed with the settings it was measured under."""

from __future__ import annotations

import json

from lmlab.cli.generate import add_device_argument
from lmlab.data.sources import iter_documents
from lmlab.evaluation.perplexity import PerplexityResult, evaluate_perplexity
from lmlab.models import from_pretrained
from lmlab.tokenizer import Tokenizer
from lmlab.training.runtime import pick_device


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True,
                        help="a model directory: a GPT (perplexity) or a BERT with its masked-LM "
                             "head (pseudo-perplexity)")
    parser.add_argument("--data", required=True, nargs="+",
                        help="text files, folders of them, or JSONL (one document per line); a "
                             "file named here is read whatever its suffix (WikiText's .tokens)")
    parser.add_argument("--context", type=int, default=None,
                        help="window length in tokens (default: the model's context window)")
    parser.add_argument("--stride", type=int, default=None,
                        help="tokens a window advances by; each token is scored once with at "
                             "least context - stride tokens before it (default: context // 2; "
                             "causal LMs only)")
    parser.add_argument("--text-field", default="text", help="the JSONL field holding the text")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="windows (masked copies, for a masked LM) per forward pass")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON record")
    add_device_argument(parser)


def format_result(r: PerplexityResult) -> str:
    """The numbers, with every setting that changes them."""
    first = ""
    if r.scored == r.tokens - 1:
        first = " (the stream's first token has no context)"
    elif r.scored < r.tokens:
        first = (" (a window's first token has no context: the stream's and, at stride = "
                 "context, every window's)")
    lines = [
        f"model {r.model} · data {r.data}: {r.documents:,} document(s), {r.words:,} words, "
        f"{r.bytes:,} bytes",
        f"{r.method}: {r.tokens:,} tokens, {r.scored:,} scored{first} · context {r.context}"
        + (f" · stride {r.stride}" if r.stride is not None else "")
        + f" · {r.windows:,} windows · batch {r.batch_size} · {r.device} fp32",
    ]
    if r.joined_with:
        lines.append(f"documents joined into one stream: {r.joined_with}")
    name = "pseudo-perplexity" if r.method == "pseudo-perplexity" else "perplexity"
    lines.append(f"{name} {r.token_perplexity:.3f} per token · {r.word_perplexity:.3f} per word · "
                 f"{r.bits_per_byte:.4f} bits per byte (byte perplexity "
                 f"{r.byte_perplexity:.4f}) · NLL {r.nll:.1f} nats")
    return "\n".join(lines)


def run(args) -> int:
    device = pick_device(args.device, flag="--device")
    # checks the paths now; reads (and reports non-UTF-8 text) after the settings are checked
    texts = (doc.text for doc in iter_documents(args.data, text_field=args.text_field))
    model = from_pretrained(args.model, device=device).eval()
    tokenizer = Tokenizer.from_pretrained(args.model)
    result = evaluate_perplexity(model, tokenizer, texts, context=args.context,
                                 stride=args.stride, batch_size=args.batch_size,
                                 data_name=", ".join(args.data), model_name=args.model)
    print(json.dumps(result.as_dict()) if args.json else format_result(result))
    return 0
