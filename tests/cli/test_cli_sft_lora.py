"""SFT with LoRA: only the adapter trains and is saved (PEFT's format — peft loads it on the
transformers model with the same logits), `lmlab evaluate` reads the run, `lmlab lora merge`
writes a plain checkpoint transformers loads, and an adapter-only run killed mid-training resumes
bit-exact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lmlab.models.hf import from_pretrained
from lmlab.models.hf.peft import load_adapter
from conftest import write_splits
from test_cli_errors import one_line, run_cli
from test_cli_sft import conversations, sft_args

pytest.importorskip("peft", reason="peft is the oracle of the adapter format")
LORA = ["--lora.r", "4", "--lora.alpha", "8", "--lora.target_modules", "c_attn,c_fc"]


@pytest.fixture(scope="module")
def sft_files(tmp_path_factory):
    return write_splits(tmp_path_factory.mktemp("sft_lora_data"),
                        {"train": conversations(64, 0),
                         "validation": conversations(16, 1)})


def lora_args(model_dir, files, out, *extra):
    args = sft_args(model_dir, files, out, *LORA, *extra)
    args[args.index("--epochs") + 1] = "4"
    return args


@pytest.fixture(scope="module")
def lora_run(tiny_gpt_dir, sft_files, tmp_path_factory):
    from contextlib import redirect_stdout
    from io import StringIO

    from lmlab.cli import main

    out = tmp_path_factory.mktemp("lora_run")
    with redirect_stdout(StringIO()):
        assert main([str(a) for a in lora_args(tiny_gpt_dir, sft_files, out)]) == 0
    return out


def test_only_the_adapter_is_saved_and_peft_loads_it(lora_run, tiny_gpt_dir):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    assert (lora_run / "adapter_config.json").is_file()
    assert (lora_run / "adapter_model.safetensors").is_file()
    assert not (lora_run / "model.safetensors").exists()
    config = json.loads((lora_run / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["c_attn", "c_fc"]
    results = json.loads((lora_run / "results.json").read_text())
    assert results["validation"]["val_loss"] < results["validation_before"]["val_loss"]
    # the checkpoints hold the adapter only
    ckpt = sorted((lora_run / "checkpoints").glob("step-*"))[-1]
    from safetensors import safe_open
    weights = next(ckpt.glob("*.safetensors"))
    with safe_open(str(weights), "pt") as f:
        assert all("lora_" in k for k in f.keys())

    ours = load_adapter(from_pretrained(tiny_gpt_dir), lora_run).eval()
    peft = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_gpt_dir), lora_run).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), peft(ids).logits, atol=1e-5, rtol=0)
        base = from_pretrained(tiny_gpt_dir).eval()(ids)
    assert not torch.allclose(ours(ids), base, atol=1e-4)  # the adapter learned something


def test_evaluate_reads_the_adapter_run(lora_run, sft_files, capsys):
    code, printed, _ = run_cli(capsys, "evaluate", lora_run, "--data",
                               sft_files / "validation.jsonl", "--json")
    assert code == 0
    best = json.loads((lora_run / "results.json").read_text())["validation"]
    assert json.loads(printed)["loss"] == pytest.approx(best["val_loss"], rel=1e-5)


def test_merge_writes_a_plain_checkpoint(lora_run, tiny_gpt_dir, tmp_path, capsys):
    from transformers import GPT2LMHeadModel

    out = tmp_path / "merged"
    code, printed, _ = run_cli(capsys, "lora", "merge", "--adapter", lora_run, "--out", out)
    assert code == 0 and "plain checkpoint" in printed
    assert not (out / "adapter_config.json").exists()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    unmerged = load_adapter(from_pretrained(tiny_gpt_dir), lora_run).eval()
    with torch.no_grad():
        torch.testing.assert_close(GPT2LMHeadModel.from_pretrained(out).eval()(ids).logits,
                                   unmerged(ids), atol=1e-5, rtol=0)
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    code, _, err = run_cli(capsys, "lora", "merge", "--adapter", lora_run, "--out", out)
    assert code == 2 and "already holds a model" in one_line(err)


@pytest.mark.parametrize("flag, value, message", [
    ("--lora.r", "0", "lora.r must be a positive integer"),
    ("--lora.target_modules", "q_proj", "q_proj"),
])
def test_bad_lora_settings_are_one_line(tiny_gpt_dir, sft_files, tmp_path, capsys, flag, value,
                                        message):
    args = lora_args(tiny_gpt_dir, sft_files, tmp_path / "out")
    args[args.index(flag) + 1] = value
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and message in one_line(err)


def test_adapter_for_another_base_is_refused(lora_run, tiny_gpt2, tmp_path, capsys):
    _, other = tiny_gpt2("c")  # another width
    code, _, err = run_cli(capsys, "lora", "merge", "--adapter", lora_run, "--model", other,
                           "--out", tmp_path / "m")
    assert code == 2 and "adapter_model.safetensors" in one_line(err)
    assert not (tmp_path / "m").exists()


def test_adapter_run_killed_mid_training_resumes_bit_exact(tiny_gpt_dir, sft_files, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMLAB_MATMUL_PEAK_FLOPS": "1e11"}
    extra = ["--lora.dropout", "0.1", "--log_every", "1", "--samples", "0"]

    def command(out, *more):
        return [sys.executable, "-m", "lmlab", *map(str, lora_args(tiny_gpt_dir, sft_files, out,
                                                                    *extra)), *more]

    reference = tmp_path / "reference"
    subprocess.run(command(reference), env=env, check=True, capture_output=True, timeout=120)
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    # after the first epoch's checkpoint, somewhere in the second epoch
    while time.monotonic() < deadline and proc.poll() is None:
        lines = (out / "metrics.jsonl").read_text().splitlines() \
            if (out / "metrics.jsonl").is_file() else []
        steps = [json.loads(x).get("step", 0) for x in lines[:-1]]
        if any((out / "checkpoints").glob("step-*")) and steps and max(steps) >= 3 + 2:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it was killed"
    subprocess.run(command(out, "--resume"), env=env, check=True, capture_output=True,
                   timeout=120)
    assert (out / "adapter_model.safetensors").read_bytes() == \
        (reference / "adapter_model.safetensors").read_bytes()

    def losses(run):
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    assert losses(out) == losses(reference)
