"""The GPT training step in C (train_f32.c says why and how) and the adapter through which a
causal-LM recipe uses it: `FusedCausalLMLoss(model)(input_ids, labels)` is the summed
next-token cross-entropy with autograd — its backward fills every parameter's gradient in one C
call — or None where the step does not apply, and the caller takes logits from the model.
"""

from __future__ import annotations

import ctypes

import torch

from lmlab.kernels import build
from lmlab.kernels.gpt import (GPT_ACTIVATIONS, ModuleTree, block_tensors, cpu_autocast,
                               dropout_active, stock_architecture)


# The fused training step keeps the attention probabilities of every layer (batch · heads · T²
# floats each) for its backward pass; beyond this many floats in all, the module path (SDPA's
# flash attention, which recomputes them) is the better use of memory.
TRAIN_MAX_ATTENTION_FLOATS = 64 * 2**20
# Each shard beyond the first holds a gradient copy of every parameter until they are added up.
TRAIN_MAX_SHARD_GRAD_FLOATS = 256 * 2**20


def training_available() -> bool:
    """Whether `gpt_causal_lm_loss` can run here (the kernels, and a BLAS sgemm from torch)."""
    functions = build.load()
    return functions is not None and "train_forward" in functions


def training_shards(batch: int, n_params: int) -> int:
    """How many shards (groups of whole sequences, one per thread) a step of `batch` rows is
    cut into: one per thread, so every thread works; 0 when that cannot be done — fewer
    sequences than threads, or too many gradient copies — and the module path should run."""
    threads = torch.get_num_threads()
    if batch < threads or (threads - 1) * n_params > TRAIN_MAX_SHARD_GRAD_FLOATS:
        return 0
    return threads


def _take(pool: dict, kind: str, size: int) -> torch.Tensor:
    """A float buffer of at least `size` elements from the pool (taken out while in use)."""
    buffer = pool.pop(kind, None)
    return (buffer if buffer is not None and buffer.numel() >= size
            else torch.empty(size, dtype=torch.float32))


def _give_back(pool: dict, kind: str, buffer: torch.Tensor) -> None:
    """Keep one buffer per kind, the largest seen (an evaluation batch's workspace serves the
    smaller training batches after it: a step uses the front part it needs)."""
    if kind not in pool or pool[kind].numel() < buffer.numel():
        pool[kind] = buffer


def _forward(spec, input_ids, labels, params):
    """The C forward pass: (summed loss as a 0-d fp32 tensor, workspace holding the
    activations, pointer table)."""
    batch, T = input_ids.shape
    fn = build.load()
    size = fn["train_workspace"](spec.n_layer, batch, T, spec.n_embd, spec.n_head, spec.n_inner,
                                 spec.vocab)
    ws = _take(spec.pool, "workspace", size)
    losses = torch.empty(spec.shards, dtype=torch.float64)
    table = spec.table(params)
    fn["train_forward"](table, spec.n_layer, batch, T, spec.n_embd, spec.n_head, spec.n_inner,
                        spec.vocab, spec.eps, spec.activation, input_ids.data_ptr(),
                        labels.data_ptr(), ws.data_ptr(), losses.data_ptr(), spec.shards,
                        torch.get_num_threads())
    return torch.tensor(float(sum(losses.tolist())), dtype=torch.float32), ws, table


class _GPTCausalLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, input_ids, labels, *params):
        loss, ctx.ws, ctx.table = _forward(spec, input_ids, labels, params)
        ctx.spec = spec
        ctx.save_for_backward(input_ids, labels, *params)
        return loss

    @staticmethod
    def backward(ctx, grad):
        if ctx.ws is None:
            raise RuntimeError("the fused GPT loss was already back-propagated (its logits became "
                               "their gradient); retain_graph is not supported")
        spec, ws = ctx.spec, ctx.ws
        ctx.ws = None
        input_ids, labels, *params = ctx.saved_tensors
        batch, T = input_ids.shape
        sizes = [p.numel() for p in params]
        total = sum(sizes)
        grads = torch.empty(total, dtype=torch.float32)
        scratch = _take(spec.pool, "scratch", max(1, (spec.shards - 1) * total))
        status = build.load()["train_backward"](
            ctx.table, spec.n_layer, batch, T, spec.n_embd, spec.n_head, spec.n_inner, spec.vocab,
            spec.positions, spec.eps, spec.activation, input_ids.data_ptr(), labels.data_ptr(),
            ws.data_ptr(), float(grad), spec.offsets(sizes), grads.data_ptr(),
            scratch.data_ptr(), total, spec.shards, torch.get_num_threads())
        # Fresh buffers of tens of MB cost a page fault per 4 KiB on every step (~10% of a
        # small model's step): the caller's pool keeps them for the next one.
        _give_back(spec.pool, "workspace", ws)
        _give_back(spec.pool, "scratch", scratch)
        if status != 0:
            raise MemoryError("the fused GPT backward pass could not allocate its scratch memory")
        views = [g.view(p.shape) for g, p in zip(grads.split(sizes), params)]
        return (None, None, None, *views)


class _TrainSpec:
    """The C table layout of a GPT's parameters: per layer the twelve slots of GPTDecoder, then
    wte, wpe, ln_f weight, ln_f bias, head; `slots[i]` indexes the unique parameters (or -1)."""

    def __init__(self, slots, unique, *, n_layer, n_head, eps, activation, shards, pool):
        self.slots, self.n_layer, self.n_head, self.eps = slots, n_layer, n_head, eps
        self.pool = pool
        self.activation, self.shards = GPT_ACTIVATIONS[activation], shards
        wte, wpe = unique[slots[12 * n_layer]], unique[slots[12 * n_layer + 1]]
        self.vocab, self.n_embd = wte.shape
        self.positions = wpe.shape[0]
        self.n_inner = unique[slots[8]].shape[0]

    def table(self, params):
        return (ctypes.c_int64 * len(self.slots))(
            *[0 if i < 0 else params[i].data_ptr() for i in self.slots])

    def offsets(self, sizes):
        """Where each slot's gradient starts in the flat buffer (-1: no such tensor). A tied
        head shares wte's slice; the C code sees the same address and writes it once."""
        starts = [0]
        for size in sizes[:-1]:
            starts.append(starts[-1] + size)
        return (ctypes.c_int64 * len(self.slots))(*[-1 if i < 0 else starts[i] for i in self.slots])


def gpt_causal_lm_loss(layers, *, wte: torch.Tensor, wpe: torch.Tensor,
                       ln_f: tuple[torch.Tensor, torch.Tensor | None], head: torch.Tensor,
                       n_head: int, eps: float, activation: str, input_ids: torch.Tensor,
                       labels: torch.Tensor, shards: int, pool: dict) -> torch.Tensor:
    """Summed next-token cross-entropy of a GPT-2-style model (fp32 CPU, no dropout) on
    `input_ids` (batch, T) against `labels` (batch, T), with autograd: its backward fills every
    parameter's gradient in one C call (without grad mode, the forward pass alone). `layers` as
    for GPTDecoder; `head` may be `wte` (tied). The caller checks eligibility
    (`training_available`, `training_shards`, stock architecture, ids and labels in range,
    positions within wpe). `pool` (a dict the caller keeps, e.g. per
    model) holds the step's large buffers between steps; a buffer is taken out while a step
    uses it, so overlapping steps each get their own."""
    tensors = [t for layer in layers for t in layer] + [wte, wpe, *ln_f, head]
    # The gradient buffer mirrors the parameters' memory order: parameters laid out back to
    # back (training.optim.flatten_parameters) get gradients laid out the same way, which the
    # optimizer and the gradient clipping then treat as one tensor.
    unique = sorted({id(t): t for t in tensors if t is not None}.values(),
                    key=lambda t: t.data_ptr())
    index = {id(t): i for i, t in enumerate(unique)}
    slots = [-1 if t is None else index[id(t)] for t in tensors]
    spec = _TrainSpec(slots, unique, n_layer=len(layers), n_head=n_head, eps=eps,
                      activation=activation, shards=shards, pool=pool)
    input_ids, labels = input_ids.contiguous(), labels.contiguous()
    if not torch.is_grad_enabled():  # evaluation: the forward pass alone
        loss, ws, _ = _forward(spec, input_ids, labels, unique)
        _give_back(pool, "workspace", ws)
        return loss
    return _GPTCausalLMLoss.apply(spec, input_ids, labels, *unique)


class _TrainingPlan:
    def __init__(self, model):
        self.tree = ModuleTree(model)
        self.activation = model.config.activation  # what the C step computes, checked each call
        self.layers = [block_tensors(block) for block in model.h]
        self.n_params = sum(p.numel() for p in model.parameters())


class FusedCausalLMLoss:
    """The summed next-token cross-entropy of `labels` given `input_ids` (both (B, T)) for one
    stock lmlab GPT, computed by the C training step — with autograd; without grad mode
    (evaluation), by its forward pass alone — or None where the step does not apply.

    A small model's eager step is mostly dispatch and badly split small products; the C step
    gives each thread whole sequences and single-threaded BLAS (nanoGPT's Shakespeare recipe:
    ~20 instead of ~29 ms a step). It applies to the stock architecture on CPU in fp32 without
    active dropout or autocast, with at least one sequence per thread, checked at every call
    (a hook or a replaced layer added mid-run sends the next step to the module path). The
    module path stays the reference (gradients equal to ~1e-6; the summation order differs, so
    the two are not bit-identical). The step's large buffers are kept here between steps.
    """

    def __init__(self, model):
        self.model = model
        self._plan: _TrainingPlan | None = None
        self._pool: dict = {}

    def _training_plan(self) -> _TrainingPlan | None:
        """The per-block tensors and parameter count of the stock architecture (None if it is
        not), memoised: walking the module tree through nn.Module attributes costs ~0.7 ms a
        step (3% of the Shakespeare recipe's), checking that it has not changed ~0.05 ms."""
        plan = self._plan
        if plan is not None and plan.activation == self.model.config.activation \
                and plan.tree.unchanged():
            return plan
        self._plan = _TrainingPlan(self.model) if stock_architecture(self.model) else None
        return self._plan

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        model = self.model
        c = model.config
        if not (not dropout_active(model) and not cpu_autocast()
                and input_ids.dim() == 2 and labels.shape == input_ids.shape
                and input_ids.dtype == labels.dtype == torch.long
                and input_ids.device.type == labels.device.type == "cpu"
                and training_available()):
            return None
        batch, T = input_ids.shape
        plan = self._training_plan()
        shards = training_shards(batch, plan.n_params) if plan else 0
        attention = c.n_layer * batch * c.n_head * T * T
        if shards == 0 or T > c.n_positions or attention > TRAIN_MAX_ATTENTION_FLOATS:
            return None
        # Out-of-range ids would be read as addresses in C; forward raises the proper error.
        if (int(input_ids.min()) < 0 or int(input_ids.max()) >= c.vocab_size
                or int(labels.min()) < 0 or int(labels.max()) >= c.vocab_size):
            return None
        return gpt_causal_lm_loss(
            plan.layers, wte=model.wte.weight, wpe=model.wpe.weight,
            ln_f=(model.ln_f.weight, model.ln_f.bias), head=model.lm_head.weight,
            n_head=c.n_head, eps=c.layer_norm_epsilon, activation=c.activation,
            input_ids=input_ids, labels=labels, shards=shards, pool=self._pool)
