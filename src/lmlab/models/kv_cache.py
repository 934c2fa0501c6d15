"""A preallocated key/value cache in which every row (sequence) has its own length.

Buffers are one (rows, n_head, max_len, head_dim) pair per layer. Preallocation means a decode
step writes one column in place instead of concatenating (and so copying) the whole cache, which
keeps the cost of a token flat as the sequence grows.

Each row keeps its own state, so rows need not move in lockstep — a row that joins a running
batch starts at slot 0 while the others are at slot 300, a row of speculative decoding keeps
fewer drafted tokens than its neighbour, beam search copies rows onto others:
  - `lengths[r]`: slots written so far (the next token goes to slot `lengths[r]`);
  - `next_positions[r]`: the position id of its next real token — slots and positions differ
    where slots hold left padding, which takes no position;
  - `valid[r, s]`: whether slot s holds a real token (padding does not; no query attends to it);
    slots past a row's length are always marked real.

A forward pass over T new tokens per row asks `begin(T, token_mask)` for its `CacheStep` (where
each row's tokens go, their position ids, and the attention mask that keeps every query to its
own row's past), writes each layer's keys and values with `update`, and ends with `commit`.
When every row has the same length and no padding — plain decoding — the step takes the fast
paths: slice writes, and no mask (one query) or SDPA's own causal mask (a fresh prompt).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class CacheStep:
    """Where one forward pass's T tokens per row go and what they may attend to."""

    starts: list[int]  # per row: the slot of its first new token
    start: int | None  # the one start slot of every row, or None when rows differ
    tokens: int  # T, new tokens per row
    positions: torch.Tensor  # (B, T) position ids
    keys: int  # S: slots the attention reads (the longest row's, after this step)
    token_mask: torch.Tensor | None  # (B, T) 0 where a new token is padding, or None
    _valid: torch.Tensor = field(repr=False, default=None)  # the cache's (B, max_len) validity
    padded: bool = False  # some slot the step reads is padding
    needs_mask: bool = False  # rows differ in length, or some slot is padding
    _mask: torch.Tensor | None = field(repr=False, default=None)

    @property
    def is_causal(self) -> bool:
        """A fresh, unpadded prompt of several tokens: SDPA builds the causal mask itself."""
        return not self.needs_mask and self.tokens > 1 and self.start == 0

    @property
    def mask(self) -> torch.Tensor | None:
        """Boolean (B, 1, T, S), True where a query may attend: the slots of its own row up to
        its own, except padding — but always its own slot, so that a padded query's softmax
        never sees an empty row (its output is never used). None when no mask is needed: a
        single new token per row (it attends to everything written), or `is_causal`."""
        if self._mask is None and (self.needs_mask or (self.tokens > 1 and not self.is_causal)):
            device = self.positions.device
            starts = torch.tensor(self.starts, device=device)
            own = starts[:, None] + torch.arange(self.tokens, device=device)  # (B, T)
            slot = torch.arange(self.keys, device=device)
            allowed = slot[None, None, :] <= own[:, :, None]  # (B, T, S)
            if self.needs_mask:
                allowed &= self._valid[:, None, : self.keys]
                allowed |= slot[None, None, :] == own[:, :, None]
            self._mask = allowed[:, None]
        return self._mask


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
        # Host-side bookkeeping as plain lists, shared with row views (`rows`): reading a Python
        # int costs nothing, where a tensor element costs a dispatch (or a GPU sync).
        self._lengths = [0] * batch_size
        self._padded = [False] * batch_size  # some written slot of the row is padding
        self._offset = 0  # this cache's first row in those lists (non-zero for a view)
        self.next_positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        # Per-row tensors a model carries along with its rows (an encoder's output for
        # cross-attention, say): row views, copies and selections apply to them too.
        self.extras: dict[str, torch.Tensor] = {}
        # Tensors a model derives once per cache and every step reads whole (a table of
        # position biases, say): not per row, so row copies and views leave them alone.
        self.constants: dict[str, torch.Tensor] = {}
        self._spare: dict[torch.dtype, torch.Tensor] = {}  # copy_rows' scratch, shared by views

    # -- shape and state -------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def lengths(self) -> list[int]:
        """Slots written per row (a copy)."""
        return self._lengths[self._offset:self._offset + self.batch_size]

    @property
    def length(self) -> int:
        """The longest row's length (= every row's, in lockstep decoding)."""
        return max(self.lengths, default=0)

    def rows(self, start: int, stop: int) -> KVCache:
        """A view of rows [start, stop): the same memory (each buffer's rows are contiguous),
        the same bookkeeping. A forward pass on the view fills those rows of this cache."""
        view = KVCache.__new__(KVCache)
        view.keys = [k[start:stop] for k in self.keys]
        view.values = [v[start:stop] for v in self.values]
        view.max_len = self.max_len
        view._lengths, view._padded = self._lengths, self._padded
        view._offset = self._offset + start
        view.next_positions = self.next_positions[start:stop]
        view.valid = self.valid[start:stop]
        view.extras = {name: t[start:stop] for name, t in self.extras.items()}
        view.constants = self.constants
        view._spare = self._spare
        return view

    # -- one forward pass ------------------------------------------------------------------------
    def begin(self, tokens: int, token_mask: torch.Tensor | None = None) -> CacheStep:
        """Plan a forward pass of `tokens` new tokens per row. `token_mask` (B, T), 0 for
        padding, gives padded tokens no position of their own and hides them from every other
        query (left padding of a batch of prompts; drafted tokens past a row's budget)."""
        lengths = self.lengths
        batch, device = len(lengths), self.next_positions.device
        end = max(lengths, default=0) + tokens
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot grow to {end}")
        if token_mask is not None and bool(token_mask.all()):
            token_mask = None
        offsets = torch.arange(tokens, device=device)
        if token_mask is None:
            positions = self.next_positions[:, None] + offsets
        else:
            counted = token_mask.long().cumsum(-1) - 1  # real tokens before and at each one
            positions = (self.next_positions[:, None] + counted).clamp(min=0)
        uniform = all(n == lengths[0] for n in lengths)  # read by every layer: decided once
        padded = token_mask is not None or any(self._padded[self._offset:self._offset + batch])
        if token_mask is not None:  # record which new slots are real
            slots = torch.tensor(lengths, device=device)[:, None] + offsets
            self.valid.scatter_(1, slots, token_mask.bool())
        return CacheStep(starts=lengths, start=(lengths[0] if lengths else 0) if uniform else None,
                         tokens=tokens, positions=positions, keys=end,
                         token_mask=token_mask, _valid=self.valid, padded=padded,
                         needs_mask=padded or not uniform)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               step: CacheStep) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k, v (B, nh, T, hs) at each row's slots; return every row's keys
        and values up to the step's longest row (B, nh, S, hs) — slots past a row's own length
        hold stale numbers that the step's mask hides."""
        start = step.start
        keys, values = self.keys[layer], self.values[layer]
        if start is not None:
            keys[:, :, start:start + step.tokens] = k
            values[:, :, start:start + step.tokens] = v
        else:
            rows = torch.arange(len(step.starts), device=k.device)[:, None]
            slots = torch.tensor(step.starts, device=k.device)[:, None] + \
                torch.arange(step.tokens, device=k.device)
            keys[rows, :, slots] = k.transpose(1, 2)  # advanced indices first: (B, T, nh, hs)
            values[rows, :, slots] = v.transpose(1, 2)
        return keys[:, :, :step.keys], values[:, :, :step.keys]

    def commit(self, step: CacheStep) -> None:
        """After every layer has written the step: lengths and next positions move on."""
        first = self._offset
        for row in range(len(step.starts)):
            self._lengths[first + row] += step.tokens
        if step.token_mask is None:
            self.next_positions += step.tokens
            return
        self.next_positions += step.token_mask.long().sum(-1)
        for row, padded in enumerate((step.token_mask == 0).any(-1).tolist()):
            self._padded[first + row] |= padded

    # -- moving rows -----------------------------------------------------------------------------
    def copy_rows(self, source: list[int] | torch.Tensor, target: list[int] | torch.Tensor, *,
                  extras: bool = True) -> None:
        """Row target[i] becomes a copy of row source[i] (all of them read before any is
        written, so the two may overlap): beam search continuing its surviving beams, a prompt
        expanded to its beams, a batch closing the gap a finished row left. Only the written
        slots are copied; with `extras=False` not the extras either, for rows whose extras are
        equal already (the beams of one source share its cross-attention keys and values)."""
        source = torch.as_tensor(source, dtype=torch.long)
        target = torch.as_tensor(target, dtype=torch.long)
        if source.numel() == 0:
            return
        lengths, rows = self.lengths, source.tolist()
        width = max(lengths[i] for i in rows)
        device = self.next_positions.device
        src, dst = source.to(device), target.to(device)
        written = [b[:, :, :width] for b in (*self.keys, *self.values)] if width else []
        for t in (*written, *(self.extras.values() if extras else ())):
            moved = self._scratch(t, len(rows))
            torch.index_select(t, 0, src, out=moved)
            t.index_copy_(0, dst, moved)
        for t in (self.next_positions, self.valid):
            t.index_copy_(0, dst, t.index_select(0, src))
        first = self._offset
        padded = [self._padded[first + i] for i in rows]
        for i, j in enumerate(target.tolist()):
            self._lengths[first + j] = lengths[rows[i]]
            self._padded[first + j] = padded[i]

    def _scratch(self, like: torch.Tensor, rows: int) -> torch.Tensor:
        """A contiguous (rows, *like.shape[1:]) tensor in memory kept between calls: beam search
        moves megabytes of cache rows every step, and a fresh buffer that size costs its page
        faults every time (the allocator hands large blocks back to the system)."""
        shape = (rows, *like.shape[1:])
        need = math.prod(shape)
        spare = self._spare.get(like.dtype)
        if spare is None or spare.numel() < need:
            spare = self._spare[like.dtype] = torch.empty(need, dtype=like.dtype,
                                                          device=like.device)
        return spare[:need].view(shape)

    def truncate(self, lengths: int | list[int]) -> None:
        """Forget every row's slots from `lengths[r]` on (one int: the same for all rows):
        speculative decoding rolls back the drafts a row did not keep."""
        if isinstance(lengths, int):
            lengths = [lengths] * self.batch_size
        first = self._offset
        for row, n in enumerate(lengths):
            if not 0 <= n <= self._lengths[first + row]:
                raise ValueError(f"cannot truncate row {row} of length "
                                 f"{self._lengths[first + row]} to {n}")
            self._lengths[first + row] = n
        # A row's next position is the number of real tokens it keeps. Slots past a row's
        # length are always marked real, so that a later step that writes them without a
        # token mask needs no write of its own there.
        kept = torch.arange(self.max_len, device=self.valid.device)[None] < \
            torch.tensor(lengths, device=self.valid.device)[:, None]
        self.valid |= ~kept
        self.next_positions.copy_((self.valid & kept).sum(-1))
        for row, padded in enumerate((~self.valid).any(-1).tolist()):
            self._padded[first + row] = padded

    def reset(self, rows: list[int] | None = None) -> None:
        """Empty the given rows (all by default) for new sequences."""
        rows = range(self.batch_size) if rows is None else rows
        first = self._offset
        for row in rows:
            self._lengths[first + row] = 0
            self._padded[first + row] = False
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.valid.device)
        self.next_positions.index_fill_(0, index, 0)
        self.valid.index_fill_(0, index, True)
