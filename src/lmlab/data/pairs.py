"""Parallel text for translation: source/target pairs from a JSONL file or two line-aligned
plain-text files, with the bad-input rules.

* JSONL, one object per line. The two sides are named by field (`source_field="src"`) or by
  language code (`source_lang="en", target_lang="de"` reads the fields "en" and "de", as in
  Multi30k's `{"id", "en", "de"}` files); one 4-way file serves every direction.
* A language code that is not a field of the file is an error listing the fields present; a
  line without a field, a line that is not a JSON object, or a value that is not a string is an
  error naming the file and line.
* A pair whose source or target is empty (or only whitespace) is skipped — counted, its line
  numbers kept in `ParallelData.skipped_lines`, and reported in one warning — never dropped
  silently.
* A source longer than the encoder's window is truncated, and `truncate` says how many were
  (the documented choice: truncate with a count, rather than refuse a whole corpus for a few
  long sentences).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lmlab.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

_SHOWN_LINES = 10  # line numbers listed in the skipped-pairs warning before "…"


@dataclass
class ParallelData:
    """The pairs of one file, in file order."""

    sources: list[str]
    targets: list[str]
    where: list[str]  # "train.jsonl line 4" for each pair, for messages about one pair
    path: str  # the file (for two plain-text files, "train.en + train.de")
    source_field: str
    target_field: str
    skipped_lines: list[int] = field(default_factory=list)  # pairs with an empty side

    @property
    def n_skipped(self) -> int:
        return len(self.skipped_lines)

    def __len__(self) -> int:
        return len(self.sources)


def read_pairs(path: str | Path, *, source_field: str | None = None,
               target_field: str | None = None, source_lang: str | None = None,
               target_lang: str | None = None) -> ParallelData:
    """Source/target pairs of a JSONL file. Each side is a field name, or a language code that
    names the field (a field name wins where both are given)."""
    path = Path(path)
    src = _side("source", source_field, source_lang)
    tgt = _side("target", target_field, target_lang)
    if src == tgt:
        raise ConfigError(f"source and target are the same field {src!r}; set different "
                          "source_field/target_field (or source_lang/target_lang)")
    sources, targets, where, skipped = [], [], [], []
    first = True
    for number, record in _records(path):
        if first:  # a side that is no field of the first record is a wrong name, not a bad line
            _check_names(path, record, ((src, source_field, source_lang),
                                        (tgt, target_field, target_lang)))
            first = False
        values = []
        for name in (src, tgt):
            if name not in record:
                raise DataError(f"{path} line {number}: missing field '{name}' (fields: "
                                f"{', '.join(map(str, record))})")
            value = record[name]
            if not isinstance(value, str):
                kind = "null" if value is None else type(value).__name__
                raise DataError(f"{path} line {number}: field '{name}' must be a string, "
                                f"got {kind}")
            values.append(value)
        _add(values, number, f"{path} line {number}", sources, targets, where, skipped)
    return _finish(ParallelData(sources, targets, where, str(path), src, tgt, skipped))


def read_text_pairs(source_path: str | Path, target_path: str | Path) -> ParallelData:
    """Pairs of two line-aligned plain-text files (Moses style: `train.en`, `train.de`, line i
    of one translating line i of the other). Different line counts are an error."""
    source_path, target_path = Path(source_path), Path(target_path)
    source_lines, target_lines = _lines(source_path), _lines(target_path)
    if not source_lines:
        raise DataError(f"{source_path}: no pairs (the file is empty)")
    if len(source_lines) != len(target_lines):
        raise DataError(f"{source_path} has {len(source_lines)} lines but {target_path} has "
                        f"{len(target_lines)}; parallel files must be line-aligned")
    sources, targets, where, skipped = [], [], [], []
    for number, pair in enumerate(zip(source_lines, target_lines), 1):
        _add(pair, number, f"{source_path} + {target_path} line {number}",
             sources, targets, where, skipped)
    return _finish(ParallelData(sources, targets, where, f"{source_path} + {target_path}",
                                source_path.name, target_path.name, skipped))


@dataclass(frozen=True)
class Truncated:
    sequences: list[list[int]]
    n_truncated: int  # how many sequences were longer than max_length
    longest: int  # the longest length before truncation


def truncate(sequences: Sequence[Sequence[int]], max_length: int, *, eos_id: int | None = None,
             what: str = "sources", where: str = "") -> Truncated:
    """Token sequences cut to `max_length` (the encoder's window). With `eos_id`, a cut sequence
    still ends with it (its first max_length − 1 tokens, then end-of-sequence), so the model
    sees a finished input. How many were cut is returned and, if any, logged as a warning
    such as "train.jsonl: truncated 3 of 29000 sources longer than 128 tokens (longest 203)"."""
    if max_length < 1 or (eos_id is not None and max_length < 2):
        raise ConfigError(f"the maximum {what} length must be at least "
                          f"{1 if eos_id is None else 2}, got {max_length}")
    out, cut, longest = [], 0, 0
    for seq in sequences:
        seq = list(seq)
        longest = max(longest, len(seq))
        if len(seq) > max_length:
            cut += 1
            seq = seq[: max_length - 1] + [eos_id] if eos_id is not None else seq[:max_length]
        out.append(seq)
    if cut:
        logger.warning("%struncated %d of %d %s longer than %d tokens (longest %d)",
                       f"{where}: " if where else "", cut, len(out), what, max_length, longest)
    return Truncated(out, cut, longest)


# -- helpers -----------------------------------------------------------------------------------
def _side(role: str, field_name: str | None, lang: str | None) -> str:
    name = field_name or lang
    if not name:
        raise ConfigError(f"set {role}_field (the JSONL field of the {role} text) or "
                          f"{role}_lang (a language code that names the field, e.g. 'en')")
    return name


def _check_names(path: Path, record: dict, sides) -> None:
    fields = ", ".join(map(str, record))
    for name, field_name, lang in sides:
        if name in record:
            continue
        if field_name:
            raise DataError(f"{path}: no field '{name}' (fields: {fields}); check the "
                            "source_field/target_field")
        raise DataError(f"{path}: unknown language code '{lang}': the file has no field "
                        f"'{lang}' (fields: {fields})")


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file."""
    found = False
    for number, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {number}: not valid JSON ({err.msg} at column "
                            f"{err.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path} line {number}: expected a JSON object, got "
                            f"{type(record).__name__}")
        found = True
        yield number, record
    if not found:
        raise DataError(f"{path}: no pairs (the file is empty)")


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    # Lines end at "\n" only: str.splitlines would also cut at U+2028 and friends, which JSON
    # allows inside strings, and the line numbers would then differ from an editor's.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    return lines[:-1] if lines and lines[-1] == "" else lines


def _add(pair, number: int, where_text: str, sources: list, targets: list, where: list,
         skipped: list) -> None:
    source, target = pair
    if not source.strip() or not target.strip():
        skipped.append(number)
        return
    sources.append(source)
    targets.append(target)
    where.append(where_text)


def _finish(data: ParallelData) -> ParallelData:
    if data.skipped_lines:
        shown = ", ".join(map(str, data.skipped_lines[:_SHOWN_LINES]))
        more = ", …" if data.n_skipped > _SHOWN_LINES else ""
        logger.warning("%s: skipped %d pair%s with an empty source or target (line%s %s%s)",
                       data.path, data.n_skipped, "s" if data.n_skipped != 1 else "",
                       "s" if data.n_skipped != 1 else "", shown, more)
    if not data.sources:
        raise DataError(f"{data.path}: no pairs left: all {data.n_skipped} have an empty "
                        "source or target")
    return data
