from __future__ import annotations

from lmlab.data.prepare import build_tokenizer, prepare_dataset
from lmlab.errors import ConfigError


def add_arguments(parser) -> None:
    parser.add_argument("sources", nargs="+", help="text files, folders, globs or JSONL files")
    parser.add_argument("--out", required=True, help="dataset directory to write")
    parser.add_argument("--tokenizer", default="bpe",
                        help="'bpe' (train byte-level BPE), 'wordpiece' (train an uncased BERT"
                             " WordPiece), 'unigram' (train a T5 SentencePiece-style Unigram"
                             " with 100 sentinels), 'char', or a tokenizer/model directory")
    parser.add_argument("--vocab-size", type=int, default=8192,
                        help="BPE / WordPiece / Unigram vocabulary size")
    parser.add_argument("--val", nargs="*", default=None, help="validation sources (else a split)")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--split", choices=["auto", "document", "tail"], default="auto")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text")
    parser.add_argument("--doc-separator", default=None,
                        help="regular expression that cuts plain-text files into documents,"
                             " e.g. '\\n\\s*\\n' for blank lines (next-sentence prediction"
                             " needs documents)")


def run(args) -> int:
    if args.tokenizer == "bpe" and args.vocab_size < 257:
        raise ConfigError(f"--vocab-size must be at least 257, got {args.vocab_size}")
    tokenizer = build_tokenizer(args.tokenizer, args.sources, vocab_size=args.vocab_size,
                                text_field=args.text_field)
    info = prepare_dataset(
        args.sources, tokenizer=tokenizer, out_dir=args.out, val_sources=args.val,
        val_fraction=args.val_fraction, split=args.split, text_field=args.text_field,
        document_separator=args.doc_separator, progress=True,
    )
    for name, split in info.splits.items():
        print(f"{name}: {split.tokens:,} tokens in {split.documents:,} documents")
    print(f"dataset written to {args.out} (split: {info.split}, vocab {info.vocab_size})")
    return 0
