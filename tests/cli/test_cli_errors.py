"""Bad input on the command line: exit status 2, one line on stderr naming the culprit, no traceback,
no half-written output; and the COMMANDS table agrees with the parser."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmlab.cli import COMMANDS, build_parser
from lmlab.models import GPT, GPTConfig
from lmlab.tokenizer import Tokenizer

from conftest import run_cli  # noqa: F401  (test_cli_*.py import it from here)


def one_line(err: str) -> str:
    """The single stderr line, asserting there is exactly one and no traceback."""
    assert "Traceback" not in err, err
    assert err.endswith("\n") and err.count("\n") == 1, f"expected one line, got:\n{err}"
    return err.rstrip("\n")


def assert_usage_error(capsys, *argv, names: list[str], prefix: str | None = None) -> str:
    code, _, err = run_cli(capsys, *argv)
    line = one_line(err)
    assert code == 2, (code, line)
    if prefix is not None:
        assert line.startswith(prefix), line
    for name in names:
        assert name in line, f"{name!r} not in {line!r}"
    return line


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random char-level GPT with a 16-token context window, saved in the HF layout."""
    directory = tmp_path_factory.mktemp("tiny_model")
    tok = Tokenizer.char_level("abcdefghij def \n")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=16, n_embd=16, n_layer=1,
                          n_head=2, eos_token_id=tok.eos_token_id))
    model.save_pretrained(directory, tokenizer=tok)
    return directory


# -- pretrain: data errors ----------------------------------------------------------------------
def test_pretrain_missing_data_file(capsys, tmp_path):
    missing = tmp_path / "nope.txt"
    assert_usage_error(capsys, "pretrain", "--data", missing, "--out", tmp_path / "run",
                       prefix="lmlab pretrain: error: ", names=[str(missing), "no such file"])


def test_pretrain_empty_data_file(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_usage_error(capsys, "pretrain", "--data", empty, "--out", tmp_path / "run",
                       prefix="lmlab pretrain: error: ", names=[str(empty), "empty"])


@pytest.mark.parametrize("tokenizer", ["bpe", "char"])
def test_pretrain_non_utf8_data_file(capsys, tmp_path, tokenizer):
    bad = tmp_path / "latin.txt"
    bad.write_bytes(b"\xff\xfe abc")
    assert_usage_error(capsys, "pretrain", "--data", bad, "--out", tmp_path / "run",
                       "--tokenizer", tokenizer, prefix="lmlab pretrain: error: ",
                       names=[str(bad), "UTF-8", "byte 0"])


def test_pretrain_jsonl_line_missing_text(capsys, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "hello"}\n{"body": "no text field"}\n')
    assert_usage_error(capsys, "pretrain", "--data", data, "--out", tmp_path / "run",
                       prefix="lmlab pretrain: error: ",
                       names=[f"{data} line 2", "missing field 'text'"])


def test_pretrain_jsonl_error_is_not_wrapped_as_a_bpe_failure(capsys, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "hello"}\n{"body": "no text field"}\n')
    code, _, err = run_cli(capsys, "pretrain", "--data", data, "--out", tmp_path / "run")
    assert (code, one_line(err)) == (2, f"lmlab pretrain: error: {data} line 2: missing field 'text'")


def test_failed_pretrain_leaves_no_model(capsys, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "hello"}\n{"text": 3}\n')
    run = tmp_path / "run"
    assert_usage_error(capsys, "pretrain", "--data", data, "--out", run,
                       names=[f"{data} line 2", "must be a string"])
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert not (run / name).exists(), name
    assert not (run / "checkpoints").exists()
    assert not (run / "data" / "meta.json").exists()  # no half-prepared dataset passes as complete


# -- pretrain: config errors --------------------------------------------------------------------
def test_pretrain_unknown_key_in_yaml(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("n_layer: 1\nbatchsize: 4\n")
    line = assert_usage_error(capsys, "pretrain", "--config", bad, "--out", tmp_path / "run",
                              prefix=f"lmlab pretrain: error: {bad}: ",
                              names=["unknown key 'batchsize'", "did you mean 'batch_size'"])
    assert not (tmp_path / "run").exists(), line  # nothing is written before the config is valid


def test_pretrain_unknown_override(capsys, tmp_path):
    assert_usage_error(capsys, "pretrain", "--out", tmp_path / "run", "--learnin_rate", "1",
                       prefix="lmlab pretrain: error: --learnin_rate: ",
                       names=["unknown key 'learnin_rate'"])


def test_pretrain_bad_override_value(capsys, tmp_path):
    assert_usage_error(capsys, "pretrain", "--out", tmp_path / "run", "--max_steps", "ten",
                       prefix="lmlab pretrain: error: --max_steps: ",
                       names=["expected an integer", "'ten'"])


def test_pretrain_override_missing_value(capsys, tmp_path):
    assert_usage_error(capsys, "pretrain", "--out", tmp_path / "run", "--max_steps",
                       names=["--max_steps: missing value"])


def test_pretrain_invalid_value_range(capsys, tmp_path):
    assert_usage_error(capsys, "pretrain", "--out", tmp_path / "run", "--batch_size", "-2",
                       names=["batch_size must be positive, got -2"])


def test_pretrain_without_data(capsys, tmp_path):
    assert_usage_error(capsys, "pretrain", "--out", tmp_path / "run", "--max_steps", "1",
                       names=["--data"])


def test_pretrain_without_out_is_a_usage_error(capsys):
    assert_usage_error(capsys, "pretrain", "--max_steps", "1", names=["--out"])


def test_unknown_subcommand(capsys):
    assert_usage_error(capsys, "pretrian", names=["pretrian"])


# -- generate -----------------------------------------------------------------------------------
def test_generate_unknown_flag(capsys, tiny_model_dir):
    assert_usage_error(capsys, "generate", "--model", tiny_model_dir, "--prompt", "abc",
                       "--beams", "3", names=["unrecognized arguments", "--beams"])


def test_generate_model_dir_without_config(capsys, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert_usage_error(capsys, "generate", "--model", tmp_path, "--prompt", "abc",
                       prefix="lmlab generate: error: ", names=[str(tmp_path), "config.json"])


def test_generate_missing_model_dir(capsys, tmp_path):
    assert_usage_error(capsys, "generate", "--model", tmp_path / "nowhere", "--prompt", "abc",
                       names=[str(tmp_path / "nowhere")])


def test_generate_unsupported_model_type(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    assert_usage_error(capsys, "generate", "--model", tmp_path, "--prompt", "abc",
                       names=[str(tmp_path / "config.json"), "'llama'", "gpt2"])


def test_generate_prompt_longer_than_context(capsys, tiny_model_dir):
    prompt = "abcdefghij" * 2  # 20 characters, 20 tokens; the window is 16
    assert_usage_error(capsys, "generate", "--model", tiny_model_dir, "--prompt", prompt,
                       "--max-new-tokens", "2", prefix="lmlab generate: error: --prompt ",
                       names=["20 tokens", "context window of 16"])


def test_generate_prompt_plus_new_tokens_over_context(capsys, tiny_model_dir):
    assert_usage_error(capsys, "generate", "--model", tiny_model_dir, "--prompt", "abcdefghij",
                       "--max-new-tokens", "7", names=["--max-new-tokens 7", "16"])


def test_generate_top_p_without_do_sample(capsys, tiny_model_dir):
    line = assert_usage_error(capsys, "generate", "--model", tiny_model_dir, "--prompt", "abc",
                              "--top-p", "0.9", names=["--top-p", "--do-sample"])
    assert "do_sample=True" not in line


def test_generate_seed_without_do_sample(capsys, tiny_model_dir):
    assert_usage_error(capsys, "generate", "--model", tiny_model_dir, "--prompt", "abc",
                       "--seed", "1", names=["--seed", "--do-sample"])


def test_generate_top_p_out_of_range(capsys, tiny_model_dir):
    assert_usage_error(capsys, "generate", "--model", tiny_model_dir, "--prompt", "abc",
                       "--top-p", "1.5", "--do-sample", names=["--top-p must be in (0, 1]", "1.5"])


@pytest.mark.parametrize("flags, names", [
    (["--top-p", "0", "--do-sample"], ["--top-p", "(0, 1]"]),
    (["--top-k", "0", "--do-sample"], ["--top-k", "positive"]),
    (["--max-new-tokens", "-1"], ["--max-new-tokens", ">= 0"]),
])
def test_generate_bad_sampling_values(capsys, tiny_model_dir, flags, names):
    assert_usage_error(capsys, "generate", "--model", tiny_model_dir, "--prompt", "abc", *flags,
                       names=names)


def test_generate_character_outside_vocabulary(capsys, tiny_model_dir):
    assert_usage_error(capsys, "generate", "--model", tiny_model_dir, "--prompt", "xyz",
                       names=["'x'", "vocabulary"])


# -- prepare: no half-written dataset -----------------------------------------------------------
@pytest.mark.parametrize("tokenizer", ["bpe", "char"])
def test_failed_prepare_leaves_no_output(capsys, tmp_path, tokenizer):
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "also fine"}\nnot json\n')
    out = tmp_path / "ds"
    assert_usage_error(capsys, "prepare", data, "--out", out, "--tokenizer", tokenizer,
                       prefix="lmlab prepare: error: ", names=[f"{data} line 3", "not valid JSON"])
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]  # no .tmp-ds-* left


def test_prepare_refuses_to_overwrite_a_non_dataset(capsys, tmp_path):
    data = tmp_path / "a.txt"
    data.write_text("hello world\n")
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert_usage_error(capsys, "prepare", data, "--out", out, "--tokenizer", "char",
                       names=[str(out), "refusing to overwrite"])
    assert (out / "notes.txt").read_text() == "keep me"


def test_prepare_vocab_size_too_small(capsys, tmp_path):
    data = tmp_path / "a.txt"
    data.write_text("hello world\n")
    assert_usage_error(capsys, "prepare", data, "--out", tmp_path / "ds", "--vocab-size", "100",
                       names=["--vocab-size", "257", "100"])
    assert not (tmp_path / "ds").exists()


def test_plot_without_metrics(capsys, tmp_path):
    assert_usage_error(capsys, "plot", tmp_path, names=[str(tmp_path), "metrics.jsonl"])


# -- end to end: a real process, exit status 2, one line, no traceback ------------------------
@pytest.mark.parametrize("case", ["missing-data", "llama", "unknown-flag"])
def test_subprocess_errors_are_one_line(tmp_path, case):
    if case == "missing-data":
        argv = ["pretrain", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "run")]
        names = [str(tmp_path / "nope.txt")]
    elif case == "llama":
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
        argv = ["generate", "--model", str(tmp_path), "--prompt", "hi"]
        names = ["model_type 'llama' is not supported"]
    else:
        argv = ["generate", "--model", str(tmp_path), "--beams", "3"]
        names = ["--beams"]
    proc = subprocess.run([sys.executable, "-m", "lmlab", *argv], capture_output=True, text=True,
                          timeout=120)
    line = one_line(proc.stderr)
    assert proc.returncode == 2, proc.stderr
    for name in names:
        assert name in line


# -- the table and the parser agree -------------------------------------------------------------
def _subcommands(parser) -> dict:
    (action,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return action.choices


def test_table_and_parser_agree():
    parser = build_parser()
    assert set(_subcommands(parser)) == set(COMMANDS)
    for name, sub in _subcommands(parser).items():
        module_name, help_text = COMMANDS[name]
        module = sys.modules[module_name]
        assert sub.get_default("_run") is module.run, name
        assert sub.description == help_text


def test_top_level_help(capsys):
    code, out, err = run_cli(capsys, "--help")
    assert code == 0 and err == ""
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_subcommand_help(capsys, name):
    code, out, err = run_cli(capsys, name, "--help")
    assert code == 0 and err == ""
    assert out.startswith(f"usage: lmlab {name}")
