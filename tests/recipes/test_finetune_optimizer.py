"""Fine-tuning reaches every optimizer setting of the loop (it used to hard-code AdamW's betas and
had no adam_eps): a one-step tiny fine-tune builds its optimizer with the configured betas,
epsilon, weight decay and speed-layer switch, and its checkpoint's optimizer state holds them."""

from __future__ import annotations

import pytest
import torch

from lmlab.recipes import RECIPES, load_recipe_config
from lmlab.training import loop
from lmlab.training.checkpoint import latest_valid


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_adam_settings_reach_the_optimizer(cpu_kernels, tiny_bert_dir, sentiment_files, tmp_path,
                                           monkeypatch, single_thread):
    built = {}
    real = loop.build_optimizer

    def spy(model, **kwargs):
        built.update(kwargs)
        return real(model, **kwargs)

    monkeypatch.setattr(loop, "build_optimizer", spy)
    recipe = RECIPES["classification"]
    cfg = load_recipe_config(recipe, None, {
        "model": str(tiny_bert_dir), "train": str(sentiment_files / "train.jsonl"),
        "validation": str(sentiment_files / "validation.jsonl"), "text_field": "sentence",
        "max_length": "32", "batch_size": "16", "epochs": "0.05",  # 15 steps per epoch: 1 step
        "adam_eps": "1e-6", "beta1": "0.8", "optim.beta2": "0.95", "weight_decay": "0.03",
        "cpu_kernels": str(cpu_kernels)})
    out = recipe.run(cfg, run_dir=tmp_path, progress=False)
    assert out.train.steps == 1
    assert built["eps"] == 1e-6 and built["betas"] == (0.8, 0.95)
    assert built["weight_decay"] == 0.03 and built["speed_layer"] is cpu_kernels
    state = torch.load(latest_valid(tmp_path).path / "state.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert [g["eps"] for g in groups] == [1e-6, 1e-6]
    assert [tuple(g["betas"]) for g in groups] == [(0.8, 0.95), (0.8, 0.95)]
    assert [g["weight_decay"] for g in groups] == [0.03, 0.0]  # matrices only
    # and the run's saved config says so, in the loop's block
    saved = (tmp_path / "train_config.yaml").read_text()
    assert saved.startswith("recipe: classification\n") and "\noptim:\n" in saved
    assert "  adam_eps: 1.0e-06\n" in saved and "  beta1: 0.8\n" in saved
