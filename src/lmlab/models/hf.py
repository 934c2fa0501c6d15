"""Hugging Face checkpoint interop as data: one record per model family.

A checkpoint directory holds `config.json` (the only source of truth about the model) and
`model.safetensors` (or a sharded index, or a legacy `pytorch_model.bin`, read with
`weights_only=True` so that no pickled code ever runs). lmlab saves exactly this layout, so an
lmlab checkpoint *is* a Hugging Face checkpoint.

A family (GPT-2, BERT, …) is one `FamilyRecord`: its config tables, the architectures it builds,
one `KeyMap` per model class (our state-dict names ↔ HF names: prefixes, transposes, fused
tensors, legacy names, skipped buffers) and its tied weights. The generic code at the end —
reading, building on `meta`, strict loading, saving whole checkpoints or a subset of weights —
only dispatches through `RECORDS`, so a new family is one more `register_family(...)`.
(Over 600 lines because it holds that machinery *and* the records; with a third family the
records belong in one module each beside it.)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lmlab.errors import CheckpointError, ConfigError
from lmlab.fileio import atomic_path, atomic_write_bytes
from lmlab.models import bert
from lmlab.models.gpt import GPT, GPTConfig, GPTForSequenceClassification

log = logging.getLogger(__name__)
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
                  required: dict[str, Any], ignored: set[str]) -> dict[str, Any]:
    """Our config fields from an HF config.json, by a family's tables: `keys` maps HF key → our
    field; a `required` key must hold its one supported value; any key in neither table nor
    `ignored` is an error — an option lmlab does not implement is never silently dropped."""
    values = {}
    for key, value in hf.items():
        if key in keys:
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


# -- GPT-2 -------------------------------------------------------------------------------------
# HF config key -> GPTConfig field.
GPT2_CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "n_positions": "n_positions",
    "n_embd": "n_embd",
    "n_layer": "n_layer",
    "n_head": "n_head",
    "n_inner": "n_inner",
    "activation_function": "activation",
    "embd_pdrop": "embd_dropout",
    "resid_pdrop": "resid_dropout",
    "attn_pdrop": "attn_dropout",
    "layer_norm_epsilon": "layer_norm_epsilon",
    "tie_word_embeddings": "tie_word_embeddings",
    "initializer_range": "initializer_range",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
}
# Options whose other values change the computation and that lmlab does not implement.
GPT2_REQUIRED_VALUES = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
}
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu")
# HF's attention and MLP weights are Conv1D, stored (in, out); old checkpoints carry the causal
# mask as buffers, recomputed here, never loaded.
_GPT2_TRANSPOSED = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight",
                    ".mlp.c_proj.weight")
_GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")
# GPT2LMHeadModel holds the blocks under `transformer.` and lm_head beside them; our GPT holds
# both at the top. GPT2ForSequenceClassification and ours share names (`transformer.`, `score`).
GPT2_LM_KEYS = KeyMap(prefixes=(("lm_head.", "lm_head."), ("", "transformer.")),
                      transposed=_GPT2_TRANSPOSED, skipped=_GPT2_BUFFERS)
GPT2_CLASSIFIER_KEYS = KeyMap(transposed=_GPT2_TRANSPOSED, skipped=_GPT2_BUFFERS)
# Weights that have a bias in GPT-2: a bias-free (nanoGPT bias=False) model gets zero biases.
_GPT2_BIASED = ("ln_1.weight", "ln_2.weight", "ln_f.weight", "c_attn.weight", "c_proj.weight",
                "c_fc.weight")


def gpt2_config_from_hf(hf: dict[str, Any], where: str, *, cls: type[nn.Module] = GPT,
                        overrides: dict[str, Any] | None = None) -> GPTConfig:
    values = config_values(hf, where, keys=GPT2_CONFIG_KEYS, required=GPT2_REQUIRED_VALUES,
                           ignored=HF_IGNORED_KEYS)
    if values.get("activation", "gelu_new") not in GPT2_ACTIVATIONS:
        raise CheckpointError(f"{where}: activation_function {values['activation']!r} is not "
                              f"supported (expected {', '.join(GPT2_ACTIVATIONS)})")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(values.get(name), list):  # a list of EOS ids: the first is the main one
            values[name] = values[name][0] if values[name] else None
    if cls is GPTForSequenceClassification:  # an LM's config.json labels mean nothing to it
        values.update(labels_from_hf(hf, where))
    values.update(overrides or {})
    try:
        return GPTConfig(**values)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: {err}") from None


def gpt2_config_to_hf(model: nn.Module) -> dict[str, Any]:
    config = model.config
    hf = {hf_key: getattr(config, ours) for hf_key, ours in GPT2_CONFIG_KEYS.items()}
    hf.update(GPT2_REQUIRED_VALUES)
    if isinstance(model, GPTForSequenceClassification):
        hf.update(labels_to_hf(config.id2label or [f"LABEL_{i}" for i in range(config.num_labels)]))
    return hf


def _gpt2_zero_biases(state: State, config: GPTConfig) -> State:
    if config.bias:
        return state
    return {**state, **{name[: -len("weight")] + "bias": torch.zeros(t.shape[0], dtype=t.dtype)
                        for name, t in state.items() if name.endswith(_GPT2_BIASED)}}


def _gpt2_tied(config: GPTConfig) -> dict[str, str]:
    return {"lm_head.weight": "wte.weight"} if config.tie_word_embeddings else {}


def gpt2_state_dict_from_hf(hf_state: State, where: str) -> State:
    """Our GPT's names and layouts for a GPT2LMHeadModel (or GPT2Model) state dict."""
    return GPT2_LM_KEYS.from_hf(hf_state, where)


GPT2 = register_family(FamilyRecord(
    model_type="gpt2",
    architectures={"GPT2LMHeadModel": GPT,
                   "GPT2ForSequenceClassification": GPTForSequenceClassification},
    default="GPT2LMHeadModel",
    key_maps={GPT: GPT2_LM_KEYS, GPTForSequenceClassification: GPT2_CLASSIFIER_KEYS},
    config_from_hf=gpt2_config_from_hf,
    config_to_hf=gpt2_config_to_hf,
    tied=_gpt2_tied,
    base_model_prefix="transformer",
    complete_state=_gpt2_zero_biases,
    unlisted=GPT,  # GPT2Model and other names: the blocks, loaded as a GPT (extra heads are errors)
))


# -- BERT --------------------------------------------------------------------------------------
# HF config keys that are BertConfig fields under the same name.
BERT_CONFIG_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
    "type_vocab_size", "layer_norm_eps", "initializer_range", "pad_token_id", "classifier_dropout",
)
BERT_REQUIRED_VALUES = {
    "position_embedding_type": "absolute",
    "is_decoder": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}
# chunk_size_feed_forward only splits the FFN computation; problem_type concerns the loss, which
# lives in lmlab's tasks; the rest is bookkeeping.
BERT_IGNORED_KEYS = HF_IGNORED_KEYS | {
    "num_labels", "chunk_size_feed_forward", "bos_token_id", "eos_token_id", "directionality",
    "output_past", "pooler_fc_size", "pooler_num_attention_heads", "pooler_num_fc_layers",
    "pooler_size_per_head", "pooler_type", "problem_type",
}
# Our one qkv matmul is HF's query, key and value. The MLM decoder *is* the word-embedding
# matrix in our model (BertLMPredictionHead holds the embedding), so HF's decoder weight and bias
# are aliases, skipped like the position/token-type id buffers. TensorFlow-converted checkpoints
# name LayerNorm weights gamma and beta.
BERT_KEYS = KeyMap(
    fused=((".attention.self.qkv",
            (".attention.self.query", ".attention.self.key", ".attention.self.value")),),
    legacy=((".LayerNorm.gamma", ".LayerNorm.weight"), (".LayerNorm.beta", ".LayerNorm.bias")),
    skipped=("embeddings.position_ids", "embeddings.token_type_ids",
             "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"),
)


def bert_config_from_hf(hf: dict[str, Any], where: str, *, cls: type[nn.Module] | None = None,
                        overrides: dict[str, Any] | None = None) -> bert.BertConfig:
    values = config_values(hf, where, keys={key: key for key in BERT_CONFIG_KEYS},
                           required=BERT_REQUIRED_VALUES, ignored=BERT_IGNORED_KEYS)
    values.update(labels_from_hf(hf, where))
    values.update(overrides or {})
    try:
        return bert.BertConfig(**values)
    except (TypeError, ConfigError) as err:
        raise CheckpointError(f"{where}: {err}") from None


def bert_config_to_hf(model: nn.Module) -> dict[str, Any]:
    config = model.config
    hf: dict[str, Any] = {key: getattr(config, key) for key in BERT_CONFIG_KEYS}
    hf.update(BERT_REQUIRED_VALUES)
    # transformers sizes BertForQuestionAnswering's head by num_labels too: it must stay 2 there.
    num_labels = config.num_labels if isinstance(model, bert.BertForSequenceClassification) else 2
    labels = (config.id2label if config.id2label and num_labels == config.num_labels
              else [f"LABEL_{i}" for i in range(num_labels)])
    hf.update(labels_to_hf(labels))
    return hf


def _bert_build(cls: type[nn.Module], config: bert.BertConfig,
                checkpoint_names: Iterable[str]) -> nn.Module:
    names = set(checkpoint_names)
    if cls is bert.BertModel:  # an encoder saved without its pooler (HF add_pooling_layer=False)
        return cls(config, add_pooling_layer=bool(
            names & {"pooler.dense.weight", "bert.pooler.dense.weight"}))
    return cls(config)


BERT = register_family(FamilyRecord(
    model_type="bert",
    architectures=dict(bert.ARCHITECTURES),
    default="BertModel",
    key_maps={cls: BERT_KEYS for cls in bert.ARCHITECTURES.values()},
    config_from_hf=bert_config_from_hf,
    config_to_hf=bert_config_to_hf,
    base_model_prefix="bert",
    encoder=("embeddings", "encoder"),
    build=_bert_build,
    unsupported_hint=("; to reuse its encoder, use e.g. "
                      "BertForSequenceClassification.from_encoder(path)"),
))


# -- reading and writing directories (generic: dispatch through RECORDS) ------------------------
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
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


def read_state_dict(directory: Path) -> State:
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    legacy = directory / "pytorch_model.bin"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
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
    except (OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from None


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


load_bert_encoder = load_encoder  # the name BertPreTrainedModel.from_encoder imports


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
