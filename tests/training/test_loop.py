"""The training loop: learning, exact resume, gradient-accumulation equivalence, guards, outputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmlab.models.gpt import GPT, GPTConfig
from lmlab.tasks.causal_lm import CausalLMTask
from lmlab.training.checkpoint import latest_valid, list_checkpoints
from lmlab.training.loop import (LoopConfig, OptimConfig, TrainingStopped, steps_that_fit,
                                 train)
from lmlab.training.optim import build_optimizer
from lmlab.training.schedule import lr_at

VOCAB = 32


def corpus(n: int = 20_000, seed: int = 0) -> np.ndarray:
    """A learnable stream: a repeating pattern with noise, so the loss can fall well below log(V)."""
    rng = np.random.default_rng(seed)
    pattern = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4])
    stream = np.tile(pattern, n // len(pattern) + 1)[:n].copy()
    noise = rng.random(n) < 0.05
    stream[noise] = rng.integers(0, VOCAB, noise.sum())
    return stream.astype(np.uint16)


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2))


LOOP_KEYS = {"max_steps", "warmup_steps", "eval_every", "save_every", "eval_at_start", "progress"}


def loop_config(**overrides) -> LoopConfig:
    """A LoopConfig from flat keys: the horizon's go to LoopConfig, the rest to its OptimConfig."""
    values = dict(
        max_steps=30, lr=3e-3, min_lr=3e-4, warmup_steps=5, weight_decay=0.1, beta1=0.9,
        beta2=0.99, grad_clip=1.0, eval_every=10, save_every=10, keep_last=5, log_every=1,
        max_minutes=None, max_bad_steps=3, tensorboard=False, progress=False,
    )
    values.update(overrides)
    optim = OptimConfig(**{k: v for k, v in values.items() if k not in LOOP_KEYS})
    return LoopConfig(**{k: v for k, v in values.items() if k in LOOP_KEYS}, optim=optim)


def make_task(tokens, *, batch_size=4, grad_accum=1, seed=7) -> CausalLMTask:
    return CausalLMTask(
        train_tokens=tokens[:16_000], val_tokens=tokens[16_000:], block_size=16,
        batch_size=batch_size, grad_accum=grad_accum, seed=seed, device=torch.device("cpu"),
        eval_tokens=1024,
    )


def test_loss_falls_and_outputs_are_written(tmp_path):
    tokens = corpus()
    result = train(tiny_model(), make_task(tokens), loop_config(max_steps=60, tensorboard=True),
                   run_dir=tmp_path, device=torch.device("cpu"), tokens_per_step=64)
    assert result.first_metrics["val_loss"] == pytest.approx(math.log(VOCAB), abs=0.3)
    assert result.metrics["val_loss"] < 0.6 * result.first_metrics["val_loss"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert len(train_losses) == 60
    assert np.mean(train_losses[-10:]) < 0.6 * np.mean(train_losses[:5])
    assert [r["step"] for r in records if "val_loss" in r] == [0, 10, 20, 30, 40, 50, 60]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert [c.step for c in list_checkpoints(tmp_path)] == [20, 30, 40, 50, 60]  # keep_last=5


class CrashAt:
    """Wraps a task and raises mid-run, as a killed process would stop."""

    def __init__(self, task, step):
        self.task, self.step = task, step

    def __getattr__(self, name):
        return getattr(self.task, name)

    def train_batches(self, step):
        if step == self.step:
            raise KeyboardInterrupt
        return self.task.train_batches(step)


def test_resume_is_bit_exact(tmp_path):
    tokens = corpus()
    cfg = loop_config(max_steps=25, save_every=10)
    reference = tiny_model()
    train(reference, make_task(tokens), cfg, run_dir=tmp_path / "a", device=torch.device("cpu"))

    interrupted = tiny_model()
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, CrashAt(make_task(tokens), 17), cfg, run_dir=tmp_path / "b",
              device=torch.device("cpu"))
    assert latest_valid(tmp_path / "b").step == 10
    resumed = tiny_model(seed=123)  # different init: everything must come from the checkpoint
    train(resumed, make_task(tokens), cfg, run_dir=tmp_path / "b", device=torch.device("cpu"),
          resume=True)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert curve(tmp_path / "a") == curve(tmp_path / "b")


TIMING = {"tokens_per_s", "targets_per_s", "mfu", "peak_mem_mb"}  # differ from run to run


def curve(run_dir) -> list[dict]:
    """metrics.jsonl without the timing fields: what a resumed run must reproduce exactly."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_corrupted_latest_checkpoint_falls_back(tmp_path, caplog):
    tokens = corpus()
    train(tiny_model(), make_task(tokens), loop_config(max_steps=20, save_every=10),
          run_dir=tmp_path, device=torch.device("cpu"))
    newest = list_checkpoints(tmp_path)[-1].path / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    assert latest_valid(tmp_path).step == 10
    assert "checksum mismatch" in caplog.text


def test_gradient_accumulation_equals_the_large_batch(tmp_path, monkeypatch):
    # Plain SGD makes the update proportional to the gradient; Adam's first step is nearly
    # sign(grad), which would turn round-off in exactly-zero gradients into full-size updates.
    monkeypatch.setattr(
        "lmlab.training.loop.build_optimizer",
        lambda model, lr, **_: torch.optim.SGD(model.parameters(), lr=lr),
    )
    tokens = corpus()
    cfg = loop_config(max_steps=3, eval_every=0, save_every=0, grad_clip=0.0, warmup_steps=0)
    big, small = tiny_model(), tiny_model()
    train(big, make_task(tokens, batch_size=8), cfg, run_dir=tmp_path / "big",
          device=torch.device("cpu"))
    train(small, make_task(tokens, batch_size=2, grad_accum=4), cfg, run_dir=tmp_path / "acc",
          device=torch.device("cpu"))
    for (name, a), b in zip(big.state_dict().items(), small.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


class NaNAt:
    """Injects NaN at the given steps: into the loss, or (`where="grad"`) only into the
    gradient, through a term whose value is 0 but whose derivative is 0 · ∞."""

    def __init__(self, task, steps, where="loss"):
        self.task, self.steps, self.where, self.current = task, set(steps), where, None

    def __getattr__(self, name):
        return getattr(self.task, name)

    def train_batches(self, step):
        self.current = step
        return self.task.train_batches(step)

    def loss(self, model, batch):
        loss = self.task.loss(model, batch)
        if self.current not in self.steps:
            return loss
        if self.where == "loss":
            return loss * float("nan")
        return loss + torch.sqrt(model.wte.weight.sum() * 0)  # value 0, gradient NaN


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_non_finite_step_is_skipped_and_repeated_ones_stop(tmp_path, caplog, where):
    tokens = corpus()
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, NaNAt(make_task(tokens), steps=[0, 1, 2], where=where),
          loop_config(max_steps=3, max_bad_steps=5, eval_every=0, save_every=0),
          run_dir=tmp_path / "a", device=torch.device("cpu"))
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name  # every update was skipped
    assert "step 2: non-finite loss or gradient; update skipped" in caplog.text
    # steps 2, 3, 4 are bad: the run stops there and checkpoints the state after steps 0 and 1
    with pytest.raises(TrainingStopped, match="3 non-finite steps in a row at step 4"):
        train(tiny_model(), NaNAt(make_task(tokens), steps=range(2, 10), where=where),
              loop_config(max_steps=10, eval_every=0, save_every=0), run_dir=tmp_path / "b",
              device=torch.device("cpu"))
    last_good = tiny_model()
    train(last_good, make_task(tokens), loop_config(max_steps=2, eval_every=0, save_every=0),
          run_dir=tmp_path / "c", device=torch.device("cpu"))
    ckpt = latest_valid(tmp_path / "b")
    assert ckpt.step == 5
    weights = load_file(ckpt.path / "model.safetensors")
    for name, value in weights.items():
        assert torch.equal(value, last_good.state_dict()[name]), name


def test_checkpoint_holds_model_weights_and_resumable_state(tmp_path):
    tokens = corpus()
    model = tiny_model()
    train(model, make_task(tokens), loop_config(max_steps=10, save_every=10, adam_eps=1e-6),
          run_dir=tmp_path, device=torch.device("cpu"))
    ckpt = latest_valid(tmp_path)
    weights = load_file(ckpt.path / "model.safetensors")
    assert torch.equal(weights["wte.weight"], model.wte.weight.detach())
    state = torch.load(ckpt.path / "state.pt", weights_only=True)
    assert state["step"] == 10 and state["max_steps"] == 10
    assert len(state["optimizer"]["state"]) == len(list(model.parameters()))
    assert [g["eps"] for g in state["optimizer"]["param_groups"]] == [1e-6, 1e-6]


def test_schedule_warmup_cosine_floor():
    kw = dict(lr=1e-3, min_lr=1e-4, warmup_steps=100, max_steps=2000)
    assert lr_at(0, **kw) == pytest.approx(1e-3 / 101)
    assert lr_at(99, **kw) == pytest.approx(1e-3 * 100 / 101)
    assert lr_at(100, **kw) == pytest.approx(1e-3)
    assert lr_at(1050, **kw) == pytest.approx(5.5e-4)  # half way: the mean of lr and min_lr
    assert lr_at(2000, **kw) == pytest.approx(1e-4)
    assert lr_at(5000, **kw) == pytest.approx(1e-4)


def test_weight_decay_applies_to_matrices_only():
    model = tiny_model()
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    # the tied embedding / LM head weight is optimised once
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_unique


def test_time_budget_cuts_max_steps_and_the_schedule_still_decays(tmp_path):
    tokens = corpus()
    result = train(tiny_model(), make_task(tokens),
                   loop_config(max_steps=100_000, max_minutes=0.05, eval_every=0, save_every=0),
                   run_dir=tmp_path, device=torch.device("cpu"))
    assert 25 <= result.steps < 100_000
    state = torch.load(latest_valid(tmp_path).path / "state.pt", weights_only=True)
    assert state["max_steps"] == result.steps  # the horizon was fitted, then reached
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
           if "lr" in json.loads(x)]
    # the cosine reached its floor (within the last step's distance of it: on a loaded machine
    # the budget may fit only a few steps past the 25 it calibrates on)
    assert lrs[-1] == pytest.approx(lr_at(result.steps - 1, lr=3e-3, min_lr=3e-4, warmup_steps=5,
                                          max_steps=result.steps))
    assert lrs[-1] == pytest.approx(3e-4, rel=0.1)


def test_steps_that_fit_leave_time_for_the_evaluations_to_come():
    # 100 s at 1 s a step: 100 steps, so 10 evaluations every 10 steps and the final one
    assert steps_that_fit(100, 100.0, per_step=1.0, eval_every=10, eval_seconds=1.0) == \
        100 + int(0.97 * (100 - 11))
    assert steps_that_fit(100, 100.0, per_step=1.0, eval_every=0, eval_seconds=5.0) == \
        100 + int(0.97 * 95)
    assert steps_that_fit(7, -3.0, per_step=1.0, eval_every=10, eval_seconds=1.0) == 7


class FakeClock:
    """The loop's clock, advanced by the task alone: steps cost 1 ms while the budget is
    calibrated, then 30 ms — a run whose first steps misjudge the rest (batch lengths that vary,
    a shared machine) — and evaluations nothing. Deterministic, whatever the machine does."""

    def __init__(self):
        self.now, self.calls = 0.0, 0

    def perf_counter(self) -> float:
        return self.now

    def step(self) -> None:
        self.calls += 1
        self.now += 0.001 if self.calls <= 40 else 0.03


def test_time_budget_is_fitted_again_after_each_evaluation(tmp_path, monkeypatch):
    import lmlab.training.loop as loop_module

    clock = FakeClock()
    monkeypatch.setattr(loop_module, "time", clock)

    class Task(CausalLMTask):
        def loss(self, model, batch):
            clock.step()
            return super().loss(model, batch)

    tokens = corpus()
    # a validation split of one batch: every evaluation, the final one too, costs one call
    task = Task(train_tokens=tokens[:16_000], val_tokens=tokens[16_000:16_065], block_size=16,
                batch_size=4, grad_accum=1, seed=7, device=torch.device("cpu"), eval_tokens=64)
    result = train(tiny_model(), task,
                   loop_config(max_steps=5_000, max_minutes=0.05, eval_every=10, save_every=0),
                   run_dir=tmp_path, device=torch.device("cpu"))
    # Fitted once, from the 1 ms steps, the 3 s budget would hold ~2,900 steps (87 s at 30 ms).
    # Fitted again after each evaluation, the run ends within its budget, having used most of it.
    assert 2.5 <= clock.now <= 3.0, f"{clock.now:.2f} s for a 3 s budget ({result.steps} steps, {clock.calls} calls)"
    assert 110 <= result.steps <= 130  # ~37 fast steps, then what 30 ms steps fit
    state = torch.load(latest_valid(tmp_path).path / "state.pt", weights_only=True)
    assert state["max_steps"] == result.steps
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
           if "lr" in json.loads(x)]
    assert lrs[-1] == pytest.approx(3e-4, rel=0.1)  # the schedule still ends at its floor


def test_continued_pretraining_refuses_data_from_another_tokenizer(tmp_path):
    from lmlab.data.prepare import prepare_dataset
    from lmlab.errors import DataError
    from lmlab.tokenizer import Tokenizer
    from lmlab.config import from_dict
    from lmlab.recipes.causal_lm import CausalLMConfig, pretrain_causal_lm

    text = "the quick brown fox jumps over the lazy dog\n" * 200
    (tmp_path / "a.txt").write_text(text)
    base = tmp_path / "base"
    tok = Tokenizer.char_level(text)
    GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=16, n_embd=16, n_layer=1,
                  n_head=2)).save_pretrained(base, tokenizer=tok)
    other = Tokenizer.char_level(text + "XYZ")  # another vocabulary
    prepare_dataset([tmp_path / "a.txt"], tokenizer=other, out_dir=tmp_path / "ds")
    cfg = from_dict(CausalLMConfig, dict(data=str(tmp_path / "ds"), init_from=str(base),
                                         block_size=8, max_steps=2, tensorboard=False))
    with pytest.raises(DataError, match="different tokenizer"):
        pretrain_causal_lm(cfg, run_dir=tmp_path / "run", progress=False)
    # the same tokenizer is accepted, and training continues from the base weights
    prepare_dataset([tmp_path / "a.txt"], tokenizer=tok, out_dir=tmp_path / "ds2")
    cfg = from_dict(CausalLMConfig, dict(data=str(tmp_path / "ds2"), init_from=str(base),
                                         block_size=8, max_steps=2, eval_every=0,
                                         tensorboard=False, warmup_steps=0))
    result = pretrain_causal_lm(cfg, run_dir=tmp_path / "run2", progress=False)
    assert result.result.steps == 2
