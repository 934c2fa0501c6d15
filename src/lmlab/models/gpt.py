"""GPT: a decoder-only transformer, as in GPT-2 — config, layers, model, read top to bottom.

Module names equal the Hugging Face GPT-2 checkpoint names (wte, wpe, h.N.attn.c_attn, …), so the
conversion in `models/hf/gpt2.py` is a prefix plus a transpose list. The model only computes logits
(or hidden states); losses live in `lmlab.tasks`, decoding in `lmlab.generation` (which drives
`forward` with a KV cache), and the CPU speed layer in `lmlab.kernels`, which runs this model's
arithmetic in C where that applies — this file is the reference it is tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from lmlab.errors import ConfigError
from lmlab.models.base import PreTrainedModel, checkpoint_io
from lmlab.models.kv_cache import CacheStep, KVCache
from lmlab.models.layers import (ACTIVATIONS, attention, document_causal_mask, label_names,
                                 padded_causal_mask, positions_in_documents)


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    n_positions: int = 1024  # context window (block size)
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # feed-forward width; None means 4 * n_embd
    activation: str = "gelu_new"  # GPT-2's tanh-GELU; "relu" as in the original Transformer
    embd_dropout: float = 0.0
    resid_dropout: float = 0.0
    attn_dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    # False: no biases in the linear layers and LayerNorms (nanoGPT's default: "a bit better and
    # faster"). Saved to the GPT-2 layout as zero biases, which transformers loads unchanged.
    bias: bool = True
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # Sequence classification (GPTForSequenceClassification) only: label names, or a count.
    num_labels: int = 2
    id2label: list[str] | None = None

    def __post_init__(self):
        if self.id2label is not None:
            self.id2label = label_names(self.id2label)
            self.num_labels = len(self.id2label)
        if self.num_labels <= 0:
            raise ConfigError(f"num_labels must be positive, got {self.num_labels}")
        if self.n_inner is None:
            self.n_inner = 4 * self.n_embd
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )
        for name in ("embd_dropout", "resid_dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.attn_dropout
        self.resid_dropout = nn.Dropout(config.resid_dropout)

    def forward(self, x, *, layer: int, mask: torch.Tensor | None, is_causal: bool,
                cache: KVCache | None = None, step: CacheStep | None = None):
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 × (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v, step)  # (B, nh, S, hs): every row's past and now
        dropout = self.attn_dropout if self.training else 0.0
        y = attention(q, k, v, mask=mask, is_causal=is_causal, dropout=dropout)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, nh·hs)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner, bias=config.bias)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd, bias=config.bias)
        self.act = ACTIVATIONS[config.activation]
        self.dropout = nn.Dropout(config.resid_dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, *, layer: int, mask: torch.Tensor | None, is_causal: bool,
                cache: KVCache | None = None, step: CacheStep | None = None):
        x = x + self.attn(self.ln_1(x), layer=layer, mask=mask, is_causal=is_causal, cache=cache,
                          step=step)
        return x + self.mlp(self.ln_2(x))


class GPT(PreTrainedModel):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self._init_weights)
            # GPT-2: scale the residual projections by 1/sqrt(2·n_layer) so the residual
            # stream's variance does not grow with depth.
            std = config.initializer_range / math.sqrt(2 * config.n_layer)
            for block in self.h:
                nn.init.normal_(block.attn.c_proj.weight, mean=0.0, std=std)
                nn.init.normal_(block.mlp.c_proj.weight, mean=0.0, std=std)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # -- forward -------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size); (B, 1, vocab_size) with `last_only` (decoding needs only
        the last position, and the LM head is the largest matmul of a prompt's forward pass)."""
        hidden = self.hidden_states(input_ids, positions=positions, cache=cache,
                                    attention_mask=attention_mask, document_ids=document_ids)
        if last_only:
            hidden = hidden[:, -1:]
        return self.lm_head(hidden)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final (layer-normed) hidden states (B, T, n_embd).

        `attention_mask` (B, T) marks real tokens with 1 and (left) padding with 0; positions
        then count real tokens only, as transformers does for left-padded batches. With a
        `cache`, the tokens continue each row of it (decoding): the cache knows every row's
        past, so the mask covers the new tokens only (a (B, past + T) mask, as transformers
        takes it, is accepted too: its last T columns are used).
        """
        T = input_ids.shape[1]
        if document_ids is not None and (cache is not None or attention_mask is not None):
            raise ValueError("document_ids is for packed training rows: pass neither a cache "
                             "nor an attention_mask with it")
        if attention_mask is not None and attention_mask.shape[1] != T:
            attention_mask = attention_mask[:, -T:]
        # Computed positions never exceed this bound (padding only lowers them); given ones
        # are checked as given.
        bound = None if positions is None else self.config.n_positions
        step = None
        if cache is not None:
            step = cache.begin(T, attention_mask)
            mask, is_causal = step.mask, step.is_causal
            positions = step.positions if positions is None else positions
            bound = bound or cache.length + T - 1
        else:
            mask = None
            if document_ids is not None:
                mask = document_causal_mask(document_ids)
                positions = positions_in_documents(document_ids) if positions is None else positions
            elif attention_mask is not None and not bool(attention_mask.all()):
                mask = padded_causal_mask(attention_mask, T)
            is_causal = mask is None and T > 1
            if positions is None:
                positions = (torch.arange(T, device=input_ids.device)[None]
                             if attention_mask is None
                             else (attention_mask.long().cumsum(-1) - 1).clamp(min=0))
            bound = bound or T - 1
        self.check_positions(positions, bound=bound)
        x = self.drop(self.wte(input_ids) + self.wpe(positions))
        for i, block in enumerate(self.h):
            x = block(x, layer=i, mask=mask, is_causal=is_causal, cache=cache, step=step)
        if cache is not None:
            cache.commit(step)
        return self.ln_f(x)

    def check_positions(self, positions: torch.Tensor, *, bound: int) -> None:
        """Positions never exceed `bound` (padding only lowers them), so the check reads the
        tensor — a device sync on a GPU — only when that bound is past the window."""
        if bound >= self.config.n_positions and positions.numel():
            last = int(positions.max())
            if last >= self.config.n_positions:
                raise ValueError(
                    f"sequence needs position {last}, but the model's context window "
                    f"(n_positions) is {self.config.n_positions}"
                )

    # -- decoding support (lmlab.generation's decoder protocol) --------------------------------
    @property
    def context_window(self) -> int:
        """Positions a sequence may use, prompt and new tokens together."""
        return self.config.n_positions

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        param = self.wte.weight
        return KVCache(
            n_layer=self.config.n_layer,
            batch_size=batch_size,
            n_head=self.config.n_head,
            head_dim=self.config.head_dim,
            max_len=max_len or self.config.n_positions,
            dtype=param.dtype,
            device=param.device,
        )

    # -- size --------------------------------------------------------------------------------------
    def num_parameters(self, *, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6·N for the weight matmuls plus 12·L·d·T for attention
        scores and values (PaLM, appendix B)."""
        c = self.config
        matmul_params = self.num_parameters() - self.wpe.weight.numel()
        if not c.tie_word_embeddings:
            matmul_params -= self.wte.weight.numel()  # the input embedding is a lookup
        return 6 * matmul_params + 12 * c.n_layer * c.n_embd * seq_len


class GPTForSequenceClassification(PreTrainedModel):
    """GPT with a linear `score` head (no bias) on the hidden state of each row's last real
    token — the only position that has seen the whole text in a causal model — as transformers'
    GPT2ForSequenceClassification, whose checkpoints this loads and writes (`transformer.*` and
    `score.weight`). Called like the BERT classifier, so the two families are interchangeable."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = GPT(config)
        self.transformer.lm_head = None  # unused here; HF's classifier has no LM head either
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)
        if not self.score.weight.is_meta:
            nn.init.normal_(self.score.weight, mean=0.0, std=config.initializer_range)

    @classmethod
    def from_backbone(cls, path, *, id2label: list[str]) -> GPTForSequenceClassification:
        """The GPT checkpoint at `path` with a fresh score head for `id2label`."""
        backbone = checkpoint_io().from_pretrained(path)
        if not isinstance(backbone, GPT):
            raise ConfigError(f"{path}: expected a GPT language-model checkpoint, got "
                              f"{type(backbone).__name__}")
        config = GPTConfig(**{**vars(backbone.config), "id2label": list(id2label)})
        model = cls(config)
        state = {k: v for k, v in backbone.state_dict().items() if k != "lm_head.weight"}
        model.transformer.load_state_dict(state, strict=False)
        return model.train()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, num_labels) logits. Rows are right-padded; the last real token is the last 1 of
        `attention_mask`, else (as transformers does) the last token that is not pad_token_id."""
        if token_type_ids is not None:
            raise ValueError("GPT has no token-type embeddings; pass token_type_ids=None")
        hidden = self.transformer.hidden_states(input_ids, attention_mask=attention_mask)
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device)
        if attention_mask is not None:
            last = (positions * attention_mask.to(positions.dtype)).argmax(-1)
        elif self.config.pad_token_id is not None:
            last = (positions * (input_ids != self.config.pad_token_id)).argmax(-1)
        else:
            last = torch.full((B,), T - 1, device=input_ids.device)
        return self.score(hidden[torch.arange(B, device=input_ids.device), last])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
