"""LoRA adapters in PEFT's on-disk format: a directory with `adapter_config.json` and
`adapter_model.safetensors`, which `peft.PeftModel.from_pretrained(transformers_model, dir)`
loads, and which lmlab loads from PEFT.

The format is data about names: PEFT's key of an adapter weight is "base_model.model." + the
transformers module name + ".lora_A.weight" (or lora_B), and a task head trained in full
(modules_to_save) is saved under its plain transformers name. Our names become transformers
names through the family's key map (records.py), so BERT's fused qkv adapters are saved as
PEFT's `query`, `key` and `value` adapters. GPT-2's Conv1D layout does not matter here: PEFT's
A is (r, in) and B (out, r) whatever the base layer's layout (fan_in_fan_out only tells it how
to merge).

Only safetensors is read: a pickled adapter_model.bin could run code on load.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from lmlab.errors import CheckpointError, ConfigError
from lmlab.fileio import atomic_write_bytes
from lmlab.models.bert import (
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
)
from lmlab.models.gpt import GPT, GPTForSequenceClassification
from lmlab.models.hf.checkpoints import read_json_object, state_to_hf
from lmlab.models.hf.records import _lookup
from lmlab.models.lora import (
    LoraConfig,
    adaptable_modules,
    apply_lora,
    head_names,
    hf_module_names,
    lora_modules,
    lora_parameters,
    matches,
    remove_lora,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel).model (the transformers model)
# PEFT's task_type per model class (it picks PeftModel's subclass and the default
# modules_to_save); a class not listed is saved with task_type null, as a plain PeftModel.
TASK_TYPES: dict[type[nn.Module], str] = {
    GPT: "CAUSAL_LM",
    GPTForSequenceClassification: "SEQ_CLS",
    BertModel: "FEATURE_EXTRACTION",
    BertForSequenceClassification: "SEQ_CLS",
    BertForQuestionAnswering: "QUESTION_ANS",
}
# PEFT's defaults for keys an adapter_config.json may leave out (its LoraConfig's).
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": None}
# Options that change what an adapter computes, with the one value lmlab implements (a key that
# is absent or null means PEFT's default, which is that value too).
PLAIN_LORA = {
    "bias": "none", "use_rslora": False, "use_dora": False, "lora_bias": False,
    "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
    "layer_replication": None, "exclude_modules": None, "target_parameters": None,
    "trainable_token_indices": None, "use_qalora": False, "alora_invocation_tokens": None,
}
# Initialisations that also change the base weights: such an adapter is relative to a base
# model that no checkpoint holds, unless PEFT converted it when saving (init_lora_weights true).
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


# -- names -------------------------------------------------------------------------------------
def peft_key_names(model: nn.Module) -> dict[str, str]:
    """Our name of every tensor the adapter of `model` holds (`lora_parameters`) → its key in
    PEFT's adapter_model.safetensors."""
    hf_names = hf_module_names(model)
    names = {}
    for name, module in lora_modules(model).items():
        for part, index in module.parts().items():
            for kind in ("lora_A", "lora_B"):
                ours = ".".join(filter(None, (name, kind, part, "weight")))
                names[ours] = f"{PEFT_PREFIX}{hf_names[name][index]}.{kind}.weight"
    for ours, p in lora_parameters(model).items():
        if ours not in names:  # the task head: saved whole, under its transformers name
            (hf_name,) = state_to_hf(model, {ours: p.detach()})
            names[ours] = PEFT_PREFIX + hf_name
    return names


def _task_type(model: nn.Module) -> str | None:
    return next((TASK_TYPES[c] for c in type(model).__mro__ if c in TASK_TYPES), None)


def _target_modules(model: nn.Module) -> list[str]:
    """The targets that select exactly the adapted modules: their last name components where
    those select no more (["c_attn"]), else their full transformers names."""
    hf_names = hf_module_names(model)
    adapted = {hf_names[name][index] for name, module in lora_modules(model).items()
               for index in module.parts().values()}
    short = sorted({name.rpartition(".")[2] for name in adapted})
    selected = {p for parts in adaptable_modules(model).values() for p in parts
                if any(matches(p, target) for target in short)}
    return short if selected == adapted else sorted(adapted)


def adapter_config(model: nn.Module, *, base_model_name_or_path: str | None) -> dict[str, Any]:
    """The adapter_config.json PEFT writes for the adapters of `model` (keys it leaves at their
    defaults are left out; PEFT fills them in when loading)."""
    layers = list(lora_modules(model).values())
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no LoRA adapters to save; "
                          "apply_lora(model, cfg) first")
    first = layers[0]
    assert all((m.r, m.alpha, m.dropout_p) == (first.r, first.alpha, first.dropout_p)
               for m in layers), "apply_lora gives every layer one configuration"
    record, cls = _lookup(model)
    task_type = _task_type(model)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        # Without a task type, AutoPeftModel finds the transformers class here.
        "auto_mapping": None if task_type else {
            "base_model_class": record.architecture_name(cls),
            "parent_library": f"transformers.models.{record.model_type}."
                              f"modeling_{record.model_type}"},
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": first.r,
        "lora_alpha": int(first.alpha) if float(first.alpha).is_integer() else first.alpha,
        "lora_dropout": first.dropout_p,
        "target_modules": _target_modules(model),
        # GPT-2's Conv1D stores its weight (in, out): PEFT transposes B @ A when it merges.
        "fan_in_fan_out": any(f"{name}.weight".endswith(record.key_maps[cls].transposed)
                              for name in lora_modules(model)),
        "modules_to_save": list(head_names(model)) or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        # Plain LoRA, said in the keys every PEFT version knows (newer options default to it;
        # an older PEFT would refuse a key it does not know).
        **{key: PLAIN_LORA[key] for key in ("bias", "use_rslora", "use_dora", "rank_pattern",
                                            "alpha_pattern")},
    }


# -- saving ------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, directory: str | Path, *,
                 base_model_name_or_path: str | None) -> None:
    """Write the adapters of `model` (and a classifier's head) as a PEFT adapter directory.

    `base_model_name_or_path` is the checkpoint the adapter applies to (PEFT's AutoPeftModel
    loads it from there); None when there is none to name. Nothing is ever half-written: the
    files are staged in a temporary directory beside `directory`, which then is renamed into
    place — or, where `directory` exists (it may hold other files, a run's tokenizer), the old
    adapter_config.json is removed first and written last, so that an interrupted save leaves
    a directory without a config (refused on load), never a config beside other weights.
    """
    directory = Path(directory)
    config = adapter_config(model, base_model_name_or_path=base_model_name_or_path)
    names = peft_key_names(model)
    state = {names[ours]: p.detach().to("cpu").contiguous()
             for ours, p in lora_parameters(model).items()}
    files = {ADAPTER_WEIGHTS: save(state, metadata={"format": "pt"}),
             ADAPTER_CONFIG: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()}
    _publish(directory, files)


def _publish(directory: Path, files: dict[str, bytes]) -> None:
    """Write `files` (in order; the config last) into `directory` all or nothing."""
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory}: exists and is not a directory; expected a directory "
                          "for the adapter")
    directory.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.",
                                  suffix=".tmp"))
    try:
        for name, data in files.items():
            atomic_write_bytes(stage / name, data)  # fsynced before any rename below
        if not directory.exists():
            os.chmod(stage, 0o755)  # mkdtemp makes it owner-only; adapters are meant to be shared
            os.rename(stage, directory)
            return
        (directory / ADAPTER_CONFIG).unlink(missing_ok=True)
        for name in files:
            os.replace(stage / name, directory / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# -- loading -----------------------------------------------------------------------------------
def read_adapter_base(directory: str | Path) -> str | None:
    """The base model an adapter names (`base_model_name_or_path`), None if it names none."""
    read_adapter_config(directory)  # a valid adapter first
    config = read_json_object(Path(directory) / ADAPTER_CONFIG)
    base = config.get("base_model_name_or_path")
    return base if isinstance(base, str) and base else None


def read_adapter_config(directory: str | Path) -> LoraConfig:
    """The LoraConfig of a PEFT adapter directory; anything lmlab would compute differently
    from PEFT is an error that names the file and the key."""
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory; expected a PEFT adapter directory "
                              f"({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {ADAPTER_CONFIG}; expected a PEFT adapter "
                              f"directory ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}, as "
                              "save_adapter or PeftModel.save_pretrained write it)")
    config = read_json_object(path)
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type {config.get('peft_type')!r} is not supported "
                              "(lmlab reads LoRA adapters: \"LORA\")")
    for key, plain in PLAIN_LORA.items():
        if config.get(key) not in (plain, None):
            raise CheckpointError(f"{path}: '{key}': {json.dumps(config[key])} is not supported "
                                  f"by lmlab (only {json.dumps(plain)}, plain LoRA)")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(BASE_CHANGING_INITS):
        raise CheckpointError(f"{path}: 'init_lora_weights': {init!r} changes the base weights "
                              "too; save the adapter with PEFT's "
                              "path_initial_model_for_weight_conversion to convert it")
    values = {key: config.get(key, default) for key, default in PEFT_DEFAULTS.items()}
    if isinstance(values["target_modules"], str):
        raise CheckpointError(f"{path}: 'target_modules': {values['target_modules']!r} (a "
                              "regular expression or 'all-linear') is not supported; list the "
                              "module names")
    try:
        return LoraConfig(r=values["r"], alpha=values["lora_alpha"],
                          dropout=values["lora_dropout"],
                          target_modules=values["target_modules"])
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None


def read_adapter_weights(directory: str | Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """(the file, its tensors by PEFT key) of an adapter directory's safetensors file."""
    directory = Path(directory)
    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        pickled = directory / "adapter_model.bin"
        hint = (f" ({pickled.name} is there: lmlab reads only safetensors, never a pickle; "
                "convert it with PEFT, e.g. load it and save_pretrained again)"
                if pickled.is_file() else "")
        raise CheckpointError(f"{directory}: no {ADAPTER_WEIGHTS}{hint}")
    try:
        with safe_open(path, framework="pt") as f:
            return path, {key: f.get_tensor(key) for key in f.keys()}
    except (OSError, RuntimeError, ValueError, SafetensorError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply the PEFT LoRA adapter in `directory` to `model` (in place; returned): LoRA layers
    as its adapter_config.json says, filled with its weights (and a classifier's head), the
    adapters left trainable. The weights must be exactly the adapter's, of this model's shapes;
    otherwise nothing is changed and a CheckpointError names the file and the key."""
    if lora_modules(model):
        raise ConfigError(f"{type(model).__name__} already has LoRA adapters; "
                          "remove_lora(model) first to load another adapter")
    directory = Path(directory)
    cfg = read_adapter_config(directory)
    path, weights = read_adapter_weights(directory)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        apply_lora(model, cfg)
    except ConfigError as err:
        raise CheckpointError(f"{directory / ADAPTER_CONFIG}: {err}") from None
    try:
        state = _our_state(model, weights, path)
    except CheckpointError:  # undo the swap: the model is as it was
        remove_lora(model, merge=False)
        for name, p in model.named_parameters():
            p.requires_grad_(trainable[name])
        raise
    params = lora_parameters(model)
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
    return model


def _our_state(model: nn.Module, weights: dict[str, torch.Tensor],
               path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors by our names, checked: the keys exactly those of the model's adapter,
    each of the model's shape."""
    ours_of = {peft: ours for ours, peft in peft_key_names(model).items()}
    params = lora_parameters(model)
    example = sorted(ours_of)[0]
    unknown = sorted(set(weights) - set(ours_of))
    if unknown:
        raise CheckpointError(
            f"{path}: '{unknown[0]}'{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}"
            f" is not a weight of this adapter on a {type(model).__name__}; expected keys such "
            f"as '{example}' — was the adapter trained on another model class or family?")
    missing = sorted(set(ours_of) - set(weights))
    if missing:
        raise CheckpointError(f"{path}: missing adapter weights {missing[:3]}"
                              f"{' …' if len(missing) > 3 else ''}")
    for key, tensor in weights.items():
        expected = tuple(params[ours_of[key]].shape)
        if tuple(tensor.shape) != expected:
            raise CheckpointError(f"{path}: '{key}' has shape {tuple(tensor.shape)}, this model "
                                  f"expects {expected}; the adapter was trained on a base model "
                                  "of another size")
    return {ours_of[key]: tensor for key, tensor in weights.items()}
