"""`lmlab pretrain --objective span`, tiny and end to end: a Unigram vocabulary with T5's
sentinels trained on the data, span-corruption pretraining of a T5 through the one loop, a Hugging
Face T5ForConditionalGeneration (with its tokenizer) that transformers loads and that gives the
same logits; a run interrupted mid-way resumes bit for bit; clear errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_simple_documents
from safetensors.torch import load_file
from torch.testing import assert_close

from lmlab.data.prepare import prepare_dataset
from lmlab.models import from_pretrained
from lmlab.models.t5 import T5ForConditionalGeneration
from lmlab.recipes.pretraining import pretrain_recipe
from lmlab.tasks.span_corruption import SpanCorruptionTask
from lmlab.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "configs" / "pretrain" / "t5_span.yaml"
TINY_T5 = {"n_layer": 1, "n_head": 2, "n_embd": 32, "d_kv": 16, "d_ff": 64, "block_size": 32,
           "batch_size": 8, "vocab_size": 150, "tensorboard": False, "eval_every": 0,
           "save_every": 0, "warmup_steps": 5, "lr": 3e-3, "min_lr": 3e-4, "dropout": 0.0,
           "val_fraction": 0.2}



@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Tiny models on a shared 2-core machine: one intra-op thread (see conftest)."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_simple_documents(tmp_path_factory.mktemp("t5_corpus") / "docs.jsonl")


def flags(values: dict) -> list[str]:
    return [item for key, value in values.items()
            for item in (f"--{key}", str(value).lower() if isinstance(value, bool) else str(value))]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_span_preset_end_to_end(capsys, corpus, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "pretrain", "--config", PRESET, "--data", corpus, "--out",
                             run, "--max_steps", "40", "--no-progress", *flags(TINY_T5))
    assert code == 0, err
    assert "objective: span" in out and "tokenizer: unigram" in out
    config = json.loads((run / "config.json").read_text())
    assert config["architectures"] == ["T5ForConditionalGeneration"]
    assert (config["d_model"], config["d_kv"], config["d_ff"], config["num_layers"],
            config["num_heads"], config["feed_forward_proj"]) == (32, 16, 64, 1, 2, "relu")
    assert config["tie_word_embeddings"] is True
    tokenizer = Tokenizer.from_pretrained(run)
    assert tokenizer.kind == "unigram" and len(tokenizer.sentinel_ids) == 100
    assert tokenizer.id_to_token(tokenizer.sentinel_ids[0]) == "<extra_id_0>"
    # transformers loads the model and computes the same logits.
    ours = from_pretrained(run).eval()
    assert isinstance(ours, T5ForConditionalGeneration)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(run).eval()
    eos, (first, second) = tokenizer.eos_token_id, tokenizer.sentinel_ids[:2]
    source = torch.tensor([[*tokenizer.encode("the cat sees"), first, *tokenizer.encode(
        "river."), eos]])
    labels = torch.tensor([[first, *tokenizer.encode("the"), second, eos]])
    with torch.no_grad():
        expected = hf(input_ids=source, labels=labels).logits
        got = ours(ours.shift_right(labels), encoder_hidden=ours.encode(source))
    assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # Evaluated before and after training, and it learnt.
    evals = [m for m in metrics(run) if "val_loss" in m]
    assert len(evals) == 2 and {"val_ppl", "val_acc"} <= set(evals[0])
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0


class Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_bit_for_bit(corpus, tmp_path, monkeypatch) -> None:
    # One prepared dataset for both runs: Unigram training's scores differ in their last bits
    # from one training to the next (tokenizers sums in hash-map order).
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    prepare_dataset(corpus, tokenizer=Tokenizer.train_unigram(iterator=texts, vocab_size=150),
                    out_dir=tmp_path / "data", val_fraction=0.2)
    settings = {**TINY_T5, "data": str(tmp_path / "data"), "max_steps": 8, "save_every": 4,
                "eval_every": 4}
    settings.pop("val_fraction")
    recipe, cfg = pretrain_recipe(PRESET, settings)
    recipe.run(cfg, run_dir=tmp_path / "a", progress=False)

    batches = SpanCorruptionTask.train_batches

    def crash_at_6(self, step):
        if step == 6:
            raise Interrupted
        return batches(self, step)

    with monkeypatch.context() as patched:
        patched.setattr(SpanCorruptionTask, "train_batches", crash_at_6)
        with pytest.raises(Interrupted):
            recipe.run(cfg, run_dir=tmp_path / "b", progress=False)
    assert not (tmp_path / "b" / "model.safetensors").exists()
    recipe.run(cfg, run_dir=tmp_path / "b", resume=True, progress=False)
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in "ab")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    timing = {"tokens_per_s", "targets_per_s", "mfu", "peak_mem_mb"}

    def curve(run: str) -> list[dict]:
        return [{k: v for k, v in m.items() if k not in timing} for m in metrics(tmp_path / run)]

    assert curve("a") == curve("b")
    assert [m["step"] for m in curve("a") if "val_loss" in m] == [0, 4, 8]


@pytest.mark.parametrize("args, message", [
    (["--tokenizer", "bpe"], "objective span needs a tokenizer with T5's sentinel tokens"),
    (["--activation", "relu"], "activation: objective span shapes T5's feed-forward"),
    (["--block_size", "2"], "block_size, the encoder's input length, must be >= 3"),
    (["--noise_density", "0"], "noise_density must be in \\(0, 1\\), got 0"),
    (["--mean_noise_span_length", "0.5"], "mean_noise_span_length must be >= 1"),
    (["--n_embd", "30", "--n_head", "4"], "n_embd \\(30\\) must be a multiple of n_head"),
])
def test_bad_settings_are_one_line_errors(capsys, corpus, tmp_path, args, message) -> None:
    code, _, err = run_cli(capsys, "pretrain", "--objective", "span", "--data", corpus,
                           "--out", tmp_path / "run", *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmlab pretrain: error:")
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "run").exists()
