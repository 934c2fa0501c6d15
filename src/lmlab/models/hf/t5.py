"""The T5 family: T5ForConditionalGeneration ↔ lmlab's T5ForConditionalGeneration (v1.0 and v1.1).

Our module names are transformers' own, so the key map only skips the embedding aliases the two
stacks hold in transformers (`encoder.embed_tokens`, `decoder.embed_tokens`: the `shared` matrix).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lmlab.errors import CheckpointError
from lmlab.models.hf.records import (HF_IGNORED_KEYS, FamilyRecord, KeyMap, config_values,
                                     register_family)
from lmlab.models.t5 import T5Config, T5ForConditionalGeneration

# HF config key -> T5Config field (the same names).
T5_CONFIG_KEYS = {name: name for name in (
    "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
    "relative_attention_num_buckets", "relative_attention_max_distance", "dropout_rate",
    "layer_norm_epsilon", "initializer_factor", "feed_forward_proj", "tie_word_embeddings",
    "scale_decoder_outputs", "pad_token_id", "eos_token_id", "decoder_start_token_id",
    "n_positions")}
# Derived by transformers from feed_forward_proj (dense_act_fn, is_gated_act), or heads and
# switches that do not change the forward pass of this class.
T5_IGNORED_KEYS = HF_IGNORED_KEYS | {"dense_act_fn", "is_gated_act", "classifier_dropout",
                                     "output_past", "is_encoder_decoder"}
T5_KEYS = KeyMap(skipped=("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                          # a bias cross-attention never had; old checkpoints carry it
                          "layer.1.EncDecAttention.relative_attention_bias.weight"))


def t5_config_from_hf(hf: dict[str, Any], where: str, *,
                      cls: type[nn.Module] = T5ForConditionalGeneration,
                      overrides: dict[str, Any] | None = None) -> T5Config:
    hf = {key: (value[0] if value else None)
          if key in ("eos_token_id", "pad_token_id", "decoder_start_token_id")
          and isinstance(value, list) else value for key, value in hf.items()}
    hf = {key: value for key, value in hf.items()
          if not (key == "decoder_start_token_id" and value is None)}
    values = config_values(hf, where, keys=T5_CONFIG_KEYS, required={},
                           ignored=T5_IGNORED_KEYS, config_cls=T5Config)
    values.update(overrides or {})
    try:
        return T5Config(**values)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: {err}") from None


def t5_config_to_hf(model: nn.Module) -> dict[str, Any]:
    config = model.config
    hf = {hf_key: getattr(config, ours) for hf_key, ours in T5_CONFIG_KEYS.items()}
    hf["scale_decoder_outputs"] = config.scales_decoder_outputs
    hf["is_encoder_decoder"] = True
    return hf


def _t5_tied(config: T5Config) -> dict[str, str]:
    return {"lm_head.weight": "shared.weight"} if config.tie_word_embeddings else {}


T5 = register_family(FamilyRecord(
    model_type="t5",
    architectures={"T5ForConditionalGeneration": T5ForConditionalGeneration},
    default="T5ForConditionalGeneration",
    key_maps={T5ForConditionalGeneration: T5_KEYS},
    config_from_hf=t5_config_from_hf,
    config_to_hf=t5_config_to_hf,
    tied=_t5_tied,
    unsupported_hint=" (T5Model and T5EncoderModel have no language-model head to decode with)",
))
