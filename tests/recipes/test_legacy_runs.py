"""Runs saved before recipes/ existed: their train_config.yaml is flat, has no `recipe:` key and
uses keys since renamed (early_stopping_patience) or gone (a causal run's mask_prob). lmlab
evaluate / predict still read them (the recipe found from config.json's architecture), and a
pretraining run still resumes with its data settings checked. The files in legacy/ are what
lmlab wrote then (dump_yaml of the old PretrainConfig / Finetune*Config)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lmlab.cli import main
from lmlab.config import read_yaml, upgrade_saved
from lmlab.recipes import RECIPES, load_recipe_config, recipe_of_run
from lmlab.recipes.causal_lm import CausalLMConfig
from lmlab.recipes.finetuning import evaluate, predict, run_config

LEGACY = Path(__file__).parent / "legacy"


def test_old_fine_tuning_configs_load(tmp_path):
    run = tmp_path / "clf"
    run.mkdir()
    shutil.copy(LEGACY / "finetune_classification.yaml", run / "train_config.yaml")
    cfg = run_config(RECIPES["classification"], run, {"max_length": "48"})
    assert (cfg.text_field, cfg.label_field, cfg.max_length, cfg.epochs) == \
        ("sentence", "label", 48, 2.0)
    assert (cfg.optim.lr, cfg.optim.batch_size, cfg.optim.patience, cfg.optim.metric) == \
        (2e-3, 16, 1, "val_accuracy")
    assert (cfg.optim.beta2, cfg.optim.adam_eps) == (0.999, 1e-8)  # what fine-tuning used then
    run = tmp_path / "qa"
    run.mkdir()
    shutil.copy(LEGACY / "finetune_qa.yaml", run / "train_config.yaml")
    cfg = run_config(RECIPES["qa"], run)
    assert (cfg.max_length, cfg.stride, cfg.n_best, cfg.optim.metric) == (24, 8, 20, "val_f1")


def test_old_pretraining_config_loads():
    values = upgrade_saved(CausalLMConfig, read_yaml(LEGACY / "pretrain_causal.yaml"))
    assert "early_stopping_patience" not in values and values["patience"] == 0
    assert "mask_prob" not in values  # a masked-LM key the causal recipe no longer has
    cfg = load_recipe_config(RECIPES["causal"], None, values)
    assert (cfg.tokenizer, cfg.n_embd, cfg.optim.beta2, cfg.optim.batch_size) == \
        ("char", 16, 0.99, 4)


def test_an_old_fine_tuned_run_evaluates_and_predicts(tiny_bert_dir, sentiment_files, tmp_path,
                                                      capsys, single_thread):
    run = tmp_path / "run"
    assert main(["finetune", "classification", "--model", str(tiny_bert_dir), "--train",
                 str(sentiment_files / "train.jsonl"), "--validation",
                 str(sentiment_files / "validation.jsonl"), "--text_field", "sentence",
                 "--max_length", "32", "--batch_size", "16", "--epochs", "0.2", "--out", str(run),
                 "--no-progress"]) == 0
    data = sentiment_files / "validation.jsonl"
    metrics = evaluate(run, data=data)
    before = predict(run, data=data, out=tmp_path / "new.jsonl").read_text()
    shutil.copy(LEGACY / "finetune_classification.yaml", run / "train_config.yaml")
    assert recipe_of_run(run) is RECIPES["classification"]  # from config.json's architecture
    assert evaluate(run, data=data) == pytest.approx(metrics)
    assert predict(run, data=data, out=tmp_path / "old.jsonl").read_text() == before
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(metrics)


def test_an_old_pretraining_run_resumes(tmp_path, capsys, single_thread):
    text = tmp_path / "corpus.txt"
    text.write_text("First Citizen:\nBefore we proceed.\n\nAll:\nSpeak, speak.\n\n" * 20)
    run = tmp_path / "run"
    args = ["pretrain", "--data", str(text), "--out", str(run), "--tokenizer", "char",
            "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16",
            "--batch_size", "4", "--eval_every", "0", "--eval_tokens", "256",
            "--tensorboard", "false", "--no-progress"]
    assert main([*args, "--max_steps", "2"]) == 0
    old = (LEGACY / "pretrain_causal.yaml").read_text().replace("data: corpus.txt",
                                                               f"data: {text}")
    (run / "train_config.yaml").write_text(old)
    capsys.readouterr()
    assert main([*args, "--max_steps", "3", "--resume", "--val_fraction", "0.2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: val_fraction: " in err  # checked against the old file
    assert main([*args, "--max_steps", "3", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 3
    assert read_yaml(run / "train_config.yaml")["recipe"] == "causal"  # rewritten, new style
