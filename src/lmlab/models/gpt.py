"""GPT: a decoder-only transformer, as in GPT-2 — config, layers, model, read top to bottom.

Module names equal the Hugging Face GPT-2 checkpoint names (wte, wpe, h.N.attn.c_attn, …), so the
conversion in `models/hf.py` is a prefix plus a transpose list. The model only computes logits
(or hidden states); losses live in `lmlab.tasks`, decoding in `lmlab.generation`.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn as nn

from lmlab import kernels
from lmlab.errors import ConfigError
from lmlab.models.kv_cache import KVCache
from lmlab.models.layers import ACTIVATIONS, Linear, label_names, attention, padded_causal_mask


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
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.attn_dropout
        self.resid_dropout = nn.Dropout(config.resid_dropout)

    def forward(self, x, *, layer: int, cache: KVCache | None, mask: torch.Tensor | None):
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 × (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, S, hs): everything up to this step
        # A single query attending to the whole cache needs no mask; a multi-token step on top
        # of a filled cache needs an explicit one, because SDPA's is_causal aligns top-left.
        is_causal = mask is None and T > 1
        if is_causal and cache is not None and k.shape[2] != T:
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(
                k.shape[2] - T
            )
        dropout = self.attn_dropout if self.training else 0.0
        y = attention(q, k, v, mask=mask, is_causal=is_causal, dropout=dropout)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, nh·hs)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.n_inner, bias=config.bias)
        self.c_proj = Linear(config.n_inner, config.n_embd, bias=config.bias)
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

    def forward(self, x, *, layer: int, cache: KVCache | None, mask: torch.Tensor | None):
        x = x + self.attn(self.ln_1(x), layer=layer, cache=cache, mask=mask)
        return x + self.mlp(self.ln_2(x))


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
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
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final (layer-normed) hidden states (B, T, n_embd).

        `attention_mask` (B, S) marks real tokens with 1 and (left) padding with 0 over every
        position so far, cached ones included; positions then default to counting real tokens
        only, as transformers does for left-padded batches.
        """
        T = input_ids.shape[1]
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = padded_causal_mask(attention_mask, T)
        x = self.drop(self._embed(input_ids, positions, cache, attention_mask))
        for i, block in enumerate(self.h):
            x = block(x, layer=i, cache=cache, mask=mask)
        if cache is not None:
            cache.advance(T)
        return self.ln_f(x)

    def _embed(self, input_ids, positions, cache, attention_mask) -> torch.Tensor:
        """Token + position embeddings (B, T, n_embd) of tokens fed at the cache's length."""
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        # Positions never exceed start + T - 1 (left padding only lowers them), so this check
        # needs no device sync; explicit positions are checked as given.
        self._check_position(start + T - 1 if positions is None else int(positions.max()))
        if positions is None:
            if attention_mask is not None:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
            else:
                positions = torch.arange(start, start + T, device=input_ids.device)[None]
        return self.wte(input_ids) + self.wpe(positions)

    def _check_position(self, last: int) -> None:
        if last >= self.config.n_positions:
            raise ValueError(
                f"sequence needs position {last}, but the model's context window "
                f"(n_positions) is {self.config.n_positions}"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size); (B, 1, vocab_size) with `last_only` (decoding needs only
        the last position, and the LM head is the largest matmul of a prompt's forward pass)."""
        B, T = input_ids.shape
        decoder = None if cache is None or self.training else self._fused_decoder(cache, B, B * T)
        if decoder is not None:  # a few tokens on top of a cache, inside decoding: one C call
            x = self._embed(input_ids, positions, cache, attention_mask).reshape(B * T, -1)
            if attention_mask is not None and bool(attention_mask.all()):
                attention_mask = None
            logits = decoder.step(x, cache.keys, cache.values, position=cache.length,
                                  tokens_per_row=T, mask=attention_mask).view(B, T, -1)
            cache.advance(T)
            return logits[:, -1:] if last_only else logits
        hidden = self.hidden_states(
            input_ids, positions=positions, cache=cache, attention_mask=attention_mask
        )
        if last_only:
            hidden = hidden[:, -1:]
        return self.lm_head(hidden)

    # -- decoding support ----------------------------------------------------------------------
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

    def decode_step(self, token: torch.Tensor, cache: KVCache,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, vocab_size) for one new token per row, `token` (B, 1), at the cache's next
        position — `forward(token, cache=cache, attention_mask=...)[:, -1]`.

        Decoding a small model spends much of a token's time in the glue around the arithmetic.
        Inside decoding on CPU (see `_fused_decoder`) the whole step is one call into
        lmlab's C kernel, as forward's is there: the module path's arithmetic in another
        summation order (logits equal to ~1e-6). Otherwise this path keeps only what one query
        needs — no causal-mask or position-range construction, no dropout modules, no
        (B, T, 3, nh, hs) permutes — still calling the layers as modules so that hooks and
        replaced layers work. Either way, forward's numbers bit for bit.
        """
        if self.training:  # dropout is active: the full path
            return self(token, cache=cache, attention_mask=attention_mask)[:, -1]
        position = cache.length
        self._check_position(position)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            # Left padding: the new token is real, so it may attend to every non-pad key.
            mask = attention_mask.bool()[:, None, None, :]
            positions = (attention_mask.long().sum(-1) - 1).clamp(min=0)
            x = self.wte(token[:, 0]) + self.wpe(positions)
        else:
            x = self.wte(token[:, 0]) + self.wpe.weight[position]
        batch, n_head, head_dim = len(token), self.config.n_head, self.config.head_dim
        decoder = self._fused_decoder(cache, batch, batch)
        if decoder is not None:
            logits = decoder.step(x, cache.keys, cache.values, position=position,
                                  mask=None if mask is None else attention_mask)
            cache.advance(1)
            return logits
        for i, block in enumerate(self.h):
            qkv = block.attn.c_attn(block.ln_1(x)).view(batch, 3, n_head, 1, head_dim)
            k, v = cache.update(i, qkv[:, 1], qkv[:, 2])
            y = attention(qkv[:, 0], k, v, mask=mask, is_causal=False)
            x = x + block.attn.c_proj(y.reshape(batch, -1))
            mlp = block.mlp
            x = x + mlp.c_proj(mlp.act(mlp.c_fc(block.ln_2(x))))
        cache.advance(1)
        return self.lm_head(self.ln_f(x))

    # The fused decode step (lmlab/kernels): one C call for every block, the final LayerNorm and
    # the head, instead of ~16 tensor operations per block. Taken only inside decoding
    # (packed_inference: CPU, fp32, no autograd) for a few rows, and only for the stock
    # architecture — a replaced layer (LoRA), a hook or autocast means the module path, which
    # stays the reference the fused step is tested against.
    def _fused_decoder(self, cache: KVCache, batch: int, rows: int) -> kernels.GPTDecoder | None:
        if not (self.lm_head._decoding and rows <= kernels.FUSED_MAX_ROWS and kernels.available()
                and not torch.is_grad_enabled() and not _cpu_autocast()):
            return None
        plan = getattr(self, "_decode_plan", None)  # memo for one packed_inference block
        if plan is None:
            plan = self._decode_plan = self._stock_architecture() and kernels.GPTDecoder(
                [self._block_tensors(block) for block in self.h], head=self.lm_head.weight,
                ln_f=(self.ln_f.weight, self.ln_f.bias), eps=self.config.layer_norm_epsilon,
                activation=self.config.activation)
        return plan if plan and plan.accepts(cache.keys, cache.values, batch) else None

    def _stock_architecture(self) -> bool:
        if torch.nn.modules.module._global_forward_hooks or \
                torch.nn.modules.module._global_forward_pre_hooks:
            return False
        if any(m._forward_hooks or m._forward_pre_hooks for m in self.modules()):
            return False
        for block in self.h:
            if "forward" in vars(block):  # replaced, e.g. by activation checkpointing
                return False
            parts = (block.ln_1, block.attn.c_attn, block.attn.c_proj, block.ln_2,
                     block.mlp.c_fc, block.mlp.c_proj)
            if tuple(map(type, parts)) != (nn.LayerNorm, Linear, Linear, nn.LayerNorm, Linear, Linear):
                return False
            if block.mlp.act is not ACTIVATIONS[self.config.activation]:
                return False
        return (type(self.ln_f) is nn.LayerNorm and type(self.lm_head) is Linear
                and self.config.activation in kernels.GPT_ACTIVATIONS
                and all(map(_fp32_cpu_contiguous, self.parameters())))

    # -- training support ----------------------------------------------------------------------
    def fused_lm_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """The summed next-token cross-entropy of `labels` given `input_ids` (both (B, T)),
        computed with autograd by lmlab's C training step (lmlab/kernels/train_f32.c) — without
        grad mode (evaluation), by its forward pass alone — or None where that step does not
        apply, and the caller takes logits from `forward`.

        A small model's eager step is mostly dispatch and badly split small products; the C
        step gives each thread whole sequences and single-threaded BLAS (nanoGPT's Shakespeare
        recipe: ~20 instead of ~29 ms a step here). It applies to the stock architecture on CPU
        in fp32 without active dropout or autocast, with at least one sequence per thread; the
        module path stays the reference it is tested against (gradients equal to ~1e-6; the
        summation order differs, so the two are not bit-identical).
        """
        c = self.config
        if not ((not self.training or c.embd_dropout == c.resid_dropout == c.attn_dropout == 0.0)
                and not _cpu_autocast()
                and input_ids.dim() == 2 and labels.shape == input_ids.shape
                and input_ids.dtype == labels.dtype == torch.long
                and input_ids.device.type == labels.device.type == "cpu"
                and kernels.training_available()):
            return None
        batch, T = input_ids.shape
        plan = self._fused_training_plan()
        shards = kernels.training_shards(batch, plan.n_params) if plan else 0
        attention = c.n_layer * batch * c.n_head * T * T
        if shards == 0 or T > c.n_positions or attention > kernels.TRAIN_MAX_ATTENTION_FLOATS:
            return None
        # Out-of-range ids would be read as addresses in C; forward raises the proper error.
        if (int(input_ids.min()) < 0 or int(input_ids.max()) >= c.vocab_size
                or int(labels.min()) < 0 or int(labels.max()) >= c.vocab_size):
            return None
        pool = self.__dict__.setdefault("_train_buffers", {})
        return kernels.gpt_causal_lm_loss(
            plan.layers, wte=self.wte.weight, wpe=self.wpe.weight,
            ln_f=(self.ln_f.weight, self.ln_f.bias), head=self.lm_head.weight, n_head=c.n_head,
            eps=c.layer_norm_epsilon, activation=c.activation, input_ids=input_ids,
            labels=labels, shards=shards, pool=pool)

    def _fused_training_plan(self) -> _TrainingPlan | None:
        """The per-block tensors and parameter count of the stock architecture (None if it is
        not), memoised: walking the module tree through nn.Module attributes costs ~0.7 ms a
        step (3% of the Shakespeare recipe's), checking that it has not changed ~0.05 ms."""
        plan = self.__dict__.get("_training_plan")
        if plan is not None and plan.activation == self.config.activation and plan.tree.unchanged():
            return plan
        plan = _TrainingPlan(self) if self._stock_architecture() else None
        self.__dict__["_training_plan"] = plan
        return plan

    @staticmethod
    def _block_tensors(block: Block) -> tuple:
        attn, mlp = block.attn, block.mlp
        return (block.ln_1.weight, block.ln_1.bias, attn.c_attn.weight, attn.c_attn.bias,
                attn.c_proj.weight, attn.c_proj.bias, block.ln_2.weight, block.ln_2.bias,
                mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias)

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Prompt + new tokens, like transformers' generate; see lmlab.generation.generate."""
        from lmlab.generation import generate  # generation builds on models, not the reverse

        return generate(self, input_ids, **kwargs)

    # -- checkpoints ---------------------------------------------------------------------------
    def save_pretrained(self, directory, *, tokenizer=None) -> None:
        """Write config.json + model.safetensors in the Hugging Face GPT-2 layout."""
        from lmlab.models.hf import save_pretrained

        save_pretrained(self, directory, tokenizer=tokenizer)

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



class GPTForSequenceClassification(nn.Module):
    """GPT with a linear `score` head (no bias) on the hidden state of each row's last real
    token — the only position that has seen the whole text in a causal model — as transformers'
    GPT2ForSequenceClassification, whose checkpoints this loads and writes (`transformer.*` and
    `score.weight`). Called like the BERT classifier, so the two families are interchangeable."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = GPT(config)
        self.transformer.lm_head = None  # unused here; HF's classifier has no LM head either
        self.score = Linear(config.n_embd, config.num_labels, bias=False)
        if not self.score.weight.is_meta:
            nn.init.normal_(self.score.weight, mean=0.0, std=config.initializer_range)

    @classmethod
    def from_backbone(cls, path, *, id2label: list[str]) -> GPTForSequenceClassification:
        """The GPT checkpoint at `path` with a fresh score head for `id2label`."""
        from lmlab.models.hf import from_pretrained

        backbone = from_pretrained(path)
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

    def save_pretrained(self, directory, *, tokenizer=None) -> None:
        """Write config.json + model.safetensors in transformers' GPT2ForSequenceClassification
        layout."""
        from lmlab.models.hf import save_pretrained

        save_pretrained(self, directory, tokenizer=tokenizer)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class _ModuleTree:
    """A module tree's structure as plain references — every module's children, parameters
    and hooks — to tell cheaply (dict lookups, no nn.Module.__getattr__) whether anything that
    decides the fused path has changed since: a replaced or added layer or parameter, a hook,
    a patched forward, parameters moved to another dtype, device or layout."""

    def __init__(self, root: nn.Module):
        self.modules = [(m, list(m._modules.values()), list(m._parameters.values()))
                        for m in root.modules()]
        self.parameters = [p for _, _, params in self.modules for p in params if p is not None]

    def unchanged(self) -> bool:
        if (torch.nn.modules.module._global_forward_hooks
                or torch.nn.modules.module._global_forward_pre_hooks):
            return False
        for module, children, params in self.modules:
            if (module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__
                    or len(module._modules) != len(children)
                    or len(module._parameters) != len(params)
                    or not all(map(operator.is_, module._modules.values(), children))
                    or not all(map(operator.is_, module._parameters.values(), params))):
                return False
        return all(map(_fp32_cpu_contiguous, self.parameters))


class _TrainingPlan:
    def __init__(self, model: GPT):
        self.tree = _ModuleTree(model)
        self.activation = model.config.activation  # what the C step computes, checked each call
        self.layers = [model._block_tensors(block) for block in model.h]
        self.n_params = sum(p.numel() for p in model.parameters())


def _fp32_cpu_contiguous(p: torch.Tensor) -> bool:
    """What the fused C steps read a parameter as."""
    return p.is_cpu and p.dtype == torch.float32 and p.is_contiguous()
