"""The fused GPT decode step (one C call per forward pass) against the module path it replaces,
through the adapter the decoding engine applies (kernels.FusedGPTDecoding)."""

from __future__ import annotations

import pytest
import torch

import lmlab
from lmlab import kernels
from lmlab.models.gpt import GPT, GPTConfig

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


def forward(model, adapter, ids, cache, mask=None):
    """A cached forward pass, through the adapter when one is given (it must take the call)."""
    if adapter is None:
        return model(ids, cache=cache, attention_mask=mask)
    logits = adapter.forward(ids, cache=cache, attention_mask=mask)
    assert logits is not None
    return logits


def decode(model, ids, mask, steps, *, fused):
    """Prefill on the module path, then `steps` greedy one-token steps; each step's logits and
    the cache."""
    adapter = kernels.FusedGPTDecoding.for_model(model) if fused else None
    with torch.inference_mode():
        cache = model.new_cache(len(ids), ids.shape[1] + steps)
        logits = model(ids, cache=cache, attention_mask=mask)[:, -1]
        out = []
        for _ in range(steps):
            token = logits.argmax(-1, keepdim=True)
            logits = forward(model, adapter, token, cache)[:, -1]
            out.append(logits)
    return out, cache


def assert_caches_close(a, b, width):
    for x, y in zip(a.keys + a.values, b.keys + b.values):
        torch.testing.assert_close(x[:, :, :width], y[:, :, :width], atol=1e-5, rtol=1e-5)


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
    assert fused_cache.lengths == reference_cache.lengths == [15] * 3
    assert torch.equal(fused_cache.next_positions, reference_cache.next_positions)
    assert_caches_close(fused_cache, reference_cache, 15)


@pytest.mark.parametrize("tokens", [1, 3])
def test_rows_of_different_lengths_and_padding_equal_the_module_path(tokens):
    """Each row continues its own cache row at its own slot (a server's rows joined at
    different times; speculative rows that kept different numbers of drafts), some with
    padding, with one or several new tokens each."""
    model = build(**CONFIGS["exact gelu, odd widths"])
    torch.manual_seed(4)
    ids = torch.randint(0, 97, (4, 12))
    results = []
    for fused in (False, True):
        adapter = kernels.FusedGPTDecoding.for_model(model) if fused else None
        with torch.inference_mode():
            cache = model.new_cache(4, 20)
            for row, (n, pads) in enumerate([(5, 0), (2, 0), (9, 3), (1, 0)]):
                mask = torch.ones(1, n, dtype=torch.long)
                mask[0, :pads] = 0
                model(ids[row:row + 1, :n], cache=cache.rows(row, row + 1), attention_mask=mask)
            new_mask = torch.ones(4, tokens, dtype=torch.long)
            new_mask[3, -1] = 0  # a drafted token past a row's budget goes in as padding
            logits = forward(model, adapter, ids[:, -tokens:], cache, new_mask)
            results.append((logits, cache))
    (reference, reference_cache), (got, got_cache) = results
    real = torch.ones(4, tokens, dtype=torch.bool)
    real[3, -1] = False
    torch.testing.assert_close(got[real], reference[real], atol=2e-5, rtol=1e-5)
    assert got_cache.lengths == reference_cache.lengths == [n + tokens for n in (5, 2, 9, 1)]
    assert torch.equal(got_cache.next_positions, reference_cache.next_positions)
    assert_caches_close(got_cache, reference_cache, 9 + tokens)


def test_a_row_decodes_the_same_bits_in_any_batch(monkeypatch):
    """Each output is summed in the same order whatever the batch, so given the same cache a
    row's logits do not depend on the rows beside it (batch invariance, bit for bit) — up to
    the 64 rows of a server's batch, and whichever cache row holds it."""
    model = build(**CONFIGS["gpt2-like"])
    adapter = kernels.FusedGPTDecoding.for_model(model)
    calls = count_fused_steps(monkeypatch)
    torch.manual_seed(2)
    rows = 64
    ids = torch.randint(0, 97, (rows, 6))
    with torch.inference_mode():
        cache = model.new_cache(rows + 1, 8)  # one spare row
        model(ids, cache=cache.rows(0, rows))
        batch, spare = cache.rows(0, rows), cache.rows(rows, rows + 1)
        singles = []
        for row in (0, 17, 63):
            cache.copy_rows([row], [rows])  # the same cache row, elsewhere, alone
            singles.append(adapter.forward(ids[row:row + 1, -1:], cache=spare))
            spare.truncate([6])
        together = adapter.forward(ids[:, -1:], cache=batch)
    assert calls == [1, 1, 1, rows]
    for single, row in zip(singles, (0, 17, 63)):
        assert torch.equal(together[row], single[0])


def test_the_adapter_applies_only_where_the_rule_holds(monkeypatch):
    model = build(**CONFIGS["gpt2-like"])
    adapter = kernels.FusedGPTDecoding.for_model(model)
    calls = count_fused_steps(monkeypatch)
    ids = torch.randint(0, 97, (4, 5))
    with torch.inference_mode():
        too_many = model.new_cache(kernels.FusedGPTDecoding.MAX_ROWS + 1, 4)
        assert adapter.forward(torch.zeros(len(too_many.lengths), 1, dtype=torch.long),
                               cache=too_many) is None
        long_prompt = ids.new_zeros(1, kernels.FusedGPTDecoding.MAX_TOKENS_PER_ROW + 1)
        assert adapter.forward(long_prompt, cache=model.new_cache(1, 20)) is None
    with torch.no_grad(), torch.enable_grad():
        assert adapter.forward(ids[:, :1], cache=model.new_cache(4, 4)) is None  # autograd
    assert calls == []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert adapter.forward(ids[:, :1], cache=model.new_cache(4, 4)) is None
    dropout = build(**CONFIGS["gpt2-like"], resid_dropout=0.1).train()
    with torch.inference_mode():
        assert kernels.FusedGPTDecoding.for_model(dropout).forward(
            ids[:, :1], cache=dropout.new_cache(4, 4)) is None  # dropout active
    handle = model.h[1].mlp.c_fc.register_forward_hook(lambda *_: None)
    assert kernels.FusedGPTDecoding.for_model(model) is None  # a hook: the module path
    handle.remove()
    monkeypatch.setenv("LMLAB_CPU_KERNELS", "0")
    assert kernels.decoding_adapter(model) is None  # switched off
    monkeypatch.delenv("LMLAB_CPU_KERNELS")
    assert kernels.decoding_adapter(model) is not None
    assert kernels.decoding_adapter(model.double()) is None  # not fp32


def test_generate_prefills_on_the_module_path_and_fuses_each_decode_step(monkeypatch):
    model = build(**CONFIGS["gpt2-like"])
    calls = count_fused_steps(monkeypatch)
    ids = torch.randint(0, 97, (2, 20))  # a 40-token prefill: more than 16 tokens per row
    fused = lmlab.generate(model, ids, max_new_tokens=5, eos_token_id=[])
    assert calls == [2] * 4  # the prefill gave the first token; four one-token steps
    calls.clear()
    plain = lmlab.generate(model, ids, max_new_tokens=5, eos_token_id=[], cpu_kernels=False)
    assert calls == [] and torch.equal(fused, plain)


def test_writing_past_the_cache_is_refused():
    model = build(**CONFIGS["gpt2-like"])
    adapter = kernels.FusedGPTDecoding.for_model(model)
    with torch.inference_mode():
        cache = model.new_cache(1, 4)
        model(torch.randint(0, 97, (1, 4)), cache=cache)
        with pytest.raises(ValueError, match="holds 4 positions"):
            adapter.forward(torch.zeros(1, 1, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="holds 4 positions"):
            adapter.decoder.step(torch.zeros(1, 32), cache.keys, cache.values, starts=[4])


def test_a_cache_of_another_shape_is_refused():
    """The kernel writes through raw addresses: a mismatched cache must never reach it."""
    model = build(**CONFIGS["gpt2-like"])
    decoder = kernels.FusedGPTDecoding.for_model(model).decoder
    other = GPT(GPTConfig(vocab_size=97, n_positions=48, n_layer=2, n_embd=32, n_head=4))
    cache = model.new_cache(1, 8)
    with torch.inference_mode():
        with pytest.raises(ValueError, match="must hold 3 key and value buffers"):
            decoder.step(torch.zeros(1, 32), other.new_cache(1, 8).keys,
                         other.new_cache(1, 8).values, starts=[0])
        with pytest.raises(ValueError, match="contiguous CPU float32 buffers"):
            decoder.step(torch.zeros(1, 32), [k.double() for k in cache.keys],
                         [v.double() for v in cache.values], starts=[0])
        with pytest.raises(ValueError, match="contiguous CPU float32"):
            decoder.step(torch.zeros(1, 32, dtype=torch.float64), cache.keys, cache.values,
                         starts=[0])
        with pytest.raises(ValueError, match=r"valid must be \(1, 8\)"):
            decoder.step(torch.zeros(1, 32), cache.keys, cache.values, starts=[0],
                         valid=torch.ones(1, 3))
