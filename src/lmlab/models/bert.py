"""BERT: a bidirectional encoder, as in Devlin et al. (2019) — config, layers, model, heads.

Post-LayerNorm blocks (x = LN(x + attn(x)), x = LN(x + ffn(x))), word + position + token-type
embeddings, a padding mask, and the heads the BERT checkpoints carry: masked-LM (decoder tied to
the word embeddings), next-sentence prediction, sequence classification and span extraction.

Module names equal the Hugging Face BERT names (embeddings.word_embeddings,
encoder.layer.N.attention.output.LayerNorm, cls.predictions.transform.dense, …) with one
exception: query, key and value are one `qkv` matmul instead of three (one larger GEMM is faster
to train), so `models/hf/bert.py` concatenates / splits them. Losses live in `lmlab.tasks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.errors import ConfigError
from lmlab.models.base import PreTrainedModel
from lmlab.models.layers import ACTIVATIONS, label_names, attention



@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"  # BERT uses the exact (erf) GELU
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    classifier_dropout: float | None = None  # None: hidden_dropout_prob, as in transformers
    num_labels: int = 2  # sequence-classification head size
    id2label: list[str] | None = field(default=None)  # label names, saved in config.json

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size", "num_labels"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size ({self.hidden_size}) must be divisible by "
                              f"num_attention_heads ({self.num_attention_heads})")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act must be one of {sorted(ACTIVATIONS)}, got {self.hidden_act!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.id2label is not None:
            self.id2label = label_names(self.id2label)
            self.num_labels = len(self.id2label)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# -- the encoder -------------------------------------------------------------------------------
class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                            padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        T = input_ids.shape[1]
        # Absolute positions 0..T-1 whatever the padding: BERT pads on the right.
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[:T]
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.n_head = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)  # HF's query, key, value
        self.dropout = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = attention(q, k, v, mask=mask, is_causal=False,
                      dropout=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B, T, C)


class BertResidualNorm(nn.Module):
    """dense → dropout → + residual → LayerNorm: the post-LN sublayer output (HF's BertSelfOutput
    and BertOutput)."""

    def __init__(self, config: BertConfig, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(x)))


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertResidualNorm(config, config.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertResidualNorm(config, config.intermediate_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask)
        return x


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))  # the [CLS] position


def padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) 1/0 → boolean (B, 1, 1, T), True where a key may be attended; None when nothing is
    padded, so SDPA can take its fastest path."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()[:, None, None, :]


class BertPreTrainedModel(PreTrainedModel):
    """What every BERT model shares: BERT initialisation and parameter counting (saving and
    `from_encoder` come from PreTrainedModel)."""

    config: BertConfig

    def init_weights(self) -> None:
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self._init_module)

    def _init_module(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def num_parameters(self, *, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(p.numel() for name, p in self.named_parameters() if "embeddings." in name)
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward): 6 per matmul weight plus attention
        scores and values (12·L·d·T); the MLM decoder is left out (it scores masked tokens only)."""
        c = self.config
        d, L = c.hidden_size, c.num_hidden_layers
        return 6 * L * (4 * d * d + 2 * d * c.intermediate_size) + 12 * L * d * seq_len


class BertModel(BertPreTrainedModel):
    """The encoder: `model(input_ids, attention_mask, token_type_ids)` → last hidden states
    (B, T, hidden), like transformers' `BertModel(...).last_hidden_state`."""

    def __init__(self, config: BertConfig, *, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.init_weights()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embeddings(input_ids, token_type_ids)
        return self.encoder(x, padding_mask(attention_mask))

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, hidden): tanh(dense(h[CLS])) — the sentence summary BERT's NSP head was trained on."""
        if self.pooler is None:
            raise ConfigError("this BertModel was built without a pooler")
        return self.pooler(hidden)


# -- heads -------------------------------------------------------------------------------------
class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(hidden)))


class BertLMPredictionHead(nn.Module):
    """transform, then the decoder whose weight is the word-embedding matrix (tied, as in every
    BERT checkpoint) plus an output bias."""

    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self._word_embeddings = [word_embeddings]  # a list: not registered twice as a submodule

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(hidden), self._word_embeddings[0].weight, self.bias)


class BertHeads(nn.Module):
    """HF's `cls` module: masked-LM predictions and, for pretraining, the next-sentence head."""

    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding, *, nsp: bool):
        super().__init__()
        self.predictions = BertLMPredictionHead(config, word_embeddings)
        self.seq_relationship = nn.Linear(config.hidden_size, 2) if nsp else None


class BertForPreTraining(BertPreTrainedModel):
    """Encoder + masked-LM head + next-sentence head (BERT's pretraining model)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.cls = BertHeads(config, self.bert.embeddings.word_embeddings, nsp=True)
        self.init_weights()

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits for the given hidden states — pass only the masked positions
        (`hidden[masked]`) to skip the (T × vocab) product for the other 85%."""
        return self.cls.predictions(hidden)

    def nsp_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, 2): index 0 = B follows A, 1 = B is random (the HF / original BERT convention)."""
        return self.cls.seq_relationship(self.bert.pool(hidden))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, *, masked=None):
        """(MLM logits, NSP logits); with a boolean `masked` (B, T), MLM logits only at those
        positions, (n_masked, vocab)."""
        hidden = self.bert(input_ids, attention_mask, token_type_ids)
        return (self.mlm_logits(hidden if masked is None else hidden[masked]),
                self.nsp_logits(hidden))


class BertForMaskedLM(BertPreTrainedModel):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertHeads(config, self.bert.embeddings.word_embeddings, nsp=False)
        self.init_weights()

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.cls.predictions(hidden)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, *, masked=None):
        hidden = self.bert(input_ids, attention_mask, token_type_ids)
        return self.mlm_logits(hidden if masked is None else hidden[masked])


class BertForSequenceClassification(BertPreTrainedModel):
    """Pooled [CLS] → dropout → linear: (B, num_labels) logits."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        dropout = config.classifier_dropout
        self.dropout = nn.Dropout(config.hidden_dropout_prob if dropout is None else dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        hidden = self.bert(input_ids, attention_mask, token_type_ids)
        return self.classifier(self.dropout(self.bert.pool(hidden)))


class BertForQuestionAnswering(BertPreTrainedModel):
    """A linear map of every hidden state to (start, end) span logits, each (B, T)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        hidden = self.bert(input_ids, attention_mask, token_type_ids)
        start, end = self.qa_outputs(hidden).unbind(-1)
        return start, end


ARCHITECTURES = {
    cls.__name__: cls
    for cls in (BertModel, BertForPreTraining, BertForMaskedLM, BertForSequenceClassification,
                BertForQuestionAnswering)
}
