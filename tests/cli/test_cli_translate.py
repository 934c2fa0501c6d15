"""`lmlab translate`: lines from stdin or a file, translated in input order and streamed batch by
batch; empty lines kept and counted; one-line errors (exit 2) for an unknown --to, a model that
is not an encoder–decoder, a missing file."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest
import torch

from conftest import run_cli
from lmlab.recipes.translation import load_translator, translate_lines


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("lmlab ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def validation(tiny_translation_run):
    """The run's own validation translations (beam 2): what translate must print again."""
    path = tiny_translation_run / "translations_validation.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def agree(printed: list[str], rows: list[dict]) -> int:
    return sum(p == r["hypothesis"] for p, r in zip(printed, rows))


def test_stdin_is_translated_line_by_line_in_order(tiny_translation_run, validation, capsys,
                                                   monkeypatch):
    rows = validation[:12]
    text = "".join(r["source"] + "\n" for r in rows[:5]) + "\n" + \
        "".join(r["source"] + "\n" for r in rows[5:])
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    code, out, err = run_cli(capsys, "translate", "--model", tiny_translation_run,
                             "--num-beams", "2", "--batch-size", "4")
    assert code == 0, err
    printed = out.split("\n")[:-1]
    assert len(printed) == 13 and printed[5] == ""  # the empty line stays, in its place
    assert agree(printed[:5] + printed[6:], rows) >= 11
    assert "1 of 13 input lines were empty" in err


def test_a_file_is_translated_and_a_bilingual_model_takes_its_own_language(
        tiny_translation_run, validation, tmp_path, capsys):
    source = tmp_path / "news.en"
    source.write_text("".join(r["source"] + "\n" for r in validation))
    code, out, err = run_cli(capsys, "translate", "--model", tiny_translation_run, "--to", "de",
                             "--num-beams", "2", source)
    assert code == 0, err
    assert agree(out.splitlines(), validation) >= 0.9 * len(validation)
    assert err == ""


def test_translations_stream_one_batch_per_core_at_a_time(tiny_translation_run, validation):
    model, tokenizer, languages = load_translator(tiny_translation_run)
    pulled = []

    def lines():
        for row in validation[:6]:
            pulled.append(row["source"])
            yield row["source"]

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two batches side by side
    try:
        out = translate_lines(model, tokenizer, languages, lines(), num_beams=2, batch_size=2)
        first = next(out)
        assert len(pulled) == 4  # two batches are printed before the fifth line is read
        assert torch.get_num_threads() == 2
        assert [first, *out] == list(translate_lines(model, tokenizer, languages,
                                                     [r["source"] for r in validation[:6]],
                                                     num_beams=2, batch_size=6))
    finally:
        torch.set_num_threads(threads)


def test_a_too_long_line_is_truncated_with_a_warning(tiny_translation_run, tmp_path, capsys,
                                                     caplog):
    source = tmp_path / "long.txt"
    source.write_text("ka lo\n" + " ".join(["ka lo mi tu"] * 20) + "\n")
    with caplog.at_level(logging.WARNING):
        code, out, err = run_cli(capsys, "translate", "--model", tiny_translation_run,
                                 "--num-beams", "1", "--max-new-tokens", "8", source)
    assert code == 0 and len(out.splitlines()) == 2
    assert "truncated 1 of 2 sources longer than 32 tokens" in caplog.text


@pytest.mark.parametrize("extra, message", [
    (["--to", "fr"], "--to fr: not a target language of this model (its languages: de)"),
    (["missing.txt"], "missing.txt: no such file"),
    (["--num-beams", "0"], "--batch-size and --num-beams must be at least 1"),
])
def test_bad_flags_are_one_line(tiny_translation_run, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(sys, "stdin", io.StringIO("ka lo\n"))
    code, out, err = run_cli(capsys, "translate", "--model", tiny_translation_run, *extra)
    assert code == 2 and out == ""
    assert message in one_line(err)


def test_a_model_that_is_not_an_encoder_decoder(tiny_gpt_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "translate", "--model", tiny_gpt_dir, tmp_path / "x.txt")
    assert code == 2 and "not an encoder–decoder; translate needs one" in one_line(err)
    code, _, err = run_cli(capsys, "translate", "--model", tmp_path, tmp_path / "x.txt")
    assert code == 2 and "not a model directory (no config.json)" in one_line(err)


def test_evaluate_and_predict_read_a_translation_run(tiny_translation_run, translation_files,
                                                     validation, tmp_path, capsys):
    data = translation_files / "validation.jsonl"
    code, out, err = run_cli(capsys, "evaluate", tiny_translation_run, "--data", data, "--json")
    assert code == 0, err
    scores = json.loads(out)
    saved = json.loads((tiny_translation_run / "results.json").read_text())["validation_scores"]
    assert set(scores) == {"bleu", "chrf", "tokenized_bleu"}
    assert scores["bleu"] == pytest.approx(saved["bleu"], abs=1.0)  # batches pad differently
    code, out, err = run_cli(capsys, "predict", tiny_translation_run, "--data", data,
                             "--out", tmp_path / "hyp.jsonl")
    assert code == 0, err
    rows = [json.loads(x) for x in (tmp_path / "hyp.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == [r["source"] for r in validation]
    assert agree([r["hypothesis"] for r in rows], validation) >= 0.9 * len(rows)


def test_a_lora_run_is_merged_before_it_translates(tiny_translation_run, translation_files,
                                                   tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(capsys, "finetune", "translation", "--model", tiny_translation_run,
                           "--train", translation_files / "train.jsonl", "--validation",
                           translation_files / "validation.jsonl", "--source_lang", "en",
                           "--target_lang", "de", "--epochs", "1", "--batch_size", "16",
                           "--num_beams", "2", "--max_length", "32", "--bleu_examples", "4",
                           "--lora.r", "4", "--lora.target_modules", "q,v",
                           "--out", tmp_path / "lora", "--no-progress")
    assert code == 0, err
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    monkeypatch.setattr(sys, "stdin", io.StringIO("ka lo\n"))
    code, _, err = run_cli(capsys, "translate", "--model", tmp_path / "lora")
    assert code == 2 and "a LoRA adapter" in one_line(err) and "lmlab lora merge" in err
    code, _, err = run_cli(capsys, "lora", "merge", "--adapter", tmp_path / "lora",
                           "--out", tmp_path / "merged")
    assert code == 0, err
    monkeypatch.setattr(sys, "stdin", io.StringIO("ka lo\n"))
    code, out, err = run_cli(capsys, "translate", "--model", tmp_path / "merged")
    assert code == 0 and len(out.splitlines()) == 1, err
