"""Parallel pairs: JSONL by field or language code, line-aligned text files, and the bad-input
rules (missing field, bad JSON, empty sides counted and reported, unknown language code,
sources longer than the window truncated with a count)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lmlab.data.pairs import read_pairs, read_text_pairs, truncate
from lmlab.errors import ConfigError, DataError

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n"
                            for row in rows), encoding="utf-8")
    return path


ROWS = [{"id": 0, "en": "A dog runs.", "de": "Ein Hund rennt.", "fr": "Un chien court."},
        {"id": 1, "en": "Two men sit.", "de": "Zwei Männer sitzen.", "fr": "Deux hommes."},
        {"id": 2, "en": "A red ball.", "de": "Ein roter Ball.", "fr": "Un ballon rouge."}]


def test_language_codes_name_the_fields(tmp_path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    data = read_pairs(path, source_lang="en", target_lang="de")
    assert data.sources == ["A dog runs.", "Two men sit.", "A red ball."]
    assert data.targets == ["Ein Hund rennt.", "Zwei Männer sitzen.", "Ein roter Ball."]
    assert (data.source_field, data.target_field, len(data), data.n_skipped) == ("en", "de", 3, 0)
    assert data.where[1] == f"{path} line 2"
    reverse = read_pairs(path, source_lang="fr", target_lang="en")
    assert reverse.sources[0] == "Un chien court." and reverse.targets[0] == "A dog runs."


def test_fields_by_name_and_a_field_wins_over_a_code(tmp_path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"src": "hello", "tgt": "hallo", "de": "x"},
                                              "", {"src": "bye", "tgt": "tschüss", "de": "y"}])
    data = read_pairs(path, source_field="src", target_field="tgt", target_lang="de")
    assert data.sources == ["hello", "bye"] and data.targets == ["hallo", "tschüss"]
    assert data.where == [f"{path} line 1", f"{path} line 3"]  # blank line 2 is no pair


def test_unknown_language_code_lists_the_fields(tmp_path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(DataError) as err:
        read_pairs(path, source_lang="en", target_lang="cs")
    assert str(err.value) == (f"{path}: unknown language code 'cs': the file has no field 'cs' "
                              "(fields: id, en, de, fr)")
    with pytest.raises(DataError, match="no field 'target'.*check the source_field"):
        read_pairs(path, source_field="en", target_field="target")


def test_a_line_missing_a_field_names_file_and_line(tmp_path) -> None:
    rows = ROWS[:2] + [{"id": 2, "en": "A red ball."}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as err:
        read_pairs(path, source_lang="en", target_lang="de")
    assert str(err.value) == f"{path} line 3: missing field 'de' (fields: id, en)"


@pytest.mark.parametrize("line, message", [
    ('{"en": "a", "de": ', "line 2: not valid JSON"),
    ('["a", "b"]', "line 2: expected a JSON object, got list"),
    ('{"en": "a", "de": 5}', "line 2: field 'de' must be a string, got int"),
    ('{"en": null, "de": "b"}', "line 2: field 'en' must be a string, got null"),
])
def test_malformed_lines_are_errors(tmp_path, line, message) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], line])
    with pytest.raises(DataError, match=message):
        read_pairs(path, source_lang="en", target_lang="de")


def test_empty_sides_are_skipped_counted_and_reported(tmp_path, caplog) -> None:
    rows = [ROWS[0], {"en": "", "de": "Leer."}, ROWS[1], {"en": "Blank.", "de": "   "},
            ROWS[2], {"en": "", "de": ""}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="lmlab.data.pairs"):
        data = read_pairs(path, source_lang="en", target_lang="de")
    assert len(data) == 3 and data.sources == [r["en"] for r in ROWS]
    assert data.skipped_lines == [2, 4, 6] and data.n_skipped == 3
    assert caplog.messages == [
        f"{path}: skipped 3 pairs with an empty source or target (lines 2, 4, 6)"]


def test_all_pairs_empty_or_no_lines_is_an_error(tmp_path) -> None:
    path = write_jsonl(tmp_path / "empty.jsonl", [{"en": "", "de": "x"}])
    with pytest.raises(DataError, match="no pairs left: all 1 have an empty source or target"):
        read_pairs(path, source_lang="en", target_lang="de")
    (tmp_path / "nothing.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="nothing.jsonl: no pairs"):
        read_pairs(tmp_path / "nothing.jsonl", source_lang="en", target_lang="de")
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        read_pairs(tmp_path / "missing.jsonl", source_lang="en", target_lang="de")


def test_bad_configuration_is_a_config_error(tmp_path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(ConfigError, match="set target_field .* or target_lang"):
        read_pairs(path, source_lang="en")
    with pytest.raises(ConfigError, match="same field 'en'"):
        read_pairs(path, source_lang="en", target_field="en")


def test_line_aligned_text_files(tmp_path, caplog) -> None:
    (tmp_path / "train.en").write_text("A dog.\nTwo men.\n\nA ball.\n", encoding="utf-8")
    (tmp_path / "train.de").write_text("Ein Hund.\nZwei Männer.\nLeer.\nEin Ball.\n",
                                       encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="lmlab.data.pairs"):
        data = read_text_pairs(tmp_path / "train.en", tmp_path / "train.de")
    assert data.sources == ["A dog.", "Two men.", "A ball."]
    assert data.targets == ["Ein Hund.", "Zwei Männer.", "Ein Ball."]
    assert data.skipped_lines == [3] and "skipped 1 pair with an empty source or target " \
        "(line 3)" in caplog.text
    (tmp_path / "short.de").write_text("Ein Hund.\n", encoding="utf-8")
    with pytest.raises(DataError, match="has 4 lines but .*short.de has 1"):
        read_text_pairs(tmp_path / "train.en", tmp_path / "short.de")


def test_a_line_separator_inside_a_string_is_not_a_new_line(tmp_path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", ['{"en": "a\u2028b", "de": "c"}', ROWS[0]])
    data = read_pairs(path, source_lang="en", target_lang="de")
    assert data.sources == ["a\u2028b", "A dog runs."] and data.where[1].endswith("line 2")


def test_truncate_to_the_window_counts_what_it_cut(caplog) -> None:
    sequences = [[5, 6, 7, 1], [5, 6, 7, 8, 9, 1], [5, 1]]
    with caplog.at_level(logging.WARNING, logger="lmlab.data.pairs"):
        cut = truncate(sequences, 4, eos_id=1, where="train.jsonl")
    assert cut.sequences == [[5, 6, 7, 1], [5, 6, 7, 1], [5, 1]]  # still ends with EOS
    assert (cut.n_truncated, cut.longest) == (1, 6)
    assert caplog.messages == [
        "train.jsonl: truncated 1 of 3 sources longer than 4 tokens (longest 6)"]
    plain = truncate(sequences, 2)
    assert plain.sequences == [[5, 6], [5, 6], [5, 1]] and plain.n_truncated == 2
    caplog.clear()
    assert truncate(sequences, 10).n_truncated == 0 and not caplog.messages
    with pytest.raises(ConfigError, match="at least 2, got 1"):
        truncate(sequences, 1, eos_id=1)


@pytest.mark.parametrize("folder, fields", [("multi30k_en_de", ["en", "de"]),
                                            ("multi30k_multilingual", ["en", "de", "fr", "cs"])])
def test_multi30k_loads(folder, fields) -> None:
    path = SHARED / folder / "train.jsonl"
    if not path.is_file():
        pytest.skip(f"../shared/data ({folder}) is absent")
    for target in fields[1:]:
        data = read_pairs(path, source_lang="en", target_lang=target)
        assert len(data) == 29000 and data.n_skipped == 0
        assert data.sources[0] == "Two young, White males are outside near many bushes."
    if len(fields) == 4:
        assert data.targets[0] == "Dva mladí bílí muži jsou venku poblíž mnoha keřů."
        with pytest.raises(DataError, match=r"fields: id, en, de, fr, cs\)"):
            read_pairs(path, source_lang="en", target_lang="es")
