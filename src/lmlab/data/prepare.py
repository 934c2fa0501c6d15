"""Text sources → a prepared token dataset (`train.bin`, `val.bin`, `meta.json`, tokenizer files).

Documents are streamed, tokenized `batch_docs` at a time and appended to raw `.bin` files, so
memory is bounded by one batch. Every document is followed by the tokenizer's EOS (nothing if it
has none), as in GPT-2 pretraining data; `<split>.docs.bin` records where each document ends
(int64 token offsets), which next-sentence prediction needs — a WordPiece stream has no EOS to
find them by. How val is chosen:
- `val_sources` given: those documents are val, `sources` are train (recorded as "sources");
- "document": a document is val iff a hash of its `key` (its file relative to the folder or glob
  it was found through, plus `:line`, `#chunk` or `@piece`) is below `val_fraction`:
  deterministic, independent of the order of the files and of where the corpus lies;
- "tail": the last `val_fraction` of the token stream (nanoGPT's 90/10 split of one text);
- "auto": "document" with at least `AUTO_MIN_DOCUMENTS` documents, else "tail".
A document split that leaves val empty (tiny corpus, unlucky hash) falls back to the tail split,
so `val_fraction > 0` always gives validation tokens. The dataset is built in a temporary
directory beside `out_dir` and renamed into place: `out_dir` is complete or untouched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import replace
from itertools import chain, islice
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from tqdm import tqdm

from lmlab.data.dataset import DOC_DTYPE, META_FILE, DatasetInfo, SplitInfo, docs_path
from lmlab.data.sources import Document, SourceArg, as_source_list, iter_documents
from lmlab.errors import ConfigError, DataError

__all__ = ["DatasetInfo", "SplitInfo", "build_tokenizer", "prepare_dataset"]

logger = logging.getLogger(__name__)

AUTO_MIN_DOCUMENTS = 20
_COPY_BYTES = 16 * 2**20


class _Tokenizer(Protocol):
    """The part of `lmlab.tokenizer.Tokenizer` this module needs."""

    eos_token_id: int | None
    vocab_size: int
    fingerprint: str

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def save_pretrained(self, path: str | Path) -> None: ...


class _SplitWriter:
    """Appends token arrays to `<split>.bin` and each document's end offset to
    `<split>.docs.bin`."""

    def __init__(self, path: Path, dtype: type) -> None:
        self.path = path
        self.ends_path = docs_path(path.parent, path.stem)
        self.dtype = dtype
        self.file = open(path, "ab")
        self.ends_file = open(self.ends_path, "ab")
        self.tokens = 0
        self.documents = 0

    def write(self, docs: list[list[int]]) -> None:
        flat = np.array(list(chain.from_iterable(docs)), dtype=np.int64)
        flat.astype(self.dtype).tofile(self.file)
        ends = self.tokens + np.cumsum([len(d) for d in docs], dtype=np.int64)
        ends.astype(DOC_DTYPE).tofile(self.ends_file)
        self.tokens += len(flat)
        self.documents += len(docs)

    def close(self) -> None:
        self.file.close()
        self.ends_file.close()


def _in_val(doc: Document, val_fraction: float) -> bool:
    digest = hashlib.sha256((doc.key or doc.source).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def _validate(*, val_fraction: float, split: str, batch_docs: int, val_sources: object) -> None:
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if split not in ("auto", "document", "tail"):
        raise ConfigError(f"split must be 'auto', 'document' or 'tail', got {split!r}")
    if batch_docs < 1:
        raise ConfigError(f"batch_docs must be >= 1, got {batch_docs}")
    if val_sources is not None and split != "auto":
        raise ConfigError(f"split={split!r} cannot be combined with val_sources; drop one")


def _check_out_dir(out_dir: Path) -> None:
    if not out_dir.exists():
        return
    if out_dir.is_dir() and ((out_dir / META_FILE).is_file() or not any(out_dir.iterdir())):
        return
    raise DataError(
        f"{out_dir}: exists and is not a prepared dataset (no {META_FILE}); refusing to "
        "overwrite it — remove it or choose another output directory"
    )


def prepare_dataset(
    sources: SourceArg,
    *,
    tokenizer: _Tokenizer,
    out_dir: str | Path,
    val_sources: SourceArg | None = None,
    val_fraction: float = 0.1,
    split: Literal["auto", "document", "tail"] = "auto",
    text_field: str = "text",
    document_separator: str | None = None,
    batch_docs: int = 256,
    progress: bool = False,
) -> DatasetInfo:
    """Tokenize `sources` into a dataset at `out_dir` (replacing a dataset already there).
    `document_separator` (a regular expression) cuts plain-text files into documents."""
    _validate(val_fraction=val_fraction, split=split, batch_docs=batch_docs,
              val_sources=val_sources)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    # Checked now, before any work: a missing path fails in milliseconds, not after an hour.
    train_docs = iter_documents(sources, text_field=text_field, separator=document_separator)
    val_docs = None if val_sources is None else iter_documents(
        val_sources, text_field=text_field, separator=document_separator)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed run with our pid
    tmp.mkdir()
    try:
        info = _build(tmp, train_docs, val_docs, tokenizer=tokenizer, val_fraction=val_fraction,
                      split=split, batch_docs=batch_docs, progress=progress)
        info = replace(info, sources=_names(sources),
                       val_sources=None if val_sources is None else _names(val_sources))
        tokenizer.save_pretrained(tmp)
        # meta.json last: its presence is what marks a directory as a complete dataset.
        (tmp / META_FILE).write_text(json.dumps(info.to_json(), indent=2) + "\n", "utf-8")
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("prepared %s: %s", out_dir, info.splits)
    return info


def _names(sources: SourceArg) -> list[str]:
    return [str(s) for s in as_source_list(sources)]


def _route(
    train_docs: Iterator[Document], val_docs: Iterator[Document] | None, *,
    split: str, val_fraction: float,
) -> tuple[str, Iterator[tuple[Document, str]]]:
    """Decide the split mode and pair every document with the split it is written to."""
    if val_docs is not None:
        return "sources", chain(((d, "val") for d in val_docs), ((d, "train") for d in train_docs))
    mode = split
    if mode == "auto":
        # Buffering a few documents is cheaper than a counting pass over every file.
        head = list(islice(train_docs, AUTO_MIN_DOCUMENTS))
        mode = "document" if len(head) >= AUTO_MIN_DOCUMENTS else "tail"
        train_docs = chain(head, train_docs)
    in_val = mode == "document"
    return mode, ((d, "val" if in_val and _in_val(d, val_fraction) else "train")
                  for d in train_docs)


def _build(
    tmp: Path, train_docs: Iterator[Document], val_docs: Iterator[Document] | None, *,
    tokenizer: _Tokenizer, val_fraction: float, split: str, batch_docs: int, progress: bool,
) -> DatasetInfo:
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
    mode, stream = _route(train_docs, val_docs, split=split, val_fraction=val_fraction)
    with ExitStack() as stack:
        writers = {name: _SplitWriter(tmp / f"{name}.bin", dtype) for name in ("train", "val")}
        for writer in writers.values():
            stack.callback(writer.close)
        _tokenize_into(stream, writers, tokenizer=tokenizer, batch_docs=batch_docs,
                       progress=progress)
    train, val = writers["train"], writers["val"]

    if mode == "document" and val.tokens == 0 and val_fraction > 0:
        logger.warning("document split left val empty; using the tail split instead")
        mode = "tail"
    if mode == "document" and train.tokens == 0:
        raise DataError(f"the document split put all {val.documents} documents into val; "
                        "lower val_fraction or use split='tail'")
    splits = {"train": SplitInfo(train.tokens, train.documents),
              "val": SplitInfo(val.tokens, val.documents)}
    if mode == "tail":
        splits = _move_tail(train, val, val_fraction=val_fraction)
    return DatasetInfo(
        dtype=np.dtype(dtype).name, vocab_size=tokenizer.vocab_size,
        eos_token_id=tokenizer.eos_token_id, tokenizer_fingerprint=tokenizer.fingerprint,
        splits=splits, sources=[], split=mode,
        val_fraction=None if mode == "sources" else val_fraction, document_index=True,
    )


def _tokenize_into(
    stream: Iterator[tuple[Document, str]], writers: dict[str, _SplitWriter], *,
    tokenizer: _Tokenizer, batch_docs: int, progress: bool,
) -> None:
    eos = tokenizer.eos_token_id
    separator = [] if eos is None else [eos]
    start = time.perf_counter()
    with tqdm(desc="prepare", unit="doc", disable=not progress) as bar:
        while batch := list(islice(stream, batch_docs)):
            encoded = tokenizer.encode_batch([doc.text for doc, _ in batch])
            per_split: dict[str, list[list[int]]] = {name: [] for name in writers}
            for (doc, name), ids in zip(batch, encoded, strict=True):
                _check_ids(ids, doc, vocab_size=tokenizer.vocab_size)
                per_split[name].append(list(ids) + separator)
            for name, docs in per_split.items():
                if docs:
                    writers[name].write(docs)
            tokens = sum(w.tokens for w in writers.values())
            bar.update(len(batch))
            bar.set_postfix(tokens=tokens, tok_s=f"{tokens / (time.perf_counter() - start):.0f}")


def _check_ids(ids: list[int], doc: Document, *, vocab_size: int) -> None:
    # A tokenizer whose ids exceed vocab_size would silently wrap around in uint16.
    if ids and not 0 <= min(ids) <= max(ids) < vocab_size:
        raise DataError(f"{doc.source}: tokenizer produced an id outside [0, {vocab_size})")


def _move_tail(train: _SplitWriter, val: _SplitWriter, *, val_fraction: float
               ) -> dict[str, SplitInfo]:
    """Move the last `val_fraction` of train.bin into (empty) val.bin, in bounded chunks, and
    cut the document index there too (a document cut in two ends at the cut in train and
    starts at 0 in val)."""
    assert val.tokens == 0
    total = train.tokens
    cut = int(total * (1 - val_fraction))  # nanoGPT: train = data[:int(n * 0.9)]
    itemsize = np.dtype(train.dtype).itemsize
    with open(train.path, "rb") as src, open(val.path, "ab") as dst:
        src.seek(cut * itemsize)
        shutil.copyfileobj(src, dst, _COPY_BYTES)
    os.truncate(train.path, cut * itemsize)
    ends = np.fromfile(train.ends_path, dtype=DOC_DTYPE).astype(np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    n_train = int(np.searchsorted(starts, cut, "left"))  # documents starting before the cut
    train_ends = np.minimum(ends[:n_train], cut)
    val_ends = ends[int(np.searchsorted(ends, cut, "right")):] - cut
    train_ends.astype(DOC_DTYPE).tofile(train.ends_path)
    val_ends.astype(DOC_DTYPE).tofile(val.ends_path)
    return {"train": SplitInfo(cut, len(train_ends)), "val": SplitInfo(total - cut, len(val_ends))}


def _publish(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    # Rename the old dataset aside first, so a failed rename can put it back.
    old = out_dir.parent / f".old-{out_dir.name}-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except OSError:
        old.rename(out_dir)
        raise
    shutil.rmtree(old)


def build_tokenizer(kind: str, sources, *, vocab_size: int, text_field: str = "text"):
    """The tokenizer a dataset is prepared with: "bpe" trains a byte-level BPE on `sources`,
    "wordpiece" an uncased BERT WordPiece, "unigram" a SentencePiece-style Unigram laid out as
    T5's (100 sentinels included in `vocab_size`), "char" makes one token per character seen in
    them, anything else is a tokenizer (or model) directory to load."""
    from lmlab.tokenizer import Tokenizer  # the concrete class; this module needs only a protocol

    trainers = {"bpe": Tokenizer.train_bpe, "wordpiece": Tokenizer.train_wordpiece,
                "unigram": Tokenizer.train_unigram}
    if kind in trainers:
        texts = (doc.text for doc in iter_documents(sources, text_field=text_field))
        return trainers[kind](iterator=texts, vocab_size=vocab_size)
    if kind == "char":
        return Tokenizer.char_level("".join(
            doc.text for doc in iter_documents(sources, text_field=text_field)))
    if Path(kind).exists():
        return Tokenizer.from_pretrained(kind)
    raise ConfigError("tokenizer: expected bpe, wordpiece, unigram, char or a tokenizer directory,"
                      f" got {kind!r}")

