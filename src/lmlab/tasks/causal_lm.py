"""Causal language modelling: predict every next token of random windows of the token stream."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from lmlab.data.dataset import iter_eval_batches, sample_batch
from lmlab.tasks.batching import to_device
from lmlab.tasks.losses import summed_cross_entropy

# (input_ids, labels) -> the summed loss, or None where it does not apply (the CPU speed
# layer's lmlab.kernels.FusedCausalLMLoss is one); it serves one model, `fast_loss.model`.
FastLoss = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"]


class CausalLMTask:
    def __init__(
        self,
        *,
        train_tokens: np.ndarray,
        val_tokens: np.ndarray | None,
        block_size: int,
        batch_size: int,
        grad_accum: int = 1,
        seed: int,
        device: torch.device,
        eval_tokens: int | None = None,
        eval_batch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        fast_loss: FastLoss | None = None,
    ):
        self.train_tokens, self.val_tokens = train_tokens, val_tokens
        self.block_size, self.batch_size, self.grad_accum = block_size, batch_size, grad_accum
        self.seed, self.device = seed, device
        self.eval_tokens = eval_tokens
        self.eval_batch_size = eval_batch_size or max(batch_size, 32)
        self.rank, self.world_size = rank, world_size
        self.fast_loss = fast_loss

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.block_size * self.world_size

    def train_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the global batch of `step` — a pure function of
        (seed, step), which is what makes resumed runs draw exactly the same data."""
        x, y = sample_batch(
            self.train_tokens,
            batch_size=self.batch_size * self.grad_accum,
            block_size=self.block_size,
            seed=self.seed,
            step=step,
            rank=self.rank,
            world_size=self.world_size,
        )
        x, y = to_device(x, self.device), to_device(y, self.device)
        return [
            {"input_ids": xi, "labels": yi}
            for xi, yi in zip(x.split(self.batch_size), y.split(self.batch_size))
        ]

    def num_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["labels"].numel()

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed cross-entropy over every target token (the loop normalises). The model
        itself — not wrapped for DDP/FSDP or compiled — takes `fast_loss` where that applies
        (the C training step)."""
        if self.fast_loss is not None and model is self.fast_loss.model:
            fused = self.fast_loss(batch["input_ids"], batch["labels"])
            if fused is not None:
                return fused
        logits = model(batch["input_ids"])
        return summed_cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                    batch["labels"].reshape(-1))

    @torch.inference_mode()
    def evaluate(self, model, *, final: bool = False) -> dict[str, float]:
        """Loss and perplexity in non-overlapping windows of the validation split: its first
        `eval_tokens` tokens during training, all of it for the final figure. Deterministic: the
        same number every time, unlike a few random batches."""
        if self.val_tokens is None:
            return {}
        total, count = 0.0, 0
        for x, y in iter_eval_batches(
            self.val_tokens,
            batch_size=self.eval_batch_size,
            block_size=self.block_size,
            max_tokens=None if final else self.eval_tokens,
        ):
            x, y = x.to(self.device), y.to(self.device)
            total += float(self.loss(model, {"input_ids": x, "labels": y}))
            count += y.numel()
        loss = total / max(count, 1)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
