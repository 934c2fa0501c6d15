"""The recipe registry: every recipe has a config that loads with defaults and nests the loop's
settings, names are unique, the command line offers exactly the registered recipes, every
shipped YAML loads into its recipe's config, and a run's saved config names its recipe."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lmlab.cli import build_parser
from lmlab.config import from_dict, key_paths, read_yaml
from lmlab.errors import ConfigError
from lmlab.recipes import RECIPES, find_recipe, load_recipe_config, recipes_for, register_recipe
from lmlab.recipes.pretraining import pretrain_recipe
from lmlab.recipes.run_steps import config_text
from lmlab.training.loop import OptimConfig

ROOT = Path(__file__).resolve().parents[2]
YAMLS = sorted((ROOT / "configs").rglob("*.yaml"))
OPTIM_KEYS = [f.name for f in dataclasses.fields(OptimConfig)]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_config_loads_with_defaults_and_nests_the_loop_settings(name):
    recipe = RECIPES[name]
    assert recipe.name == name and recipe.command in ("pretrain", "finetune")
    cfg = from_dict(recipe.config, {})
    assert isinstance(cfg.optim, OptimConfig)
    paths = key_paths(recipe.config)  # raises if a name appears twice in the nesting
    assert all(paths[key] == ("optim", key) for key in OPTIM_KEYS)  # every loop setting, flat
    assert (recipe.evaluate is not None) == (recipe.command == "finetune")
    assert recipe.models or recipe.command == "pretrain"


def test_pretraining_recipes_are_named_by_their_objective():
    for name, recipe in recipes_for("pretrain").items():
        assert from_dict(recipe.config, {}).objective == name


def test_names_are_unique():
    recipe = RECIPES["qa"]
    with pytest.raises(ValueError, match="'qa' is already registered"):
        register_recipe(dataclasses.replace(recipe, help="another"))
    assert RECIPES["qa"] is recipe


def _choices(parser, command: str, dest: str) -> set[str]:
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    (action,) = [a for a in sub.choices[command]._actions if a.dest == dest]
    return set(action.choices)


def test_the_command_line_offers_exactly_the_registered_recipes():
    parser = build_parser()
    assert _choices(parser, "finetune", "task") == set(recipes_for("finetune"))
    assert _choices(parser, "pretrain", "objective") == set(recipes_for("pretrain"))
    assert set(recipes_for("finetune")) | set(recipes_for("pretrain")) == set(RECIPES)


def test_an_unknown_recipe_lists_the_choices():
    with pytest.raises(ConfigError, match="finetune has no recipe 'ner'; expected one of "
                                          "classification, qa"):
        find_recipe("ner", command="finetune")
    with pytest.raises(ConfigError, match="--objective: pretrain has no recipe 'electra'"):
        pretrain_recipe(None, {"objective": "electra"})


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_yaml_loads_into_its_recipes_config(path):
    command = path.parent.name  # configs/pretrain/…, configs/finetune/…
    if command == "pretrain":  # the objective names the recipe (causal when it names none)
        recipe, cfg = pretrain_recipe(path)
        assert recipe.name == read_yaml(path).get("objective", "causal")
    else:  # fine-tuning configs name their recipe
        recipe = find_recipe(read_yaml(path)["recipe"], command=command)
        cfg = load_recipe_config(recipe, path)
    assert type(cfg) is recipe.config


def test_a_config_of_another_recipe_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="squad.yaml: a config of recipe 'qa'; this command "
                                          "runs 'classification'"):
        load_recipe_config(RECIPES["classification"], ROOT / "configs/finetune/squad.yaml")


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_resolved_config_reloads(name, tmp_path):
    """What a run prints and saves as train_config.yaml loads back into the same config."""
    recipe = RECIPES[name]
    cfg = load_recipe_config(recipe, None, {"lr": "3e-4", "seed": "7", "adam_eps": "1e-6"})
    saved = tmp_path / "train_config.yaml"
    saved.write_text(config_text(name, cfg))
    assert read_yaml(saved)["recipe"] == name
    assert load_recipe_config(recipe, saved) == cfg
