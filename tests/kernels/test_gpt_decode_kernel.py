"""The fused GPT decode step (one C call per token) against the module path it replaces."""

from __future__ import annotations

import pytest
import torch

from lmlab import kernels
from lmlab.models.gpt import GPT, GPTConfig
from lmlab.models.layers import packed_inference

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason=f"no CPU kernel here: {kernels.unavailable_reason()}")

CONFIGS = {
    "gpt2-like": dict(n_embd=32, n_head=4, activation="gelu_new"),
    "relu, no biases": dict(n_embd=24, n_head=2, activation="relu", bias=False),
    "exact gelu, odd widths": dict(n_embd=40, n_head=5, n_inner=72, activation="gelu",
                                   tie_word_embeddings=False),
}


def build(**overrides) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, n_positions=48, n_layer=3, **overrides)).eval()
    with torch.no_grad():  # non-zero biases and LayerNorm affines, so every term is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.startswith(("ln", "h.")) and ".ln_" in name:
                p.normal_(0.0, 0.3)
    return model


def count_fused_steps(monkeypatch) -> list:
    calls = []
    real = kernels.GPTDecoder.step
    monkeypatch.setattr(kernels.GPTDecoder, "step",
                        lambda self, *a, **k: calls.append(a[0].shape[0]) or real(self, *a, **k))
    return calls


def decode(model, ids, mask, steps, *, fused):
    """Prefill, then `steps` greedy decode steps; returns each step's logits and the cache."""
    batch, length = ids.shape
    with torch.inference_mode(), (packed_inference(model) if fused else torch.inference_mode()):
        cache = model.new_cache(batch, length + steps)
        logits = model(ids, cache=cache, attention_mask=mask)[:, -1]
        out = []
        for _ in range(steps):
            token = logits.argmax(-1, keepdim=True)
            if mask is not None:
                mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], 1)
            logits = model.decode_step(token, cache, mask)
            out.append(logits)
    return out, cache


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "left-padded"])
@pytest.mark.parametrize("name", CONFIGS)
def test_fused_step_equals_the_module_path(name, padded, monkeypatch):
    model = build(**CONFIGS[name])
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (3, 9))
    mask = None
    if padded:
        mask = torch.ones(3, 9, dtype=torch.long)
        mask[1, :4] = 0
        mask[2, :8] = 0  # one real token
    reference, reference_cache = decode(model, ids, mask, 6, fused=False)
    calls = count_fused_steps(monkeypatch)
    fused, fused_cache = decode(model, ids, mask, 6, fused=True)
    assert calls == [3] * 6
    for step, (got, expected) in enumerate(zip(fused, reference)):
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5, msg=f"step {step}")
    for got, expected in zip(fused_cache.keys + fused_cache.values,
                             reference_cache.keys + reference_cache.values):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert fused_cache.length == reference_cache.length == 15


def test_a_row_decodes_the_same_bits_in_any_batch(monkeypatch):
    """Each output is summed in the same order whatever the batch, so given the same cache a
    row's logits do not depend on the rows beside it (batch invariance, bit for bit)."""
    model = build(**CONFIGS["gpt2-like"])
    calls = count_fused_steps(monkeypatch)
    torch.manual_seed(2)
    ids = torch.randint(0, 97, (4, 6))
    with torch.inference_mode(), packed_inference(model):
        batch_cache = model.new_cache(4, 8)
        model(ids, cache=batch_cache)
        singles = []
        for row in range(4):
            cache = model.new_cache(1, 8)
            for k, v, bk, bv in zip(cache.keys, cache.values, batch_cache.keys, batch_cache.values):
                k.copy_(bk[row:row + 1])
                v.copy_(bv[row:row + 1])
            cache.advance(6)
            singles.append(model.decode_step(ids[row:row + 1, -1:], cache))
        together = model.decode_step(ids[:, -1:], batch_cache)
    assert calls == [1, 1, 1, 1, 4]
    for row in range(4):
        assert torch.equal(together[row], singles[row][0])


def test_hooks_wide_batches_and_training_take_the_module_path(monkeypatch):
    model = build(**CONFIGS["gpt2-like"])
    calls = count_fused_steps(monkeypatch)
    ids = torch.randint(0, 97, (kernels.FUSED_MAX_ROWS + 1, 5))
    decode(model, ids, None, 2, fused=True)  # more rows than the kernel takes
    assert calls == []
    seen = []
    handle = model.h[1].mlp.c_fc.register_forward_hook(lambda *_: seen.append(1))
    decode(model, ids[:2], None, 2, fused=True)
    assert calls == [] and len(seen) == 3  # the prefill and both steps ran the hooked module
    handle.remove()
    model.train()  # dropout modules active: the full forward
    decode(model, ids[:2], None, 2, fused=True)
    assert calls == []
    model.eval()
    decode(model, ids[:2], None, 2, fused=True)
    assert calls == [10, 2, 2]  # a prefill of few enough rows (2 × 5) is fused too
    assert model._decode_plan is None  # the memo lives for one decoding block only


def test_writing_past_the_cache_is_refused():
    model = build(**CONFIGS["gpt2-like"])
    with torch.inference_mode(), packed_inference(model):
        cache = model.new_cache(1, 4)
        model(torch.randint(0, 97, (1, 4)), cache=cache)
        decoder = model._fused_decoder(cache, 1, 1)
        with pytest.raises(ValueError, match="holds 4 positions"):
            decoder.step(torch.zeros(1, 32), cache.keys, cache.values, position=4, mask=None)


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "left-padded"])
def test_a_few_tokens_per_row_on_top_of_the_cache(padded, monkeypatch):
    """Speculative decoding's verification feeds k + 1 tokens per row: causal among themselves,
    each attending to the cache and to the new tokens before it."""
    model = build(**CONFIGS["exact gelu, odd widths"])
    torch.manual_seed(3)
    prompt, more = torch.randint(0, 97, (2, 7)), torch.randint(0, 97, (2, 3))
    mask = torch.ones(2, 10, dtype=torch.long)
    if padded:
        mask[0, :5] = 0
    results = []
    for fused in (False, True):
        with torch.inference_mode(), (packed_inference(model) if fused else torch.inference_mode()):
            cache = model.new_cache(2, 12)
            model(prompt, cache=cache, attention_mask=mask[:, :7])  # 14 rows: the module path
            calls = count_fused_steps(monkeypatch)
            results.append((model(more, cache=cache, attention_mask=mask), cache))
        assert calls == ([6] if fused else [])
    (reference, reference_cache), (got, got_cache) = results
    torch.testing.assert_close(got, reference, atol=2e-5, rtol=1e-5)
    for a, b in zip(got_cache.keys + got_cache.values, reference_cache.keys + reference_cache.values):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert got_cache.length == 10


def test_a_cache_of_another_shape_is_refused():
    """The kernel writes through raw addresses: a mismatched cache must never reach it."""
    model = build(**CONFIGS["gpt2-like"])
    other = GPT(GPTConfig(vocab_size=97, n_positions=48, n_layer=2, n_embd=32, n_head=4))
    with torch.inference_mode(), packed_inference(model):
        cache = model.new_cache(1, 8)
        decoder = model._fused_decoder(cache, 1, 1)
        with pytest.raises(ValueError, match="must hold 3 key and value buffers"):
            decoder.step(torch.zeros(1, 32), other.new_cache(1, 8).keys,
                         other.new_cache(1, 8).values, position=0, mask=None)
        with pytest.raises(ValueError, match="contiguous CPU float32 buffers"):
            decoder.step(torch.zeros(1, 32), [k.double() for k in cache.keys],
                         [v.double() for v in cache.values], position=0, mask=None)
        with pytest.raises(ValueError, match="contiguous CPU float32"):
            decoder.step(torch.zeros(1, 32, dtype=torch.float64), cache.keys, cache.values,
                         position=0, mask=None)
        with pytest.raises(ValueError, match=r"mask must be \(1, 1\)"):
            decoder.step(torch.zeros(1, 32), cache.keys, cache.values, position=0,
                         mask=torch.ones(1, 3))
