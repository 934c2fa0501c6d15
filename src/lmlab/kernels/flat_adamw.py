"""AdamW for one process on the CPU, over parameters laid out in one buffer.

On a CPU a small model's update is dominated by per-tensor cost, not arithmetic: torch's fused
AdamW kernel and gradient clipping run one parallel region per tensor (a 0.8M-parameter GPT
has 50 tensors: ~1.4 ms for AdamW and ~1.1 ms for clipping in a ~24 ms step). When the
parameters lie back to back in one buffer (`flatten_parameters`), and so do their gradients
(the C training step lays gradients out in the parameters' memory order) and the optimizer
state, one call of the same fused kernel updates a whole group, and clipping is one norm whose
scaling that kernel applies as it reads the gradients: ~0.7 + ~0.2 ms.

Part of the CPU speed layer: `lmlab.training.optim.build_optimizer` uses it where the rule of
lmlab/kernels/__init__.py says so; DDP, FSDP and GPUs keep torch.optim.AdamW.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor


def flatten_parameters(params: list[torch.nn.Parameter]) -> Tensor | None:
    """Move the parameters' data into one new buffer, back to back in the order given; return
    the buffer (None when they differ in device or dtype, and nothing moves). The Parameter
    objects stay the same — module attributes, ties, names and `requires_grad` are untouched —
    only the memory under them changes, values included exactly."""
    params = list({id(p): p for p in params}.values())
    if not params or any(p.device != params[0].device or p.dtype != params[0].dtype
                         for p in params):
        return None
    buffer = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype,
                         device=params[0].device)
    offset = 0
    with torch.no_grad():
        for p in params:
            view = buffer[offset:offset + p.numel()].view(p.shape)
            view.copy_(p)
            p.data = view
            offset += p.numel()
    return buffer


_PLAIN = (Tensor, torch.nn.Parameter)


def contiguous_span(tensors: list[Tensor]) -> Tensor | None:
    """A 1-D tensor over exactly the memory of `tensors` when they lie back to back, in this
    order, in one storage (each contiguous); None otherwise. Writing to it writes to them."""
    if not tensors or any(type(t) not in _PLAIN for t in tensors):  # e.g. FSDP's DTensors
        return None
    first = tensors[0]
    storage, end = first.untyped_storage().data_ptr(), first.data_ptr()
    for t in tensors:
        if (t.data_ptr() != end or t.numel() == 0 or not t.is_contiguous()
                or t.dtype != first.dtype or t.device != first.device
                or t.untyped_storage().data_ptr() != storage):
            return None
        end += t.numel() * t.element_size()
    count = (end - first.data_ptr()) // first.element_size()
    return first.detach().as_strided((count,), (1,), first.storage_offset())


class FlatAdamW:
    """AdamW for one process on the CPU, with the parameters laid out in one buffer.

    The arithmetic is torch's: the fused AdamW kernel that torch.optim.AdamW(fused=True) calls
    (`torch._fused_adamw_`), given each group as one span of parameters, gradients and state
    when the gradients lie back to back (as the C training step leaves them), else the
    parameters that have gradients as a list (what torch.optim does). Not torch.optim.AdamW
    itself because torch.optim's first use imports torch._dynamo, ~1.6 s of the ~50 s
    Shakespeare recipe, for compilation support that an eager CPU run does not use.

    The interface the loop and checkpoints use is torch's: `param_groups` (dicts with torch's
    keys; the loop sets "lr"), `state` (per parameter "step", "exp_avg", "exp_avg_sq"),
    `step()`, `zero_grad()`, and `state_dict()` / `load_state_dict()` in torch.optim.AdamW's
    format, so that each loads the other's state (a run resumed under torchrun, or the reverse).
    """

    _DEFAULTS = dict(amsgrad=False, foreach=None, maximize=False, capturable=False,
                     differentiable=False, fused=True, decoupled_weight_decay=True)

    def __init__(self, groups: list[dict], *, lr: float, betas: tuple[float, float],
                 eps: float = 1e-8):
        self.param_groups = [{"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": 0.0,
                              **self._DEFAULTS, **g, "params": list(g["params"])} for g in groups]
        params = self._parameters()
        if len({id(p) for p in params}) != len(params):
            raise ValueError("FlatAdamW: a parameter appears more than once")
        if any(p.device.type != "cpu" or not p.is_floating_point() or p.dtype != params[0].dtype
               for p in params):
            raise ValueError("FlatAdamW: expected CPU parameters of one floating dtype")
        flatten_parameters(params)
        self.state: dict[Tensor, dict[str, Tensor]] = {}  # created on the first step, as torch
        # per group: exp_avg, exp_avg_sq, steps
        self._buffers: list[tuple[Tensor, Tensor, Tensor]] = []
        self._grad_scale: Tensor | None = None  # a clipping left to the next step

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor | None:
        """The joint 2-norm of the gradients, and clipping to `max_norm` (torch's coefficient,
        max_norm / (norm + 1e-6) when below 1) applied by the next `step()` as it reads them;
        None, and nothing done, when the gradients do not lie back to back."""
        grads = sorted((p.grad for p in self._parameters() if p.grad is not None),
                       key=Tensor.data_ptr)
        flat = contiguous_span(grads)
        if flat is None:
            return None
        norm = torch.linalg.vector_norm(flat)
        value = float(norm)  # on the CPU: no device to wait for
        coefficient = max_norm / (value + 1e-6)
        # the kernel divides by the scale; a non-finite norm's step is skipped by the caller
        self._grad_scale = (torch.tensor(1.0 / coefficient, dtype=torch.float32)
                            if math.isfinite(value) and coefficient < 1.0 else None)
        return norm

    def _parameters(self) -> list[Tensor]:
        """Every parameter, groups in order: torch's positions in a state dict."""
        return [p for g in self.param_groups for p in g["params"]]

    def _create_state(self) -> None:
        """Zero state, each kind one buffer per group that mirrors the parameters' layout."""
        self._buffers = []
        for group in self.param_groups:
            params = group["params"]
            dtype = params[0].dtype if params else torch.float32
            exp_avg = torch.zeros(sum(p.numel() for p in params), dtype=dtype)
            exp_avg_sq = torch.zeros_like(exp_avg)
            steps = torch.zeros(len(params), dtype=torch.float32)  # torch's dtype for fused
            offset = 0
            for i, p in enumerate(params):
                part = slice(offset, offset + p.numel())
                self.state[p] = {"step": steps[i], "exp_avg": exp_avg[part].view(p.shape),
                                 "exp_avg_sq": exp_avg_sq[part].view(p.shape)}
                offset += p.numel()
            self._buffers.append((exp_avg, exp_avg_sq, steps))

    @torch.no_grad()
    def step(self) -> None:
        if not self._buffers:
            self._create_state()
        grad_scale, self._grad_scale = self._grad_scale, None
        for group, (exp_avg, exp_avg_sq, steps) in zip(self.param_groups, self._buffers):
            params = group["params"]
            present = [i for i, p in enumerate(params) if p.grad is not None]
            if not present:
                continue
            beta1, beta2 = group["betas"]
            kernel = functools.partial(
                torch._fused_adamw_, amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2,
                weight_decay=group["weight_decay"], eps=group["eps"],
                maximize=group["maximize"], grad_scale=grad_scale, found_inf=None)
            if len(present) == len(params):
                flat_params = contiguous_span(params)
                flat_grads = contiguous_span([p.grad for p in params])
                # one step count for all: true unless some parameter once had no gradient
                if (flat_params is not None and flat_grads is not None
                        and bool((steps == steps[0]).all())):
                    steps.add_(1)
                    kernel([flat_params], [flat_grads], [exp_avg], [exp_avg_sq], [], [steps[0]])
                    continue
            states = [self.state[params[i]] for i in present]
            counts = [s["step"] for s in states]
            torch._foreach_add_(counts, 1)
            kernel([params[i] for i in present], [params[i].grad for i in present],
                   [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [], counts)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._grad_scale = None  # a clipping of gradients that are gone
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.AdamW's layout: parameters by position, groups in order."""
        position = {id(p): i for i, p in enumerate(self._parameters())}
        groups, first = [], 0
        for g in self.param_groups:
            groups.append({**{k: v for k, v in g.items() if k != "params"},
                           "params": list(range(first, first + len(g["params"])))})
            first += len(g["params"])
        return {"state": {position[id(p)]: dict(s) for p, s in self.state.items()},
                "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load `state_dict()` of this class or of torch.optim.AdamW (Adam's update rule with
        amsgrad is not supported) over the same parameter groups."""
        saved = state_dict["param_groups"]
        if [len(g["params"]) for g in saved] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("optimizer state: its parameter groups do not match this "
                             f"optimizer's ({[len(g['params']) for g in saved]} parameters per "
                             f"group, expected {[len(g['params']) for g in self.param_groups]})")
        if any(g.get("amsgrad") or not g.get("decoupled_weight_decay", True) for g in saved):
            raise ValueError("optimizer state: amsgrad or Adam's coupled weight decay is not "
                             "supported by FlatAdamW")
        for group, old in zip(self.param_groups, saved):
            for key in ("lr", "betas", "eps", "weight_decay", "maximize"):
                if key in old:
                    group[key] = tuple(old[key]) if key == "betas" else old[key]
        self.state, self._buffers = {}, []
        if not state_dict["state"]:
            return
        self._create_state()  # a parameter without saved state starts from zero, as in torch
        params = self._parameters()
        with torch.no_grad():
            for index, values in state_dict["state"].items():
                for key, target in self.state[params[int(index)]].items():
                    target.copy_(torch.as_tensor(values[key]))
