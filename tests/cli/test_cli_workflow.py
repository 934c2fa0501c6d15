"""The happy path, tiny and end to end: prepare → pretrain → load (ours and transformers) →
generate → plot → resume; and the char-level preset on raw text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmlab.cli import main

from test_cli_errors import run_cli  # noqa: E402  (same folder)

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
              "--batch_size", "8", "--tensorboard", "false", "--no-progress"]


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Tiny models on a shared 2-core machine: one intra-op thread (see conftest)."""


def python_like_corpus(lines: int = 200) -> str:
    """Repetitive, learnable 'code': a handful of function shapes with varying names and numbers."""
    out = []
    for i in range(lines // 2):
        out.append(f"def f{i % 17}(x, y):\n    return x * {i % 7} + y\n")
    return "\n".join(out)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("workflow")
    (root / "corpus.txt").write_text(python_like_corpus(), encoding="utf-8")
    try:
        assert main(["prepare", str(root / "corpus.txt"), "--out", str(root / "ds"),
                     "--tokenizer", "bpe", "--vocab-size", "300"]) == 0
        assert main(["pretrain", "--data", str(root / "ds"), "--out", str(root / "run"),
                     "--max_steps", "30", "--eval_every", "10", "--save_every", "10",
                     "--warmup_steps", "5", "--lr", "3e-3", "--min_lr", "3e-4", *TINY_MODEL]) == 0
    finally:
        torch.set_num_threads(before)
    return root


def test_prepare_writes_a_dataset(workspace):
    meta = json.loads((workspace / "ds" / "meta.json").read_text())
    assert meta["vocab_size"] <= 300
    assert meta["splits"]["train"]["tokens"] > 0 and meta["splits"]["val"]["tokens"] > 0
    assert (workspace / "ds" / "train.bin").stat().st_size == 2 * meta["splits"]["train"]["tokens"]
    assert (workspace / "ds" / "tokenizer.json").is_file()


def test_run_directory_layout(workspace):
    run = workspace / "run"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train_config.yaml",
                 "metrics.jsonl", "loss.png"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir())
    assert (run / "loss.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert not (run / "tensorboard").exists()  # --tensorboard false was honoured
    assert "max_steps: 30" in (run / "train_config.yaml").read_text()
    config = json.loads((run / "config.json").read_text())
    assert (config["model_type"], config["n_layer"], config["n_embd"], config["n_positions"]) == \
        ("gpt2", 1, 32, 32)


def test_metrics_show_learning(workspace):
    records = read_metrics(workspace / "run")
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    train = {r["step"]: r["train_loss"] for r in records if "train_loss" in r}
    assert sorted(val) == [0, 10, 20, 30]
    assert 30 in train
    assert val[30] < val[0] - 1.0, val  # seeded: about 5.65 -> 3.3


def test_load_ours_and_transformers_agree(workspace):
    from transformers import GPT2LMHeadModel

    from lmlab.models import from_pretrained

    run = workspace / "run"
    ours = from_pretrained(run)
    theirs = GPT2LMHeadModel.from_pretrained(run).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits
    assert a.shape == (2, 32, ours.config.vocab_size)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_generate_greedy(capsys, workspace):
    code, out, err = run_cli(capsys, "generate", "--model", workspace / "run", "--prompt", "def ",
                             "--max-new-tokens", "5")
    assert code == 0, err
    assert out.startswith("def ") and len(out) > len("def \n")
    again = run_cli(capsys, "generate", "--model", workspace / "run", "--prompt", "def ",
                    "--max-new-tokens", "5")[1]
    assert again == out  # greedy is deterministic


def test_generate_sampling_is_reproducible_with_a_seed(capsys, workspace):
    argv = ["generate", "--model", workspace / "run", "--prompt", "def ", "--max-new-tokens", "8",
            "--do-sample", "--top-k", "5"]
    first = run_cli(capsys, *argv, "--seed", "3")
    second = run_cli(capsys, *argv, "--seed", "3")
    assert first[0] == second[0] == 0
    assert first[1] == second[1] and first[1].startswith("def ")
    others = {run_cli(capsys, *argv, "--seed", str(s))[1] for s in (4, 5, 6)}
    assert len(others | {first[1]}) > 1  # the seed matters


def test_generate_reads_the_prompt_from_stdin(capsys, monkeypatch, workspace):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("def "))
    code, out, _ = run_cli(capsys, "generate", "--model", workspace / "run", "--max-new-tokens", "5")
    assert code == 0
    assert out == run_cli(capsys, "generate", "--model", workspace / "run", "--prompt", "def ",
                          "--max-new-tokens", "5")[1]


def test_plot(capsys, workspace, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(workspace / "run" / "metrics.jsonl", run)
    code, out, err = run_cli(capsys, "plot", run)
    assert code == 0, err
    assert (run / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert str(run / "loss.png") in out


def test_pretrain_into_an_existing_run_needs_resume(capsys, workspace):
    run = workspace / "run"
    weights = (run / "model.safetensors").read_bytes()
    code, _, err = run_cli(capsys, "pretrain", "--data", workspace / "ds", "--out", run,
                           "--max_steps", "5", *TINY_MODEL)
    assert code == 2
    assert err.count("\n") == 1 and "--resume" in err and str(run) in err
    assert (run / "model.safetensors").read_bytes() == weights  # untouched


@pytest.fixture
def resumed_copy(workspace, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(workspace / "run", run)
    return run


def test_resume_without_new_steps_keeps_the_run(capsys, workspace, resumed_copy):
    code, _, err = run_cli(capsys, "pretrain", "--data", workspace / "ds", "--out", resumed_copy,
                           "--resume", "--max_steps", "30", *TINY_MODEL)
    assert code == 0, err
    assert max(r["step"] for r in read_metrics(resumed_copy)) == 30


def test_resume_continues_to_a_larger_max_steps(capsys, workspace, resumed_copy):
    code, _, err = run_cli(capsys, "pretrain", "--data", workspace / "ds", "--out", resumed_copy,
                           "--resume", "--max_steps", "40", "--eval_every", "10",
                           "--save_every", "10", *TINY_MODEL)
    assert code == 0, err
    records = read_metrics(resumed_copy)
    assert max(r["step"] for r in records) == 40
    assert any(r["step"] == 40 and "val_loss" in r for r in records)
    assert (resumed_copy / "checkpoints" / "step-00000040").is_dir()


def test_char_level_preset_on_raw_text(capsys, tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 20)
    run = tmp_path / "run"
    code, out, err = run_cli(
        capsys, "pretrain", "--config", REPO / "configs/pretrain/shakespeare_char.yaml",
        "--data", text, "--out", run, "--max_steps", "3", "--eval_every", "0",
        "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16",
        "--batch_size", "4", "--eval_tokens", "256", "--tensorboard", "false", "--no-progress")
    assert code == 0, err
    assert "tokenizer: char" in out and "activation: gelu" in out  # the preset was applied
    config = json.loads((run / "config.json").read_text())
    assert config["activation_function"] == "gelu"
    vocab = json.loads((run / "tokenizer.json").read_text())["model"]["vocab"]
    assert set(text.read_text()) <= set(vocab)  # one token per character of the text
    assert (run / "data" / "meta.json").is_file()  # raw text was prepared on the fly
    assert max(r["step"] for r in read_metrics(run)) == 3


def test_resume_on_raw_text_refuses_other_data_settings(capsys, tmp_path):
    """RUN_DIR/data, prepared from raw text by the first run, is what a resumed run trains on:
    a setting that would have shaped it differently is an error, not silently ignored."""
    text = tmp_path / "tiny.txt"
    text.write_text("First Citizen:\nBefore we proceed.\n\nAll:\nSpeak, speak.\n\n" * 20)
    run = tmp_path / "run"
    args = ["pretrain", "--config", REPO / "configs/pretrain/shakespeare_char.yaml", "--data",
            text, "--out", run, "--eval_every", "0", "--n_layer", "1", "--n_head", "2",
            "--n_embd", "16", "--block_size", "16", "--batch_size", "4", "--eval_tokens", "256",
            "--tensorboard", "false", "--no-progress"]
    code, _, err = run_cli(capsys, *args, "--max_steps", "2")
    assert code == 0, err
    saved = (run / "train_config.yaml").read_text()
    for change, key in [(["--doc_separator", r"\n\n"], "doc_separator"),
                        (["--val_fraction", "0.2"], "val_fraction"),
                        (["--tokenizer", "bpe"], "tokenizer")]:
        code, _, err = run_cli(capsys, *args, "--max_steps", "3", "--resume", *change)
        assert code == 2, err
        assert err.count("\n") == 1 and f"error: {key}: " in err and "--out" in err
        assert (run / "train_config.yaml").read_text() == saved  # the run is untouched
    code, _, err = run_cli(capsys, *args, "--max_steps", "3", "--resume")
    assert code == 0, err
    assert max(r["step"] for r in read_metrics(run)) == 3
