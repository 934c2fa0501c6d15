"""The recipe registry: one `Recipe` per workflow, each registered by its own module.

A recipe is named (`causal`, `mlm+nsp`, `qa`, …), belongs to a command (`lmlab pretrain`
picks one by its `objective`, `lmlab finetune` by its positional task), and brings its config
class and its run function; a fine-tuning recipe also brings how to evaluate and predict with a
run it saved. Adding a workflow adds a module that calls `register_recipe` — nothing here, and
no branch anywhere, names it.

A run records its recipe as the `recipe:` key of RUN_DIR/train_config.yaml; runs saved before
that key existed are matched by the model class their config.json names (`models`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.config import key_paths, load_config, read_yaml
from lmlab.errors import CheckpointError, ConfigError
from lmlab.models.hf import RECORDS, read_config


@dataclass(frozen=True)
class Recipe:
    name: str  # what the command line calls it: `--objective mlm+nsp`, `finetune qa`
    command: str  # the subcommand that runs it: "pretrain" or "finetune"
    config: type  # its config dataclass; nests the loop's settings as `optim`
    run: Callable[..., Any]  # run(cfg, *, run_dir, resume=False, progress=True) -> result
    help: str  # one line, for --help
    # The model classes its runs save: how a run without a `recipe:` key is recognised.
    models: tuple[type, ...] = ()
    # Fine-tuned runs only: evaluate(run, data) -> metrics; predict(run, data, out) -> path,
    # where `run` is a lmlab.recipes.finetuning.FinetunedRun.
    evaluate: Callable[..., dict[str, float]] | None = None
    predict: Callable[..., Path] | None = None
    # show_examples(cfg, n) -> text: the first n training examples as the loss sees them
    # (`lmlab finetune TASK --show-masks N`), for recipes whose inputs are worth a look.
    show_examples: Callable[..., str] | None = None


# name → recipe; filled by register_recipe, one call per recipe, in the recipe's own module.
RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    if recipe.name in RECIPES:
        raise ValueError(f"recipe {recipe.name!r} is already registered")
    if (recipe.evaluate is None) != (recipe.predict is None):
        raise ValueError(f"recipe {recipe.name!r}: evaluate and predict come together")
    key_paths(recipe.config)  # a name used twice in its nesting is a bug: fail at import
    RECIPES[recipe.name] = recipe
    return recipe


def recipes_for(command: str) -> dict[str, Recipe]:
    """The recipes of one command, by name."""
    return {name: r for name, r in RECIPES.items() if r.command == command}


def find_recipe(name: str, *, command: str, where: str = "recipe") -> Recipe:
    choices = recipes_for(command)
    if name not in choices:
        raise ConfigError(f"{where}: {command} has no recipe {name!r}; expected one of "
                          f"{', '.join(sorted(choices))}")
    return choices[name]


def load_recipe_config(recipe: Recipe, path: str | Path | None,
                       overrides: dict[str, Any] | None = None) -> Any:
    """The recipe's config from a YAML file (optional) and overrides. A file may carry a
    `recipe:` key (a run's saved train_config.yaml does): it must name this recipe. A key of
    another recipe of the same command is named as such, not just as unknown."""
    overrides = dict(overrides or {})
    if path is not None:
        values = read_yaml(path)
        named = values.get("recipe", recipe.name)
        if named != recipe.name:
            raise ConfigError(f"{path}: a config of recipe {named!r}; this command runs "
                              f"{recipe.name!r}")
        _check_recipe_keys(recipe, values, str(path))
    _check_recipe_keys(recipe, overrides, None)
    return load_config(recipe.config, path, overrides, skip=("recipe",))


def _check_recipe_keys(recipe: Recipe, values: dict[str, Any], where: str | None) -> None:
    known = key_paths(recipe.config)
    for key in values:
        if key in known or key == "recipe" or key.split(".")[-1] in known:
            continue
        others = sorted(r.name for r in recipes_for(recipe.command).values()
                        if key in key_paths(r.config))
        if others:
            raise ConfigError(f"{where or '--' + key}: '{key}' is a setting of "
                              f"{' and '.join(others)}, not of {recipe.name}")


def recipe_of_run(run_dir: Path) -> Recipe:
    """The recipe that trained RUN_DIR: its train_config.yaml's `recipe:` key, or for a run
    saved before that key existed, the recipe whose models include the class config.json
    names (looked up in the model registry)."""
    saved = run_dir / "train_config.yaml"
    name = read_yaml(saved).get("recipe") if saved.is_file() else None
    if name is not None:
        if name not in RECIPES:
            raise CheckpointError(f"{saved}: recipe {name!r} is not one this lmlab knows "
                                  f"({', '.join(sorted(RECIPES))})")
        return RECIPES[name]
    hf = read_config(run_dir)
    where = str(run_dir / "config.json")
    record = RECORDS.get(hf.get("model_type"))
    cls = record.model_class(hf, where) if record is not None else None
    found = [r for r in RECIPES.values() if cls is not None and cls in r.models]
    if not found:
        architecture = (hf.get("architectures") or [hf.get("model_type")])[0]
        fine_tuned = sorted(r.name for r in RECIPES.values() if r.evaluate is not None)
        raise CheckpointError(f"{where}: architecture {architecture!r} is not a fine-tuned model "
                              f"of a recipe ({', '.join(fine_tuned)})")
    return found[0]
