"""Text sources → a lazy stream of documents.

A *source* is a file, a directory (searched recursively) or a glob pattern. Plain-text files are
one document each; a `.jsonl` file is one document per line, taken from a string field. Files are
opened one at a time, so memory is bounded by the largest document, and a very large plain-text
file is cut into several documents (see `LARGE_FILE_BYTES`) so that bound holds for it too.
A `separator` (a regular expression) cuts plain-text files into documents wherever it matches —
e.g. BERT's corpus format, blank lines between documents — which next-sentence prediction needs.
"""

from __future__ import annotations

import glob
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lmlab.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# Suffixes picked up when a *directory* is given; files named explicitly or by a glob are always
# read. `.json` is left out on purpose: it has no one-document-per-line shape, and leaving it out
# keeps a prepared dataset's meta.json / tokenizer.json out of a corpus folder that holds it.
TEXT_SUFFIXES = frozenset({".txt", ".text", ".md", ".rst", ".py", ".jsonl"})

# A plain-text file larger than LARGE_FILE_BYTES is read CHUNK_BYTES at a time and every chunk
# becomes its own document, cut at a blank line (else a newline, else a character boundary) in
# the second half of the chunk. The price is an extra end-of-text token every ~16 MiB of a huge
# file, which is negligible; the gain is that a multi-GB dump never has to fit in memory.
LARGE_FILE_BYTES = 64 * 2**20
CHUNK_BYTES = 16 * 2**20

_GLOB_CHARS = frozenset("*?[")

SourceArg = str | Path | Sequence[str | Path]


@dataclass(frozen=True)
class Document:
    """One document: `source` names where it came from (`file`, `file:line` or `file#chunk`).

    `key` is the same name with the file given relative to the source argument it was found
    through (a directory's relative path, a glob's matches relative to the pattern's fixed
    prefix, a named file's base name): it does not depend on where the corpus lies, so a hash of
    it splits train/val the same way on every machine and in every temporary folder.
    """

    source: str
    text: str
    key: str = field(default="", compare=False, repr=False)


def as_source_list(sources: SourceArg) -> list[str | Path]:
    """One source or a sequence of them, as a list."""
    if isinstance(sources, (str, Path)):
        return [sources]
    return list(sources)


def _relative_key(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path != root else path.name


def _glob_root(pattern: str) -> Path:
    """The leading part of a glob pattern that holds no wildcard: matches are keyed from it."""
    root = Path()
    for part in Path(pattern).parts:
        if _GLOB_CHARS & set(part):
            break
        root /= part
    return root


def _walk_directory(root: Path) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        relative = path.relative_to(root).parts
        # Hidden files and anything under a hidden folder (.git, .venv, …) are never corpus text.
        if any(part.startswith(".") for part in relative):
            continue
        if path.is_file() and path.suffix.lower() in TEXT_SUFFIXES:
            found.append(path)
    return sorted(found)


def list_files(sources: SourceArg) -> list[Path]:
    """Expand `sources` into the ordered list of files to read (each file listed once).

    Directories contribute their `TEXT_SUFFIXES` files, recursively and sorted; glob patterns
    (`**` allowed) their sorted matches. A missing path, a glob with no match or a directory
    without text files is a `DataError` naming it.
    """
    return list(_keyed_files(sources))


def _keyed_files(sources: SourceArg) -> dict[Path, str]:
    """`list_files` with each file's location-independent key (see `Document.key`)."""
    items = as_source_list(sources)
    if not items:
        raise DataError("no data sources given; pass at least one file, directory or glob")
    files: dict[Path, str] = {}
    for item in items:
        path = Path(item)
        if path.is_file():
            found, root = [path], path
        elif path.is_dir():
            found, root = _walk_directory(path), path
            if not found:
                wanted = " ".join(sorted(TEXT_SUFFIXES))
                raise DataError(f"{path}: directory contains no text files (looked for {wanted})")
        elif _GLOB_CHARS & set(str(item)):
            matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True))
            found, root = [], _glob_root(str(item))
            for match in matches:
                found.extend(_walk_directory(match) if match.is_dir() else [match])
            if not found:
                raise DataError(f"{item}: glob pattern matched no files")
        else:
            raise DataError(f"{path}: no such file or directory")
        for file in found:
            # The same file reached twice (a folder and a glob over it) would silently double
            # its weight; it keeps the key of the first argument that reached it.
            files.setdefault(file, _relative_key(file, root))
    return files


def iter_documents(sources: SourceArg, *, text_field: str = "text",
                   separator: str | None = None) -> Iterator[Document]:
    """Yield the documents of `sources` in order, reading one file at a time.

    Empty files and empty JSONL texts are skipped; if nothing at all is left, a `DataError` is
    raised when the stream ends. Paths are checked at call time, not at the first `next()`.
    With `separator`, a plain-text file is cut at every match of that regular expression into
    documents named `file@N` (the match itself is dropped; blank pieces are skipped).
    """
    pattern = _separator(separator)
    files = _keyed_files(sources)
    return _stream(files, sources, text_field, pattern)


def _separator(separator: str | None) -> re.Pattern | None:
    if separator is None:
        return None
    try:
        pattern = re.compile(separator)
    except re.error as err:
        raise ConfigError(f"document separator {separator!r}: not a regular expression ({err})"
                          ) from None
    if pattern.groups:  # re.split would return the groups as documents
        raise ConfigError(f"document separator {separator!r}: use (?:...) instead of capture"
                          " groups")
    if pattern.match(""):
        raise ConfigError(f"document separator {separator!r} matches the empty string")
    return pattern


def _split(docs: Iterator[Document], pattern: re.Pattern | None) -> Iterator[Document]:
    if pattern is None:
        yield from docs
        return
    for doc in docs:
        pieces = (piece for piece in pattern.split(doc.text) if piece.strip())
        for index, piece in enumerate(pieces):
            yield Document(source=f"{doc.source}@{index}", text=piece, key=f"{doc.key}@{index}")


def _stream(files: dict[Path, str], sources: SourceArg, text_field: str,
            pattern: re.Pattern | None) -> Iterator[Document]:
    count = 0
    for path, key in files.items():
        is_jsonl = path.suffix.lower() == ".jsonl"
        reader = (_read_jsonl(path, key, text_field) if is_jsonl
                  else _split(_read_text(path, key), pattern))
        for doc in reader:
            count += 1
            yield doc
    if count == 0:
        shown = ", ".join(str(s) for s in as_source_list(sources))
        raise DataError(f"no text found in {shown}: all {len(files)} file(s) are empty")


def _decode(data: bytes, *, path: Path, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not valid UTF-8 at byte {offset + err.start} ({err.reason}); "
            "convert the file to UTF-8"
        ) from None


def _read_text(path: Path, key: str) -> Iterator[Document]:
    if path.stat().st_size <= LARGE_FILE_BYTES:
        text = _decode(path.read_bytes(), path=path, offset=0)
        if text:
            yield Document(source=str(path), text=text, key=key)
        return
    logger.info("%s is larger than %d bytes; reading it in chunks", path, LARGE_FILE_BYTES)
    for index, (offset, data) in enumerate(_chunks(path)):
        yield Document(source=f"{path}#{index}", text=_decode(data, path=path, offset=offset),
                       key=f"{key}#{index}")


def _chunks(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield `(file offset, bytes)` pieces of about CHUNK_BYTES, cut as described above."""
    carry = b""
    offset = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            buf = carry + block
            cut = _cut_point(buf)
            yield offset, buf[:cut]
            offset += cut
            carry = buf[cut:]
    if carry:
        yield offset, carry


def _cut_point(buf: bytes) -> int:
    # Search only the second half so every piece is at least half a chunk long; the carry is then
    # at most half a chunk, which keeps the buffer (and memory) bounded.
    half = len(buf) // 2
    for sep in (b"\n\n", b"\n"):
        at = buf.rfind(sep, half)
        if at >= 0:
            return at + len(sep)
    # No newline at all: back up to the start of a UTF-8 character (continuation bytes are
    # 0b10xxxxxx) so that no character is split between two documents.
    for cut in range(len(buf) - 1, max(len(buf) - 5, half), -1):
        if buf[cut] & 0xC0 != 0x80:
            return cut
    return len(buf)


def _read_jsonl(path: Path, key: str, text_field: str) -> Iterator[Document]:
    with open(path, "rb") as f:
        offset = 0
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, path=path, offset=offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path} line {lineno}: not valid JSON ({err.msg} at column {err.colno})"
                ) from None
            if not isinstance(record, dict):
                kind = type(record).__name__
                raise DataError(f"{path} line {lineno}: expected a JSON object, got {kind}")
            if text_field not in record:
                raise DataError(f"{path} line {lineno}: missing field '{text_field}'")
            text = record[text_field]
            if not isinstance(text, str):
                kind = type(text).__name__
                raise DataError(
                    f"{path} line {lineno}: field '{text_field}' must be a string, got {kind}"
                )
            if text:
                yield Document(source=f"{path}:{lineno}", text=text, key=f"{key}:{lineno}")
