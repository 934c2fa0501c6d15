"""The document index of a prepared dataset (`<split>.docs.bin`): exact ends for every split
mode, the tail cut, tokenizers without EOS, old datasets without it, truncated files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmlab.data.dataset import TokenDataset
from lmlab.data.prepare import prepare_dataset
from lmlab.errors import ConfigError, DataError



class ByteTokenizer:
    """Ids are UTF-8 bytes; EOS is 0 (absent from the texts)."""

    eos_token_id: int | None = 0
    vocab_size = 256
    fingerprint = "bytes"

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def save_pretrained(self, path) -> None:
        (Path(path) / "tokenizer.json").write_text("{}")


class NoEosTokenizer(ByteTokenizer):
    eos_token_id = None


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def documents(dataset: TokenDataset, split: str) -> list[bytes]:
    """The split's token stream cut at the document index, as bytes (ByteTokenizer ids)."""
    tokens, ends = dataset.split(split), dataset.document_ends(split)
    starts = [0, *ends[:-1]]
    return [bytes(int(t) for t in tokens[s:e]) for s, e in zip(starts, ends)]


@pytest.mark.parametrize("tokenizer, eos", [(ByteTokenizer(), b"\x00"), (NoEosTokenizer(), b"")])
def test_document_ends_recover_every_document(tmp_path, tokenizer, eos) -> None:
    texts = [f"doc {i} " + "x" * (i % 5) for i in range(30)]
    source = write_jsonl(tmp_path / "docs.jsonl", texts)
    prepare_dataset(source, tokenizer=tokenizer, out_dir=tmp_path / "ds", val_fraction=0.2,
                    split="document")
    dataset = TokenDataset.open(tmp_path / "ds")
    assert dataset.meta.document_index
    got = documents(dataset, "train") + documents(dataset, "val")
    assert sorted(got) == sorted(t.encode() + eos for t in texts)
    assert len(documents(dataset, "val")) == dataset.meta.splits["val"].documents > 0


def test_tail_split_cuts_the_index_at_the_cut(tmp_path) -> None:
    texts = ["aaaa", "bbbbbb", "cc", "dddddddd"]  # 20 tokens without EOS
    source = write_jsonl(tmp_path / "docs.jsonl", texts)
    prepare_dataset(source, tokenizer=NoEosTokenizer(), out_dir=tmp_path / "ds",
                    val_fraction=0.25, split="tail")
    dataset = TokenDataset.open(tmp_path / "ds")
    # cut = int(20 * 0.75) = 15: "dddddddd" (12..20) is split 3 | 5.
    assert dataset.document_ends("train").tolist() == [4, 10, 12, 15]
    assert dataset.document_ends("val").tolist() == [5]
    assert documents(dataset, "train") == [b"aaaa", b"bbbbbb", b"cc", b"ddd"]
    assert dataset.meta.splits["train"].documents == 4
    assert dataset.meta.splits["val"].documents == 1


def test_tail_cut_on_a_document_boundary(tmp_path) -> None:
    source = write_jsonl(tmp_path / "docs.jsonl", ["aaaaaa", "bb"])  # cut = int(8 * 0.75) = 6
    prepare_dataset(source, tokenizer=NoEosTokenizer(), out_dir=tmp_path / "ds",
                    val_fraction=0.25, split="tail")
    dataset = TokenDataset.open(tmp_path / "ds")
    assert dataset.document_ends("train").tolist() == [6]
    assert dataset.document_ends("val").tolist() == [2]


def test_old_dataset_without_index_and_truncated_index(tmp_path) -> None:
    source = write_jsonl(tmp_path / "docs.jsonl", ["hello", "world"])
    prepare_dataset(source, tokenizer=ByteTokenizer(), out_dir=tmp_path / "ds", val_fraction=0)
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    (tmp_path / "ds" / "train.docs.bin").write_bytes(b"\x00" * 12)
    with pytest.raises(DataError, match=r"train.docs.bin: 12 bytes, expected 16 bytes"):
        TokenDataset.open(tmp_path / "ds").document_ends("train")
    del meta["document_index"]  # a dataset prepared before the index existed
    (tmp_path / "ds" / "meta.json").write_text(json.dumps(meta))
    old = TokenDataset.open(tmp_path / "ds")
    assert old.document_ends("train") is None
    assert np.array_equal(old.split("train"), np.frombuffer(b"hello\x00world\x00", np.uint8))


WIKI = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "wikitext2" / "wiki.valid.tokens"
HEADING = r"\n(?= = [^=])"  # WikiText: a new article starts at a " = Title = " line


def test_separator_cuts_text_files_into_documents(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("first doc\nline two\n\n\nsecond doc\n\n  \n\nthird")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "json\n\nstays whole"}) + "\n")
    prepare_dataset([tmp_path / "a.txt", tmp_path / "b.jsonl"], tokenizer=NoEosTokenizer(),
                    out_dir=tmp_path / "ds", val_fraction=0, document_separator=r"\n\s*\n")
    dataset = TokenDataset.open(tmp_path / "ds")
    assert documents(dataset, "train") == [b"first doc\nline two", b"second doc", b"third",
                                           b"json\n\nstays whole"]


def test_separator_finds_wikitext_articles(tmp_path) -> None:
    if not WIKI.is_file():
        pytest.skip("../shared/data (wikitext2) is absent")
    info = prepare_dataset(WIKI, tokenizer=ByteTokenizer(), out_dir=tmp_path / "ds",
                           val_fraction=0.1, document_separator=HEADING)
    assert info.split == "document"  # 60 articles: enough for the per-document split
    dataset = TokenDataset.open(tmp_path / "ds")
    heads = [doc[:3] for doc in documents(dataset, "train") + documents(dataset, "val")]
    assert len(heads) == 60 and all(head == b" = " for head in heads)


@pytest.mark.parametrize("separator, message", [("(\n)", "capture groups"), ("[", "not a regular"),
                                                ("x*", "empty string")])
def test_bad_separators(tmp_path, separator, message) -> None:
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(ConfigError, match=message):
        prepare_dataset(tmp_path / "a.txt", tokenizer=ByteTokenizer(), out_dir=tmp_path / "ds",
                        document_separator=separator)
