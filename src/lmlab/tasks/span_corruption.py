"""Span corruption: T5's pretraining objective for an encoder–decoder.

Each example is `raw_length` consecutive tokens of the prepared token stream (packed: windows
cross document boundaries, which the stream marks with EOS), corrupted by T5's random-spans
noise mask into a sentinel-encoded input and target (`lmlab.data.span_corruption`). `raw_length`
is chosen as T5 chooses it, so that every corrupted input is exactly `inputs_length` tokens, EOS
included: no padding, the encoder's context filled. The number of noise tokens and spans depends
on the length alone, so every target has one length too (29 for inputs of 128 at T5's 15% noise
and mean span 3).

Every example is a pure function of (seed, step, its row in the global batch) — the window and
the mask both drawn from a generator seeded with them, and drawn anew every step — so a resumed
run sees exactly the same batches and N ranks together see the batch one process would.
Validation uses consecutive windows of the validation split, each with one fixed mask (its own
seed), so evaluations are comparable across steps and runs.

The loss is the summed token cross-entropy of the decoder's logits, teacher-forced with
`model.shift_right(labels)`; `num_targets` counts the target tokens, so the loop's mean is
transformers' T5 loss (mean over target tokens) for the step's whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from lmlab.data.segments import mlm_window
from lmlab.data.span_corruption import (compute_input_and_target_lengths, corrupted_lengths,
                                        noise_counts, random_spans_noise_mask, sentinel_encode)
from lmlab.errors import ConfigError, DataError
from lmlab.tasks.batching import to_device
from lmlab.tasks.losses import summed_cross_entropy

EVAL_SEED = 20_191_023  # validation masks: fixed, and the same for every run
_TRAIN, _EVAL = 1, 2  # keep the training and validation random streams apart
IGNORE_INDEX = -100


def span_lengths(inputs_length: int, noise_density: float,
                 mean_noise_span_length: float) -> tuple[int, int, int]:
    """(raw_length, inputs_length, targets_length) of every example: the raw window that fills
    `inputs_length`, and the exact lengths its corruption has (ConfigError when impossible)."""
    try:
        raw, _ = compute_input_and_target_lengths(inputs_length, noise_density,
                                                  mean_noise_span_length)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    inputs, targets = corrupted_lengths(raw, noise_density, mean_noise_span_length)
    return raw, inputs, targets


class SpanCorruptionTask:
    def __init__(
        self,
        *,
        train_tokens: np.ndarray,
        val_tokens: np.ndarray | None,
        inputs_length: int,
        sentinel_ids: Sequence[int],
        eos_token_id: int,
        batch_size: int,
        seed: int,
        device: torch.device,
        noise_density: float = 0.15,
        mean_noise_span_length: float = 3.0,
        grad_accum: int = 1,
        eval_tokens: int | None = None,
        eval_batch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.raw_length, self.inputs_length, self.targets_length = span_lengths(
            inputs_length, noise_density, mean_noise_span_length)
        spans = noise_counts(self.raw_length, noise_density, mean_noise_span_length)[1]
        if len(sentinel_ids) < spans:
            raise ConfigError(f"span corruption of {self.raw_length} tokens makes {spans} noise "
                              f"spans, but the tokenizer has {len(sentinel_ids)} sentinel tokens "
                              "(<extra_id_N>); use a tokenizer with more, or a smaller block_size")
        if eos_token_id is None:
            raise ConfigError("span corruption ends inputs and targets with EOS; the tokenizer "
                              "has none")
        if len(train_tokens) < self.raw_length:
            raise DataError(f"the train split has {len(train_tokens)} tokens, fewer than one "
                            f"example of {self.raw_length}; use more data or a smaller "
                            "block_size")
        self.train_tokens, self.val_tokens = train_tokens, val_tokens
        if val_tokens is not None and len(val_tokens) < self.raw_length:
            self.val_tokens = None
        self.sentinel_ids = [int(s) for s in sentinel_ids]
        self.eos_token_id = int(eos_token_id)
        self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.seed, self.device = seed, device
        self.eval_tokens = eval_tokens
        self.eval_batch_size = eval_batch_size or max(batch_size, 32)
        self.rank, self.world_size = rank, world_size
        self._eval_cache: dict[int, list[dict]] = {}

    @property
    def tokens_per_step(self) -> int:
        """Encoder input tokens per optimizer step (T5 counts its pretraining tokens so)."""
        return self.batch_size * self.grad_accum * self.inputs_length * self.world_size

    # -- examples ------------------------------------------------------------------------------
    def example(self, window: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of one raw window, its noise mask drawn from `rng`."""
        mask = random_spans_noise_mask(len(window), noise_density=self.noise_density,
                                       mean_noise_span_length=self.mean_noise_span_length,
                                       rng=rng)
        return sentinel_encode(window, mask, sentinel_ids=self.sentinel_ids,
                               eos_token_id=self.eos_token_id)

    def train_row(self, step: int, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Row `row` of the global batch of `step`: a pure function of (seed, step, row)."""
        rng = np.random.default_rng([self.seed, step, _TRAIN, row])
        return self.example(mlm_window(self.train_tokens, rng, self.raw_length), rng)

    def _collate(self, rows: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
        inputs = torch.from_numpy(np.stack([r[0] for r in rows]))  # (B, inputs_length)
        labels = torch.from_numpy(np.stack([r[1] for r in rows]))  # (B, targets_length)
        return {"input_ids": to_device(inputs, self.device),
                "labels": to_device(labels, self.device)}

    def train_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the global batch of `step`."""
        per_rank = self.batch_size * self.grad_accum
        first = self.rank * per_rank
        rows = [self.train_row(step, g) for g in range(first, first + per_rank)]
        return [self._collate(rows[i:i + self.batch_size])
                for i in range(0, per_rank, self.batch_size)]

    def num_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    # -- loss ----------------------------------------------------------------------------------
    @staticmethod
    def _logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Teacher-forced decoder logits (B, T, vocab). The encoder runs on the model itself (a
        DDP wrapper has no `encode`: its `.module`), the decoder through the forward of what the
        loop passes, so that DDP's gradient synchronisation sees one forward per step."""
        inner = getattr(model, "module", model)
        encoded = inner.encode(batch["input_ids"])
        return model(inner.shift_right(batch["labels"]), encoder_hidden=encoded)

    def _summed(self, model, batch: dict[str, torch.Tensor]):
        logits = self._logits(model, batch)
        labels = batch["labels"]
        keep = labels != IGNORE_INDEX
        return summed_cross_entropy(logits[keep].float(), labels[keep]), logits[keep], labels[keep]

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed cross-entropy over every target token (the loop divides by num_targets)."""
        return self._summed(model, batch)[0]

    # -- evaluation ----------------------------------------------------------------------------
    def _eval_batches(self, rows: int) -> list[dict[str, torch.Tensor]]:
        """The first `rows` consecutive validation windows, each under its fixed mask."""
        if rows not in self._eval_cache:
            n = self.raw_length
            examples = [self.example(np.asarray(self.val_tokens[i * n:(i + 1) * n], np.int64),
                                     np.random.default_rng([EVAL_SEED, _EVAL, i]))
                        for i in range(rows)]
            self._eval_cache = {rows: [self._collate(examples[i:i + self.eval_batch_size])
                                       for i in range(0, rows, self.eval_batch_size)]}
        return self._eval_cache[rows]

    @torch.inference_mode()
    def evaluate(self, model, *, final: bool = False) -> dict[str, float]:
        """Loss, perplexity and accuracy per target token (sentinels and EOS included) on the
        validation split: its first `eval_tokens` tokens' worth of windows during training, all
        of it for the final figure."""
        if self.val_tokens is None:
            return {}
        tokens = len(self.val_tokens)
        if not final and self.eval_tokens is not None:
            tokens = min(tokens, self.eval_tokens)
        rows = max(1, tokens // self.raw_length)
        total, correct, count = 0.0, 0, 0
        for batch in self._eval_batches(rows):
            summed, logits, labels = self._summed(model, batch)
            total += float(summed)
            correct += int((logits.argmax(-1) == labels).sum())
            count += len(labels)
        loss = total / count
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)),
                "val_acc": correct / count}
