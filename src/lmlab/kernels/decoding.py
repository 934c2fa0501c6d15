"""Decoding in C: a blocked product (`linear`) and a whole GPT decode step (`GPTDecoder`), and
the adapter through which lmlab.generation runs a stock GPT's cached forward passes in C.

decode_f32.c says why each beats eager PyTorch. The adapter, `FusedGPTDecoding`, is what the
decoding engine applies to a model (`FusedGPTDecoding.for_model(model)`, None where the rule of
lmlab/kernels/__init__.py does not hold); its `forward` has the model's cached forward's
signature and meaning, and answers None for a call it does not take (many tokens per row — a
prompt's prefill —, grad mode, autocast, active dropout), which then runs on the model.
"""

from __future__ import annotations

import ctypes

import torch

from lmlab.kernels import build
from lmlab.kernels.gpt import (GPT_ACTIVATIONS, block_tensors, cpu_autocast, dropout_active,
                               fp32_cpu_contiguous, stock_architecture)
from lmlab.models.kv_cache import KVCache


def _address(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (rows, in) @ weight (out, in).T + bias with the decoding kernels' blocked product, for
    CPU fp32 tensors (tests check the product against torch through this). The caller checks
    `lmlab.kernels.available()`."""
    rows, width = x.shape
    out_features = weight.shape[0]
    if not all(t.dtype == torch.float32 and t.device.type == "cpu"
               for t in (x, weight, bias) if t is not None):
        raise ValueError("linear: x, weight and bias must be CPU float32 tensors")
    if weight.shape[1] != width or (bias is not None and bias.shape != (out_features,)):
        raise ValueError(f"linear: shapes {tuple(x.shape)} @ {tuple(weight.shape)}.T do not match")
    x, weight = x.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = torch.empty(rows, out_features, dtype=torch.float32)
    build.load()["linear"](x.data_ptr(), rows, width, weight.data_ptr(), out_features,
                           _address(bias), y.data_ptr(), torch.get_num_threads())
    return y


class GPTDecoder:
    """One decode step of a GPT-2-style model, all of it in one C call.

    Built once per decoding run from the model's tensors (the pointer table is the costly part
    in Python). The kernel reads the weights through their addresses, so in-place updates are
    seen; the tensors are kept alive here.

    layers: per block the twelve tensors of `block_tensors`, biases None when absent. All CPU
    fp32 and contiguous — the caller checks.
    """

    def __init__(self, layers, *, ln_f: tuple[torch.Tensor, torch.Tensor | None],
                 head: torch.Tensor, eps: float, activation: str):
        self._tensors = [t for layer in layers for t in layer] + [*ln_f, head]
        self._table = (ctypes.c_int64 * (12 * len(layers)))(
            *[0 if t is None else t.data_ptr() for layer in layers for t in layer])
        self.n_layer = len(layers)
        self.n_embd = layers[0][2].shape[1]
        self.n_inner = layers[0][8].shape[0]
        self.vocab = head.shape[0]
        self._ln_f = (ln_f[0].data_ptr(), _address(ln_f[1]))
        self._head = head.data_ptr()
        self._eps = eps
        self._activation = GPT_ACTIVATIONS[activation]
        self._caches_memo = None  # (keys list, values list, address table) of the last call

    def _checked_caches(self, keys, values):
        """The cache buffers' address table, after checking what the C code would otherwise
        misread. A decoding run passes the same lists of buffers every step (KVCache never
        replaces a buffer in them), so the last table is kept for those lists — the checks and
        the table cost ~30 µs a step on a small model, where a step is ~1.5 ms."""
        memo = self._caches_memo
        if memo is not None and memo[0] is keys and memo[1] is values:
            return memo[2]
        shape = keys[0].shape
        if (len(keys) != self.n_layer or len(values) != self.n_layer
                or shape[1] * shape[3] != self.n_embd
                or any(t.shape != shape for t in (*keys, *values))):
            raise ValueError(f"the cache must hold {self.n_layer} key and value buffers of one "
                             f"shape (batch, n_head, max_len, head_dim) with n_head·head_dim = "
                             f"{self.n_embd}")
        if not all(fp32_cpu_contiguous(t) for t in (*keys, *values)):
            raise ValueError("the cache must be contiguous CPU float32 buffers")
        table = (ctypes.c_int64 * (2 * self.n_layer))(
            *[t.data_ptr() for pair in zip(keys, values) for t in pair])
        self._caches_memo = (keys, values, table)
        return table

    def step(self, x: torch.Tensor, keys, values, *, starts: list[int], tokens_per_row: int = 1,
             valid: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (rows, vocab), rows = batch × tokens_per_row (row-major: a batch row's tokens
        are consecutive). x: (rows, n_embd) input embeddings, contiguous, overwritten (it
        becomes the residual stream). keys/values: per block the contiguous (batch, n_head,
        max_len, head_dim) caches. Batch row b's token t is written at slot `starts[b] + t` and
        attends to its row's slots up to its own. valid: (batch, max_len), zero where a slot is
        padding that no query attends (a token always attends to itself), or None for none."""
        rows = x.shape[0]
        batch, n_head, max_len, head_dim = keys[0].shape
        caches = self._checked_caches(keys, values)
        if len(starts) != batch or min(starts) < 0 or max(starts) + tokens_per_row > max_len:
            raise ValueError(f"KV cache holds {max_len} positions; cannot write slots "
                             f"{min(starts)}..{max(starts) + tokens_per_row - 1} of {batch} rows")
        if (x.shape != (batch * tokens_per_row, self.n_embd) or not fp32_cpu_contiguous(x)):
            raise ValueError(f"x must be a contiguous CPU float32 ({batch * tokens_per_row}, "
                             f"{self.n_embd}) tensor, got {tuple(x.shape)} {x.dtype}")
        if valid is not None:
            if valid.shape != (batch, max_len):
                raise ValueError(f"valid must be ({batch}, {max_len}), got {tuple(valid.shape)}")
            valid = valid.to(torch.uint8).contiguous()
        starts_c = (ctypes.c_int64 * batch)(*starts)
        logits = torch.empty(rows, self.vocab, dtype=torch.float32)
        status = build.load()["gpt_decode"](
            self._table, caches, self.n_layer, rows, tokens_per_row, self.n_embd, n_head,
            self.n_inner, max_len, starts_c, _address(valid), self._eps, self._activation,
            *self._ln_f, self._head, self.vocab, x.data_ptr(), logits.data_ptr(),
            torch.get_num_threads())
        if status != 0:
            raise MemoryError("the fused decode step could not allocate its scratch memory")
        return logits


class FusedGPTDecoding:
    """A stock lmlab GPT's decoding forward passes (a few tokens per row on top of a KV cache)
    as one C call each: every block, the final LayerNorm and the head, attention in-line.

    The model's arithmetic in another summation order (logits equal to ~1e-6), and the same
    order whatever the batch: a row's logits are bit-identical alone or among others. The
    weights are read through their addresses as they are when the adapter is built: in-place
    updates are seen; parameters replaced by others are not (build a new adapter).
    """

    MAX_ROWS = 256  # tokens in one call; a long prompt's prefill runs faster on BLAS
    MAX_TOKENS_PER_ROW = 16

    def __init__(self, model):
        self.model = model
        # The tables the step's inputs are looked up in, held directly (module attribute
        # lookups cost microseconds a step); like the kernel, they see in-place updates.
        self.wte, self.wpe = model.wte.weight, model.wpe.weight
        self.decoder = GPTDecoder([block_tensors(block) for block in model.h],
                                  head=model.lm_head.weight,
                                  ln_f=(model.ln_f.weight, model.ln_f.bias),
                                  eps=model.config.layer_norm_epsilon,
                                  activation=model.config.activation)

    @classmethod
    def for_model(cls, model) -> FusedGPTDecoding | None:
        """The adapter where the kernels apply to `model` (lmlab/kernels/__init__.py's rule),
        else None."""
        if build.load() is None or not stock_architecture(model):
            return None
        return cls(model)

    def forward(self, input_ids: torch.Tensor, *, cache: KVCache,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """Logits (B, T, V) of `input_ids` (B, T) continuing each row of `cache`, as
        `model(input_ids, cache=cache, attention_mask=attention_mask)` computes them — or None,
        with nothing done, for a call the kernel does not take."""
        batch, tokens = input_ids.shape
        if (batch * tokens > self.MAX_ROWS or tokens > self.MAX_TOKENS_PER_ROW
                or torch.is_grad_enabled() or cpu_autocast() or dropout_active(self.model)
                or not isinstance(cache, KVCache) or input_ids.device.type != "cpu"
                or not fp32_cpu_contiguous(cache.keys[0])):  # the step checks every buffer
            return None
        step = cache.begin(tokens, attention_mask)
        model = self.model
        model.check_positions(step.positions, bound=cache.length + tokens - 1)
        x = (self.wte[input_ids] + self.wpe[step.positions]).reshape(batch * tokens, -1)
        logits = self.decoder.step(x, cache.keys, cache.values, starts=step.starts,
                                   tokens_per_row=tokens,
                                   valid=cache.valid if step.padded else None)
        cache.commit(step)
        return logits.view(batch, tokens, -1)
