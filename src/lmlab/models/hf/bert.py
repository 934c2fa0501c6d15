"""The BERT family: BertModel and its task heads (pretraining, masked LM, sequence
classification, question answering)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from lmlab.errors import CheckpointError, ConfigError
from lmlab.models import bert
from lmlab.models.hf.records import (HF_IGNORED_KEYS, FamilyRecord, KeyMap, config_values,
                                     labels_from_hf, labels_to_hf, register_family)

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
                           required=BERT_REQUIRED_VALUES, ignored=BERT_IGNORED_KEYS,
                           config_cls=bert.BertConfig)
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
