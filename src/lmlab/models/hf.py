"""Hugging Face checkpoint interop as data: per family a config table and a key-map table.

A checkpoint directory holds `config.json` (the only source of truth about the model) and
`model.safetensors` (or a sharded index, or a legacy `pytorch_model.bin`, read with
`weights_only=True` so that no pickled code ever runs). lmlab saves exactly this layout, so an
lmlab checkpoint *is* a Hugging Face checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmlab.errors import CheckpointError, ConfigError
from lmlab.fileio import atomic_path, atomic_write_bytes
from lmlab.models import bert
from lmlab.models.gpt import GPT, GPTConfig, GPTForSequenceClassification

log = logging.getLogger(__name__)

# -- GPT-2 tables ------------------------------------------------------------------------------
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
# Keys that do not change the forward pass in fp32 (heads of other GPT-2 classes, bookkeeping).
# reorder_and_upcast_attn only changes the precision of fp16 attention.
HF_IGNORED_KEYS = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "use_cache",
    "n_ctx", "summary_activation", "summary_first_dropout", "summary_proj_to_labels",
    "summary_type", "summary_use_proj", "task_specific_params", "_name_or_path",
    "reorder_and_upcast_attn", "return_dict", "output_hidden_states", "output_attentions",
    "id2label", "label2id", "problem_type", "tokenizer_class", "prefix", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "sep_token_id", "decoder_start_token_id",
    "finetuning_task", "gradient_checkpointing",
}
# Our parameter name -> HF parameter name is a prefix; these weights are Conv1D in HF, stored
# (in, out), where nn.Linear stores (out, in).
GPT2_PREFIX = "transformer."
GPT2_TRANSPOSED = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# Buffers that old HF GPT-2 checkpoints carry (the causal mask); recomputed, never loaded.
GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")


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


def gpt2_config_from_hf(hf: dict[str, Any], where: str) -> GPTConfig:
    values = config_values(hf, where, keys=GPT2_CONFIG_KEYS, required=GPT2_REQUIRED_VALUES,
                           ignored=HF_IGNORED_KEYS)
    if values.get("activation", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu"):
        raise CheckpointError(
            f"{where}: activation_function {values['activation']!r} is not supported "
            "(expected gelu_new, gelu_pytorch_tanh, gelu or relu)"
        )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(values.get(name), list):  # a list of EOS ids: the first is the main one
            values[name] = values[name][0] if values[name] else None
    try:
        return GPTConfig(**values)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: {err}") from None


def gpt2_config_to_hf(config: GPTConfig) -> dict[str, Any]:
    hf = {hf_key: getattr(config, ours) for hf_key, ours in GPT2_CONFIG_KEYS.items()}
    hf.update(GPT2_REQUIRED_VALUES)
    hf.update(architectures=["GPT2LMHeadModel"], model_type="gpt2", dtype="float32")
    return hf


def gpt2_state_dict_to_hf(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    if not config.bias:  # GPT-2 always has biases: a bias-free model is one whose biases are 0
        state = {**state, **_zero_biases(state)}
    out = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            if config.tie_word_embeddings:
                continue  # shared with wte; HF re-ties it on load
            out[name] = tensor
            continue
        if name.endswith(GPT2_TRANSPOSED):
            tensor = tensor.t()
        out[GPT2_PREFIX + name] = tensor.contiguous()
    return out


def _zero_biases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name[: -len("weight")] + "bias": torch.zeros(tensor.shape[0], dtype=tensor.dtype)
            for name, tensor in state.items()
            if name.endswith(".weight") and not name.startswith(("wte", "wpe", "lm_head"))}


def gpt2_state_dict_from_hf(hf_state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in hf_state.items():
        if name.endswith(GPT2_BUFFERS):
            continue
        ours = name[len(GPT2_PREFIX):] if name.startswith(GPT2_PREFIX) else name
        if ours.endswith(GPT2_TRANSPOSED):
            # Copied, not a transposed view: nn.Linear's (out, in) rows contiguous, as a model
            # built here has them — the decoding kernels stream those rows.
            tensor = tensor.t().contiguous()
        out[ours] = tensor
    return out


def labels_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """{"id2label": [names in id order]} from config.json's id2label, else {"num_labels": n}."""
    id2label = hf.get("id2label")
    if isinstance(id2label, dict) and id2label:
        try:
            return {"id2label": [id2label[k] for k in sorted(id2label, key=int)]}
        except ValueError:
            raise CheckpointError(f"{where}: id2label keys must be integers, got {sorted(id2label)}") from None
    if isinstance(hf.get("num_labels"), int):
        return {"num_labels": hf["num_labels"]}
    return {}


def labels_to_hf(labels: list[str]) -> dict[str, Any]:
    return {"id2label": {str(i): label for i, label in enumerate(labels)},
            "label2id": {label: i for i, label in enumerate(labels)}}


# GPT2ForSequenceClassification: the backbone under `transformer.`, a bias-free `score` head.
GPT2_SCORE = "score.weight"


def gpt2_classifier_state_to_hf(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    backbone = {k[len(GPT2_PREFIX):]: v for k, v in state.items() if k.startswith(GPT2_PREFIX)}
    return {**gpt2_state_dict_to_hf(backbone, config), GPT2_SCORE: state[GPT2_SCORE].contiguous()}


def gpt2_classifier_state_from_hf(hf_state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    state = gpt2_state_dict_from_hf(hf_state, where)
    return {(k if k == GPT2_SCORE else GPT2_PREFIX + k): v for k, v in state.items()}


# -- BERT tables -------------------------------------------------------------------------------
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
# HF's separate query/key/value are our one `qkv` (concatenated along the output dimension).
BERT_QKV = ("query", "key", "value")
# Buffers and tied aliases that checkpoints may carry; never loaded.
BERT_SKIPPED = ("embeddings.position_ids", "embeddings.token_type_ids",
                "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
# Names of the original TensorFlow-converted checkpoints.
BERT_LEGACY_RENAMES = ((".gamma", ".weight"), (".beta", ".bias"))


def bert_config_from_hf(hf: dict[str, Any], where: str, **overrides) -> bert.BertConfig:
    values = config_values(hf, where, keys={key: key for key in BERT_CONFIG_KEYS},
                           required=BERT_REQUIRED_VALUES, ignored=BERT_IGNORED_KEYS)
    values.update(labels_from_hf(hf, where))
    values.update(overrides)
    try:
        return bert.BertConfig(**values)
    except (TypeError, ConfigError) as err:
        raise CheckpointError(f"{where}: {err}") from None


def bert_config_to_hf(model: bert.BertPreTrainedModel) -> dict[str, Any]:
    config = model.config
    hf: dict[str, Any] = {key: getattr(config, key) for key in BERT_CONFIG_KEYS}
    hf.update(BERT_REQUIRED_VALUES)
    # transformers sizes BertForQuestionAnswering's head by num_labels too: it must stay 2 there.
    num_labels = config.num_labels if isinstance(model, bert.BertForSequenceClassification) else 2
    labels = (config.id2label if config.id2label and num_labels == config.num_labels
              else [f"LABEL_{i}" for i in range(num_labels)])
    hf.update(architectures=[type(model).__name__], model_type="bert", dtype="float32",
              **labels_to_hf(labels))
    return hf


def bert_state_dict_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if ".attention.self.qkv." in name:
            stem, kind = name.split(".qkv.")
            for part, piece in zip(BERT_QKV, tensor.chunk(3, dim=0)):
                out[f"{stem}.{part}.{kind}"] = piece.contiguous()
        else:
            out[name] = tensor.contiguous()
    return out


def bert_state_dict_from_hf(hf_state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    out, parts = {}, {}
    for name, tensor in hf_state.items():
        for old, new in BERT_LEGACY_RENAMES:
            if name.endswith(old) and "LayerNorm" in name:
                name = name[: -len(old)] + new
        if name.endswith(BERT_SKIPPED):
            continue
        stem, _, kind = name.rpartition(".")
        layer_part = stem.rpartition(".")
        if layer_part[2] in BERT_QKV and layer_part[0].endswith(".attention.self"):
            parts.setdefault(f"{layer_part[0]}.qkv.{kind}", {})[layer_part[2]] = tensor
            continue
        out[name] = tensor
    for name, pieces in parts.items():
        if set(pieces) != set(BERT_QKV):
            missing = sorted(set(BERT_QKV) - set(pieces))
            raise CheckpointError(f"{where}: {name.replace('qkv', missing[0])} is missing")
        out[name] = torch.cat([pieces[p] for p in BERT_QKV], dim=0)
    return out


def _bert_architecture(config: dict[str, Any], where: str) -> type[bert.BertPreTrainedModel]:
    names = config.get("architectures") or ["BertModel"]
    if names[0] not in bert.ARCHITECTURES:
        raise CheckpointError(
            f"{where}: architecture {names[0]!r} is not supported (lmlab loads "
            f"{', '.join(bert.ARCHITECTURES)}); to reuse its encoder, use e.g. "
            "BertForSequenceClassification.from_encoder(path)"
        )
    return bert.ARCHITECTURES[names[0]]


def _with_encoder_prefix(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A plain encoder checkpoint names its weights `embeddings.…`; a task model `bert.embeddings.…`.
    Rename the checkpoint's encoder weights to what `model` expects."""
    wants_prefix = hasattr(model, "bert")
    out = {}
    for name, tensor in state.items():
        has_prefix = name.startswith("bert.")
        if wants_prefix and not has_prefix and name.split(".")[0] in ("embeddings", "encoder", "pooler"):
            name = "bert." + name
        elif not wants_prefix and has_prefix:
            name = name[len("bert."):]
        out[name] = tensor
    return out


def load_bert(directory: Path, config_dict: dict[str, Any], *, dtype, device) -> torch.nn.Module:
    where = str(directory / "config.json")
    cls = _bert_architecture(config_dict, where)
    config = bert_config_from_hf(config_dict, where)
    with torch.device("meta"):
        model = cls(config)  # no memory, no init: the checkpoint fills every weight
    state = bert_state_dict_from_hf(read_state_dict(directory), str(directory))
    if cls is bert.BertModel and "pooler.dense.weight" not in state and \
            not any(k.startswith("bert.pooler.") for k in state):
        model.pooler = None  # an encoder saved without its pooler (HF add_pooling_layer=False)
    load_into(model, _with_encoder_prefix(state, model), str(directory), dtype)
    return model.to(device).eval()


def load_bert_encoder(cls: type[bert.BertPreTrainedModel], directory: Path,
                      overrides: dict[str, Any]) -> bert.BertPreTrainedModel:
    """`cls` built on the checkpoint's config (plus `overrides`, e.g. id2label), filled with every
    checkpoint weight whose name and shape it shares; the encoder must be complete."""
    config_dict = read_config(directory)
    where = str(directory / "config.json")
    if config_dict.get("model_type") != "bert":
        raise CheckpointError(f"{where}: model_type {config_dict.get('model_type')!r}; expected a BERT checkpoint")
    model = cls(bert_config_from_hf(config_dict, where, **overrides))
    state = _with_encoder_prefix(bert_state_dict_from_hf(read_state_dict(directory), str(directory)), model)
    expected = model.state_dict()
    usable = {k: v for k, v in state.items() if k in expected and v.shape == expected[k].shape}
    encoder = [k for k in expected if ".pooler." not in f".{k}" and
               k.split(".")[0 if cls is bert.BertModel else 1] in ("embeddings", "encoder")]
    missing = [k for k in encoder if k not in usable]
    if missing:
        raise CheckpointError(f"{directory}: encoder weights missing or of another shape: "
                              f"{missing[:5]}{' …' if len(missing) > 5 else ''}")
    model.load_state_dict(usable, strict=False)
    fresh = sorted(set(expected) - set(usable))
    if fresh:
        log.info("%s: newly initialised (not in %s): %s", cls.__name__, directory, ", ".join(fresh))
    return model.float()


# -- reading and writing directories -----------------------------------------------------------
def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory; expected a model directory with config.json")
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


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
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
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    state[key] = f.get_tensor(key)
        except (OSError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from None
    return state


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str, dtype) -> None:
    """Strict load with shape checks and errors naming the offending keys."""
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    if getattr(model.config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing weights {missing[:5]}{' …' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected weights {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
        raise CheckpointError(f"{where}: " + "; ".join(parts))
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{where}: weight '{key}' has shape {tuple(tensor.shape)}, "
                f"config.json implies {tuple(expected[key].shape)}"
            )
        state[key] = tensor.to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        model.lm_head.weight = model.wte.weight


def load_gpt(directory: Path, config_dict: dict[str, Any], *, dtype, device) -> torch.nn.Module:
    where = str(directory / "config.json")
    config = gpt2_config_from_hf(config_dict, where)
    classifier = (config_dict.get("architectures") or [""])[0] == "GPT2ForSequenceClassification"
    if classifier:
        config = dataclasses.replace(config, **labels_from_hf(config_dict, where))
    with torch.device("meta"):  # no memory, no init: the checkpoint fills every weight
        model = GPTForSequenceClassification(config) if classifier else GPT(config)
    convert = gpt2_classifier_state_from_hf if classifier else gpt2_state_dict_from_hf
    load_into(model, convert(read_state_dict(directory), str(directory)), str(directory), dtype)
    return model.to(device).eval()


def to_hf(model: torch.nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json dict, HF-named fp32 state dict) for any lmlab model."""
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    if isinstance(model, GPT):
        return gpt2_config_to_hf(model.config), gpt2_state_dict_to_hf(state, model.config)
    if isinstance(model, GPTForSequenceClassification):
        hf = gpt2_config_to_hf(model.config)
        hf.update(architectures=["GPT2ForSequenceClassification"],
                  **labels_to_hf(model.config.id2label or
                                 [f"LABEL_{i}" for i in range(model.config.num_labels)]))
        return hf, gpt2_classifier_state_to_hf(state, model.config)
    if isinstance(model, bert.BertPreTrainedModel):
        return bert_config_to_hf(model), bert_state_dict_to_hf(state)
    raise TypeError(f"cannot save a {type(model).__name__} in the Hugging Face layout")


def save_pretrained(model: torch.nn.Module, directory, *, tokenizer=None) -> None:
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


LOADERS = {"gpt2": load_gpt, "bert": load_bert}


def from_pretrained(path, *, dtype: torch.dtype = torch.float32, device=None) -> torch.nn.Module:
    """Load a model from a Hugging Face-layout directory (any family lmlab implements)."""
    directory = Path(path)
    config = read_config(directory)
    model_type = config.get("model_type")
    if model_type not in LOADERS:
        raise CheckpointError(
            f"{directory / 'config.json'}: model_type {model_type!r} is not supported "
            f"(lmlab loads: {', '.join(sorted(LOADERS))})"
        )
    return LOADERS[model_type](directory, config, dtype=dtype, device=device or "cpu")
