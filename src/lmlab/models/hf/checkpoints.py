"""Reading and writing Hugging Face-layout checkpoints, for any family in `RECORDS`.

A checkpoint directory holds `config.json` (the only source of truth about the model) and
`model.safetensors` (or a sharded index, or a legacy `pytorch_model.bin`, read with
`weights_only=True` so that no pickled code ever runs). lmlab saves exactly this layout, so an
lmlab checkpoint *is* a Hugging Face checkpoint. Nothing here knows a family: it dispatches
through the records (records.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lmlab.errors import CheckpointError, ConfigError
from lmlab.fileio import atomic_path, atomic_write_bytes
from lmlab.models.hf.records import RECORDS, FamilyRecord, State, _lookup, record_for

log = logging.getLogger(__name__)


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory; expected a model directory "
                              "with config.json")
    if not path.is_file():
        raise CheckpointError(
            f"{directory}: no config.json; expected a model directory "
            "(config.json + model.safetensors, as written by save_pretrained)"
        )
    return read_json_object(path)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding one object (config.json, adapter_config.json); anything else is a
    CheckpointError naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def read_state_dict(directory: Path) -> State:
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    legacy = directory / "pytorch_model.bin"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str)
                                                       for v in weight_map.values()):
            raise CheckpointError(f"{index}: expected a 'weight_map' object of weight name → "
                                  "shard file name")
        files = [directory / name for name in sorted(set(weight_map.values()))]
    elif legacy.is_file():
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # noqa: BLE001 — any unpickling failure means a bad file
            raise CheckpointError(f"{legacy}: cannot be read safely ({err})") from None
    else:
        raise CheckpointError(
            f"{directory}: no model.safetensors (or pytorch_model.bin) beside config.json"
        )
    state = {}
    for file in files:
        state.update(_read_safetensors(file))
    return state


def _read_safetensors(file: Path) -> State:
    try:
        with safe_open(file, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (OSError, RuntimeError, ValueError, SafetensorError) as err:
        # SafetensorError ("incomplete metadata", "header too large"): truncated or not one
        raise CheckpointError(f"{file}: not a readable safetensors file ({err}); expected the "
                              "complete file save_pretrained writes") from None


def _record_for_config(hf: dict[str, Any], where: str) -> FamilyRecord:
    model_type = hf.get("model_type")
    if model_type not in RECORDS:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported "
                              f"(lmlab loads: {', '.join(sorted(RECORDS))})")
    return RECORDS[model_type]


def _align_base_prefix(state: State, expected: Iterable[str], prefix: str) -> State:
    """A base-model checkpoint names its weights `embeddings.…`, a task model
    `bert.embeddings.…`: rename the checkpoint's weights as the model expects (as transformers
    does with base_model_prefix)."""
    if not prefix:
        return state
    expected = set(expected)
    out = {}
    for name, tensor in state.items():
        if name not in expected:
            if f"{prefix}.{name}" in expected:
                name = f"{prefix}.{name}"
            elif name.startswith(f"{prefix}.") and name[len(prefix) + 1:] in expected:
                name = name[len(prefix) + 1:]
        out[name] = tensor
    return out


def _ties(record: FamilyRecord, model: nn.Module, expected: Iterable[str]) -> dict[str, str]:
    """The model's tied weights that it really has (a classifier has no lm_head to tie)."""
    return {name: source for name, source in record.tied(model.config).items() if name in expected}


def _shown(names: list[str]) -> str:
    return f"{names[:5]}{' …' if len(names) > 5 else ''}"


def load(directory: Path, hf_config: dict[str, Any], *, dtype: torch.dtype = torch.float32,
         device=None) -> nn.Module:
    """The model a checkpoint directory holds: built on `meta` (no memory, no init: the checkpoint
    fills every weight), then loaded strictly with shape checks."""
    where = str(directory / "config.json")
    record = _record_for_config(hf_config, where)
    cls = record.model_class(hf_config, where)
    config = record.config_from_hf(hf_config, where, cls=cls, overrides={})
    state = record.key_maps[cls].from_hf(read_state_dict(directory), str(directory))
    with torch.device("meta"):
        model = record.build(cls, config, state.keys())
    expected = model.state_dict(keep_vars=True)
    state = _align_base_prefix(state, expected, record.base_model_prefix)
    ties = _ties(record, model, expected)
    for name in ties:
        expected.pop(name)
        state.pop(name, None)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = ([f"missing weights {_shown(missing)}"] if missing else []) + \
                ([f"unexpected weights {_shown(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{directory}: " + "; ".join(parts))
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{directory}: weight '{key}' has shape {tuple(tensor.shape)}, "
                                  f"config.json implies {tuple(expected[key].shape)}")
        state[key] = tensor.to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    _retie(model, ties)
    return model.to(device or "cpu").eval()


def _retie(model: nn.Module, ties: dict[str, str]) -> None:
    # assign=True gave the source weight a new Parameter; the tied name must share it again.
    for name, source in ties.items():
        module, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(module), leaf, model.get_parameter(source))


def from_pretrained(path, *, dtype: torch.dtype = torch.float32, device=None) -> nn.Module:
    """Load a model from a Hugging Face-layout directory (any family in RECORDS)."""
    directory = Path(path)
    return load(directory, read_config(directory), dtype=dtype, device=device)


def load_encoder(cls: type[nn.Module], directory: Path, overrides: dict[str, Any]) -> nn.Module:
    """`cls` built on the checkpoint's config (plus `overrides`, e.g. id2label), filled with every
    checkpoint weight whose name and shape it shares; the encoder (the record's `encoder`
    modules) must be complete. Weights the checkpoint lacks (a new head) stay freshly
    initialised."""
    record = record_for(cls)
    hf_config = read_config(directory)
    where = str(directory / "config.json")
    if hf_config.get("model_type") != record.model_type:
        raise CheckpointError(f"{where}: model_type {hf_config.get('model_type')!r}; expected a "
                              f"{record.model_type} checkpoint")
    model = cls(record.config_from_hf(hf_config, where, cls=cls, overrides=overrides))
    # The checkpoint's names are those of its own architecture, whichever lmlab class loads it.
    name = (hf_config.get("architectures") or [record.default])[0]
    source = record.architectures.get(name, record.unlisted) or cls
    state = record.key_maps[source].from_hf(read_state_dict(directory), str(directory))
    expected = model.state_dict()
    state = _align_base_prefix(state, expected, record.base_model_prefix)
    usable = {k: v for k, v in state.items() if k in expected and v.shape == expected[k].shape}
    prefix = f"{record.base_model_prefix}."
    encoder = [k for k in expected
               if (k[len(prefix):] if k.startswith(prefix) else k).split(".")[0] in record.encoder]
    missing = [k for k in encoder if k not in usable]
    if missing:
        raise CheckpointError(f"{directory}: encoder weights missing or of another shape: "
                              f"{_shown(missing)}")
    model.load_state_dict(usable, strict=False)
    fresh = sorted(set(expected) - set(usable))
    if fresh:
        log.info("%s: newly initialised (not in %s): %s", cls.__name__, directory, ", ".join(fresh))
    return model.float()


def state_to_hf(model: nn.Module, state: State) -> State:
    """HF names and layouts of `state` — all of `model.state_dict()` or any subset of it — key
    by key through the model's family record; a tied weight is written once, under the weight
    it shares, as transformers writes it."""
    record, cls = _lookup(model)
    ties = record.tied(model.config)
    return record.key_maps[cls].to_hf({ties.get(name, name): t for name, t in state.items()})


def to_hf(model: nn.Module) -> tuple[dict[str, Any], State]:
    """(config.json dict, HF-named fp32 state dict) for any lmlab model in RECORDS."""
    record, cls = _lookup(model)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    if record.complete_state is not None:
        state = record.complete_state(state, model.config)
    hf_config = {**record.config_to_hf(model), "architectures": [record.architecture_name(cls)],
                 "model_type": record.model_type, "dtype": "float32"}
    return hf_config, state_to_hf(model, state)


def save_pretrained(model: nn.Module, directory, *, tokenizer=None) -> None:
    if any(".lora_A" in name for name, _ in model.named_modules()):
        # A full checkpoint with adapter weights in it would be neither transformers' model nor
        # PEFT's adapter.
        raise ConfigError(f"{type(model).__name__} has LoRA adapters: save them with "
                          "lmlab.models.hf.peft.save_adapter, or merge them first "
                          "(lmlab.models.lora.remove_lora)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_config, hf_state = to_hf(model)
    # Weights first, config last: a directory whose config.json exists is a complete checkpoint.
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(hf_state, tmp, metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    config = json.dumps(hf_config, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(directory / "config.json", config.encode())


# -- a subset of the weights (adapters) --------------------------------------------------------
def save_weights(model: nn.Module, path, *, names: Iterable[str] | None = None) -> None:
    """Write the weights `names` (ours, as in `model.state_dict()`; all when None) to one
    safetensors file under the names transformers uses, atomically. Dtypes are kept."""
    state = model.state_dict()
    if names is not None:
        names = list(names)
        unknown = [name for name in names if name not in state]
        if unknown:
            raise ConfigError(f"save_weights: {_shown(unknown)} are not weights of "
                              f"{type(model).__name__}; expected names of model.state_dict()")
        state = {name: state[name] for name in names}
    hf_state = state_to_hf(model, {k: v.detach().to("cpu") for k, v in state.items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(hf_state, tmp, metadata={"format": "pt"})


def load_weights(model: nn.Module, path, *, strict: bool = False) -> list[str]:
    """Copy the tensors of an HF-named safetensors file (a subset such as save_weights writes,
    or all) into `model` in place, through its family's key map; returns the names (ours)
    loaded. Every tensor must be a weight of `model` of the same shape; with `strict`, every
    weight of `model` must be in the file."""
    path = Path(path)
    record, cls = _lookup(model)
    key_map = record.key_maps[cls]
    state = key_map.from_hf(_read_safetensors(path), str(path))
    expected = model.state_dict()
    state = _align_base_prefix(state, expected, record.base_model_prefix)
    ties = _ties(record, model, expected)
    for name in ties:  # an alias of the weight it shares, which the file must name instead
        state.pop(name, None)
    unknown = sorted(set(state) - set(expected))
    if unknown:
        hf_names = sorted(key_map.to_hf({name: state[name] for name in unknown}))
        raise CheckpointError(f"{path}: {_shown(hf_names)} are not weights of {cls.__name__}")
    missing = sorted(set(expected) - set(state) - set(ties))
    if strict and missing:
        raise CheckpointError(f"{path}: missing weights {_shown(missing)} (strict=True)")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(f"{path}: weight '{key}' has shape {tuple(tensor.shape)}, "
                                  f"the model's is {tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=False)
    return sorted(state)
