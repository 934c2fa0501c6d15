"""A preallocated key/value cache, one (B, nh, max_len, hs) buffer pair per layer.

Preallocation means a decode step writes one column in place instead of concatenating (and so
copying) the whole cache, which is what makes per-token cost flat as the sequence grows.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        *,
        n_layer: int,
        batch_size: int,
        n_head: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (batch_size, n_head, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.max_len = max_len
        self.length = 0  # positions filled so far, the same for every layer

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) at the current length; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot grow to {end}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Called once per forward pass, after every layer has written its n new positions."""
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget positions from `length` on (speculative decoding rolls back rejected drafts)."""
        self.length = length

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows: beam search keeps the surviving beams each step (in place, copying
        only the filled positions — no new full-length buffers per step), or expands each
        prompt's rows to its beams once (a new batch size, so new buffers)."""
        if index.numel() != self.keys[0].shape[0]:
            self.keys = [k.index_select(0, index) for k in self.keys]
            self.values = [v.index_select(0, index) for v in self.values]
            return
        n = self.length
        for buffer in (*self.keys, *self.values):
            buffer[:, :, :n] = buffer[:, :, :n].index_select(0, index)
