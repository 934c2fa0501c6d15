"""The GPT-2 family: GPT2LMHeadModel ↔ lmlab's GPT, GPT2ForSequenceClassification ↔
GPTForSequenceClassification."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmlab.errors import CheckpointError
from lmlab.models.gpt import GPT, GPTConfig, GPTForSequenceClassification
from lmlab.models.hf.records import (HF_IGNORED_KEYS, FamilyRecord, KeyMap, State, config_values,
                                     labels_from_hf, labels_to_hf, register_family)

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
    # a list of EOS ids: the first is the main one
    hf = {key: (value[0] if value else None)
          if key in ("bos_token_id", "eos_token_id", "pad_token_id") and isinstance(value, list)
          else value for key, value in hf.items()}
    values = config_values(hf, where, keys=GPT2_CONFIG_KEYS, required=GPT2_REQUIRED_VALUES,
                           ignored=HF_IGNORED_KEYS, config_cls=GPTConfig)
    if values.get("activation", "gelu_new") not in GPT2_ACTIVATIONS:
        raise CheckpointError(f"{where}: activation_function {values['activation']!r} is not "
                              f"supported (expected {', '.join(GPT2_ACTIVATIONS)})")
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
