"""Hugging Face checkpoint interop as data: the record types, and the registry of families.

A family (GPT-2, BERT, …) is one `FamilyRecord`, in a module of its own beside this one: its
config tables, the architectures it builds, one `KeyMap` per model class (our state-dict names ↔
HF names: prefixes, transposes, fused tensors, legacy names, skipped buffers) and its tied
weights. The generic reading and writing (checkpoints.py) dispatches through `RECORDS` only, so a
new family is one new module with one `register_family(...)` call, imported by __init__.py.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmlab.errors import CheckpointError

State = dict[str, torch.Tensor]


# -- the record types --------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyMap:
    """Our state-dict names ↔ the names of one HF model class, tensor by tensor, so a partial
    state dict (an adapter's few weights) converts exactly as a whole one does."""

    # (our prefix, HF prefix): the first rule whose prefix matches renames a name; a name that no
    # rule matches is the same on both sides.
    prefixes: tuple[tuple[str, str], ...] = ()
    # Name suffixes of weights HF stores transposed: (in, out), where nn.Linear stores (out, in).
    transposed: tuple[str, ...] = ()
    # (our module suffix, its HF module suffixes): our one tensor is HF's tensors concatenated
    # along dim 0 (BERT's qkv is query, key and value).
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # (old HF suffix, current HF suffix): renamed when reading old checkpoints.
    legacy: tuple[tuple[str, str], ...] = ()
    # HF name suffixes never read: recomputed buffers and aliases of tied weights.
    skipped: tuple[str, ...] = ()

    def to_hf(self, state: State) -> State:
        out = {}
        for name, tensor in state.items():
            if name.endswith(self.transposed):
                tensor = tensor.t()
            for part, piece in self._split(name, tensor):
                out[_rename(part, self.prefixes, to_hf=True)] = piece.contiguous()
        return out

    def from_hf(self, hf_state: State, where: str) -> State:
        """Our names and layouts; `where` (the file) names a fused tensor that lacks a part."""
        out, pieces = {}, {}
        for name, tensor in hf_state.items():
            for old, new in self.legacy:
                if name.endswith(old):
                    name = name[: -len(old)] + new
            if name.endswith(self.skipped):
                continue
            name = _rename(name, self.prefixes, to_hf=False)
            stem, _, kind = name.rpartition(".")
            site = next(((stem[: -len(part)], ours, theirs, kind, part)
                         for ours, theirs in self.fused for part in theirs if stem.endswith(part)),
                        None)
            if site is None:
                out[name] = self._untranspose(name, tensor)
            else:  # one part of a fused tensor: gathered, concatenated below
                pieces.setdefault(site[:4], {})[site[4]] = tensor
        for (base, ours, theirs, kind), parts in pieces.items():
            missing = [part for part in theirs if part not in parts]
            if missing:
                hf_name = _rename(f"{base}{missing[0]}.{kind}", self.prefixes, to_hf=True)
                raise CheckpointError(f"{where}: {hf_name} is missing")
            name = f"{base}{ours}.{kind}"
            out[name] = self._untranspose(name, torch.cat([parts[p] for p in theirs], dim=0))
        return out

    def _split(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        stem, _, kind = name.rpartition(".")
        for ours, theirs in self.fused:
            if stem.endswith(ours):
                base = stem[: -len(ours)]
                return [(f"{base}{part}.{kind}", piece)
                        for part, piece in zip(theirs, tensor.chunk(len(theirs), dim=0))]
        return [(name, tensor)]

    def _untranspose(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        # Copied, not a transposed view: nn.Linear's (out, in) rows contiguous, as a model built
        # here has them — the decoding kernels stream those rows.
        return tensor.t().contiguous() if name.endswith(self.transposed) else tensor


def _rename(name: str, prefixes: tuple[tuple[str, str], ...], *, to_hf: bool) -> str:
    for ours, theirs in prefixes:
        old, new = (ours, theirs) if to_hf else (theirs, ours)
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _no_ties(config: Any) -> dict[str, str]:
    return {}


def _build(cls: type[nn.Module], config: Any, checkpoint_names: Iterable[str]) -> nn.Module:
    return cls(config)


@dataclass(frozen=True)
class FamilyRecord:
    """Everything lmlab needs to read and write one Hugging Face model family."""

    model_type: str  # config.json's model_type
    architectures: dict[str, type[nn.Module]]  # HF architecture name → our class
    default: str  # the architecture built when config.json names none
    key_maps: dict[type[nn.Module], KeyMap]  # our class → its names in HF checkpoints
    # (hf config dict, where, *, cls, overrides) → our config; errors name `where`.
    config_from_hf: Callable[..., Any]
    # model → config.json, less architectures, model_type and dtype (the generic code adds them).
    config_to_hf: Callable[[nn.Module], dict[str, Any]]
    # our config → {tied weight: the weight it shares}, both our names: never written twice,
    # never read (transformers re-ties them too), re-tied after loading.
    tied: Callable[[Any], dict[str, str]] = _no_ties
    base_model_prefix: str = ""  # where task models hold the base model (transformers' name)
    encoder: tuple[str, ...] = ()  # base-model modules that load_encoder requires complete
    # (cls, config, the checkpoint's names in ours) → the model, e.g. without a part the
    # checkpoint lacks.
    build: Callable[..., nn.Module] = _build
    # (state, config) → the state plus what the HF layout always has and our model may lack.
    complete_state: Callable[[State, Any], State] | None = None
    unlisted: type[nn.Module] | None = None  # built for an unlisted architecture (None: error)
    unsupported_hint: str = ""  # appended to the error for an unlisted architecture

    def model_class(self, hf: dict[str, Any], where: str) -> type[nn.Module]:
        name = (hf.get("architectures") or [self.default])[0]
        cls = self.architectures.get(name, self.unlisted)
        if cls is None:
            raise CheckpointError(f"{where}: architecture {name!r} is not supported (lmlab loads "
                                  f"{', '.join(self.architectures)}){self.unsupported_hint}")
        return cls

    def architecture_name(self, cls: type[nn.Module]) -> str:
        return next(name for name, listed in self.architectures.items() if listed is cls)


# model_type → record; filled by register_family below, one call per family.
RECORDS: dict[str, FamilyRecord] = {}


def register_family(record: FamilyRecord) -> FamilyRecord:
    if record.model_type in RECORDS:
        raise ValueError(f"model_type {record.model_type!r} is already registered")
    unmapped = [c.__name__ for c in record.architectures.values() if c not in record.key_maps]
    if unmapped or record.default not in record.architectures:
        raise ValueError(f"record {record.model_type!r}: default {record.default!r} must be an "
                         f"architecture and every class needs a key map (missing: {unmapped})")
    RECORDS[record.model_type] = record
    return record


def _lookup(model: nn.Module | type) -> tuple[FamilyRecord, type[nn.Module]]:
    """The record that lists `model`'s class (or a base class of it), and that class."""
    cls = model if isinstance(model, type) else type(model)
    for base in cls.__mro__:
        for record in RECORDS.values():
            if base in record.key_maps:
                return record, base
    raise TypeError(f"cannot convert a {cls.__name__} to the Hugging Face layout: no record in "
                    f"RECORDS ({', '.join(sorted(RECORDS))}) lists its class")


def record_for(model: nn.Module | type) -> FamilyRecord:
    return _lookup(model)[0]


# -- config tables shared by the families ------------------------------------------------------
# Keys that do not change the forward pass in fp32 (heads of other classes, bookkeeping).
# reorder_and_upcast_attn only changes the precision of GPT-2's fp16 attention.
HF_IGNORED_KEYS = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "use_cache",
    "n_ctx", "summary_activation", "summary_first_dropout", "summary_proj_to_labels",
    "summary_type", "summary_use_proj", "task_specific_params", "_name_or_path",
    "reorder_and_upcast_attn", "return_dict", "output_hidden_states", "output_attentions",
    "id2label", "label2id", "problem_type", "tokenizer_class", "prefix", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "sep_token_id", "decoder_start_token_id",
    "finetuning_task", "gradient_checkpointing",
}


def config_values(hf: dict[str, Any], where: str, *, keys: dict[str, str],
                  required: dict[str, Any], ignored: set[str],
                  config_cls: type | None = None) -> dict[str, Any]:
    """Our config fields from an HF config.json, by a family's tables: `keys` maps HF key → our
    field; a `required` key must hold its one supported value; any key in neither table nor
    `ignored` is an error — an option lmlab does not implement is never silently dropped. With
    `config_cls` (our config dataclass), each value must be of its field's type."""
    types = typing.get_type_hints(config_cls) if config_cls is not None else {}
    values = {}
    for key, value in hf.items():
        if key in keys:
            expected = types.get(keys[key])
            if expected is not None and not _has_type(value, expected):
                raise CheckpointError(f"{where}: '{key}' must be {_type_name(expected)}, got "
                                      f"{json.dumps(value)}")
            values[keys[key]] = value
        elif key in required:
            if value != required[key]:
                raise CheckpointError(
                    f"{where}: '{key}': {json.dumps(value)} is not supported by lmlab "
                    f"(only {json.dumps(required[key])})"
                )
        elif key not in ignored:
            raise CheckpointError(f"{where}: config option '{key}' is not supported by lmlab")
    return values


def _has_type(value: Any, expected: Any) -> bool:
    """Whether a JSON value fits a config field's annotation (int, float, bool, str, X | None,
    list[...]); a float field takes an int, as JSON writes 1.0 as 1; no field takes a bool
    for a number."""
    if isinstance(expected, types.UnionType) or typing.get_origin(expected) is typing.Union:
        return any(_has_type(value, arm) for arm in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin = typing.get_origin(expected)
    if origin is not None:  # list[str] and the like: the shape, not the items
        return isinstance(value, origin)
    return isinstance(value, expected) if isinstance(expected, type) else True


def _type_name(expected: Any) -> str:
    if isinstance(expected, types.UnionType) or typing.get_origin(expected) is typing.Union:
        return " or ".join(_type_name(arm) for arm in typing.get_args(expected))
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
             type(None): "null"}
    return names.get(expected, "a list" if typing.get_origin(expected) is list else str(expected))


def labels_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """{"id2label": [names in id order]} from config.json's id2label, else {"num_labels": n}."""
    id2label = hf.get("id2label")
    if isinstance(id2label, dict) and id2label:
        try:
            return {"id2label": [id2label[k] for k in sorted(id2label, key=int)]}
        except ValueError:
            raise CheckpointError(f"{where}: id2label keys must be integers, "
                                  f"got {sorted(id2label)}") from None
    if isinstance(hf.get("num_labels"), int):
        return {"num_labels": hf["num_labels"]}
    return {}


def labels_to_hf(labels: list[str]) -> dict[str, Any]:
    return {"id2label": {str(i): label for i, label in enumerate(labels)},
            "label2id": {label: i for i, label in enumerate(labels)}}
