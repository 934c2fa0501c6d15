"""Stopping criteria: small callables `(input_ids (B, S), new_token (B,)) -> done (B,) bool`.

They see every row after each step; a row that is done gets `pad_token_id` from then on, and
decoding stops when every row is done (or the length budget is spent).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

StoppingCriterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class EosCriterion:
    """Done when the newest token is one of the EOS ids (several are allowed, as in transformers)."""

    def __init__(self, eos_token_id: Sequence[int], *, device):
        self.eos = torch.tensor(list(eos_token_id), dtype=torch.long, device=device)

    def __call__(self, input_ids: torch.Tensor, new_token: torch.Tensor) -> torch.Tensor:
        return torch.isin(new_token, self.eos)


class StopStringCriterion:
    """Done when the generated text contains a stop string that ends inside the newest token.

    The text is decoded incrementally per row with the tokenizer's streaming decoder, so a stop
    string split across tokens — or ending in the middle of one — is found, as in transformers'
    StopStringCriteria. The stop string stays in the output, as there.
    """

    def __init__(self, stop_strings: Sequence[str], tokenizer, *, batch_size: int):
        if not stop_strings or any(not isinstance(s, str) or not s for s in stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
        self.stop_strings = list(stop_strings)
        self.longest = max(len(s) for s in self.stop_strings)
        self.decoders = [tokenizer.stream_decoder() for _ in range(batch_size)]
        self.texts = [""] * batch_size

    def __call__(self, input_ids: torch.Tensor, new_token: torch.Tensor) -> torch.Tensor:
        done = torch.zeros(len(self.texts), dtype=torch.bool)
        for row, token in enumerate(new_token.tolist()):
            before = len(self.texts[row])
            self.texts[row] += self.decoders[row].push(token)
            # Only occurrences that end in the newly decoded text count.
            window = self.texts[row][max(0, before - self.longest + 1):]
            done[row] = any(s in window for s in self.stop_strings)
        return done.to(new_token.device)
