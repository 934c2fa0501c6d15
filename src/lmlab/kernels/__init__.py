"""The CPU speed layer: native code that runs lmlab's models faster on CPUs, applied *to* a
model by whoever runs it — the decoding engine, a training recipe, the optimizer builder —
never imported by a model file, and never required.

The one rule. The speed layer applies when
  1. it is not switched off: `LMLAB_CPU_KERNELS=0` in the environment (read at each use), the
     `cpu_kernels: false` key of a training config, or `Engine(..., cpu_kernels=False)`;
  2. for the C kernels (decoding, the training step): they could be built here — x86-64
     Linux, a CPU with AVX2 + FMA (AVX-512 is used where present), a C compiler, and torch on
     GNU OpenMP (`unavailable_reason()` says which one is missing); the training step also
     needs the BLAS sgemm torch exports;
  3. the model is exactly the stock lmlab GPT (`kernels.gpt.stock_architecture`: not a
     subclass, every block the plain one, no hooks, no activation checkpointing, fp32
     contiguous CPU parameters) — a replaced layer such as LoRA, or CUDA, means the model's own
     module path;
  4. and per call: decoding — at most 256 tokens and 16 per row in a call, no grad mode, no
     autocast, no active dropout (a long prompt's prefill runs on the module path); training —
     one process (not DDP/FSDP, not torch.compile'd), no active dropout or autocast, at least
     one sequence per thread.
`FlatAdamW` (the optimizer over one flat parameter buffer) needs only 1 and a single process
whose parameters are CPU tensors of one floating dtype. `NativeDropout` (swapped in for T5's
`Dropout` modules by the training loop while a run on the CPU lasts, unless it is
torch.compile'd) needs 1
and 2 and, per call, an fp32 CPU tensor; its masks are other random numbers than torch's, drawn
from torch's generator all the same (seeded and resumed with it).

Where the rule does not hold, nothing changes but speed: the module path is the reference
every kernel is tested against (logits and gradients equal to ~1e-6, FlatAdamW bit-identical
to torch's fused AdamW).

    kernels.FusedGPTDecoding.for_model(model)  decoding: a cached forward in one C call
    kernels.FusedCausalLMLoss(model)            training: the summed causal-LM loss in C
    kernels.FlatAdamW                           the optimizer over one flat buffer
    kernels.native_dropout(model)               training: dropout masks drawn in C
"""

from __future__ import annotations

import torch

from lmlab.kernels.build import cpu_isa, load, switched_off, unavailable_reason
from lmlab.kernels.decoding import FusedGPTDecoding, GPTDecoder, linear
from lmlab.kernels.dropout import NativeDropout, native_dropout
from lmlab.kernels.flat_adamw import FlatAdamW
from lmlab.kernels.training import FusedCausalLMLoss, training_available
from lmlab.models.gpt import GPT

__all__ = ["FlatAdamW", "FusedCausalLMLoss", "FusedGPTDecoding", "GPTDecoder", "NativeDropout",
           "available", "cpu_isa", "decoding_adapter", "flat_optimizer_applies", "linear",
           "native_dropout", "switched_off", "training_available", "training_loss_adapter",
           "unavailable_reason"]


def available() -> bool:
    """Whether the C kernels are built and loaded here (and not switched off)."""
    return load() is not None


def decoding_adapter(model) -> FusedGPTDecoding | None:
    """The adapter that runs `model`'s decoding forward passes in C, for the model families the
    kernels implement (the GPT today), or None where the rule does not hold."""
    if switched_off():
        return None
    return FusedGPTDecoding.for_model(model)


def training_loss_adapter(model) -> FusedCausalLMLoss | None:
    """The C training step's causal-LM loss for `model` where the kernels implement its family
    (the GPT) and the speed layer is on; whether it applies is checked again at every call."""
    if switched_off() or not training_available() or type(model) is not GPT:
        return None
    return FusedCausalLMLoss(model)


def flat_optimizer_applies(params: list[torch.Tensor], *, distributed: bool) -> bool:
    """FlatAdamW's part of the rule: one process, every parameter a CPU tensor of one floating
    dtype, the speed layer not switched off."""
    return (not switched_off() and not distributed and bool(params)
            and all(p.device.type == "cpu" and p.is_floating_point()
                    and p.dtype == params[0].dtype for p in params))
