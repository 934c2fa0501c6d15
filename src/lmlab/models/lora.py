"""LoRA (Hu et al., 2021) as a module swap: a targeted nn.Linear becomes a `LoRALinear` that keeps
the frozen base weight under the same names (`weight`, `bias`) and adds a trainable low-rank
update, output = x W^T + b + B(A(dropout(x))) * alpha / r.

Targets are named as PEFT names them — by the module names of the transformers model, matched
as PEFT matches them (a name's last component equals a target, or the full name ends with
"." + target) — so a `target_modules` list works the same here and in PEFT, and adapters move
between the two (models/hf/peft.py). Our names become transformers names through the family's
key map (models/hf), so nothing here knows a family's layout: BERT's fused `qkv` is HF's
`query`, `key` and `value`, and an adapter on one of those is an update of its third of the
fused output (`LoRAFusedLinear`), exactly what PEFT computes on the separate Linear.

    model = apply_lora(model, LoraConfig(r=8, target_modules=["c_attn"]))  # base frozen
    optimizer = torch.optim.AdamW(lora_parameters(model).values())
    merge_lora(model); unmerge_lora(model)   # fold the update in for speed; restore exactly
    model = remove_lora(model)               # a stock model again, with the update folded in
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import ConfigError
from lmlab.models.bert import BertForQuestionAnswering, BertForSequenceClassification
from lmlab.models.gpt import GPTForSequenceClassification
from lmlab.models.hf.records import KeyMap, record_for

# PEFT's default targets per model_type (its TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
DEFAULT_TARGETS = {"gpt2": ["c_attn"], "bert": ["query", "value"]}
# Task heads trained in full beside the adapters, as PEFT's modules_to_save for these task types
# (SEQ_CLS, QUESTION_ANS): a new head has nothing pretrained to adapt.
TRAINED_HEADS: dict[type[nn.Module], tuple[str, ...]] = {
    GPTForSequenceClassification: ("score",),
    BertForSequenceClassification: ("classifier",),
    BertForQuestionAnswering: ("qa_outputs",),
}


@dataclass
class LoraConfig:
    """The `lora:` block of a recipe config. `alpha` / `r` scales the update, so a change of rank
    keeps the update's size; `target_modules` are transformers module names (None: PEFT's
    default for the family — GPT-2 ["c_attn"], BERT ["query", "value"])."""

    r: int = 8  # the rank of the update
    alpha: float = 16  # the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapter's input
    target_modules: list[str] | None = None  # module names; None: the family's default

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"lora.r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not self.alpha > 0:
            raise ConfigError(f"lora.alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None:
            targets = self.target_modules
            if (isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not targets
                    or not all(isinstance(t, str) and t for t in targets)):
                raise ConfigError("lora.target_modules must be a non-empty list of module names "
                                  f"(e.g. ['c_attn']), got {targets!r}")
            self.target_modules = list(targets)


# -- the layers --------------------------------------------------------------------------------
def _adapter_pair(in_features: int, out_features: int, r: int,
                  like: torch.Tensor) -> tuple[nn.Linear, nn.Linear]:
    """(A, B) as PEFT initialises them: A kaiming-uniform (a=√5, nn.Linear's own init), B zero,
    so the update starts at exactly zero and training starts from the base model."""
    a = nn.Linear(in_features, r, bias=False, device=like.device, dtype=like.dtype)
    b = nn.Linear(r, out_features, bias=False, device=like.device, dtype=like.dtype)
    nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
    nn.init.zeros_(b.weight)
    return a, b


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()  # as PEFT: no dropout module at p=0


def _add_low_rank(out: torch.Tensor, low: torch.Tensor, b: torch.Tensor,
                  scaling: float) -> torch.Tensor:
    """out + scaling · low @ bᵀ in one addmm: (…, out) + (…, r) @ (r → out), without the two
    output-sized temporaries of `out + lora_B(low) * scaling` (for a fused layer's parts, which
    are strided views of its output and cannot be added to in place)."""
    flat = torch.addmm(out.reshape(-1, out.shape[-1]), low.reshape(-1, low.shape[-1]), b.t(),
                       alpha=scaling)
    return flat.view(out.shape)


class LoRALayer(nn.Module):
    """What both LoRA layers share: the frozen base weight and bias under nn.Linear's names
    (state-dict keys of the base model do not change), the scaling, and merging. Subclasses
    give the update (`update`) and its weight (`delta_weight`)."""

    def __init__(self, base: nn.Linear, *, r: int, alpha: float, dropout: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter objects: ties and optimizers still hold
        self.bias = base.bias
        self.r, self.alpha, self.dropout_p = r, alpha, dropout
        self.scaling = alpha / r
        self.merged = False

    def update(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The update as a weight (out, in): B @ A * scaling."""
        raise NotImplementedError

    def parts(self) -> dict[str, int]:
        """Each adapter's name below lora_A / lora_B ("" for the whole output) → the index of
        the output slice it updates (the module's transformers names, in key-map order)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out if self.merged else self.update(x, out)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the weight. The weight before is kept (a buffer, not saved), so
        that `unmerge` restores it bit for bit rather than by a rounding subtraction."""
        if self.merged:
            return
        self.register_buffer("weight_before_merge", self.weight.detach().clone(), persistent=False)
        self.weight.add_(self.delta_weight().to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight.copy_(self.weight_before_merge)
        del self.weight_before_merge
        self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding this layer's weight and bias Parameters as they are now."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"r={self.r}, alpha={self.alpha}, merged={self.merged}")


class LoRALinear(LoRALayer):
    """One adapter over the whole output: `lora_A` (in → r) and `lora_B` (r → out)."""

    def __init__(self, base: nn.Linear, *, r: int, alpha: float, dropout: float):
        super().__init__(base, r=r, alpha=alpha, dropout=dropout)
        self.lora_dropout = _dropout(dropout)
        self.lora_A, self.lora_B = _adapter_pair(self.in_features, self.out_features, r,
                                                 base.weight)

    def update(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # In place, into F.linear's fresh output (its backward does not need it): written as
        # `out + lora_B(low) * scaling`, two more output-sized tensors per adapted layer raised
        # a LoRA run's peak memory above full fine-tuning's (benchmarks/sft_speed.py --memory).
        low = self.lora_A(self.lora_dropout(x))
        out.view(-1, out.shape[-1]).addmm_(low.reshape(-1, low.shape[-1]), self.lora_B.weight.t(),
                                           alpha=self.scaling)
        return out

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B.weight @ self.lora_A.weight * self.scaling

    def parts(self) -> dict[str, int]:
        return {"": 0}


class LoRAFusedLinear(LoRALayer):
    """A Linear whose output is several transformers Linears concatenated (BERT's qkv is
    query, key, value), with an adapter of its own on each targeted part: `lora_A[part]`,
    `lora_B[part]` — what PEFT holds on the separate layers, computed on the fused one."""

    def __init__(self, base: nn.Linear, *, names: tuple[str, ...], targeted: tuple[str, ...],
                 r: int, alpha: float, dropout: float):
        super().__init__(base, r=r, alpha=alpha, dropout=dropout)
        if self.out_features % len(names):
            raise ValueError(f"{self.out_features} outputs do not split into parts {names}")
        self.names = names  # every part, in output order
        self.part_size = self.out_features // len(names)
        self.lora_dropout = nn.ModuleDict({p: _dropout(dropout) for p in targeted})
        pairs = {p: _adapter_pair(self.in_features, self.part_size, r, base.weight)
                 for p in targeted}
        self.lora_A = nn.ModuleDict({p: a for p, (a, _) in pairs.items()})
        self.lora_B = nn.ModuleDict({p: b for p, (_, b) in pairs.items()})

    def update(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        pieces = list(out.split(self.part_size, dim=-1))  # (…, part_size) per part
        for part, index in self.parts().items():
            low = self.lora_A[part](self.lora_dropout[part](x))
            pieces[index] = _add_low_rank(pieces[index], low, self.lora_B[part].weight,
                                          self.scaling)
        return torch.cat(pieces, dim=-1)

    def delta_weight(self) -> torch.Tensor:
        delta = self.weight.new_zeros(self.out_features, self.in_features)
        for part, index in self.parts().items():
            rows = slice(index * self.part_size, (index + 1) * self.part_size)
            delta[rows] = self.lora_B[part].weight @ self.lora_A[part].weight * self.scaling
        return delta

    def parts(self) -> dict[str, int]:
        return {part: self.names.index(part) for part in self.lora_A}


# -- model surgery -----------------------------------------------------------------------------
def _key_map(model: nn.Module) -> KeyMap:
    record = record_for(model)
    return next(record.key_maps[c] for c in type(model).__mro__ if c in record.key_maps)


def hf_module_names(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Our name of every Linear (plain or LoRA) → the transformers module names it stands for,
    by the family's key map: one name, or the parts of a fused weight in output order."""
    key_map = _key_map(model)
    names = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, LoRALayer)):
            probe = {f"{name}.weight": torch.empty(module.weight.shape, device="meta")}
            names[name] = tuple(k.removesuffix(".weight") for k in key_map.to_hf(probe))
    return names


def head_names(model: nn.Module) -> tuple[str, ...]:
    """The task head(s) `model` trains in full beside its adapters (PEFT's modules_to_save)."""
    return next((TRAINED_HEADS[c] for c in type(model).__mro__ if c in TRAINED_HEADS), ())


def matches(hf_name: str, target: str) -> bool:
    """PEFT's rule for a list of targets: the full name, or a suffix after a dot."""
    return hf_name == target or hf_name.endswith(f".{target}")


def _under(name: str, modules: tuple[str, ...]) -> bool:
    return any(name == m or name.startswith(f"{m}.") for m in modules)


def _tied_weights(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def adaptable_modules(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """`hf_module_names` less what is never adapted: the task head (trained in full, as PEFT
    never adapts a module in modules_to_save) and tied weights (a merge into lm_head would
    change the input embedding too)."""
    heads, tied = head_names(model), _tied_weights(model)
    return {name: parts for name, parts in hf_module_names(model).items()
            if not _under(name, heads) and id(model.get_submodule(name).weight) not in tied}


def _plan(model: nn.Module, targets: list[str]) -> dict[str, tuple[str, ...]]:
    """Our Linear name → the transformers names of its targeted parts; every target must match
    an adaptable module."""
    heads = head_names(model)
    hf_names, adaptable = hf_module_names(model), adaptable_modules(model)
    plan = {}
    for name, parts in adaptable.items():
        chosen = tuple(p for p in parts if any(matches(p, t) for t in targets))
        if chosen:
            plan[name] = chosen
    matched = {t for parts in plan.values() for p in parts for t in targets if matches(p, t)}
    unmatched = sorted(set(targets) - matched)  # sorted: PEFT writes its targets from a set
    if unmatched:
        named = []
        for target in unmatched:
            why = ""
            if any(matches(p, target) for name, parts in hf_names.items()
                   if _under(name, heads) for p in parts):
                why = " (the task head, trained in full as PEFT's modules_to_save)"
            elif any(matches(p, target) for parts in hf_names.values() for p in parts):
                why = " (its weight is tied to another's, which a merge would change too)"
            named.append(f"{target!r}{why}")
        available = sorted({_leaf(p) for parts in adaptable.values() for p in parts})
        raise ConfigError(f"lora.target_modules: {', '.join(named)} "
                          f"match{'es' if len(named) == 1 else ''} no adaptable Linear module of "
                          f"{type(model).__name__}; available: {', '.join(available)}")
    return plan


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Freeze every parameter of `model`, then swap each targeted Linear for a LoRA layer
    (trainable adapters) in place; the task head of a classifier stays trainable. Returns
    `model`. Every target is checked before anything changes."""
    if lora_modules(model):
        raise ConfigError(f"{type(model).__name__} already has LoRA adapters; "
                          "remove_lora(model) first to apply another configuration")
    targets = cfg.target_modules
    if targets is None:
        record = record_for(model)
        if record.model_type not in DEFAULT_TARGETS:
            raise ConfigError(f"lora.target_modules: no default for {record.model_type!r} "
                              "models; name the modules to adapt")
        targets = DEFAULT_TARGETS[record.model_type]
    plan = _plan(model, targets)
    hf_names = hf_module_names(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, chosen in plan.items():
        base = model.get_submodule(name)
        if len(hf_names[name]) == 1:
            layer: LoRALayer = LoRALinear(base, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout)
        else:  # a fused weight: its parts by their last name component (query, key, value)
            layer = LoRAFusedLinear(base, names=tuple(_leaf(p) for p in hf_names[name]),
                                    targeted=tuple(_leaf(p) for p in chosen),
                                    r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout)
        _set_submodule(model, name, layer)
    for p in lora_parameters(model).values():
        p.requires_grad_(True)
    return model


def _leaf(name: str) -> str:
    return name.rpartition(".")[2]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def lora_modules(model: nn.Module) -> dict[str, LoRALayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def _adapter_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, module in lora_modules(model).items():
        for leaf, p in module.named_parameters():
            if leaf not in ("weight", "bias"):
                yield f"{name}.{leaf}", p
    for head in head_names(model):
        for leaf, p in model.get_submodule(head).named_parameters():
            yield f"{head}.{leaf}", p


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters LoRA trains, by our state-dict names: every adapter's A and B, plus the
    task head of a classifier (empty for a model without adapters)."""
    if not lora_modules(model):
        return {}
    return dict(_adapter_named_parameters(model))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`lora_parameters` as detached tensors: what an adapter checkpoint holds."""
    return {name: p.detach() for name, p in lora_parameters(model).items()}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every update into its base weight (the forward pass then is the base path alone:
    no extra matmuls when decoding). `unmerge_lora` undoes it exactly."""
    for module in lora_modules(model).values():
        module.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for module in lora_modules(model).values():
        module.unmerge()
    return model


def remove_lora(model: nn.Module, *, merge: bool = True) -> nn.Module:
    """Swap every LoRA layer back to a plain nn.Linear in place — with the update merged into
    its weight (default), or discarded (`merge=False`: the base model as it was) — and make
    every parameter trainable again, as in a freshly built model. The result is a stock model:
    it saves as a plain checkpoint, and the CPU kernels apply to it again."""
    for name, module in lora_modules(model).items():
        if merge:
            module.merge()
        else:
            module.unmerge()
        _set_submodule(model, name, module.to_linear())
    for p in model.parameters():
        p.requires_grad_(True)
    return model
