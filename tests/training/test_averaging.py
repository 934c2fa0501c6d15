"""Checkpoint averaging (`lmlab average`): the exact element-wise mean of the last N step
checkpoints, written as a model directory every command loads; clear errors otherwise."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lmlab.cli import main
from lmlab.cli.average import average
from lmlab.errors import CheckpointError, ConfigError
from lmlab.models import from_pretrained
from lmlab.models.t5 import T5Config, T5ForConditionalGeneration
from lmlab.training.checkpoint import save_checkpoint, unique_state_dict

TINY = dict(vocab_size=40, d_model=16, d_kv=4, num_heads=2, d_ff=32, num_layers=1,
            feed_forward_proj="relu", tie_word_embeddings=True)


@pytest.fixture
def run_dir(tmp_path):
    """A finished run: the model and translation.json at its root, and three step checkpoints
    with different weights (steps 10, 20, 30)."""
    run = tmp_path / "run"
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(**TINY))
    model.save_pretrained(run)
    (run / "translation.json").write_text('{"source": "en"}\n')
    (run / "train_config.yaml").write_text("recipe: translation\n")
    for step in (10, 20, 30):
        torch.manual_seed(step)
        weights = {name: torch.randn_like(t) for name, t in unique_state_dict(model).items()}
        save_checkpoint(run, step, weights, {"step": step}, keep_last=0)
    return run


def checkpoint_weights(run, step):
    return load_file(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors")


def test_average_is_the_mean_of_the_last_n(run_dir, tmp_path):
    out = tmp_path / "avg"
    assert average(run_dir, 2, out) == [20, 30]
    a, b = checkpoint_weights(run_dir, 20), checkpoint_weights(run_dir, 30)
    model = from_pretrained(out)
    state = model.state_dict()
    for name in a:
        torch.testing.assert_close(state[name], (a[name] + b[name]) / 2, rtol=0, atol=1e-7)
    # the tied head is the averaged embedding, not something averaged apart
    assert model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()
    assert (out / "translation.json").read_text() == '{"source": "en"}\n'
    assert (out / "train_config.yaml").read_text() == "recipe: translation\n"
    assert json.loads((out / "averaged.json").read_text())["averaged_steps"] == [20, 30]


def test_one_checkpoint_is_that_checkpoint(run_dir, tmp_path):
    average(run_dir, 1, tmp_path / "one")
    state = from_pretrained(tmp_path / "one").state_dict()
    for name, tensor in checkpoint_weights(run_dir, 30).items():
        assert torch.equal(state[name], tensor)


def test_too_few_checkpoints_names_keep_last(run_dir, tmp_path):
    with pytest.raises(CheckpointError, match="3 step checkpoint.*4 asked for.*keep_last: 0"):
        average(run_dir, 4, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_damaged_checkpoint_is_refused(run_dir, tmp_path):
    damaged = run_dir / "checkpoints" / "step-00000030" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="step-00000030.*checksum mismatch"):
        average(run_dir, 2, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_empty_out_and_a_run_without_a_model(run_dir, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        average(run_dir, 2, taken)
    assert (taken / "x").read_text() == "keep me"
    (run_dir / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        average(run_dir, 2, tmp_path / "out")


def test_cli_one_line_and_exit_2(run_dir, tmp_path, capsys):
    assert main(["average", "--run", str(run_dir), "--last", "3", "--out",
                 str(tmp_path / "avg")]) == 0
    assert "steps 10, 20, 30" in capsys.readouterr().out
    assert main(["average", "--run", str(run_dir), "--last", "0", "--out",
                 str(tmp_path / "avg0")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--last must be at least 1" in err
