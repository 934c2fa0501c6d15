"""Prepacked oneDNN weights: used only inside decoding, only for repeated wide products, never
stale, never in the state dict."""

from __future__ import annotations

import pytest
import torch

from lmlab.models.gpt import GPT, GPTConfig
from lmlab.models.layers import ONEDNN, Linear, packed_inference


def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN linear")
def test_packed_logits_equal_plain_ones_and_nothing_is_left_behind():
    model = tiny()
    ids = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        plain = model(ids)
        with packed_inference(model):
            once = model(ids)  # 21 rows: wider than the kernel's, but a one-off (a prefill)
            assert all(m._packed is None for m in model.modules() if isinstance(m, Linear))
            packed = model(ids)  # the second wide call packs
            assert all(m._packed is not None for m in model.modules() if isinstance(m, Linear))
    torch.testing.assert_close(once, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=0)
    assert all(m._packed is None for m in model.modules() if isinstance(m, Linear))
    assert set(model.state_dict()) == set(tiny().state_dict())


def test_weights_changed_between_calls_are_used():
    """The reason packing lives only inside a call: optimizers update weights in place, and the
    fused AdamW kernel does not bump the version counter a cache could key on."""
    model = tiny()
    ids = torch.randint(0, 50, (2, 5))
    before = model.generate(ids, max_new_tokens=6, eos_token_id=[])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0, fused=True)
    model(ids).sum().backward()
    optimizer.step()
    after = model.generate(ids, max_new_tokens=6, eos_token_id=[])
    with torch.no_grad():
        expected = model(after[:, :-1])[:, ids.shape[1] - 1:].argmax(-1)
    assert torch.equal(after[:, ids.shape[1]:], expected)  # greedy under the *new* weights
    assert not torch.equal(before, after)


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN linear")
def test_nested_blocks_pack_once_and_unpack_at_the_outermost():
    model = tiny()
    ids = torch.randint(0, 50, (3, 7))
    with torch.no_grad(), packed_inference(model):
        model(ids)
        model(ids)
        first = model.lm_head._packed
        assert first is not None
        with packed_inference(model):
            model(ids)
            assert model.lm_head._packed is first
        assert model.lm_head._packed is first
    assert model.lm_head._packed is None and model.lm_head._wide_calls == 0
