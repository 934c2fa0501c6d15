"""Recipes: one module per workflow, each a config class and a run function registered by name.

    registry.py        Recipe, RECIPES, register_recipe, find_recipe, load_recipe_config
    run_steps.py       the steps every run takes: RUN_DIR, train_config.yaml, seed, save, results
    pretraining.py     what the pretraining recipes share (data, horizon, the distributed run)
    causal_lm.py       `causal`: a GPT on next-token prediction (also continued from init_from)
    masked_lm.py       `mlm`, `mlm+nsp`: a BERT encoder on masked LM (+ next sentence)
    span_corruption.py `span`: a T5 encoder–decoder on T5's span corruption
    finetuning.py      what the fine-tuning recipes share (epochs, runs read back, evaluate/predict)
    classification.py  `classification`: a BERT or GPT with a sequence-classification head
    qa.py              `qa`: extractive QA on a BERT encoder
    sft.py             `sft`: instruction / conversation fine-tuning of a causal LM (+ LoRA)
    translation.py     `translation`: a T5 on parallel text, one or several target languages
    reference.py       every recipe's config keys described: --help, docs/config-reference.md

Each recipe module registers itself when imported; the imports below are all that makes them
known. A new workflow (translation, SFT, LoRA, …) is one more module and one more import here.
"""

from lmlab.recipes import causal_lm, classification, masked_lm, qa, sft  # noqa: F401  (register)
from lmlab.recipes import span_corruption  # noqa: F401  (register)
from lmlab.recipes import translation  # noqa: F401  (register)
from lmlab.recipes.registry import (RECIPES, Recipe, find_recipe, load_recipe_config,
                                    recipe_of_run, recipes_for, register_recipe)

__all__ = ["RECIPES", "Recipe", "find_recipe", "load_recipe_config", "recipe_of_run",
           "recipes_for", "register_recipe"]
