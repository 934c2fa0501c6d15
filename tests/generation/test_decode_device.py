"""Decoding follows the model's device: prompt ids built on the CPU move to the model (the
README's `torch.tensor(...)` then `model.to("cuda")`), every processor builds its tensors on the
scores' device, a draft model must share the target's device, and sampling's softmax runs in
fp32 for a bf16 model. The meta device stands in for a GPU where a CPU can show it."""

from __future__ import annotations

import logging

import pytest
import torch

from lmlab.generation import generate
from lmlab.generation import protocol
from lmlab.generation.generate import _prepare
from lmlab.generation.processors import LogitBias
from lmlab.models import from_pretrained


def test_cpu_prompt_ids_follow_a_model_on_another_device(tiny_gpt_dir, caplog, monkeypatch):
    monkeypatch.setattr(protocol, "_warned_moves", set())
    model = from_pretrained(tiny_gpt_dir).to("meta")
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    with caplog.at_level(logging.WARNING):
        moved, moved_mask = _prepare(model, ids, mask)
        _prepare(model, ids, mask)
    assert moved.device.type == "meta" and moved_mask.device.type == "meta"
    assert moved.shape == ids.shape
    assert caplog.text.count("moving them to the model's device") == 1  # warned once


def test_ids_on_the_models_device_are_not_copied(tiny):
    model, _ = tiny
    ids = torch.tensor([[5, 6, 7]])
    assert _prepare(model, ids, None)[0] is ids


def test_logit_bias_builds_its_tensor_on_the_scores_device(monkeypatch):
    created = []
    real = torch.tensor

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        created.append(out.device.type)
        return out

    monkeypatch.setattr(torch, "tensor", spy)
    scores = torch.zeros(2, 10, device="meta")
    out = LogitBias({1: 2.0, 3: -1.0})(torch.zeros(2, 1, dtype=torch.long), scores)
    assert out.device.type == "meta"
    assert created and set(created) == {"meta"}  # no CPU tensor written into a GPU buffer


def test_draft_and_target_must_share_a_device(tiny_gpt_dir):
    target = from_pretrained(tiny_gpt_dir)
    draft = from_pretrained(tiny_gpt_dir).to("meta")
    with pytest.raises(ValueError, match="draft model is on meta and the target on cpu"):
        generate(target, torch.tensor([[5, 6]]), draft_model=draft, max_new_tokens=2)


def test_sampling_softmax_is_fp32_for_a_bf16_model(tiny_gpt_dir, monkeypatch):
    model = from_pretrained(tiny_gpt_dir, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype is torch.bfloat16
    seen = []
    real = torch.multinomial

    def spy(probs, *args, **kwargs):
        seen.append(probs.dtype)
        return real(probs, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", spy)
    out = generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=True, seed=1,
                   top_k=20, eos_token_id=[], cpu_kernels=False)
    assert out.shape == (1, 6)
    assert seen and set(seen) == {torch.float32}
