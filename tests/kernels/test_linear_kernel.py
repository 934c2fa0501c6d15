"""lmlab's CPU decoding kernel: same products as F.linear, batch-invariant, and a clean fallback."""

from __future__ import annotations

import platform
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

from lmlab import kernels
from lmlab.models.gpt import GPT, GPTConfig
from lmlab.models.layers import packed_inference

BUILDABLE = (sys.platform.startswith("linux") and platform.machine() == "x86_64"
             and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
             and shutil.which("cc") is not None)
needs_kernel = pytest.mark.skipif(not kernels.available(), reason=f"no CPU kernel here: "
                                  f"{kernels.unavailable_reason()}")


@pytest.mark.skipif(not BUILDABLE, reason="not x86-64 Linux with AVX2 and a C compiler")
def test_kernel_builds_where_it_can():
    """Where the kernel can be built it must be: a broken build would silently cost decoding
    speed, not correctness, so no other test would notice."""
    assert kernels.available(), kernels.unavailable_reason()


@needs_kernel
@pytest.mark.parametrize("out_features,in_features", [(1, 1), (7, 13), (33, 40), (96, 64),
                                                      (130, 300), (50, 1000)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_equals_torch_linear(out_features, in_features, with_bias):
    """Odd widths exercise the 32-, 8- and 1-wide tails of the dot product."""
    torch.manual_seed(out_features * 1000 + in_features)
    weight = torch.randn(out_features, in_features)
    bias = torch.randn(out_features) if with_bias else None
    for rows in range(1, kernels.MAX_ROWS + 1):
        x = torch.randn(rows, in_features)
        torch.testing.assert_close(kernels.linear(x, weight, bias), F.linear(x, weight, bias),
                                   atol=1e-5 * in_features ** 0.5, rtol=1e-5)


@needs_kernel
def test_a_row_is_the_same_alone_in_any_batch_and_any_thread_count():
    torch.manual_seed(0)
    weight, bias = torch.randn(257, 200), torch.randn(257)
    batch = torch.randn(kernels.MAX_ROWS, 200)
    together = kernels.linear(batch, weight, bias)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single_thread = kernels.linear(batch, weight, bias)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single_thread, together)
    for row in range(len(batch)):
        assert torch.equal(kernels.linear(batch[row:row + 1], weight, bias)[0], together[row])
        assert torch.equal(kernels.linear(batch[row:row + 3], weight, bias)[0], together[row])


@needs_kernel
def test_non_contiguous_inputs_and_shape_mismatch():
    torch.manual_seed(1)
    weight = torch.randn(40, 24)
    x = torch.randn(24, 3).t()  # (3, 24), not contiguous
    torch.testing.assert_close(kernels.linear(x, weight, None), F.linear(x, weight), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="do not match"):
        kernels.linear(torch.randn(2, 23), weight, None)
    with pytest.raises(ValueError, match="CPU float32"):  # the C code would misread the bytes
        kernels.linear(torch.randn(2, 24, dtype=torch.float64), weight, None)


@needs_kernel
def test_decoding_uses_the_kernel_for_few_rows_only(monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()
    calls = []
    real = kernels.linear
    monkeypatch.setattr(kernels, "linear", lambda x, w, b: calls.append(len(x)) or real(x, w, b))
    ids = torch.randint(0, 50, (2, 12))  # prefill: 24 rows (oneDNN / BLAS), then 2 rows per step
    with torch.no_grad():
        model(ids)
        assert calls == []  # outside decoding: plain F.linear
        with packed_inference(model):
            logits = model(ids[:, :1])
    assert calls == [2] * 9  # 2 layers × 4 products + the head
    with torch.no_grad():
        torch.testing.assert_close(logits, model(ids[:, :1]), atol=1e-5, rtol=1e-5)
    generated = model.generate(ids, max_new_tokens=4, eos_token_id=[])
    # The prefill's 24 rows did not come here, only its head on the last positions (2 rows);
    # the decode steps themselves are one fused call each (test_gpt_decode_kernel.py).
    assert calls[9:] == [2]
    with torch.no_grad():  # greedy under plain F.linear picks the same tokens
        expected = model(generated[:, :-1])[:, ids.shape[1] - 1:].argmax(-1)
    assert torch.equal(generated[:, ids.shape[1]:], expected)


def test_switched_off_or_unbuildable_means_unavailable_with_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("LMLAB_CPU_KERNELS", "0")
    function, reason = kernels._build()
    assert function is None and reason == "LMLAB_CPU_KERNELS=0"
    if not BUILDABLE:
        return
    monkeypatch.delenv("LMLAB_CPU_KERNELS")
    monkeypatch.setenv("LMLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    function, reason = kernels._build()
    assert function is None and "could not build the kernels" in reason
    assert list((tmp_path / "kernels").iterdir()) == []  # no half-written library left behind
    monkeypatch.delenv("CC")
    function, reason = kernels._build()  # a real compiler, a fresh cache folder
    assert function is not None and reason is None
    assert [p.suffix for p in (tmp_path / "kernels").iterdir()] == [".so"]
