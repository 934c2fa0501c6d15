"""The C dropout (kernels/dropout.py): dropout's function — kept elements scaled by 1/(1-p), the
rest 0, the gradient through the same mask — with drop rates within binomial noise of p,
masks decided by torch's generator and independent of the thread count, whole and partial
vector tails, and the swap the training loop makes (and undoes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lmlab import kernels
from lmlab.kernels.dropout import NativeDropout, native_dropout
from lmlab.models.layers import Dropout
from lmlab.models.t5 import T5Config, T5ForConditionalGeneration

needs_kernel = pytest.mark.skipif(not kernels.available(), reason=f"no CPU kernel here: "
                                  f"{kernels.unavailable_reason()}")


def masked(x: torch.Tensor, p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NativeDropout(p)(x) under `seed` and the gradient of its sum."""
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    out = NativeDropout(p)(x)
    out.sum().backward()
    return out.detach(), x.grad


@needs_kernel
@pytest.mark.parametrize("n", [1, 7, 8, 9, 16383, 16384, 16385, 40001])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kept_elements_are_scaled_and_the_gradient_has_the_same_mask(n, p):
    x = torch.randn(n) + 5.0  # never 0, so a zero output means dropped
    out, grad = masked(x, p, seed=n)
    kept = out != 0
    assert torch.equal(out[kept], x[kept] * (1.0 / (1.0 - p)))
    assert torch.equal(grad, kept.float() * (1.0 / (1.0 - p)))


@needs_kernel
@pytest.mark.parametrize("p", [0.1, 0.3, 0.9])
def test_drop_rates_are_p_within_binomial_noise(p):
    """Over 2^20 elements, as a whole and in each of 64 slices (a bad hash shows up as a slice
    or a lane off its rate), and uncorrelated between neighbours, rows and calls."""
    n = 2**20
    torch.manual_seed(0)
    first, second = (NativeDropout(p)(torch.ones(n)) == 0 for _ in range(2))
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(first.float().mean() - p) < 5 * sigma
    slices = first.view(64, -1).float().mean(1)
    assert (slices - p).abs().max() < 5 * sigma * 8  # 8 = sqrt(64): one slice's sigma
    lanes = first.view(-1, 8).float().mean(0)  # each of the 8 vector lanes
    assert (lanes - p).abs().max() < 5 * sigma * 8**0.5
    for a, b in [(first[:-1], first[1:]), (first[:-1024], first[1024:]), (first, second)]:
        correlation = torch.corrcoef(torch.stack([a.float(), b.float()]))[0, 1]
        assert abs(correlation) < 0.01


@needs_kernel
def test_masks_follow_torch_seed_not_threads_or_length():
    x = torch.randn(50_000) + 5.0
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = masked(x, 0.2, seed=7)
    finally:
        torch.set_num_threads(threads)
    again, _ = masked(x, 0.2, seed=7)
    other, _ = masked(x, 0.2, seed=8)
    shorter, _ = masked(x[:1000], 0.2, seed=7)  # a counter-based mask: element i's own bits
    assert torch.equal(one, again)
    assert not torch.equal(one, other)
    assert torch.equal(shorter, one[:1000])
    # Each call draws one number from torch's generator: the next call's mask differs.
    torch.manual_seed(7)
    layer = NativeDropout(0.2)
    assert not torch.equal(layer(x) == 0, layer(x) == 0)


def test_where_it_does_not_apply_it_is_torch_dropout(monkeypatch):
    """Evaluation mode, p = 0, another dtype, or the speed layer switched off: Dropout's own
    forward (the same numbers under the same seed)."""
    x = torch.randn(4, 100)
    layer, reference = NativeDropout(0.5), Dropout(0.5)
    assert torch.equal(layer.eval()(x), x)
    assert torch.equal(NativeDropout(0.0)(x), x)
    for value, switch in [(x.double(), "1"), (x, "0")]:
        monkeypatch.setenv("LMLAB_CPU_KERNELS", switch)
        torch.manual_seed(1)
        ours = layer.train()(value)
        torch.manual_seed(1)
        assert torch.equal(ours, reference.train()(value))


def tiny_t5(dropout: float) -> T5ForConditionalGeneration:
    return T5ForConditionalGeneration(T5Config(
        vocab_size=50, d_model=16, d_kv=4, num_heads=4, d_ff=32, num_layers=2,
        dropout_rate=dropout, n_positions=32))


@needs_kernel
def test_the_swap_covers_t5_dropout_and_is_undone():
    model = tiny_t5(0.1)
    model.extra = nn.Dropout(0.1)  # torch's own class is left alone
    before = [type(m) for m in model.modules()]
    with native_dropout(model) as swapped:
        assert swapped == sum(t is Dropout for t in before) > 0
        assert not any(type(m) is Dropout for m in model.modules())
        assert type(model.extra) is nn.Dropout
        model.train()
        source, target = torch.randint(2, 50, (3, 7)), torch.randint(2, 50, (3, 5))
        model(target, encoder_hidden=model.encode(source)).sum().backward()
        model.eval()  # the mode set inside the block is the model's after it
    assert [type(m) for m in model.modules()] == before
    assert not any(m.training for m in model.modules())
    with native_dropout(model, enabled=False) as swapped:
        assert swapped == 0
    with native_dropout(tiny_t5(0.0)) as swapped:
        assert swapped == 0  # p = 0: nothing to draw
