"""Damaged, foreign and mismatched files on every command: weights, config.json, tokenizer.json,
training checkpoints, adapters, metrics. Each is one line `lmlab CMD: error: …` naming the file
and what was expected, exit status 2, no traceback — and the output path exactly as it was."""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from lmlab.cli import main
from lmlab.tokenizer import Tokenizer
from conftest import _corpus, write_splits
from test_cli_errors import assert_usage_error
from test_cli_sft import conversations


def tree(path: Path) -> list | None:
    """Every file and folder under `path` with its bytes' digest (None: `path` does not exist)."""
    if not path.exists():
        return None
    return sorted((str(p.relative_to(path)),
                   hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
                  for p in path.rglob("*"))


def assert_bad(capsys, *argv, names: list[str], out: Path | None = None) -> str:
    """One line `lmlab CMD: error: …` holding `names`, exit status 2, and `out` unchanged."""
    before = tree(out) if out is not None else None
    command = str(argv[0])
    line = assert_usage_error(capsys, *argv, names=names, prefix=f"lmlab {command}: error: ")
    if out is not None:
        assert tree(out) == before, f"{out} changed: {line}"
    return line


def quiet(*argv) -> None:
    with redirect_stdout(StringIO()):
        assert main([str(a) for a in argv]) == 0


# -- damage, applied to a copy of a model directory ------------------------------------------
def truncate(d: Path) -> str:  # safetensors: "incomplete metadata, file not fully covered"
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    return "model.safetensors"


def garbage(d: Path) -> str:  # safetensors: "header too large"
    (d / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    return "model.safetensors"


def config_not_json(d: Path) -> str:
    (d / "config.json").write_text("{not json")
    return "config.json"


def config_not_object(d: Path) -> str:
    (d / "config.json").write_text("[1, 2]")
    return "config.json"


def _edit_config(d: Path, **values) -> None:
    config = json.loads((d / "config.json").read_text())
    for key, value in values.items():
        config[key if key in config else _BERT_NAMES[key]] = value
    (d / "config.json").write_text(json.dumps(config))


_BERT_NAMES = {"n_layer": "num_hidden_layers", "n_embd": "hidden_size"}


def config_wrong_type(d: Path) -> str:
    _edit_config(d, n_layer="two")
    return "must be an integer"


def config_wrong_shape(d: Path) -> str:
    _edit_config(d, n_embd=64)
    return "shape"


def missing_tensor(d: Path) -> str:
    state = load_file(d / "model.safetensors")
    state.pop(sorted(state)[3])
    save_file(state, d / "model.safetensors")
    return "missing"


def tokenizer_not_json(d: Path) -> str:
    (d / "tokenizer.json").write_text("{broken")
    return "tokenizer.json"


def tokenizer_too_big(d: Path) -> str:
    Tokenizer.train_bpe(iterator=_corpus() * 3, vocab_size=400).save_pretrained(d)
    return "400 tokens"


DAMAGE = {f.__name__: f for f in (truncate, garbage, config_not_json, config_not_object,
                                  config_wrong_type, config_wrong_shape, missing_tensor,
                                  tokenizer_not_json, tokenizer_too_big)}


def damaged(src: Path, tmp_path: Path, damage: str) -> tuple[Path, str]:
    d = tmp_path / f"model_{damage}"
    shutil.copytree(src, d)
    return d, DAMAGE[damage](d)


@pytest.fixture
def precious(tmp_path) -> Path:
    """A pre-existing --out holding a user's file."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    return out


# -- runs to read back ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clf_run(tiny_bert_dir, sentiment_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad_files") / "clf"
    quiet("finetune", "classification", "--model", tiny_bert_dir, "--train",
          sentiment_files / "train.jsonl", "--validation", sentiment_files / "validation.jsonl",
          "--text_field", "sentence", "--out", out, "--no-progress", "--max_length", "32",
          "--batch_size", "64", "--epochs", "0.3")
    return out


@pytest.fixture(scope="module")
def sft_files(tmp_path_factory) -> Path:
    return write_splits(tmp_path_factory.mktemp("bad_files_sft"),
                        {"train": conversations(16, 0), "validation": conversations(8, 1)})


@pytest.fixture(scope="module")
def adapter(tiny_gpt_dir, sft_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad_files") / "adapter"
    quiet("finetune", "sft", "--model", tiny_gpt_dir, "--train", sft_files / "train.jsonl",
          "--validation", sft_files / "validation.jsonl", "--out", out, "--no-progress",
          "--max_length", "48", "--batch_size", "16", "--epochs", "1", "--lora.r", "4",
          "--lora.target_modules", "c_attn", "--samples", "0")
    return out


TEXT = "hello world the quick brown fox jumps over the lazy dog\n" * 40
PRETRAIN = ["--tokenizer", "char", "--n_layer", "1", "--n_head", "2", "--n_embd", "16",
            "--block_size", "16", "--batch_size", "4", "--save_every", "1", "--eval_every", "0",
            "--no-progress", "--tensorboard", "false"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad_files_text") / "a.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def pretrain_run(text_file, tmp_path_factory) -> Path:
    """A char-level GPT pretrained two steps, checkpointed after each."""
    out = tmp_path_factory.mktemp("bad_files") / "pretrain"
    quiet("pretrain", "--data", text_file, "--out", out, "--max_steps", "2", *PRETRAIN)
    return out


# -- model directories: generate, chat, evaluate, predict, finetune, pretrain init_from --------
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_generate_damaged_model(capsys, tiny_gpt_dir, tmp_path, damage):
    model, expected = damaged(tiny_gpt_dir, tmp_path, damage)
    assert_bad(capsys, "generate", "--model", model, "--prompt", "good", "--max-new-tokens", "2",
               names=[str(model), expected])


@pytest.mark.parametrize("damage", ["truncate", "config_wrong_type", "tokenizer_too_big"])
def test_chat_damaged_model(capsys, tiny_gpt_dir, tmp_path, damage):
    model, expected = damaged(tiny_gpt_dir, tmp_path, damage)
    assert_bad(capsys, "chat", "--model", model, names=[str(model), expected])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "config_wrong_type",
                                    "config_wrong_shape", "tokenizer_too_big"])
def test_evaluate_damaged_run(capsys, clf_run, sentiment_files, tmp_path, damage):
    run, expected = damaged(clf_run, tmp_path, damage)
    assert_bad(capsys, "evaluate", run, "--data", sentiment_files / "validation.jsonl",
               names=[str(run), expected])


@pytest.mark.parametrize("damage", ["garbage", "missing_tensor"])
def test_predict_damaged_run_writes_nothing(capsys, clf_run, sentiment_files, tmp_path, damage):
    run, expected = damaged(clf_run, tmp_path, damage)
    out = tmp_path / "predictions.jsonl"
    assert_bad(capsys, "predict", run, "--data", sentiment_files / "validation.jsonl", "--out",
               out, names=[str(run), expected], out=out)


@pytest.mark.parametrize("family, damage", [
    ("gpt", "truncate"), ("bert", "garbage"), ("bert", "config_wrong_type"),
    ("gpt", "tokenizer_not_json"), ("gpt", "tokenizer_too_big"), ("bert", "missing_tensor"),
])
def test_finetune_damaged_model_keeps_out(capsys, tiny_gpt_dir, tiny_bert_dir, sentiment_files,
                                          tmp_path, precious, family, damage):
    model, expected = damaged(tiny_gpt_dir if family == "gpt" else tiny_bert_dir, tmp_path, damage)
    assert_bad(capsys, "finetune", "classification", "--model", model, "--train",
               sentiment_files / "train.jsonl", "--validation",
               sentiment_files / "validation.jsonl", "--text_field", "sentence", "--out", precious,
               "--no-progress", "--max_length", "32", names=[str(model), expected], out=precious)


@pytest.mark.parametrize("damage", ["truncate", "config_not_json", "config_wrong_shape"])
def test_pretrain_init_from_damaged_model_leaves_no_out(capsys, tiny_gpt_dir, sentiment_files,
                                                        tmp_path, damage):
    model, expected = damaged(tiny_gpt_dir, tmp_path, damage)
    out = tmp_path / "run"
    assert_bad(capsys, "pretrain", "--data", sentiment_files / "train.jsonl", "--text_field",
               "sentence", "--init_from", model, "--out", out, "--max_steps", "1",
               "--block_size", "16", "--no-progress", names=[str(model), expected], out=out)
    assert not out.exists()


# -- a model family that cannot do what the command needs ---------------------------------------
def test_generate_with_a_bert_classifier_run(capsys, clf_run):
    assert_bad(capsys, "generate", "--model", clf_run, "--prompt", "good",
               names=[str(clf_run), "BertForSequenceClassification", "cannot generate"])


def test_chat_with_a_bert_encoder(capsys, tiny_bert_dir):
    assert_bad(capsys, "chat", "--model", tiny_bert_dir,
               names=[str(tiny_bert_dir), "cannot generate"])


def test_qa_on_a_gpt_leaves_out_as_it_was(capsys, tiny_gpt_dir, sentiment_files, precious):
    assert_bad(capsys, "finetune", "qa", "--model", tiny_gpt_dir, "--train",
               sentiment_files / "train.jsonl", "--validation",
               sentiment_files / "validation.jsonl", "--out", precious,
               names=[str(tiny_gpt_dir), "extractive QA needs"], out=precious)


def test_causal_pretraining_from_a_bert(capsys, tiny_bert_dir, sentiment_files, tmp_path):
    out = tmp_path / "run"
    assert_bad(capsys, "pretrain", "--data", sentiment_files / "train.jsonl", "--text_field",
               "sentence", "--init_from", tiny_bert_dir, "--out", out, "--max_steps", "1",
               "--block_size", "16", names=[str(tiny_bert_dir), "mlm"], out=out)


# -- failed training runs leave --out as they found it -----------------------------------------
def test_failed_finetune_leaves_no_out(capsys, tiny_bert_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok", "label": "a"}\n{"text": "no label"}\n')
    out = tmp_path / "run"
    assert_bad(capsys, "finetune", "classification", "--model", tiny_bert_dir, "--train", bad,
               "--validation", bad, "--out", out, names=[f"{bad} line 2", "label"], out=out)
    assert not out.exists()  # no train_config.yaml left behind


def test_failed_pretrain_keeps_a_users_files(capsys, tmp_path, precious):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"nope": 1}\n')
    assert_bad(capsys, "pretrain", "--data", bad, "--out", precious, *PRETRAIN,
               names=[f"{bad} line 2", "missing field 'text'"], out=precious)
    assert (precious / "notes.txt").read_text() == "keep me"


# -- training checkpoints on --resume -----------------------------------------------------------
def _checkpoints(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("step-*"))


def _damage_weights(run: Path) -> str:
    for c in _checkpoints(run):
        (c / "model.safetensors").write_bytes(b"junk")
    return "checksum mismatch"


def _damage_state(run: Path) -> str:
    for c in _checkpoints(run):  # a state.pt that matches its manifest but is no pickle
        data = b"not a pickle"
        (c / "state.pt").write_bytes(data)
        manifest = json.loads((c / "manifest.json").read_text())
        manifest["files"]["state.pt"] = {"sha256": hashlib.sha256(data).hexdigest(),
                                         "bytes": len(data)}
        (c / "manifest.json").write_text(json.dumps(manifest))
    return "cannot be loaded"


def _damage_manifest(run: Path) -> str:
    for c in _checkpoints(run):
        (c / "manifest.json").write_text('{"files": "x"}')
    return "manifest"


@pytest.mark.parametrize("damage", [_damage_weights, _damage_state, _damage_manifest])
def test_resume_from_damaged_checkpoints(capsys, pretrain_run, text_file, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(pretrain_run, run)
    expected = damage(run)
    assert_bad(capsys, "pretrain", "--data", text_file, "--out", run, "--max_steps", "3",
               *PRETRAIN, "--resume", names=[str(run / "checkpoints"), expected], out=run)


def test_resume_with_another_model_shape(capsys, pretrain_run, text_file, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pretrain_run, run)
    assert_bad(capsys, "pretrain", "--data", text_file, "--out", run, "--max_steps", "3",
               *PRETRAIN, "--n_embd", "32", "--resume",
               names=[str(run / "checkpoints"), "has shape", "the model's is"], out=run)


# -- adapters ------------------------------------------------------------------------------------
def _adapter_copy(adapter: Path, tmp_path: Path) -> Path:
    d = tmp_path / "adapter"
    shutil.copytree(adapter, d)
    return d


@pytest.mark.parametrize("text, expected", [("{", "not valid JSON"),
                                            ("[]", "expected a JSON object"),
                                            ('{"peft_type": "LORA", "r": "four"}', "lora.r")])
def test_lora_merge_damaged_adapter_config(capsys, adapter, tiny_gpt_dir, tmp_path, text,
                                           expected):
    d = _adapter_copy(adapter, tmp_path)
    (d / "adapter_config.json").write_text(text)
    out = tmp_path / "merged"
    assert_bad(capsys, "lora", "merge", "--adapter", d, "--model", tiny_gpt_dir, "--out", out,
               names=[str(d / "adapter_config.json"), expected], out=out)


@pytest.mark.parametrize("command", ["lora", "chat"])
def test_truncated_adapter_weights(capsys, adapter, tiny_gpt_dir, tmp_path, command):
    d = _adapter_copy(adapter, tmp_path)
    weights = d / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    out = tmp_path / "merged"
    argv = (["lora", "merge", "--adapter", d, "--model", tiny_gpt_dir, "--out", out]
            if command == "lora" else ["chat", "--model", tiny_gpt_dir, "--adapter", d])
    assert_bad(capsys, *argv, names=[str(weights), "not a readable safetensors file"], out=out)


def test_adapter_for_a_base_of_another_size(capsys, adapter, tmp_path):
    from lmlab.models.gpt import GPT, GPTConfig

    base = tmp_path / "wider"
    GPT(GPTConfig(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=2)).save_pretrained(
        base, tokenizer=Tokenizer.from_pretrained(adapter))
    out = tmp_path / "merged"
    assert_bad(capsys, "lora", "merge", "--adapter", adapter, "--model", base, "--out", out,
               names=[str(adapter / "adapter_model.safetensors"), "another size"], out=out)


def test_adapter_for_another_family(capsys, adapter, tiny_bert_dir, tmp_path):
    out = tmp_path / "merged"
    assert_bad(capsys, "lora", "merge", "--adapter", adapter, "--model", tiny_bert_dir, "--out",
               out, names=[str(adapter / "adapter_config.json"), "BertModel"], out=out)


def test_evaluate_adapter_whose_base_is_damaged(capsys, adapter, tiny_gpt_dir, sft_files,
                                                tmp_path):
    base, _ = damaged(tiny_gpt_dir, tmp_path, "truncate")
    d = _adapter_copy(adapter, tmp_path)
    config = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**config,
                                                       "base_model_name_or_path": str(base)}))
    assert_bad(capsys, "evaluate", d, "--data", sft_files / "validation.jsonl",
               names=[str(base / "model.safetensors"), "not a readable safetensors file"])


# -- plot, demo ----------------------------------------------------------------------------------
@pytest.mark.parametrize("data", [b"\xff\xfe\x00", b"{not json\n[1]\n"])
def test_plot_unreadable_metrics(capsys, tmp_path, data):
    (tmp_path / "metrics.jsonl").write_bytes(data)
    assert_bad(capsys, "plot", tmp_path, names=[str(tmp_path / "metrics.jsonl"), "JSON object"],
               out=tmp_path)


@pytest.mark.parametrize("steps", ["-1", "0"])
def test_demo_bad_steps_fails_before_any_work(capsys, tmp_path, steps):
    out = tmp_path / "demo"
    assert_bad(capsys, "demo", "--steps", steps, "--out", out, names=["--steps", steps], out=out)
    assert not out.exists()
