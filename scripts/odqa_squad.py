#!/usr/bin/env python
"""Open-domain QA on SQuAD v1.1 dev: retrieval recall and, with a reader, end-to-end EM/F1.

    python scripts/odqa_squad.py                              recall@1/5/20 on half A
    python scripts/odqa_squad.py --half B                     the same on half B (for tuning)
    python scripts/odqa_squad.py --reader runs/squad --top-k 1 5 10   + end-to-end EM/F1
    python scripts/odqa_squad.py --half B --reader runs/squad --retrieval-weight 0 1 2 4
                                                  (weights compared on one reading: tuning)
    python scripts/odqa_squad.py --half B --reader runs/squad_negatives --scoring span relative
                                                  (span scores with and without the no-answer
                                                  logits subtracted, on one reading; a number
                                                  subtracts that weight × them)
    python scripts/odqa_squad.py --half B --reader runs/squad_negatives --rrf-k 60 10
                                                  (two fusions, read once: their passages' union)

The corpus is every paragraph of dev-v1.1.json (2,067), each a passage titled with its article
(evaluation/retrieval.py: the indexed text is "title. paragraph"). The questions are one half of
configs/finetune/squad.yaml's article split: A = `test_titles` (the articles the reader was not
trained on), B = `train_titles` + `validation_titles`. Tune on B, report A. A question's gold
passage is the paragraph it was asked on. Hybrid = reciprocal-rank fusion of the top `--depth`
of BM25 and dense.

Reported: recall@1/5/20 per retriever, retrieval latency per question (one question at a time,
median and mean), index build time (BM25 and dense separately); with --reader, end-to-end
EM/F1 (SQuAD's official normalisation) reading the top-k passages of `--retriever`, next to the
same reader's EM/F1 given the gold paragraph. Everything runs on the CPU. Writes --json if given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from lmlab.config import read_yaml  # noqa: E402
from lmlab.evaluation.retrieval import (RRF_K, build_bm25, embed, load_encoder,  # noqa: E402
                                        read_passages, reciprocal_rank_fusion, passage_text)
from lmlab.evaluation.squad import squad_scores  # noqa: E402

KS = (1, 5, 20)


def questions(data: Path, titles: set[str]) -> list[dict]:
    """{id, question, answers, gold} of the articles in `titles`; gold = the paragraph's index
    among all paragraphs of the file (the order read_passages gives)."""
    rows, passage = [], 0
    for article in json.loads(data.read_text(encoding="utf-8"))["data"]:
        for paragraph in article["paragraphs"]:
            if article["title"] in titles:
                rows += [{"id": qa["id"], "question": qa["question"], "gold": passage,
                          "answers": [a["text"] for a in qa["answers"]]}
                         for qa in paragraph["qas"]]
            passage += 1
    return rows


def build(passages, encoder) -> tuple[object, torch.Tensor, dict[str, float]]:
    t0 = time.perf_counter()
    bm25 = build_bm25(passages)
    t1 = time.perf_counter()
    embeddings = embed(encoder, [passage_text(p) for p in passages], batch_size=64)
    t2 = time.perf_counter()
    return bm25, embeddings, {"bm25_s": t1 - t0, "dense_s": t2 - t1}


def rankings(qs, passages, bm25, embeddings, encoder, depth: int):
    """Per question the top-`depth` passages of BM25 and of dense, and each one's latency (s)."""
    from lmlab.evaluation.retrieval import bm25_scores, dense_search

    out = {"bm25": [], "dense": []}
    latency = {"bm25": [], "dense": []}
    for q in qs:
        t0 = time.perf_counter()
        scores = torch.from_numpy(bm25_scores(bm25, q["question"]).astype("float32"))
        out["bm25"].append(torch.topk(scores, depth).indices.tolist())
        t1 = time.perf_counter()
        _, top = dense_search(embed(encoder, [q["question"]]), embeddings, depth)
        out["dense"].append(top[0].tolist())
        t2 = time.perf_counter()
        latency["bm25"].append(t1 - t0)
        latency["dense"].append(t2 - t1)
    return out, latency


def fuse(ranked, rrf_k: int) -> list[list[int]]:
    return [[p for p, _ in reciprocal_rank_fusion([b, d], k=rrf_k)]
            for b, d in zip(ranked["bm25"], ranked["dense"])]


def recall(ranked: list[list[int]], qs) -> dict[str, float]:
    return {f"recall@{k}": 100 * sum(q["gold"] in r[:k] for q, r in zip(qs, ranked)) / len(qs)
            for k in KS}


def end_to_end(reader_dir: str, qs, passages, rankings: dict[str, list[list[int]]], top_ks,
               weights: list[float], scorings: list[str] | None, aggregates: list[str],
               candidates_out: str | None = None) -> dict:
    """EM/F1 reading the top-k passages of each ranking of `rankings` (named: several RRF k),
    for each k of `top_ks`, each retrieval weight of `weights`, each span scoring of
    `scorings`, each aggregate of `aggregates` — one reading of the union of those passages
    serves them all — and given the gold paragraph. Scorings: "span" (start + end logit),
    "relative" (minus the [CLS] no-answer logits), or a number (minus that weight × them);
    None = the reader's own (open_qa.relative_scores). Aggregates: open_qa.merge_answers.
    `candidates_out`: every read passage's best span under each scoring, a JSON line per
    question (to score other rules without reading again)."""
    import math

    from lmlab.recipes.finetuning import load_run
    from lmlab.recipes.open_qa import (check_reader, decode, merge_answers, read_logits,
                                       relative_scores)

    reader = load_run(reader_dir, device="cpu")
    check_reader(reader)
    scorings = scorings or ["relative" if relative_scores(reader) else "span"]
    gold = [(q["id"], q["answers"]) for q in qs]
    settings = [(r, k, w, s, a) for r in rankings for k in top_ks for w in weights
                for s in scorings for a in aggregates]
    best = {setting: {} for setting in settings}
    at_gold = {}
    dump = open(candidates_out, "w", encoding="utf-8") if candidates_out else None
    t0 = time.perf_counter()
    for n, q in enumerate(qs):
        tops = {name: ranked[n][:max(top_ks)] for name, ranked in rankings.items()}
        read_ids = list(dict.fromkeys([p for top in tops.values() for p in top] + [q["gold"]]))
        logits = read_logits(reader, q["question"], [passages[p].text for p in read_ids])
        spans = {s: dict(zip(read_ids, decode(reader, logits, relative=null_weight(s))))
                 for s in scorings}
        at_gold[q["id"]] = spans[scorings[0]][q["gold"]][0]
        if dump:
            dump.write(json.dumps({"id": q["id"], "top": tops, "gold": q["gold"], "spans": {
                s: {str(p): spans[s][p] for p in read_ids} for s in scorings}}) + "\n")
        for r, k, w, s, a in settings:
            scored = [(spans[s][p][0], spans[s][p][1] - w * math.log(rank))
                      for rank, p in enumerate(tops[r][:k], 1) if math.isfinite(spans[s][p][1])]
            merged = merge_answers(scored, aggregate=a)
            best[r, k, w, s, a][q["id"]] = scored[merged[0][0]][0] if merged else ""
        if (n + 1) % 500 == 0:
            print(f"  read {n + 1}/{len(qs)} questions ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr)
    if dump:
        dump.close()
    return {"gold_paragraph": squad_scores(at_gold, gold),
            **{label(*setting, list(rankings), weights, scorings, aggregates):
               squad_scores(found, gold) for setting, found in best.items()},
            "reader_seconds": time.perf_counter() - t0}


NULL_WEIGHTS = {"span": 0.0, "relative": 1.0}


def null_weight(scoring: str) -> float:
    """The weight of the no-answer logits a scoring subtracts: span 0, relative 1, or a number."""
    return NULL_WEIGHTS[scoring] if scoring in NULL_WEIGHTS else float(scoring)


def scoring(value: str) -> str:
    """--scoring's values: span, relative, or a weight of the no-answer logits (a number)."""
    try:
        null_weight(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected span, relative or a number (the no-answer weight)") from None
    return value


def label(ranking: str, k: int, weight: float, scoring: str, aggregate: str, rankings: list[str],
          weights: list[float], scorings: list[str], aggregates: list[str]) -> str:
    """top{k}, with /{ranking}, /W={weight}, /{scoring} and /{aggregate} where several are
    compared."""
    return (f"top{k}" + (f"/{ranking}" if len(rankings) > 1 else "")
            + (f"/W={weight:g}" if len(weights) > 1 else "")
            + (f"/{scoring}" if len(scorings) > 1 else "")
            + (f"/{aggregate}" if len(aggregates) > 1 else ""))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT / "../shared/data/squad_v1.1/dev-v1.1.json"))
    p.add_argument("--config", default=str(ROOT / "configs/finetune/squad.yaml"))
    p.add_argument("--half", choices=["A", "B"], default="A")
    p.add_argument("--encoder", help="default all-MiniLM-L6-v2")
    p.add_argument("--depth", type=int, default=100, help="each retriever's list fused by RRF")
    p.add_argument("--rrf-k", type=int, nargs="+", default=[RRF_K],
                   help="hybrid's RRF k; several: recall for each, and with --reader each "
                        "one's end-to-end EM/F1 (one reading of their passages' union)")
    p.add_argument("--limit", type=int, help="only the first N questions (a quick check)")
    p.add_argument("--reader", help="a fine-tuned QA run: also end-to-end EM/F1")
    p.add_argument("--retriever", choices=["bm25", "dense", "hybrid"], default="hybrid")
    p.add_argument("--top-k", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--retrieval-weight", type=float, nargs="+", default=[1.0],
                   help="W in span score − W·ln(rank); several values share one reading")
    p.add_argument("--scoring", nargs="+", type=scoring,
                   help="span scores: start + end logit (span), minus the [CLS] no-answer "
                        "logits (relative), or minus a weight × them (a number, for tuning); "
                        "several share one reading (default: the reader's own)")
    p.add_argument("--aggregate", nargs="+", choices=["max", "sum"], default=["max"],
                   help="max: the best-scored span; sum: spans with the same (normalised) text "
                        "pooled by log-sum-exp (open_qa.merge_answers)")
    p.add_argument("--candidates", help="write every read passage's best spans here (JSONL)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()

    from lmlab.recipes.finetuning import resolve_model

    data = Path(args.data)
    cfg = read_yaml(args.config)
    titles = set(cfg["test_titles"] if args.half == "A"
                 else cfg["train_titles"] + cfg["validation_titles"])
    qs = questions(data, titles)[:args.limit]
    passages = read_passages(data)
    encoder = load_encoder(args.encoder or resolve_model("minilm"))
    torch.set_grad_enabled(False)
    bm25, embeddings, build_s = build(passages, encoder)
    print(f"{len(passages)} passages indexed: BM25 {build_s['bm25_s']:.1f} s, dense "
          f"{build_s['dense_s']:.1f} s ({len(passages) / build_s['dense_s']:.0f} passages/s); "
          f"{len(qs)} questions of half {args.half}")
    ranked, latency = rankings(qs, passages, bm25, embeddings, encoder, args.depth)
    results = {"half": args.half, "questions": len(qs), "passages": len(passages),
               "build_seconds": build_s, "threads": torch.get_num_threads(), "recall": {},
               "latency_ms": {}}
    for name in ("bm25", "dense"):
        results["recall"][name] = recall(ranked[name], qs)
        results["latency_ms"][name] = {"median": 1e3 * statistics.median(latency[name]),
                                       "mean": 1e3 * statistics.mean(latency[name])}
    for k in args.rrf_k:
        t0 = time.perf_counter()
        hybrid = fuse(ranked, k)
        fuse_ms = 1e3 * (time.perf_counter() - t0) / len(qs)
        name = "hybrid" if len(args.rrf_k) == 1 else f"hybrid(k={k})"
        results["recall"][name] = recall(hybrid, qs)
        results["latency_ms"][name] = {
            "mean": results["latency_ms"]["bm25"]["mean"] + results["latency_ms"]["dense"]["mean"]
            + fuse_ms}
    print("| retriever | " + " | ".join(f"recall@{k}" for k in KS) + " | latency/question |")
    print("|---|" + "---:|" * (len(KS) + 1))
    for name, r in results["recall"].items():
        ms = results["latency_ms"][name]
        print(f"| {name} | " + " | ".join(f"{r[f'recall@{k}']:.1f}%" for k in KS)
              + f" | {ms.get('median', ms['mean']):.1f} ms |")
    if args.reader:
        chosen = ({args.retriever: ranked[args.retriever]} if args.retriever != "hybrid"
                  else {f"k={k}": fuse(ranked, k) for k in args.rrf_k})
        weights = args.retrieval_weight
        e2e = end_to_end(args.reader, qs, passages, chosen, sorted(args.top_k), weights,
                         args.scoring, args.aggregate, args.candidates)
        results["end_to_end"] = {"retriever": args.retriever,
                                 "retrieval_weight": weights[0] if len(weights) == 1 else weights,
                                 **e2e}
        g = e2e["gold_paragraph"]
        print(f"reader on the gold paragraph: EM {g['exact_match']:.1f} / F1 {g['f1']:.1f}")
        for key, s in e2e.items():
            if key.startswith("top"):
                print(f"end to end, {args.retriever} {key}: EM "
                      f"{s['exact_match']:.1f} / F1 {s['f1']:.1f} "
                      f"({100 * s['f1'] / g['f1']:.0f}% of the gold-paragraph F1)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
