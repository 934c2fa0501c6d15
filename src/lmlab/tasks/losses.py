"""Cross-entropy over a large vocabulary, with a cheaper backward than F.cross_entropy's.

Language-model losses are taken over (tokens × vocabulary) logits — 2048 × 8192 floats (64 MiB)
for one batch of the 6×384 GPT — so every full pass over them costs milliseconds. PyTorch's
`F.cross_entropy` backward fills a zero tensor of that size, scatters −1 into it and runs
log-softmax's backward (two reads, one write); here the gradient, softmax − one-hot, is made in
place from the saved log-probabilities: exp, subtract 1 at the targets, scale. Measured on the
6×384 training step (2 CPU threads): ~75 ms of a ~1.7 s step, ~4% (BENCHMARKS.md).
"""

from __future__ import annotations

import torch


class _SummedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits, dim=-1)
        ctx.save_for_backward(log_probs, labels)
        return -log_probs.gather(-1, labels[:, None]).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        log_probs, labels = ctx.saved_tensors
        # The log-probabilities are not needed again, so their memory becomes the gradient. A
        # second backward through the same graph (retain_graph) then fails on autograd's version
        # check instead of reading overwritten values.
        grad_logits = log_probs.exp_()
        rows = torch.arange(len(labels), device=labels.device)
        grad_logits[rows, labels] -= 1.0
        return grad_logits.mul_(grad), None


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over rows of −log softmax(logits)[label]: `F.cross_entropy(logits, labels,
    reduction="sum")` for (N, V) float logits and (N,) labels in [0, V) (no ignore index: select
    the rows that count before calling; a label out of range fails in `gather`)."""
    return _SummedCrossEntropy.apply(logits, labels)
