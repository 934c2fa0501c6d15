"""`--device` on every command that runs a model: the one device rule (auto, cpu, cuda, cuda:N),
a clear one-line error where the device is not there, and `evaluate`/`predict` on the device of
this machine — not the one the run trained on."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lmlab.cli import build_parser
from lmlab.config import read_yaml
from test_cli_errors import assert_usage_error, run_cli
from test_cli_finetune import trained_run  # noqa: F401 — the fixture

RUNS_A_MODEL = ("generate", "chat", "serve", "evaluate", "predict")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.mark.parametrize("command", RUNS_A_MODEL)
def test_every_model_command_takes_device_defaulting_to_auto(command):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    action = next(a for a in sub._actions if "--device" in a.option_strings)
    assert action.default == "auto"
    assert "cuda:N" in action.help


@no_cuda
def test_generate_on_a_missing_gpu_is_one_line(capsys, tiny_gpt_dir):
    assert_usage_error(capsys, "generate", "--model", tiny_gpt_dir, "--prompt", "ab",
                       "--device", "cuda", names=["--device", "CUDA is not available"],
                       prefix="lmlab generate: error:")
    assert_usage_error(capsys, "generate", "--model", tiny_gpt_dir, "--prompt", "ab",
                       "--device", "gpu", names=["--device", "cuda:N", "'gpu'"])


@no_cuda
@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_training_with_device_cuda_on_a_cpu_machine_is_one_line(capsys, tmp_path, command,
                                                                tiny_bert_dir, sentiment_files):
    # `--device` is the training config's `device` key; it used to end in a traceback
    argv = (["pretrain", "--data", tmp_path / "none.txt"] if command == "pretrain" else
            ["finetune", "classification", "--model", tiny_bert_dir,
             "--train", sentiment_files / "train.jsonl",
             "--validation", sentiment_files / "validation.jsonl"])
    assert_usage_error(capsys, *argv, "--out", tmp_path / "run", "--device", "cuda",
                       names=["device", "CUDA is not available"])


def test_evaluate_and_predict_ignore_the_training_device(trained_run, sentiment_files,  # noqa: F811
                                                         tmp_path, capsys):
    out, _ = trained_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    config = run / "train_config.yaml"
    text = config.read_text()
    assert read_yaml(config)["optim"]["device"] == "auto"
    config.write_text(text.replace("device: auto", "device: cuda:3"))  # trained on a GPU box
    data = sentiment_files / "validation.jsonl"
    code, printed, err = run_cli(capsys, "evaluate", run, "--data", data, "--json",
                                 "--device", "cpu")
    assert code == 0, err
    assert json.loads(printed)["accuracy"] >= 0
    code, _, err = run_cli(capsys, "predict", run, "--data", data, "--out", tmp_path / "p.jsonl")
    assert code == 0, err
    assert (tmp_path / "p.jsonl").read_text() == (out / "predictions_validation.jsonl").read_text()
