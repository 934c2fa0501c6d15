"""T5: an encoder–decoder transformer — config, layers, model, read top to bottom.

What sets T5 apart from GPT and BERT, all of it here:
  - no position embeddings: each attention adds a learned bias per head to its scores, looked up
    by the *bucketed* distance between query and key (exact for near, log-spaced for far), computed
    in the first layer of each stack and shared by the layers above it;
  - RMS layer norm (no mean, no bias) before each sub-layer, and no biases anywhere;
  - unscaled attention (no 1/√d: the initialisation of the query weights absorbs it);
  - two feed-forward variants: v1.0's ReLU with the output embedding tied to the input one (and
    the decoder's output scaled by d_model**-0.5 before it), and v1.1's gated GELU with an untied
    head.

Module names equal the Hugging Face `T5ForConditionalGeneration` names (`shared`,
`encoder.block.N.layer.0.SelfAttention.q`, …), so `models/hf/t5.py` is a table. Losses live in
`lmlab.tasks`, decoding in `lmlab.generation`: `encode` fills a decoding cache with the
cross-attention keys and values of each source, once, and `forward` with that cache is one
decoder step (the decoder protocol of `lmlab.generation.protocol`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.errors import ConfigError
from lmlab.models.base import PreTrainedModel
from lmlab.models.kv_cache import CacheStep, KVCache
from lmlab.models.layers import Dropout

# feed_forward_proj → (activation, gated). Transformers' T5 parses the same strings.
FEED_FORWARD = {"relu": ("relu", False), "gated-gelu": ("gelu_new", True),
                "gelu": ("gelu", False), "gated-relu": ("relu", True)}
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu,
                "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64  # width of one attention head (T5 decouples it from d_model / num_heads)
    d_ff: int = 2048
    num_layers: int = 6  # encoder layers
    num_decoder_layers: int | None = None  # None: as many as the encoder
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: str = "relu"  # "relu" (T5 v1.0) or "gated-gelu" (v1.1)
    tie_word_embeddings: bool = True
    # Rescale the decoder's output by d_model**-0.5 before the head. None: when the head is tied
    # (v1.0 does, v1.1 does not). transformers 5 writes it on its own, as it ties every head.
    scale_decoder_outputs: bool | None = None
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    # The longest source and the longest target lmlab lets through. T5 itself has no limit
    # (relative positions); this bounds the decoding cache and the tokenised training data.
    n_positions: int = 512

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
                     "num_heads", "relative_attention_num_buckets",
                     "relative_attention_max_distance", "n_positions"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.feed_forward_proj not in FEED_FORWARD:
            raise ConfigError(f"feed_forward_proj must be one of {sorted(FEED_FORWARD)}, got "
                              f"{self.feed_forward_proj!r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ConfigError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"{name} must be a token id below vocab_size "
                                  f"({self.vocab_size}), got {getattr(self, name)}")

    @property
    def scales_decoder_outputs(self) -> bool:
        return (self.tie_word_embeddings if self.scale_decoder_outputs is None
                else self.scale_decoder_outputs)

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv


# -- relative position bias ----------------------------------------------------------------------
def relative_position_bucket(relative_position: torch.Tensor, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> torch.Tensor:
    """The bucket of each (key − query) distance. Half the buckets hold exact distances; the
    rest cover distances up to `max_distance` in log-spaced steps, and everything beyond shares
    the last one. A bidirectional (encoder) bias splits the buckets between keys before and
    after the query; a causal (decoder) one sees only keys before it."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # float32 logs on purpose: the bucket boundaries must not move with the compute dtype
    large = max_exact + (torch.log(distance.float() / max_exact)
                         / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class RMSNorm(nn.Module):
    """T5's layer norm: scale by the root mean square, no mean subtraction, no bias. The mean
    of squares is taken in float32 even under autocast (as transformers does)."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


# -- attention -------------------------------------------------------------------------------------
class T5Attention(nn.Module):
    """Multi-head attention without biases or 1/√d scaling. The first layer of a stack owns the
    relative position bias (`relative_attention_bias`, one scalar per bucket and head); the
    others receive it from there."""

    def __init__(self, config: T5Config, *, has_relative_attention_bias: bool,
                 bidirectional: bool):
        super().__init__()
        self.n_heads, self.d_kv = config.num_heads, config.d_kv
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.bidirectional = bidirectional
        self.dropout = config.dropout_rate
        inner = config.inner_dim
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.num_buckets, self.n_heads)

    def position_bias(self, query_positions: torch.Tensor,
                      key_positions: torch.Tensor) -> torch.Tensor:
        """(B, heads, Tq, S) bias for query and key positions (B or 1, Tq) and (B or 1, S)."""
        distance = key_positions[:, None, :] - query_positions[:, :, None]  # (B, Tq, S)
        buckets = relative_position_bucket(distance, bidirectional=self.bidirectional,
                                           num_buckets=self.num_buckets,
                                           max_distance=self.max_distance)
        return self.relative_attention_bias(buckets).permute(0, 3, 1, 2)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.d_kv).transpose(1, 2)  # (B, heads, T, d_kv)

    def forward(self, x: torch.Tensor, *, bias: torch.Tensor, keys: torch.Tensor | None = None,
                values: torch.Tensor | None = None, layer: int = 0,
                cache: KVCache | None = None, step: CacheStep | None = None) -> torch.Tensor:
        """Self-attention of `x` (B, T, d_model), or attention to given `keys`/`values`
        (B, heads, S, d_kv: cross-attention). `bias` (B or 1, heads, T, S) holds the position
        bias and the mask (large negative where a query may not look)."""
        B, T, _ = x.shape
        q = self.split_heads(self.q(x))
        if keys is None:
            keys, values = self.split_heads(self.k(x)), self.split_heads(self.v(x))
            if cache is not None:
                keys, values = cache.update(layer, keys, values, step)
        if T == 1 and not self.training:
            # One query per row (a decoding step): two batched matmuls, as transformers computes
            # T5's attention. SDPA's CPU kernel pays a fixed cost per (row, head) that dominates
            # at this size (160 rows × 8 heads × 37 keys: 520 µs against 375 µs).
            scores = torch.matmul(q, keys.transpose(-1, -2)) + bias.to(q.dtype)
            weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            y = torch.matmul(weights, values)
        else:
            dropout = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias.to(q.dtype),
                                               dropout_p=dropout, scale=1.0)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, *, has_relative_attention_bias: bool,
                 bidirectional: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, bidirectional=bidirectional,
                                         has_relative_attention_bias=has_relative_attention_bias)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = Dropout(config.dropout_rate)

    def forward(self, x, *, bias, layer=0, cache=None, step=None):
        y = self.SelfAttention(self.layer_norm(x), bias=bias, layer=layer, cache=cache, step=step)
        return x + self.dropout(y)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.EncDecAttention = T5Attention(config, bidirectional=True,
                                           has_relative_attention_bias=False)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = Dropout(config.dropout_rate)

    def forward(self, x, *, bias, keys, values):
        y = self.EncDecAttention(self.layer_norm(x), bias=bias, keys=keys, values=values)
        return x + self.dropout(y)


# -- feed-forward ----------------------------------------------------------------------------------
class T5DenseActDense(nn.Module):
    """v1.0: wo(act(wi(x)))."""

    def __init__(self, config: T5Config, activation: str):
        super().__init__()
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = Dropout(config.dropout_rate)
        self.act = _ACTIVATIONS[activation]

    def forward(self, x):
        return self.wo(self.dropout(self.act(self.wi(x))))


class T5DenseGatedActDense(nn.Module):
    """v1.1: wo(act(wi_0(x)) · wi_1(x)) — a GLU variant (Shazeer, 2020)."""

    def __init__(self, config: T5Config, activation: str):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = Dropout(config.dropout_rate)
        self.act = _ACTIVATIONS[activation]

    def forward(self, x):
        return self.wo(self.dropout(self.act(self.wi_0(x)) * self.wi_1(x)))


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        activation, gated = FEED_FORWARD[config.feed_forward_proj]
        dense = T5DenseGatedActDense if gated else T5DenseActDense
        self.DenseReluDense = dense(config, activation)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = Dropout(config.dropout_rate)

    def forward(self, x):
        return x + self.dropout(self.DenseReluDense(self.layer_norm(x)))


class T5Block(nn.Module):
    """layer[0] self-attention, (decoder only) layer[1] cross-attention, then feed-forward —
    each `x + sublayer(norm(x))`."""

    def __init__(self, config: T5Config, *, is_decoder: bool, first: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(
            config, has_relative_attention_bias=first, bidirectional=not is_decoder)])
        if is_decoder:
            self.layer.append(T5LayerCrossAttention(config))
        self.layer.append(T5LayerFF(config))

    def forward(self, x, *, bias, cross_bias=None, cross=None, layer=0, cache=None, step=None):
        x = self.layer[0](x, bias=bias, layer=layer, cache=cache, step=step)
        if cross is not None:
            x = self.layer[1](x, bias=cross_bias, keys=cross[0], values=cross[1])
        return self.layer[-1](x)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where a query may look, the dtype's most negative number where not (transformers'
    convention: a finite number keeps a row with no allowed key free of NaN)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


class T5Stack(nn.Module):
    """The encoder (bidirectional) or the decoder (causal, with cross-attention): blocks, then
    a final RMS norm. The embedding is the model's `shared` one, passed in."""

    def __init__(self, config: T5Config, *, is_decoder: bool):
        super().__init__()
        self.is_decoder = is_decoder
        layers = config.num_decoder_layers if is_decoder else config.num_layers
        self.block = nn.ModuleList(T5Block(config, is_decoder=is_decoder, first=i == 0)
                                   for i in range(layers))
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = Dropout(config.dropout_rate)

    @property
    def first_attention(self) -> T5Attention:
        return self.block[0].layer[0].SelfAttention

    def forward(self, x: torch.Tensor, *, bias: torch.Tensor, cross_bias=None, cross=None,
                cache: KVCache | None = None, step: CacheStep | None = None) -> torch.Tensor:
        x = self.dropout(x)
        for i, block in enumerate(self.block):
            x = block(x, bias=bias, cross_bias=cross_bias,
                      cross=None if cross is None else cross[i], layer=i, cache=cache,
                      step=step)
        return self.dropout(self.final_layer_norm(x))


# -- the model -------------------------------------------------------------------------------------
class T5ForConditionalGeneration(PreTrainedModel):
    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, is_decoder=False)
        self.decoder = T5Stack(config, is_decoder=True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """T5's initialisation (Mesh TensorFlow's): unit-variance embeddings, and every matmul
        scaled by its fan-in — the query's by d_model·d_kv, which stands in for the 1/√d_kv the
        attention leaves out."""
        c, factor = self.config, self.config.initializer_factor
        if module is self:
            nn.init.normal_(self.shared.weight, std=factor * 1.0)
            if not c.tie_word_embeddings:
                nn.init.normal_(self.lm_head.weight, std=factor * 1.0)
        elif isinstance(module, T5Attention):
            nn.init.normal_(module.q.weight, std=factor * (c.d_model * c.d_kv) ** -0.5)
            nn.init.normal_(module.k.weight, std=factor * c.d_model ** -0.5)
            nn.init.normal_(module.v.weight, std=factor * c.d_model ** -0.5)
            nn.init.normal_(module.o.weight, std=factor * c.inner_dim ** -0.5)
            if hasattr(module, "relative_attention_bias"):
                nn.init.normal_(module.relative_attention_bias.weight,
                                std=factor * c.d_model ** -0.5)
        elif isinstance(module, (T5DenseActDense, T5DenseGatedActDense)):
            for name in ("wi", "wi_0", "wi_1"):
                if hasattr(module, name):
                    nn.init.normal_(getattr(module, name).weight, std=factor * c.d_model ** -0.5)
            nn.init.normal_(module.wo.weight, std=factor * c.d_ff ** -0.5)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    # -- encoder -----------------------------------------------------------------------------------
    def encode(self, source_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
               cache: KVCache | None = None) -> torch.Tensor:
        """The encoder's output (B, S, d_model). With a decoding `cache`, also each decoder
        layer's cross-attention keys and values of these sources, written once into the
        cache's rows (its `extras`) for every decoder step to read."""
        B, S = source_ids.shape
        self.check_length(S, "source")
        positions = torch.arange(S, device=source_ids.device)[None]
        bias = self.encoder.first_attention.position_bias(positions, positions)  # (1, h, S, S)
        if attention_mask is not None and not bool(attention_mask.all()):
            bias = bias + additive_mask(attention_mask[:, None, None, :].bool(), bias.dtype)
        hidden = self.encoder(self.shared(source_ids), bias=bias)
        if cache is not None:
            self._store_source(hidden, attention_mask, cache)
        return hidden

    def cross_keys_values(self, hidden: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's cross-attention keys and values (B, heads, S, d_kv)."""
        out = []
        for block in self.decoder.block:
            attention = block.layer[1].EncDecAttention
            out.append((attention.split_heads(attention.k(hidden)),
                        attention.split_heads(attention.v(hidden))))
        return out

    def _store_source(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                      cache: KVCache) -> None:
        B, S, _ = hidden.shape
        width = cache.extras["source_bias"].shape[1]
        if S > width:
            raise ValueError(f"source of {S} tokens does not fit this cache's {width}; make the "
                             "cache with new_cache(..., source_len=S)")
        # The cross-attention's additive mask, made once here rather than at every step.
        source_bias = cache.extras["source_bias"]
        source_bias.fill_(torch.finfo(source_bias.dtype).min)
        if attention_mask is None:
            source_bias[:, :S] = 0.0
        else:
            source_bias[:, :S] = additive_mask(attention_mask.bool(), source_bias.dtype)
        for i, (k, v) in enumerate(self.cross_keys_values(hidden)):
            for name, new in ((f"cross_keys.{i}", k), (f"cross_values.{i}", v)):
                buffer = cache.extras[name]
                buffer[:, :, :S] = new
                buffer[:, :, S:] = 0.0  # masked, but must be finite: a NaN score stays NaN

    # -- decoder -------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        encoder_hidden: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        only: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder logits (B, T, vocab_size) of `input_ids` (B, T).

        Teacher forcing (training, scoring): pass the encoder's output `encoder_hidden` and its
        `encoder_mask`; `attention_mask` marks the decoder's (right) padding. Decoding: pass the
        `cache` that `encode` filled; the tokens continue each row of it, and `attention_mask`
        (B, T) marks new tokens that are padding, as for GPT. `only` (B, T) bool: the logits of
        those positions alone, (N, vocab_size) — a loss needs none at the targets' padding, and
        the output layer is a small model's largest matmul."""
        if cache is not None:
            hidden = self._decode_step(input_ids, cache, attention_mask)
        else:
            if encoder_hidden is None:
                raise ValueError("T5's decoder needs the encoder's output: pass encoder_hidden="
                                 "model.encode(source_ids, ...) (or a cache that encode filled)")
            hidden = self._decode_all(input_ids, encoder_hidden, encoder_mask, attention_mask)
        if last_only:
            hidden = hidden[:, -1:]
        if only is not None:
            hidden = hidden[only]
        if self.config.scales_decoder_outputs:
            # v1.0 shares the embedding matrix with the output: rescale, as Mesh TF does
            hidden = hidden * self.config.d_model ** -0.5
        return self.lm_head(hidden)

    def _decode_all(self, input_ids, encoder_hidden, encoder_mask, attention_mask):
        T = input_ids.shape[1]
        self.check_length(T, "target")
        positions = torch.arange(T, device=input_ids.device)[None]
        bias = self.decoder.first_attention.position_bias(positions, positions)  # (1, h, T, T)
        allowed = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :].bool()
        bias = bias + additive_mask(allowed, bias.dtype)
        cross_bias = self._cross_bias(encoder_mask, encoder_hidden)
        return self.decoder(self.shared(input_ids), bias=bias, cross_bias=cross_bias,
                            cross=self.cross_keys_values(encoder_hidden))

    def _cross_bias(self, encoder_mask, encoder_hidden) -> torch.Tensor:
        """Cross-attention has no position bias: only the source's padding, (B or 1, 1, 1, S)."""
        if encoder_mask is None:
            return torch.zeros(1, 1, 1, encoder_hidden.shape[1], device=encoder_hidden.device)
        return additive_mask(encoder_mask[:, None, None, :].bool(), torch.float32)

    def _decode_step(self, input_ids, cache: KVCache, attention_mask):
        T = input_ids.shape[1]
        if attention_mask is not None and attention_mask.shape[1] != T:
            attention_mask = attention_mask[:, -T:]
        step = cache.begin(T, attention_mask)
        self.check_length(cache.length + T, "target")
        attention = self.decoder.first_attention
        device = input_ids.device
        if step.start is not None and not step.padded:
            # lockstep rows without padding: one bias for all rows, positions = slots — a
            # slice of the cache's table of every (query, key) slot pair, made at its first use
            table = cache.constants.get("position_bias")
            if table is None:
                slots = torch.arange(cache.max_len, device=device)[None]
                table = cache.constants["position_bias"] = attention.position_bias(slots, slots)
            bias = table[:, :, step.start:step.start + T, :step.keys]
        else:
            # each row at its own length, padding taking no position (as GPT's cache counts)
            keys = (cache.valid[:, :step.keys].long().cumsum(-1) - 1).clamp(min=0)
            bias = attention.position_bias(step.positions, keys)
        allowed = step.mask
        if allowed is None and T > 1:  # a fresh, unpadded prompt: causal
            allowed = torch.ones(T, step.keys, dtype=torch.bool, device=device).tril()[None, None]
        if allowed is not None:
            bias = bias + additive_mask(allowed, bias.dtype)
        cross_bias = cache.extras["source_bias"][:, None, None, :]
        cross = [(cache.extras[f"cross_keys.{i}"], cache.extras[f"cross_values.{i}"])
                 for i in range(len(self.decoder.block))]
        hidden = self.decoder(self.shared(input_ids), bias=bias, cross_bias=cross_bias,
                              cross=cross, cache=cache, step=step)
        cache.commit(step)
        return hidden

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for teacher forcing: the start token, then the labels but the last,
        with ignored labels (-100) as padding."""
        shifted = labels.new_full(labels.shape, self.config.decoder_start_token_id)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def check_length(self, length: int, what: str) -> None:
        if length > self.config.n_positions:
            raise ValueError(f"{what} of {length} tokens exceeds the model's n_positions "
                             f"({self.config.n_positions})")

    # -- decoding support (lmlab.generation's decoder protocol) ---------------------------------
    @property
    def context_window(self) -> int:
        """Decoder tokens a row may hold (its start token included)."""
        return self.config.n_positions

    def new_cache(self, batch_size: int, max_len: int | None = None, *,
                  source_len: int | None = None) -> KVCache:
        """A decoder self-attention cache, with room in its `extras` for each row's source:
        every decoder layer's cross-attention keys and values for up to `source_len` source
        tokens (n_positions by default), and the additive mask that hides their padding."""
        c, param = self.config, self.shared.weight
        cache = KVCache(n_layer=c.num_decoder_layers, batch_size=batch_size, n_head=c.num_heads,
                        head_dim=c.d_kv, max_len=max_len or c.n_positions, dtype=param.dtype,
                        device=param.device)
        width = source_len or c.n_positions
        shape = (batch_size, c.num_heads, width, c.d_kv)
        # Not zeroed here: `encode` writes every row's whole width before a step reads it.
        for i in range(c.num_decoder_layers):
            cache.extras[f"cross_keys.{i}"] = torch.empty(shape, dtype=param.dtype,
                                                          device=param.device)
            cache.extras[f"cross_values.{i}"] = torch.empty(shape, dtype=param.dtype,
                                                            device=param.device)
        # float32 as teacher forcing's mask (_cross_bias), whatever the model's dtype
        cache.extras["source_bias"] = torch.zeros(batch_size, width, dtype=torch.float32,
                                                  device=param.device)
        return cache

    # -- size ------------------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
