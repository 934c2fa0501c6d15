"""Passage retrieval for open-domain QA: a corpus cut into passages, BM25 (bm25s), a dense index
of sentence embeddings searched exactly, reciprocal-rank fusion, and the index folder.

- **Passages**: a JSONL file (one passage per line, its text in `text_field`, a `title` if
  present), a SQuAD-format JSON file (each paragraph a passage, titled with its article), any
  other text file (paragraphs separated by blank lines, titled with the file's stem), or a folder
  of such files (sorted by name).
- **BM25** through `bm25s` (Lucene's variant, k1 = 1.5, b = 0.75) over a fixed tokenisation,
  `bm25_tokens`: lower-cased, runs of two or more word characters (scikit-learn's and bm25s'
  default pattern), bm25s' English stopwords removed, no stemming.
- **Dense**: a BERT-family encoder (all-MiniLM-L6-v2 by default) run by lmlab's own BERT; each
  passage's embedding is the mean of its last hidden states over the attention mask, L2-normalised
  — what sentence-transformers' modules.json for all-MiniLM-L6-v2 says (Transformer → mean
  Pooling → Normalize), truncated at its `max_seq_length`. Passages are encoded longest first in
  fp32 batches, so a batch pads to almost nothing. Search is exact: one matrix product of the
  question's embedding with all passages' (cosine similarity) and `torch.topk`.
- **Hybrid**: reciprocal-rank fusion of the two rankings, score(p) = Σ 1 / (k + rank(p)) with
  ranks from 1 and k = 10 (Cormack et al., 2009 used 60 to fuse whole TREC runs; 10 was
  better on SQuAD's tuning half for recall@5 and for end-to-end F1), over each retriever's
  top `depth` passages.

An index folder holds passages.jsonl, bm25/ (bm25s' files), embeddings.safetensors and
manifest.json, which names the encoder (its path and a SHA-256 of its config and weights):
questions must be embedded by that same encoder.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.errors import ConfigError, DataError
from lmlab.fileio import atomic_write_text
from lmlab.generation.side_by_side import side_by_side
from lmlab.models.hf import from_pretrained
from lmlab.tokenizer import Tokenizer

RETRIEVERS = ("bm25", "dense", "hybrid")
# Tuned on SQuAD dev's half B (docs/evaluation.md, "Measured"): a smaller k makes each
# list's first few ranks count more against the ones below (1/11 vs 1/15 for ranks 1 and 5,
# where k = 60 gives 1/61 vs 1/65).
RRF_K = 10
MANIFEST = "manifest.json"
PASSAGES = "passages.jsonl"
EMBEDDINGS = "embeddings.safetensors"
BM25_DIR = "bm25"
_TOKEN = re.compile(r"(?u)\b\w\w+\b")


@dataclass(frozen=True)
class Passage:
    title: str
    text: str


# -- passages ----------------------------------------------------------------------------------
def read_passages(path: str | Path, *, text_field: str = "text") -> list[Passage]:
    """The passages of a corpus file or folder (see the module docstring); DataError if none."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{path}: no such file or folder")
    passages = [p for f in files for p in _read_file(f, text_field)]
    if not passages:
        raise DataError(f"{path}: no passages (an empty corpus)")
    return passages


def _read_file(path: Path, text_field: str) -> list[Passage]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text, text_field)
    if path.suffix == ".json":
        return _read_squad(path, text)
    return [Passage(path.stem, p) for p in _paragraphs(text)]


def _paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def _read_jsonl(path: Path, text: str, field: str) -> list[Passage]:
    passages = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {n}: not valid JSON ({err.msg})") from None
        value = row.get(field) if isinstance(row, dict) else None
        if not isinstance(value, str):
            raise DataError(f"{path} line {n}: missing text field {field!r} (pick another "
                            "with --text-field)")
        if value.strip():
            passages.append(Passage(str(row.get("title") or ""), value))
    return passages


def _read_squad(path: Path, text: str) -> list[Passage]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from None
    articles = data.get("data") if isinstance(data, dict) else None
    if not isinstance(articles, list):
        raise DataError(f"{path}: expected SQuAD format, {{\"data\": [{{\"title\", "
                        "\"paragraphs\": [{\"context\", ...}]}]}}; other corpora: JSONL or text")
    passages = []
    for a, article in enumerate(articles):
        title = str(article.get("title") or "").replace("_", " ")  # "Super_Bowl_50"
        for p, paragraph in enumerate(article.get("paragraphs") or []):
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            if not isinstance(context, str):
                raise DataError(f"{path}: data[{a}].paragraphs[{p}]: missing field 'context'")
            passages.append(Passage(title, context))
    return passages


# -- BM25 --------------------------------------------------------------------------------------
def bm25_tokens(text: str) -> list[str]:
    """The fixed tokenisation of BM25: lower case, \\w\\w+ runs, English stopwords dropped."""
    from bm25s.stopwords import STOPWORDS_EN

    stop = frozenset(STOPWORDS_EN)
    return [t for t in _TOKEN.findall(text.lower()) if t not in stop]


def build_bm25(passages: Sequence[Passage]):
    import bm25s

    bm25 = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    bm25.index([bm25_tokens(passage_text(p)) for p in passages], show_progress=False)
    return bm25


def bm25_scores(bm25, question: str) -> np.ndarray:
    """BM25 score of every passage for `question` (terms the corpus lacks score nothing)."""
    tokens = [t for t in bm25_tokens(question) if t in bm25.vocab_dict]
    if not tokens:
        return np.zeros(bm25.scores["num_docs"], dtype=np.float32)
    return bm25.get_scores(tokens)


def passage_text(passage: Passage) -> str:
    """What is indexed: the title (when there is one) and the text."""
    return f"{passage.title}. {passage.text}" if passage.title else passage.text


# -- dense -------------------------------------------------------------------------------------
@dataclass
class Encoder:
    model: torch.nn.Module
    tokenizer: Tokenizer
    path: Path
    max_length: int
    sha256: str


def load_encoder(path: str | Path) -> Encoder:
    """A BERT encoder directory as a sentence encoder: mean pooling (an explicit
    1_Pooling/config.json must say so), truncated at sentence_bert_config.json's
    max_seq_length (else the model's positions)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"encoder: {path} is not a model directory (no config.json)")
    pooling = _json(path / "1_Pooling" / "config.json")
    if pooling and not pooling.get("pooling_mode_mean_tokens"):
        raise ConfigError(f"encoder: {path}/1_Pooling/config.json is not mean pooling; lmlab's "
                          "dense retriever pools by the mean")
    model = from_pretrained(path, device="cpu").eval()
    if not hasattr(model, "pool"):
        raise ConfigError(f"encoder: {path} is not a BERT encoder")
    positions = model.config.max_position_embeddings
    max_length = int(_json(path / "sentence_bert_config.json").get("max_seq_length") or positions)
    return Encoder(model=model, tokenizer=Tokenizer.from_pretrained(path), path=path,
                   max_length=min(max_length, positions), sha256=encoder_hash(path))


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def encoder_hash(path: Path) -> str:
    """SHA-256 over the encoder's config.json and weight files: what identifies it."""
    digest = hashlib.sha256()
    for name in ["config.json", *sorted(p.name for p in path.glob("*.safetensors")),
                 *sorted(p.name for p in path.glob("pytorch_model*.bin"))]:
        digest.update(name.encode())
        with open(path / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


# Tokens in one forward pass of `embed` on the CPU. A pass of ~2k tokens keeps each activation
# small (the feed-forward's 2,048 × 1,536 floats are 12 MB): it stays in the allocator's heap and
# near the cache, where a 64-passage batch of ~16k tokens gets fresh pages (glibc maps anything
# over 32 MB anew) for every tensor of every layer. Measured in BENCHMARKS.md ("Dense indexing").
EMBED_TOKENS = 2048


def token_batches(lengths: Sequence[int], batch_size: int, max_tokens: int) -> list[np.ndarray]:
    """Indices of `lengths` longest first, cut into batches of at most `batch_size` rows and
    `max_tokens` padded tokens (rows × the batch's longest; a longer row goes alone)."""
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < order.size:
        rows = max(1, min(batch_size, max_tokens // max(int(lengths[order[start]]), 1)))
        batches.append(order[start:start + rows])
        start += rows
    return batches


def embed(encoder: Encoder, texts: Sequence[str], *, batch_size: int = 64,
          max_tokens: int = EMBED_TOKENS, workers: int | None = None) -> torch.Tensor:
    """(N, d) float32 unit embeddings of `texts`: tokenized in one parallel call, encoded in
    batches of similar lengths (longest first; at most `batch_size` texts and `max_tokens`
    padded tokens a batch), mean-pooled over the mask, L2-normalised — sentence-transformers'
    `encode` for a Transformer → mean Pooling → Normalize model.

    On the CPU the batches run on `workers` threads (default: torch's thread count), each with
    one torch thread (`generation.side_by_side`): whole batches side by side on the cores beat
    every operation split across them, because the small ones (attention over ~150 keys, GELU,
    layer norm) split poorly."""
    rows = encoder.tokenizer.encode_pairs(list(texts), max_length=encoder.max_length,
                                          truncation="longest_first", padding="none")
    ids = [np.asarray(row.input_ids, dtype=np.int64) for row in rows]
    lengths = [len(row) for row in ids]
    out = torch.empty(len(ids), encoder.model.config.hidden_size)

    def encode(chunk: np.ndarray) -> None:
        with torch.inference_mode():  # per thread, like grad mode
            widths = torch.tensor([lengths[j] for j in chunk])
            mask = torch.arange(lengths[chunk[0]]) < widths[:, None]
            batch = torch.zeros(mask.shape, dtype=torch.long)  # [PAD] = 0 where the mask is False
            batch[mask] = torch.from_numpy(np.concatenate([ids[j] for j in chunk]))
            # a batch without padding needs no mask: SDPA then takes its fused kernel
            hidden = encoder.model(batch, attention_mask=None if bool(mask.all()) else mask.long())
            out[torch.from_numpy(chunk)] = F.normalize(mean_pool(hidden, mask), p=2, dim=1)

    side_by_side(encode, token_batches(lengths, batch_size, max_tokens),
                 device=next(encoder.model.parameters()).device, workers=workers)
    return out


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, d): the mean of `hidden` (B, T, d) over the positions `mask` (B, T) marks."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def dense_search(queries: torch.Tensor, passages: torch.Tensor,
                 k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact search: (scores, indices), each (Q, k), of the k passages (N, d) with the largest
    dot product with each query (Q, d) — cosine similarity for unit vectors."""
    return torch.topk(queries @ passages.T, min(k, passages.shape[0]), dim=1)


# -- fusion ------------------------------------------------------------------------------------
def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], *,
                           k: int = RRF_K) -> list[tuple[int, float]]:
    """(passage, Σ 1/(k + rank)) over the rankings (ranks from 1), best first; ties keep the
    order of first appearance."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, passage in enumerate(ranking, 1):
            fused[passage] = fused.get(passage, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda item: -item[1])


# -- the index ---------------------------------------------------------------------------------
@dataclass
class Hit:
    passage: int  # index into Index.passages
    score: float  # the retriever's: BM25 score, cosine similarity, or fused RRF score
    rank: int  # from 1


@dataclass
class Index:
    passages: list[Passage]
    bm25: object  # a bm25s.BM25
    embeddings: torch.Tensor  # (N, d), unit rows
    encoder: Encoder
    manifest: dict

    def search(self, question: str, *, retriever: str = "hybrid", top_k: int = 10,
               depth: int = 100, rrf_k: int = RRF_K) -> list[Hit]:
        """The `top_k` passages for `question`; hybrid fuses each retriever's top `depth`."""
        if retriever not in RETRIEVERS:
            raise ConfigError(f"retriever must be one of {', '.join(RETRIEVERS)}, got "
                              f"{retriever!r}")
        if top_k < 1 or rrf_k < 1:
            raise ConfigError(f"top_k and rrf_k must be positive, got {top_k} and {rrf_k}")
        n = len(self.passages)
        if retriever == "bm25":
            return _hits(self.bm25_ranking(question, top_k))
        if retriever == "dense":
            return _hits(self.dense_ranking(question, top_k))
        fused = reciprocal_rank_fusion(
            [[p for p, _ in self.bm25_ranking(question, min(depth, n))],
             [p for p, _ in self.dense_ranking(question, min(depth, n))]], k=rrf_k)
        return _hits(fused[:top_k])

    def bm25_ranking(self, question: str, k: int) -> list[tuple[int, float]]:
        scores = torch.from_numpy(np.asarray(bm25_scores(self.bm25, question), np.float32))
        top = torch.topk(scores, min(k, scores.numel()))
        return list(zip(top.indices.tolist(), top.values.tolist()))

    def dense_ranking(self, question: str, k: int) -> list[tuple[int, float]]:
        scores, indices = dense_search(embed(self.encoder, [question]), self.embeddings, k)
        return list(zip(indices[0].tolist(), scores[0].tolist()))


def _hits(ranking: Sequence[tuple[int, float]]) -> list[Hit]:
    return [Hit(passage=p, score=float(s), rank=r) for r, (p, s) in enumerate(ranking, 1)]


def build_index(passages: Sequence[Passage], out: str | Path, *, encoder: Encoder,
                batch_size: int = 64) -> Index:
    """Index `passages` (BM25 and dense) into the folder `out` and return the index."""
    import bm25s  # noqa: F401  (fail before any work when it is missing)
    from safetensors.torch import save_file

    if not passages:
        raise DataError("no passages to index (an empty corpus)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bm25 = build_bm25(passages)
    bm25.save(str(out / BM25_DIR), show_progress=False)
    embeddings = embed(encoder, [passage_text(p) for p in passages], batch_size=batch_size)
    save_file({"embeddings": embeddings.contiguous()}, str(out / EMBEDDINGS))
    atomic_write_text(out / PASSAGES, "".join(
        json.dumps({"id": i, "title": p.title, "text": p.text}, ensure_ascii=False) + "\n"
        for i, p in enumerate(passages)))
    manifest = {
        "format": 1, "passages": len(passages),
        "encoder": {"path": str(encoder.path.resolve()), "sha256": encoder.sha256,
                    "dim": int(embeddings.shape[1]), "max_length": encoder.max_length,
                    "pooling": "mean over the attention mask, L2-normalised"},
        "bm25": {"library": "bm25s", "method": "lucene", "k1": 1.5, "b": 0.75,
                 "tokenisation": "lower case, \\w\\w+, bm25s English stopwords, no stemming"},
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return Index(passages=list(passages), bm25=bm25, embeddings=embeddings, encoder=encoder,
                 manifest=manifest)


def load_index(directory: str | Path, *, encoder: str | Path | None = None) -> Index:
    """An index folder, with the encoder that embeds questions: `encoder` if given (it must be
    the one the index was built with), else the one its manifest names."""
    import bm25s
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (MANIFEST, PASSAGES, EMBEDDINGS, BM25_DIR):
        if not (directory / name).exists():
            raise DataError(f"{directory}: missing {name}; not an index folder (build one with "
                            "`lmlab qa index --corpus FILE --out DIR`)")
    manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    built_with = manifest["encoder"]
    path = Path(encoder if encoder is not None else built_with["path"])
    if not (path / "config.json").is_file():
        raise ConfigError(f"encoder: {path} is not a model directory; the index {directory} "
                          "was built with the encoder its manifest.json names — pass it with "
                          "--encoder")
    loaded = load_encoder(path)
    if loaded.sha256 != built_with["sha256"]:
        raise ConfigError(f"encoder: {path} is not the encoder the index {directory} was built "
                          f"with ({built_with['path']}, sha256 {built_with['sha256'][:12]}…); "
                          "rebuild the index with this encoder or pass that one")
    passages = [Passage(r["title"], r["text"]) for r in map(
        json.loads, (directory / PASSAGES).read_text(encoding="utf-8").splitlines())]
    bm25 = bm25s.BM25.load(str(directory / BM25_DIR), show_progress=False)
    embeddings = load_file(str(directory / EMBEDDINGS))["embeddings"]
    return Index(passages=passages, bm25=bm25, embeddings=embeddings,
                 encoder=loaded, manifest=manifest)
