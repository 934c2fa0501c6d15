"""lmlab.models.layers.Dropout: nn.Dropout's function with a cheaper CPU mask."""

from __future__ import annotations

import torch

from lmlab.models.layers import Dropout


def test_dropout_zeroes_a_share_p_and_scales_the_rest():
    torch.manual_seed(0)
    layer = Dropout(0.1).train()
    x = torch.rand(200, 1000) + 0.5  # no exact zeros of its own
    y = layer(x)
    dropped = y == 0
    assert abs(float(dropped.float().mean()) - 0.1) < 0.005  # 200,000 draws: σ ≈ 0.0007
    torch.testing.assert_close(y[~dropped], x[~dropped] / 0.9)
    # the gradient flows through the kept elements only, scaled alike
    x.requires_grad_(True)
    torch.manual_seed(1)
    y = layer(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y != 0).float() / 0.9)


def test_dropout_is_the_identity_in_eval_mode_and_at_zero():
    x = torch.randn(4, 8)
    assert Dropout(0.5).eval()(x) is x
    assert Dropout(0.0).train()(x) is x
    torch.manual_seed(0)
    a = Dropout(0.3).train()(x)
    torch.manual_seed(0)
    torch.testing.assert_close(Dropout(0.3).train()(x), a)  # seeded: the same mask
