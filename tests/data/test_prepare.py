"""Tests for lmlab.data.prepare: text sources → train.bin / val.bin / meta.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmlab.data.dataset import TokenDataset
from lmlab.data.prepare import DatasetInfo, prepare_dataset
from lmlab.errors import ConfigError, DataError

EOS = 256


class ByteTokenizer:
    """Stand-in for lmlab.tokenizer.Tokenizer: ids are UTF-8 bytes, EOS is 256."""

    eos_token_id: int | None = EOS
    vocab_size = 257
    fingerprint = "bytes-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def save_pretrained(self, path: str | Path) -> None:
        (Path(path) / "bytes-tokenizer.json").write_text('{"kind": "bytes"}')


class NoEosTokenizer(ByteTokenizer):
    eos_token_id = None
    vocab_size = 256


class WideTokenizer(ByteTokenizer):
    """A vocabulary that does not fit uint16; EOS is the last id."""

    eos_token_id = 69_999
    vocab_size = 70_000


class FailingTokenizer(ByteTokenizer):
    """Raises on the third batch, after train.bin already holds tokens."""

    def __init__(self) -> None:
        self.calls = 0

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("tokenizer exploded")
        return super().encode_batch(texts)


def stream(*texts: str, eos: int | None = EOS) -> list[int]:
    """The expected token stream: each document's bytes followed by EOS."""
    return [i for t in texts for i in [*t.encode("utf-8"), *([] if eos is None else [eos])]]


def tokens(out: Path, split: str) -> list[int]:
    return TokenDataset.open(out).split(split).tolist()


def documents(out: Path, split: str) -> list[str]:
    """Split a stream back into document texts at EOS (every document ends with one)."""
    ids = tokens(out, split)
    assert not ids or ids[-1] == EOS
    docs, start = [], 0
    for i, t in enumerate(ids):
        if t == EOS:
            docs.append(bytes(ids[start:i]).decode())
            start = i + 1
    return docs


def many_docs(root: Path, n: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    texts = [f"document number {i}: " + "lorem ipsum " * (i % 7) for i in range(n)]
    with open(root / "docs.jsonl", "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return texts


def test_hand_made_corpus_gives_exact_tokens_and_meta(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("hi")
    (tmp_path / "c" / "b.txt").write_text("yo é")
    out = tmp_path / "ds"
    info = prepare_dataset(tmp_path / "c", tokenizer=ByteTokenizer(), out_dir=out, val_fraction=0)
    assert tokens(out, "train") == stream("hi", "yo é")
    assert tokens(out, "val") == []
    meta = json.loads((out / "meta.json").read_text())
    assert meta == {
        "format": "lmlab-tokens-v1", "dtype": "uint16", "vocab_size": 257, "eos_token_id": EOS,
        "tokenizer_fingerprint": "bytes-v1",
        "splits": {"train": {"tokens": 9, "documents": 2}, "val": {"tokens": 0, "documents": 0}},
        "sources": [str(tmp_path / "c")], "val_sources": None, "split": "tail", "val_fraction": 0,
        "document_index": True,
    }
    assert info == TokenDataset.open(out).meta and isinstance(info, DatasetInfo)
    assert (out / "bytes-tokenizer.json").is_file()  # the dataset carries its tokenizer
    assert (out / "train.bin").stat().st_size == 9 * 2


def test_tokenizer_without_eos_writes_no_separators(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("ab")
    (tmp_path / "b.txt").write_text("cd")
    out = tmp_path / "ds"
    prepare_dataset([tmp_path / "a.txt", tmp_path / "b.txt"], tokenizer=NoEosTokenizer(),
                    out_dir=out, val_fraction=0)
    assert tokens(out, "train") == list(b"abcd")


def test_tail_split_is_nanogpts_90_10_split(tmp_path: Path) -> None:
    text = "".join(f"line {i}\n" for i in range(150))
    (tmp_path / "input.txt").write_text(text)
    out = tmp_path / "ds"
    info = prepare_dataset(tmp_path / "input.txt", tokenizer=ByteTokenizer(), out_dir=out)
    data = stream(text)
    n = len(data)
    assert info.split == "tail"  # auto: one document
    assert tokens(out, "train") == data[: int(n * 0.9)]
    assert tokens(out, "val") == data[int(n * 0.9):]
    assert info.splits["train"].documents == info.splits["val"].documents == 1  # cut in two


def test_document_split_is_deterministic_disjoint_and_order_free(tmp_path: Path) -> None:
    texts = []
    for i in range(60):
        texts.append(f"file {i} " * (i % 5 + 1))
        (tmp_path / "c").mkdir(exist_ok=True)
        (tmp_path / "c" / f"{i:02d}.txt").write_text(texts[-1])
    files = sorted((tmp_path / "c").iterdir())
    a = prepare_dataset(files, tokenizer=ByteTokenizer(), out_dir=tmp_path / "a", val_fraction=0.2)
    b = prepare_dataset(files[::-1], tokenizer=ByteTokenizer(), out_dir=tmp_path / "b",
                        val_fraction=0.2, split="document")
    assert a.split == b.split == "document"
    train, val = documents(tmp_path / "a", "train"), documents(tmp_path / "a", "val")
    assert train == [t for t in texts if t in train]  # train keeps the corpus order
    assert 0 < len(val) < len(train)
    assert set(train).isdisjoint(val) and sorted(train + val) == sorted(texts)
    assert sorted(documents(tmp_path / "b", "val")) == sorted(val)
    assert a.splits["val"].documents == len(val)
    assert a.splits["train"].tokens + a.splits["val"].tokens == len(stream(*texts))


def test_jsonl_documents_split_by_line(tmp_path: Path) -> None:
    texts = many_docs(tmp_path / "c", 100)
    info = prepare_dataset(tmp_path / "c", tokenizer=ByteTokenizer(), out_dir=tmp_path / "ds")
    train, val = documents(tmp_path / "ds", "train"), documents(tmp_path / "ds", "val")
    assert info.split == "document" and 0 < len(val) < 30
    assert sorted(train + val) == sorted(texts)


def test_document_split_is_the_same_wherever_the_corpus_lies(tmp_path: Path) -> None:
    for place in ("a", "b/c"):
        many_docs(tmp_path / place, 100)
        prepare_dataset(tmp_path / place, tokenizer=ByteTokenizer(), out_dir=tmp_path / place / "ds")
    assert documents(tmp_path / "a" / "ds", "val") == documents(tmp_path / "b/c" / "ds", "val")


def test_empty_document_split_falls_back_to_tail(tmp_path: Path) -> None:
    # The keys docs.jsonl:1 … :25 are fixed, and none of their hashes falls below 0.001.
    texts = many_docs(tmp_path / "c", 25)
    info = prepare_dataset(tmp_path / "c", tokenizer=ByteTokenizer(), out_dir=tmp_path / "ds",
                           val_fraction=0.001, split="document")
    data = stream(*texts)
    cut = int(len(data) * (1 - 0.001))
    assert info.split == "tail"
    assert tokens(tmp_path / "ds", "val") == data[cut:] != []
    assert info.splits["train"].documents == 25 and info.splits["val"].documents == 1


def test_val_sources_are_the_validation_split(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("train text")
    (tmp_path / "val.txt").write_text("val text")
    info = prepare_dataset(tmp_path / "train.txt", val_sources=tmp_path / "val.txt",
                           tokenizer=ByteTokenizer(), out_dir=tmp_path / "ds")
    assert tokens(tmp_path / "ds", "train") == stream("train text")
    assert tokens(tmp_path / "ds", "val") == stream("val text")
    assert info.split == "sources" and info.val_sources == [str(tmp_path / "val.txt")]


def test_small_batches_give_the_same_arrays_as_large_ones(tmp_path: Path) -> None:
    many_docs(tmp_path / "c", 300)
    for batch_docs in (1, 7, 1000):
        prepare_dataset(tmp_path / "c", tokenizer=ByteTokenizer(),
                        out_dir=tmp_path / f"b{batch_docs}", batch_docs=batch_docs,
                        progress=batch_docs == 7)
    for split in ("train", "val"):
        reference = (tmp_path / "b1000" / f"{split}.bin").read_bytes()
        assert len(reference) > 0
        for batch_docs in (1, 7):
            assert (tmp_path / f"b{batch_docs}" / f"{split}.bin").read_bytes() == reference


def test_dtype_is_uint16_or_uint32_by_vocab_size(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("abc")
    info = prepare_dataset(tmp_path / "a.txt", tokenizer=WideTokenizer(), out_dir=tmp_path / "w",
                           val_fraction=0)
    assert info.dtype == "uint32"
    assert (tmp_path / "w" / "train.bin").stat().st_size == 4 * 4
    assert tokens(tmp_path / "w", "train") == [97, 98, 99, 69_999]
    assert prepare_dataset(tmp_path / "a.txt", tokenizer=ByteTokenizer(), out_dir=tmp_path / "n",
                           val_fraction=0).dtype == "uint16"


def test_bad_arguments_are_config_errors(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("abc")
    call = dict(tokenizer=ByteTokenizer(), out_dir=tmp_path / "ds")
    with pytest.raises(ConfigError, match=r"val_fraction must be in \[0, 1\), got 1.5"):
        prepare_dataset(tmp_path / "a.txt", val_fraction=1.5, **call)
    with pytest.raises(ConfigError, match="split must be 'auto', 'document' or 'tail', got 'head'"):
        prepare_dataset(tmp_path / "a.txt", split="head", **call)
    with pytest.raises(ConfigError, match="cannot be combined with val_sources"):
        prepare_dataset(tmp_path / "a.txt", val_sources=tmp_path / "a.txt", split="tail", **call)
    with pytest.raises(DataError, match="missing.txt: no such file"):
        prepare_dataset(tmp_path / "missing.txt", **call)
    assert not (tmp_path / "ds").exists()


def test_empty_corpus_is_an_error_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("")
    with pytest.raises(DataError, match="no text found"):
        prepare_dataset(tmp_path / "c", tokenizer=ByteTokenizer(), out_dir=tmp_path / "ds")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_ids_outside_the_vocabulary_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("é")  # bytes 195, 169 ≥ vocab_size 100
    tok = ByteTokenizer()
    tok.vocab_size = 100
    tok.eos_token_id = 0
    with pytest.raises(DataError, match=r"a.txt: tokenizer produced an id outside \[0, 100\)"):
        prepare_dataset(tmp_path / "a.txt", tokenizer=tok, out_dir=tmp_path / "ds")


def test_failure_midway_leaves_no_output_and_keeps_the_old_dataset(tmp_path: Path) -> None:
    many_docs(tmp_path / "c", 50)
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="exploded"):
        prepare_dataset(tmp_path / "c", tokenizer=FailingTokenizer(), out_dir=out, batch_docs=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no out_dir, no temp dir

    prepare_dataset(tmp_path / "c", tokenizer=ByteTokenizer(), out_dir=out, val_fraction=0.5)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RuntimeError, match="exploded"):
        prepare_dataset(tmp_path / "c", tokenizer=FailingTokenizer(), out_dir=out, batch_docs=10)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "ds"]


def test_existing_dataset_is_replaced_but_other_directories_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b.txt").write_text("second")
    out = tmp_path / "ds"
    prepare_dataset(tmp_path / "a.txt", tokenizer=ByteTokenizer(), out_dir=out, val_fraction=0)
    prepare_dataset(tmp_path / "b.txt", tokenizer=ByteTokenizer(), out_dir=out, val_fraction=0)
    assert tokens(out, "train") == stream("second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "ds"]

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="mine: exists and is not a prepared dataset"):
        prepare_dataset(tmp_path / "a.txt", tokenizer=ByteTokenizer(), out_dir=tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def _real_tokenizer_class() -> type:
    try:
        from lmlab.tokenizer import Tokenizer
    except ImportError:
        try:
            from lmlab.tokenizer.tokenizer import Tokenizer
        except ImportError:
            pytest.skip("lmlab.tokenizer.Tokenizer is not available yet")
    return Tokenizer


def test_with_the_real_char_level_tokenizer(tmp_path: Path) -> None:
    Tokenizer = _real_tokenizer_class()
    texts = ["to be or not to be\n", "that is the question\n", "whether 'tis nobler\n"]
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(text)
    tok = Tokenizer.char_level("".join(texts))
    out = tmp_path / "ds"
    info = prepare_dataset(sorted(tmp_path.glob("*.txt")), tokenizer=tok, out_dir=out)
    eos = [] if tok.eos_token_id is None else [tok.eos_token_id]
    expected = [i for t in texts for i in [*tok.encode(t), *eos]]
    assert tokens(out, "train") + tokens(out, "val") == expected
    assert info.tokenizer_fingerprint == tok.fingerprint
    assert Tokenizer.from_pretrained(out).fingerprint == tok.fingerprint
