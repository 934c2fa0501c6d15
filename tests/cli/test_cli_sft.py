"""`lmlab finetune sft`: a tiny GPT learns to reply (held-out loss on the replies falls), the run
saves its chat template and samples, `--show-masks` shows what trains, evaluate reproduces the
figures, and bad input is one line with nothing written."""

from __future__ import annotations

import json

import pytest

from lmlab.tokenizer import Tokenizer
from lmlab.tokenizer.chat import DEFAULT_CHAT_TEMPLATE
from conftest import write_splits
from test_cli_errors import one_line, run_cli

WORDS = "good great fine happy nice lovely bad awful sad poor ugly horrible".split()


def conversations(n: int, seed: int) -> list[dict]:
    """Echo tasks a tiny model learns in a few hundred steps: the user says a word, the
    assistant repeats it twice."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = rng.choice(WORDS)
        rows.append({"messages": [{"role": "user", "content": word},
                                  {"role": "assistant", "content": f"{word} {word}"}]})
    return rows


@pytest.fixture(scope="module")
def sft_files(tmp_path_factory):
    return write_splits(tmp_path_factory.mktemp("sft_data"),
                        {"train": conversations(96, 0),
                         "validation": conversations(24, 1)})


def sft_args(model_dir, files, out, *extra) -> list:
    return ["finetune", "sft", "--model", model_dir, "--train", files / "train.jsonl",
            "--validation", files / "validation.jsonl", "--out", out, "--no-progress",
            "--max_length", "48", "--batch_size", "16", "--lr", "3e-3", "--epochs", "60",
            "--warmup_ratio", "0.05", "--samples", "3", "--sample_max_new_tokens", "8", *extra]


@pytest.fixture(scope="module")
def sft_run(tiny_gpt_dir, sft_files, tmp_path_factory):
    from contextlib import redirect_stdout
    from io import StringIO

    from lmlab.cli import main

    out = tmp_path_factory.mktemp("sft_run")
    buffer = StringIO()
    with redirect_stdout(buffer):
        code = main([str(a) for a in sft_args(tiny_gpt_dir, sft_files, out, "--packing",
                                              "true")])
    assert code == 0
    return out, buffer.getvalue()


def test_sft_learns_the_replies_and_saves_template_and_samples(sft_run):
    out, printed = sft_run
    assert "best validation" in printed
    results = json.loads((out / "results.json").read_text())
    before, after = results["validation_before"]["val_loss"], results["validation"]["val_loss"]
    assert after < 0.5 * before, (before, after)
    # the template travels with the model: transformers and lmlab chat read it back
    assert Tokenizer.from_pretrained(out).chat_template == DEFAULT_CHAT_TEMPLATE
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == DEFAULT_CHAT_TEMPLATE
    samples = [json.loads(line) for line in (out / "samples_validation.jsonl").read_text()
               .splitlines()]
    assert len(samples) == 3
    # the model repeats the word and stops (EOS learned): greedy replies equal the references
    assert sum(s["generated"] == s["reference"] for s in samples) >= 2, samples


def test_evaluate_reproduces_the_validation_loss(sft_run, sft_files, capsys):
    out, _ = sft_run
    code, printed, _ = run_cli(capsys, "evaluate", out, "--data",
                               sft_files / "validation.jsonl", "--json")
    assert code == 0
    best = json.loads((out / "results.json").read_text())["validation"]
    assert json.loads(printed)["loss"] == pytest.approx(best["val_loss"], rel=1e-5)


def test_show_masks_marks_replies(tiny_gpt_dir, sft_files, capsys):
    code, printed, _ = run_cli(capsys, "finetune", "sft", "--model", tiny_gpt_dir, "--train",
                               sft_files / "train.jsonl", "--show-masks", "2")
    assert code == 0
    first = conversations(1, 0)[0]["messages"]
    word = first[0]["content"]
    assert f"### User:\n{word}\n\n### Assistant:\n⟦{word} {word}<|endoftext|>⟧" in printed
    assert printed.count("--- ") == 2


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "robot", "content": "x"}]}, "line 1: message 0 has unknown role"),
    ({"instruction": "x"}, "line 1: cannot tell the format"),
])
def test_bad_data_is_one_line_and_writes_nothing(tiny_gpt_dir, sft_files, tmp_path, capsys, row,
                                                 message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(row) + "\n")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "finetune", "sft", "--model", tiny_gpt_dir, "--train", bad,
                           "--validation", sft_files / "validation.jsonl", "--out", out)
    assert code == 2 and message in one_line(err)
    assert not out.exists()


def test_a_template_that_fails_to_render_is_one_line(tiny_gpt_dir, sft_files, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *sft_args(tiny_gpt_dir, sft_files, out, "--chat_template",
                                             "{{ raise_exception('no system role') }}"))
    assert code == 2 and "fails to render: no system role" in one_line(err)
    assert not out.exists()


def test_a_bert_model_is_refused(tiny_bert_dir, sft_files, tmp_path, capsys):
    code, _, err = run_cli(capsys, *sft_args(tiny_bert_dir, sft_files, tmp_path / "out"))
    assert code == 2 and "sft fine-tunes a causal language model" in one_line(err)
