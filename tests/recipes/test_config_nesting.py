"""Each recipe's config nests the loop's settings (`optim`): flat and dotted keys reach them from
YAML and the command line, the recipe's own defaults stay where nothing is given, a renamed key
names its replacement, a key of another recipe says so, and every setting reaches the loop."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from lmlab import kernels
from lmlab.cli import main
from lmlab.config import from_dict, parse_overrides
from lmlab.data.dataset import TokenDataset
from lmlab.data.prepare import prepare_dataset
from lmlab.errors import ConfigError
from lmlab.recipes import RECIPES, load_recipe_config
from lmlab.recipes.causal_lm import CausalLMConfig, build_model, build_task
from lmlab.recipes.pretraining import pretrain_recipe
from lmlab.tokenizer import Tokenizer
from lmlab.training.loop import LoopConfig, OptimConfig


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("spelling", ["flat", "dotted"])
def test_every_loop_setting_reaches_every_recipe(name, spelling):
    recipe = RECIPES[name]
    changed = {"lr": "0.0123", "min_lr": "0.001", "beta1": "0.8", "beta2": "0.95",
               "adam_eps": "1e-7", "cpu_kernels": "false", "keep_last": "4", "patience": "0",
               "grad_accum": "3", "tensorboard": "true", "max_bad_steps": "5", "seed": "11",
               "compile": "true", "precision": "fp32", "lr_schedule": "constant"}
    keys = {(k if spelling == "flat" else f"optim.{k}"): v for k, v in changed.items()}
    cfg = load_recipe_config(recipe, None, parse_overrides(
        [token for k, v in keys.items() for token in (f"--{k}", v)]))
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.beta1, cfg.optim.beta2) == \
        (0.0123, 0.001, 0.8, 0.95)
    assert (cfg.optim.adam_eps, cfg.optim.cpu_kernels, cfg.optim.keep_last) == (1e-7, False, 4)
    assert (cfg.optim.grad_accum, cfg.optim.tensorboard, cfg.optim.max_bad_steps) == (3, True, 5)
    assert (cfg.optim.seed, cfg.optim.compile, cfg.optim.precision) == (11, True, "fp32")
    assert cfg.optim.lr_schedule == "constant"
    loop = (cfg.loop_config(progress=False) if recipe.command == "pretrain"
            else cfg.loop_config(10, progress=False))
    assert isinstance(loop, LoopConfig) and loop.optim is cfg.optim  # nothing copied by hand


def test_yaml_flat_dotted_and_nested_keys(tmp_path):
    recipe = RECIPES["classification"]
    for text in ("lr: 2.0e-3\nbeta2: 0.98\n", "optim.lr: 2.0e-3\noptim.beta2: 0.98\n",
                 "optim:\n  lr: 2.0e-3\n  beta2: 0.98\n"):
        path = tmp_path / "c.yaml"
        path.write_text("text_field: sentence\n" + text)
        cfg = load_recipe_config(recipe, path, {"adam_eps": "1e-6"})
        assert (cfg.text_field, cfg.optim.lr, cfg.optim.beta2, cfg.optim.adam_eps) == \
            ("sentence", 2e-3, 0.98, 1e-6)
        # untouched settings keep fine-tuning's defaults, not the loop's or pretraining's
        assert (cfg.optim.lr_schedule, cfg.optim.weight_decay, cfg.optim.restore_best) == \
            ("linear", 0.01, True)
        assert (cfg.optim.metric, cfg.optim.keep_last, cfg.optim.seed) == ("val_accuracy", 1, 42)


def test_each_recipe_keeps_its_own_defaults():
    causal, mlm, clf, qa = (from_dict(RECIPES[n].config, {})
                            for n in ("causal", "mlm+nsp", "classification", "qa"))
    assert (causal.optim.lr, causal.optim.beta2, causal.optim.batch_size) == (1e-3, 0.99, 12)
    assert (causal.tokenizer, mlm.tokenizer) == ("bpe", "wordpiece")
    assert (clf.optim.lr, clf.optim.beta2, clf.optim.adam_eps) == (5e-5, 0.999, 1e-8)
    assert (clf.optim.metric, qa.optim.metric, qa.max_length) == ("val_accuracy", "val_f1", 384)
    assert dataclasses.asdict(OptimConfig()) != dataclasses.asdict(clf.optim)


def test_a_renamed_key_names_its_replacement(capsys, tmp_path):
    with pytest.raises(ConfigError) as info:
        pretrain_recipe(None, {"early_stopping_patience": "2"})
    assert str(info.value) == ("--early_stopping_patience: 'early_stopping_patience' was renamed "
                               "to 'patience'; write patience instead")
    path = tmp_path / "old.yaml"
    path.write_text("early_stopping_min_delta: 0.1\n")
    capsys.readouterr()
    assert main(["pretrain", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == (f"lmlab pretrain: error: {path}: 'early_stopping_min_delta'"
                                       " was renamed to 'min_delta'; write min_delta instead\n")
    assert not (tmp_path / "run").exists()


def test_a_key_of_another_recipe_says_whose_it_is():
    with pytest.raises(ConfigError, match="--whole_word_mask: 'whole_word_mask' is a setting of "
                                          "mlm and mlm\\+nsp, not of causal"):
        pretrain_recipe(None, {"whole_word_mask": "true"})
    with pytest.raises(ConfigError, match="--stride: 'stride' is a setting of qa, not of "
                                          "classification"):
        load_recipe_config(RECIPES["classification"], None, {"stride": "8"})


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_the_causal_recipe_gives_its_task_the_c_training_step(cpu_kernels, tmp_path):
    text = "the quick brown fox jumps over the lazy dog\n" * 40
    (tmp_path / "a.txt").write_text(text)
    prepare_dataset([tmp_path / "a.txt"], tokenizer=Tokenizer.char_level(text),
                    out_dir=tmp_path / "ds")
    cfg = from_dict(CausalLMConfig, {"data": str(tmp_path / "ds"), "n_layer": 1, "n_head": 2,
                                     "n_embd": 16, "block_size": 8, "cpu_kernels": cpu_kernels})
    dataset = TokenDataset.open(tmp_path / "ds")
    model = build_model(cfg, Tokenizer.from_pretrained(tmp_path / "ds"))
    task = build_task(cfg, dataset, model, device=torch.device("cpu"), rank=0, world_size=1)
    expected = kernels.training_loss_adapter(model) if cpu_kernels else None
    assert (task.fast_loss is None) == (expected is None)
    if task.fast_loss is not None:
        assert task.fast_loss.model is model
    assert np.array_equal(task.train_tokens, dataset.split("train"))
