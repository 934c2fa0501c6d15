"""`lmlab lora merge --model BASE --adapter DIR --out DIR`: fold a LoRA adapter (PEFT's format,
from `lmlab finetune … lora:` or from PEFT) into its base model and write a plain checkpoint —
config.json + model.safetensors + the tokenizer — that transformers and every lmlab command load
without knowing about adapters."""

from __future__ import annotations

from pathlib import Path

from lmlab.errors import ConfigError
from lmlab.models import from_pretrained
from lmlab.models.hf.peft import load_adapter, read_adapter_base
from lmlab.models.lora import remove_lora
from lmlab.recipes.finetuning import resolve_model
from lmlab.tokenizer import Tokenizer


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    merge = sub.add_parser("merge", help="write base + adapter as one plain checkpoint")
    merge.add_argument("--adapter", required=True, help="the adapter directory (PEFT format)")
    merge.add_argument("--model", help="the base model directory (default: the adapter's "
                                       "base_model_name_or_path)")
    merge.add_argument("--out", required=True, help="where to write the merged model")


def merge(adapter: str | Path, out: str | Path, *, model: str | Path | None = None) -> Path:
    """Base + adapter → a plain checkpoint at `out` (refused if `out` already holds a model).
    The tokenizer is the adapter's when it has one (a fine-tuning run saves it, with its chat
    template), else the base's."""
    adapter, out = Path(adapter), Path(out)
    base = model or read_adapter_base(adapter)
    if base is None:
        raise ConfigError(f"{adapter}: the adapter names no base model; pass --model DIR")
    base_dir = resolve_model(str(base))
    if (out / "config.json").exists():
        raise ConfigError(f"--out {out}: already holds a model; choose another directory")
    merged = remove_lora(load_adapter(from_pretrained(base_dir), adapter), merge=True)
    tokenizer_dir = adapter if (adapter / "tokenizer_config.json").is_file() else base_dir
    merged.save_pretrained(out, tokenizer=Tokenizer.from_pretrained(tokenizer_dir))
    return out


def run(args) -> int:
    out = merge(args.adapter, args.out, model=args.model)
    print(f"merged {args.adapter} into its base: {out} (a plain checkpoint)")
    return 0
