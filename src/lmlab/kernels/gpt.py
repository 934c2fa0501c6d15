"""What the C kernels read of an lmlab GPT: whether it is the stock architecture they compute,
and its tensors in the order of the C tables (gpt_layout.h).

The kernels compute models/gpt.py's arithmetic; a model that is not exactly that — a replaced
layer (LoRA), a hook, activation checkpointing, a subclass — runs on its own module path, which
stays the reference the kernels are tested against.
"""

from __future__ import annotations

import operator

import torch
import torch.nn as nn

from lmlab.models.gpt import GPT
from lmlab.models.layers import ACTIVATIONS

# The activations the C kernels compute, by GPTConfig.activation name (gpt_layout.h's enum).
GPT_ACTIVATIONS = {"gelu_new": 0, "gelu_pytorch_tanh": 0, "gelu": 1, "relu": 2}


def fp32_cpu_contiguous(tensor: torch.Tensor) -> bool:
    """What the kernels read a tensor as, through its address."""
    return tensor.is_cpu and tensor.dtype == torch.float32 and tensor.is_contiguous()


def _global_hooks() -> bool:
    module = torch.nn.modules.module
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


def stock_architecture(model: nn.Module) -> bool:
    """An lmlab GPT (not a subclass) whose every block is the plain one, with no hooks and
    fp32 CPU contiguous parameters in an activation the kernels compute."""
    if type(model) is not GPT or _global_hooks():
        return False
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return False
    for block in model.h:
        if "forward" in vars(block):  # replaced, e.g. by activation checkpointing
            return False
        parts = (block.ln_1, block.attn.c_attn, block.attn.c_proj, block.ln_2,
                 block.mlp.c_fc, block.mlp.c_proj)
        if tuple(map(type, parts)) != (nn.LayerNorm, nn.Linear, nn.Linear, nn.LayerNorm,
                                       nn.Linear, nn.Linear):
            return False
        if block.mlp.act is not ACTIVATIONS[model.config.activation]:
            return False
    return (type(model.ln_f) is nn.LayerNorm and type(model.lm_head) is nn.Linear
            and model.config.activation in GPT_ACTIVATIONS
            and all(map(fp32_cpu_contiguous, model.parameters())))


def block_tensors(block: nn.Module) -> tuple:
    """One block's twelve tensors in gpt_layout.h's order (biases None where absent)."""
    attn, mlp = block.attn, block.mlp
    return (block.ln_1.weight, block.ln_1.bias, attn.c_attn.weight, attn.c_attn.bias,
            attn.c_proj.weight, attn.c_proj.bias, block.ln_2.weight, block.ln_2.bias,
            mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias)


def dropout_active(model: GPT) -> bool:
    c = model.config
    return model.training and not c.embd_dropout == c.resid_dropout == c.attn_dropout == 0.0


def cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


class ModuleTree:
    """A module tree's structure as plain references — every module's children, parameters
    and hooks — to tell cheaply (dict lookups, no nn.Module.__getattr__) whether anything that
    decides a kernel's path has changed since: a replaced or added layer or parameter, a hook,
    a patched forward, parameters moved to another dtype, device or layout."""

    def __init__(self, root: nn.Module):
        self.modules = [(m, list(m._modules.values()), list(m._parameters.values()))
                        for m in root.modules()]
        self.parameters = [p for _, _, params in self.modules for p in params if p is not None]

    def unchanged(self) -> bool:
        if _global_hooks():
            return False
        for module, children, params in self.modules:
            if (module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__
                    or len(module._modules) != len(children)
                    or len(module._parameters) != len(params)
                    or not all(map(operator.is_, module._modules.values(), children))
                    or not all(map(operator.is_, module._parameters.values(), params))):
                return False
        return all(map(fp32_cpu_contiguous, self.parameters))
