"""lmlab.tasks.losses.summed_cross_entropy against F.cross_entropy(reduction="sum")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmlab.tasks.losses import summed_cross_entropy


@pytest.mark.parametrize("rows,vocab,scale", [(1, 2, 1.0), (37, 65, 0.25), (512, 8192, -3.0)])
def test_value_and_gradient_equal_f_cross_entropy(rows: int, vocab: int, scale: float) -> None:
    g = torch.Generator().manual_seed(rows)
    logits = (torch.randn(rows, vocab, generator=g) * 4).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), generator=g)
    ref_logits = logits.detach().clone().requires_grad_()
    ours = summed_cross_entropy(logits, labels)
    ref = F.cross_entropy(ref_logits, labels, reduction="sum")
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    (ours * scale).backward()
    (ref * scale).backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-7)


def test_gradient_flows_into_the_producer_of_the_logits() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 11)
    x, labels = torch.randn(5, 8), torch.randint(0, 11, (5,))
    summed_cross_entropy(layer(x), labels).backward()
    ours = layer.weight.grad.clone()
    layer.zero_grad()
    F.cross_entropy(layer(x), labels, reduction="sum").backward()
    torch.testing.assert_close(ours, layer.weight.grad)


def test_second_backward_through_the_same_graph_is_refused() -> None:
    # The backward reuses the saved log-probabilities' memory; autograd must catch a rerun.
    logits = torch.randn(3, 7, requires_grad=True)
    loss = summed_cross_entropy(logits, torch.tensor([0, 6, 2]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inference_mode_and_bad_label() -> None:
    logits, labels = torch.randn(4, 5), torch.tensor([1, 2, 3, 4])
    with torch.inference_mode():
        value = summed_cross_entropy(logits, labels)
    torch.testing.assert_close(value, F.cross_entropy(logits, labels, reduction="sum"))
    with pytest.raises(RuntimeError, match="out of bounds"):
        summed_cross_entropy(logits, torch.tensor([0, 1, 2, 5]))
