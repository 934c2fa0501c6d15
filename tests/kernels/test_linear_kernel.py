"""The decoding kernels' blocked product: the same products as F.linear for 1 to 70 rows,
batch-invariant bit for bit, on every instruction set the CPU has; and a clean fallback."""

from __future__ import annotations

import platform
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

from lmlab import kernels
from lmlab.kernels import build

BUILDABLE = (sys.platform.startswith("linux") and platform.machine() == "x86_64"
             and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
             and shutil.which("cc") is not None)
SWITCHED_OFF = build.switched_off()  # LMLAB_CPU_KERNELS=0: the suite runs the torch paths
needs_kernel = pytest.mark.skipif(not kernels.available(), reason=f"no CPU kernel here: "
                                  f"{kernels.unavailable_reason()}")


@pytest.mark.skipif(not BUILDABLE or SWITCHED_OFF,
                    reason="not x86-64 Linux with AVX2 and a C compiler, or LMLAB_CPU_KERNELS=0")
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
    for rows in (*range(1, 10), 16, 31, 64, 70):
        x = torch.randn(rows, in_features)
        torch.testing.assert_close(kernels.linear(x, weight, bias), F.linear(x, weight, bias),
                                   atol=1e-5 * in_features ** 0.5, rtol=1e-5)


@needs_kernel
def test_a_row_is_the_same_alone_in_any_batch_and_any_thread_count():
    torch.manual_seed(0)
    weight, bias = torch.randn(257, 200), torch.randn(257)
    batch = torch.randn(70, 200)  # more rows than any tile, an odd number of them
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
def test_every_instruction_set_the_cpu_has_computes_the_same_products():
    """The library is built per instruction set and picked at load time; each build must be
    right on its own (the CPU of CI may be either kind)."""
    torch.manual_seed(3)
    weight, bias, x = torch.randn(67, 150), torch.randn(67), torch.randn(9, 150)
    isas = ["avx2"] + (["avx512"] if build.cpu_isa() == "avx512" else [])
    for isa in isas:
        functions, reason = build._build(isa)
        assert functions is not None, reason
        y = torch.empty(9, 67)
        functions["linear"](x.data_ptr(), 9, 150, weight.data_ptr(), 67, bias.data_ptr(),
                            y.data_ptr(), torch.get_num_threads())
        torch.testing.assert_close(y, torch.nn.functional.linear(x, weight, bias),
                                   atol=1e-4, rtol=1e-5, msg=isa)


def test_switched_off_or_unbuildable_means_unavailable_with_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("LMLAB_CPU_KERNELS", "0")
    assert not kernels.available() and kernels.unavailable_reason() == "LMLAB_CPU_KERNELS=0"
    if not BUILDABLE:
        return
    monkeypatch.delenv("LMLAB_CPU_KERNELS")
    monkeypatch.setenv("LMLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    function, reason = build._build("avx2")
    assert function is None and "could not build the kernels" in reason
    assert list((tmp_path / "kernels").iterdir()) == []  # no half-written library left behind
    monkeypatch.delenv("CC")
    function, reason = build._build("avx2")  # a real compiler, a fresh cache folder
    assert function is not None and reason is None
    assert [p.name.split("-")[1] for p in (tmp_path / "kernels").iterdir()] == ["avx2"]
    assert [p.suffix for p in (tmp_path / "kernels").iterdir()] == [".so"]
