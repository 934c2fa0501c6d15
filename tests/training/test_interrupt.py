"""SIGINT (Ctrl-C) and SIGTERM (a scheduler, a preempted machine) stop a training run at the next
step boundary with a checkpoint of that step, exit status 130 or 143, and one line saying so;
`--resume` then ends with the very weights of a run that was never interrupted (CPU, fp32, dropout
on). Plain --resume with nothing to continue is an error; --resume auto starts afresh."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import sentiment_rows, write_splits
from lmlab.cli import main
from lmlab.data.prepare import prepare_dataset
from lmlab.tokenizer import Tokenizer
from lmlab.training.distributed import Distributed
from lmlab.training.interrupt import StopSignals

PRETRAIN = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
            "--batch_size", "4", "--dropout", "0.1", "--max_steps", "30", "--eval_every", "10",
            "--eval_tokens", "256", "--warmup_steps", "4", "--log_every", "1",
            "--tensorboard", "false", "--seed", "5"]  # no save_every: only the interrupt saves
FINETUNE = ["--text_field", "sentence", "--max_length", "32", "--batch_size", "16",
            "--epochs", "2", "--lr", "2e-3", "--log_every", "1", "--patience", "1"]
# One thread, so that reductions sum in the same order in every process; no matmul-peak timing.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "LMLAB_MATMUL_PEAK_FLOPS": "1e11"}
AT = random.Random(17)  # the steps at which the signals are sent: random, but the same each time


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("interrupt")
    rng = random.Random(0)
    words = "to be or not that is the question whether tis nobler in mind suffer".split()
    text = "\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(200))
    (root / "a.txt").write_text(text)
    prepare_dataset([root / "a.txt"], tokenizer=Tokenizer.char_level(text), out_dir=root / "ds",
                    val_fraction=0.1)
    return root / "ds"


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> Path:
    """240 training rows: 15 steps per epoch of 16, 30 in all."""
    return write_splits(tmp_path_factory.mktemp("splits"),
                        {"train": sentiment_rows(240, 0), "validation": sentiment_rows(48, 1)})


def pretrain_command(dataset: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmlab", "pretrain", "--data", str(dataset), "--out", str(out),
            "--no-progress", *PRETRAIN, *extra]


def finetune_command(model: Path, splits: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmlab", "finetune", "classification", "--model", str(model),
            "--train", str(splits / "train.jsonl"), "--validation",
            str(splits / "validation.jsonl"), "--out", str(out), "--no-progress", *FINETUNE,
            *extra]


def finish(command: list[str]) -> None:
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def logged_steps(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return -1
    return max((json.loads(x).get("step", -1) for x in lines[:-1]), default=-1)


def signal_at(command: list[str], out: Path, sig: int, step: int) -> tuple[int, str]:
    """Start a run, send `sig` once it has logged `step`; its exit status and stderr."""
    log = out.with_name(out.name + ".stderr")
    with log.open("w") as stderr:
        proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 120
        while logged_steps(out) < step and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(sig)
        code = proc.wait(timeout=120)
    return code, log.read_text()


def weights_and_losses(out: Path) -> tuple[bytes, list[tuple[int, float]]]:
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return ((out / "model.safetensors").read_bytes(),
            [(r["step"], r["train_loss"]) for r in records if "train_loss" in r])


def check_interrupted(code: int, stderr: str, *, command: str, sig: int, out: Path,
                      sent_at: int, max_steps: int) -> None:
    assert code == 128 + sig, stderr[-2000:]
    assert "Traceback" not in stderr
    last = stderr.splitlines()[-1]
    match = re.fullmatch(rf"lmlab {command}: interrupted at step (\d+); checkpoint saved to "
                         rf"(\S+); continue with --resume", last)
    assert match, last
    step = int(match[1])
    assert sent_at <= step < max_steps  # stopped at the next step boundary, before the end
    assert Path(match[2]) == out / "checkpoints" / f"step-{step:08d}"
    assert (Path(match[2]) / "manifest.json").is_file()
    assert not (out / "model.safetensors").exists()  # the run is not over


@pytest.fixture(scope="module")
def pretrained(dataset, tmp_path_factory):
    """The uninterrupted run's final weights and loss curve."""
    out = tmp_path_factory.mktemp("reference") / "run"
    finish(pretrain_command(dataset, out))
    return weights_and_losses(out)


@pytest.mark.parametrize("sig, sent_at", [(signal.SIGINT, AT.randrange(2, 20)),
                                          (signal.SIGTERM, AT.randrange(2, 20))])
def test_pretraining_stops_with_a_checkpoint_and_resumes_bit_exact(dataset, pretrained, sig,
                                                                    sent_at, tmp_path):
    out = tmp_path / "run"
    code, stderr = signal_at(pretrain_command(dataset, out), out, sig, sent_at)
    check_interrupted(code, stderr, command="pretrain", sig=sig, out=out, sent_at=sent_at,
                      max_steps=30)
    finish(pretrain_command(dataset, out, "--resume"))
    weights, losses = weights_and_losses(out)
    assert losses == pretrained[1] and [s for s, _ in losses] == list(range(1, 31))
    assert weights == pretrained[0]


@pytest.fixture(scope="module")
def finetuned(tiny_bert_dir, splits, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    finish(finetune_command(tiny_bert_dir, splits, out))
    return weights_and_losses(out)


# Mid-epoch (15 steps per epoch): the data order, the schedule and the best epoch so far resume.
@pytest.mark.parametrize("sig, sent_at", [(signal.SIGINT, AT.randrange(2, 12)),
                                          (signal.SIGTERM, AT.randrange(16, 27))])
def test_finetuning_stops_mid_epoch_and_resumes_bit_exact(tiny_bert_dir, splits, finetuned, sig,
                                                          sent_at, tmp_path):
    out = tmp_path / "run"
    command = finetune_command(tiny_bert_dir, splits, out)
    code, stderr = signal_at(command, out, sig, sent_at)
    check_interrupted(code, stderr, command="finetune", sig=sig, out=out, sent_at=sent_at,
                      max_steps=30)
    finish(finetune_command(tiny_bert_dir, splits, out, "--resume"))
    weights, losses = weights_and_losses(out)
    assert losses == finetuned[1]
    assert weights == finetuned[0]


def test_two_ranks_stop_at_the_same_step_when_one_is_signalled(dataset, tmp_path):
    """Two processes (gloo), as torchrun starts them; SIGTERM reaches rank 1 only (which writes
    nothing): both stop at the same step boundary, rank 0 checkpoints it and speaks for both."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    procs, logs = [], []
    for rank in (0, 1):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        logs.append((tmp_path / f"rank{rank}.stderr").open("w"))
        procs.append(subprocess.Popen(pretrain_command(dataset, out, "--batch_size", "2"),
                                      env=env, stdout=subprocess.DEVNULL, stderr=logs[-1]))
    deadline = time.monotonic() + 120
    while logged_steps(out) < 3 and procs[0].poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=120) for p in procs]
    for f in logs:
        f.close()
    stderr = [(tmp_path / f"rank{rank}.stderr").read_text() for rank in (0, 1)]
    assert codes == [143, 143], stderr[0][-1500:] + stderr[1][-1500:]
    check_interrupted(codes[0], stderr[0], command="pretrain", sig=signal.SIGTERM, out=out,
                      sent_at=3, max_steps=30)
    assert "interrupted" not in stderr[1] and "Traceback" not in stderr[1]


# -- --resume and --resume auto --------------------------------------------------------------
def run_cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_plain_resume_needs_a_checkpoint(capsys, dataset, tiny_bert_dir, splits, tmp_path):
    new = tmp_path / "new"
    code, err = run_cli(capsys, "pretrain", "--data", dataset, "--out", new, "--resume",
                        *PRETRAIN)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("lmlab pretrain: error: --resume:") and str(new) in err
    assert "--resume auto" in err and not new.exists()  # nothing was prepared or written
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_cli(capsys, *finetune_command(tiny_bert_dir, splits, empty, "--resume")[3:])
    assert code == 2 and err.count("\n") == 1 and str(empty) in err, err
    assert list(empty.iterdir()) == []


def test_resume_auto_starts_a_new_run_then_continues_it(capsys, caplog, dataset, tmp_path,
                                                        single_thread):
    out = tmp_path / "run"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with caplog.at_level("INFO"):
        code, err = run_cli(capsys, "pretrain", "--data", dataset, "--out", out, "--resume",
                            "auto", *PRETRAIN, "--max_steps", "3")
    assert code == 0, err
    assert "starting a new run" in caplog.text
    assert (out / "model.safetensors").is_file() and logged_steps(out) == 3
    # The signal handlers were the loop's only while it trained.
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    caplog.clear()
    with caplog.at_level("INFO"):
        code, err = run_cli(capsys, "pretrain", "--data", dataset, "--out", out, "--resume",
                            "auto", *PRETRAIN, "--max_steps", "5")
    assert code == 0, err
    assert "resumed from" in caplog.text and "step 3 of 5" in caplog.text
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4, 5]


# -- the handlers themselves ---------------------------------------------------------------------
def test_a_signal_sets_the_flag_and_a_second_one_aborts():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stop = StopSignals(Distributed(), device=None)
    stop.install()
    try:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)  # handled in this (the main) thread, at once
        assert stop.requested() and stop.agreed == signal.SIGTERM
        assert stop.requested()  # it stays set
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # not reached: the handler raises at the next bytecode
        # the second signal gave the handlers back
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    finally:
        stop.restore()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
