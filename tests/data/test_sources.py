"""Tests for lmlab.data.sources: expanding sources into files, and files into documents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmlab.data import sources
from lmlab.data.sources import Document, iter_documents, list_files
from lmlab.errors import DataError


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    write(root / "b.txt", "bee")
    write(root / "a.md", "ay")
    write(root / "sub" / "c.py", "print('c')")
    write(root / "sub" / "deeper" / "d.rst", "dee")
    write(root / "e.text", "ee")
    write(root / "notes.json", '{"text": "not a corpus"}')  # .json is not a text suffix
    write(root / "image.png", b"\x89PNG")
    write(root / ".hidden.txt", "secret")
    write(root / ".git" / "HEAD.txt", "ref")
    return root


def test_directory_is_expanded_recursively_sorted_without_hidden_files(corpus: Path) -> None:
    files = list_files(corpus)
    assert files == [corpus / "a.md", corpus / "b.txt", corpus / "e.text",
                     corpus / "sub" / "c.py", corpus / "sub" / "deeper" / "d.rst"]


def test_glob_patterns_are_sorted_and_allow_double_star(corpus: Path) -> None:
    assert list_files(str(corpus / "*.txt")) == [corpus / "b.txt"]
    assert list_files(str(corpus / "**" / "*.r*")) == [corpus / "sub" / "deeper" / "d.rst"]
    # A glob names files explicitly, so their suffix does not matter.
    assert list_files(str(corpus / "*.json")) == [corpus / "notes.json"]


def test_sources_keep_their_order_and_files_are_listed_once(corpus: Path) -> None:
    files = list_files([corpus / "b.txt", corpus, str(corpus / "*.md")])
    assert files[0] == corpus / "b.txt"
    assert len(files) == len(set(files)) == 5


def test_missing_path_and_empty_glob_name_the_source(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.txt: no such file or directory"):
        list_files(tmp_path / "nope.txt")
    with pytest.raises(DataError, match=r"\*.zzz: glob pattern matched no files"):
        list_files(str(tmp_path / "*.zzz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: directory contains no text files"):
        list_files(tmp_path / "empty")
    with pytest.raises(DataError, match="no data sources"):
        list_files([])


def test_missing_path_is_reported_when_called_not_when_iterated(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        iter_documents([tmp_path / "missing.txt"])


def test_text_files_are_one_document_each_and_empty_files_are_skipped(tmp_path: Path) -> None:
    a = write(tmp_path / "a.txt", "héllo\n")
    write(tmp_path / "b.txt", "")
    c = write(tmp_path / "c.txt", "world")
    assert list(iter_documents(tmp_path)) == [Document(str(a), "héllo\n"),
                                              Document(str(c), "world")]


def test_all_empty_sources_are_an_error(tmp_path: Path) -> None:
    write(tmp_path / "a.txt", "")
    write(tmp_path / "b.jsonl", "\n\n")
    with pytest.raises(DataError, match="no text found in .*: all 2 file"):
        list(iter_documents(tmp_path))


def test_jsonl_yields_one_document_per_line(tmp_path: Path) -> None:
    lines = [json.dumps({"text": "one", "id": 1}), "", "   ", json.dumps({"text": "two ✓"})]
    path = write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    assert list(iter_documents(path)) == [Document(f"{path}:1", "one"),
                                          Document(f"{path}:4", "two ✓")]


def test_jsonl_custom_field(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", json.dumps({"body": "x", "text": 3}) + "\n")
    assert [d.text for d in iter_documents(path, text_field="body")] == ["x"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"d.jsonl line 3: not valid JSON \(.* at column 2\)"),
        ('{"content": "x"}', "d.jsonl line 3: missing field 'text'"),
        ('{"text": 5}', "d.jsonl line 3: field 'text' must be a string, got int"),
        ('["text"]', "d.jsonl line 3: expected a JSON object, got list"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path / "d.jsonl", '{"text": "ok"}\n\n' + line + "\n")
    docs = iter_documents(path)
    assert next(docs).text == "ok"  # lazy: earlier lines are yielded before the bad one is read
    with pytest.raises(DataError, match=message):
        next(docs)


def test_non_utf8_file_names_the_file_and_byte_offset(tmp_path: Path) -> None:
    write(tmp_path / "good.txt", "fine")
    write(tmp_path / "latin1.txt", "café".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not valid UTF-8 at byte 3"):
        list(iter_documents(tmp_path))
    write(tmp_path / "bad.jsonl", b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: not valid UTF-8 at byte 24"):
        list(iter_documents(tmp_path / "bad.jsonl"))


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sources, "LARGE_FILE_BYTES", 100)
    monkeypatch.setattr(sources, "CHUNK_BYTES", 64)
    return 64


def test_large_file_is_split_at_paragraphs_into_bounded_chunks(tmp_path: Path,
                                                               small_chunks: int) -> None:
    text = "".join(f"paragraph {i} über\nline two\n\n" for i in range(40))
    path = write(tmp_path / "big.txt", text)
    docs = list(iter_documents(path))
    assert "".join(d.text for d in docs) == text
    assert [d.source for d in docs] == [f"{path}#{i}" for i in range(len(docs))]
    assert len(docs) > 10
    assert all(len(d.text.encode()) <= 1.5 * small_chunks for d in docs)
    assert all(d.text.endswith("\n\n") for d in docs)


def test_large_file_without_newlines_is_cut_between_characters(tmp_path: Path,
                                                               small_chunks: int) -> None:
    text = "aé€😀" * 60  # 1-, 2-, 3- and 4-byte characters: some cut must land inside one
    path = write(tmp_path / "big.txt", text)
    docs = list(iter_documents(path))
    assert len(docs) > 3
    assert "".join(d.text for d in docs) == text


def test_large_file_reports_the_absolute_byte_offset(tmp_path: Path, small_chunks: int) -> None:
    data = ("x" * 30 + "\n") * 10 + "y" * 7
    path = write(tmp_path / "big.txt", data.encode() + b"\xff" + b"z" * 100)
    with pytest.raises(DataError, match=f"big.txt: not valid UTF-8 at byte {len(data)}"):
        list(iter_documents(path))


def test_keys_do_not_depend_on_where_the_corpus_lies(tmp_path: Path) -> None:
    """The train/val hash reads `key`: the same corpus in two folders gets the same keys."""
    for place in ("here", "there/deeper"):
        root = tmp_path / place
        write(root / "sub" / "a.txt", "one\n\ntwo")
        write(root / "b.jsonl", json.dumps({"text": "x"}) + "\n")
    keys = {place: [d.key for d in iter_documents(tmp_path / place, separator=r"\n\n")]
            for place in ("here", "there/deeper")}
    assert keys["here"] == keys["there/deeper"] == ["b.jsonl:1", "sub/a.txt@0", "sub/a.txt@1"]
    named = tmp_path / "here" / "b.jsonl"
    assert [d.key for d in iter_documents(named)] == ["b.jsonl:1"]
    pattern = str(tmp_path / "here" / "**" / "*.txt")
    assert [d.key for d in iter_documents(pattern)] == ["sub/a.txt"]
