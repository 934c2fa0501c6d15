"""Picking the next token from processed scores: argmax, or a draw from their softmax.

Randomness is per row when seeded: row i of a call seeded with s draws from its own generator
seeded with s + 1_000_003 · i, so a row's samples do not depend on which other rows share its
batch (batch invariance) — the same row alone, in a batch of 64, or joining a running server
batch draws the same tokens. Unseeded rows draw from torch's global RNG in one call over the
batch, as transformers does (so `torch.manual_seed` reproduces a run).
"""

from __future__ import annotations

import torch

ROW_SEED_STRIDE = 1_000_003


def row_generator(seed: int, index: int, device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed + ROW_SEED_STRIDE * index)
    return generator


def sample_from(probs: torch.Tensor, generators: list[torch.Generator] | None,
                num_samples: int = 1) -> torch.Tensor:
    """(B, num_samples) draws without replacement from each row of `probs` (B, V): with each
    row's own generator, or one global-RNG call for all rows when `generators` is None."""
    if generators is None:
        return torch.multinomial(probs, num_samples=num_samples)
    return torch.stack([torch.multinomial(p, num_samples=num_samples, generator=g)
                        for p, g in zip(probs, generators)])


def pick_tokens(scores: torch.Tensor, *, do_sample: bool,
                generators: list[torch.Generator] | None) -> torch.Tensor:
    """The next token of each row of `scores` (B, V), (B,): argmax, or one draw from
    softmax(scores) — with each row's own generator, or the global RNG when None."""
    if not do_sample:
        return scores.argmax(dim=-1)
    # The softmax in fp32 whatever the model's dtype: bf16 probabilities of a 50k vocabulary
    # sum far from 1.
    return sample_from(torch.softmax(scores.float(), dim=-1), generators).squeeze(-1)


class TokenSampler:
    """Picks the next token of every row: argmax, or a draw from softmax(scores).

    `generators`, one per row (see `row_generator`), make seeded sampling batch-invariant;
    None draws all rows from torch's global RNG. `TokenSampler.seeded(...)` builds the
    generators of rows 0..batch_size-1 of a call.
    """

    def __init__(self, *, do_sample: bool, generators: list[torch.Generator] | None = None):
        self.do_sample = do_sample
        self.generators = generators if do_sample else None

    @classmethod
    def seeded(cls, *, do_sample: bool, seed: int | None, batch_size: int, device) -> TokenSampler:
        generators = None
        if do_sample and seed is not None:
            generators = [row_generator(seed, row, device) for row in range(batch_size)]
        return cls(do_sample=do_sample, generators=generators)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        return pick_tokens(scores, do_sample=self.do_sample, generators=self.generators)

    def uniform(self, batch: int, *, device, dtype) -> torch.Tensor:
        """One uniform [0, 1) draw per row from the same randomness (speculative acceptance)."""
        if self.generators is None:
            return torch.rand(batch, device=device, dtype=dtype)
        return torch.cat([torch.rand(1, generator=g, device=device, dtype=dtype)
                          for g in self.generators])
