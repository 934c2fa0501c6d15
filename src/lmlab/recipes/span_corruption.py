"""Recipe `span` (`lmlab pretrain --objective span`): a T5 encoder–decoder pretrained with T5's
span corruption — a new one shaped by the config, or `init_from`'s (continued pretraining).

The shape keys are the ones every pretraining objective has: `n_layer` (encoder and decoder
blocks each, unless `num_decoder_layers`), `n_head`, `n_embd` (T5's d_model), `dropout` (its
dropout_rate) and `block_size` — here the encoder's input length, T5's `inputs_length`: each
example is the raw window of the token stream whose corrupted input is exactly that long
(lmlab.tasks.span_corruption). T5's own keys add the rest of a T5Config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lmlab.data.dataset import TokenDataset
from lmlab.errors import ConfigError
from lmlab.models.t5 import T5Config, T5ForConditionalGeneration
from lmlab.recipes import run_steps
from lmlab.recipes.pretraining import (PretrainConfig, PretrainResult, load_init_from,
                                       run_pretraining, validation_split)
from lmlab.recipes.registry import Recipe, register_recipe
from lmlab.tasks.span_corruption import SpanCorruptionTask, span_lengths
from lmlab.tokenizer import Tokenizer


@dataclass
class SpanCorruptionConfig(PretrainConfig):
    objective: Literal["span"] = "span"  # the recipe: span, T5's span corruption
    n_layer: int = 6  # encoder blocks; the decoder has as many unless num_decoder_layers
    n_embd: int = 384  # width: T5's d_model
    # the encoder's input length in tokens, EOS included (T5's inputs_length): the raw windows
    # are as long as fills it after corruption
    block_size: int = 128
    dropout: float = 0.0  # T5's dropout_rate: after every sub-layer and on the attention weights
    noise_density: float = 0.15  # share of each window's tokens hidden in noise spans (T5: 0.15)
    mean_noise_span_length: float = 3.0  # mean length of a noise span in tokens (T5: 3)
    d_ff: int | None = None  # width of the feed-forward layers; None: 4 × n_embd (T5-small's)
    d_kv: int | None = None  # width of one attention head; None: n_embd / n_head
    num_decoder_layers: int | None = None  # decoder blocks; None: n_layer, as many as the encoder
    # T5 v1.0 (ReLU) or v1.1 (gated GELU); replaces `activation`, which span does not use
    feed_forward_proj: Literal["relu", "gated-gelu"] = "relu"
    relative_attention_num_buckets: int = 32  # distance buckets of the relative position bias
    relative_attention_max_distance: int = 128  # distances beyond this share the last bucket
    # the output layer shares the embedding matrix; None: tied for relu (v1.0), not for v1.1
    tie_word_embeddings: bool | None = None

    def __post_init__(self):
        if self.tokenizer == "auto":  # T5's SentencePiece-style Unigram, with its sentinels
            self.tokenizer = "unigram"
        if self.tokenizer in ("bpe", "wordpiece", "char"):
            raise ConfigError(f"objective span needs a tokenizer with T5's sentinel tokens "
                              f"(<extra_id_0> …); {self.tokenizer} has none: use tokenizer "
                              "unigram (the default for span) or a T5 tokenizer directory")
        if self.activation != "gelu_new":
            raise ConfigError(f"activation: objective span shapes T5's feed-forward with "
                              f"feed_forward_proj (relu or gated-gelu), not activation "
                              f"({self.activation!r})")
        if self.d_kv is None and self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be a multiple of n_head "
                              f"({self.n_head}), or give d_kv, the width of one head")
        for name in ("d_ff", "d_kv", "num_decoder_layers"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if not 0 < self.noise_density < 1:
            raise ConfigError(f"noise_density must be in (0, 1), got {self.noise_density}")
        if not self.mean_noise_span_length >= 1:
            raise ConfigError(f"mean_noise_span_length must be >= 1, got "
                              f"{self.mean_noise_span_length}")
        if self.block_size < 3:
            raise ConfigError(f"block_size, the encoder's input length, must be >= 3 for span "
                              f"corruption (a token, a sentinel, EOS), got {self.block_size}")
        super().__post_init__()


def build_model(cfg: SpanCorruptionConfig, tokenizer: Tokenizer) -> T5ForConditionalGeneration:
    """A new T5 shaped by `cfg`, or `cfg.init_from`'s, on the CPU."""
    if cfg.init_from is not None:
        return load_init_from(cfg, T5ForConditionalGeneration, "trained with span corruption; "
                              "it needs an encoder–decoder (T5)")
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ConfigError("objective span needs <pad> and </s> in the tokenizer (T5's); use "
                          "tokenizer unigram or a T5 tokenizer directory")
    targets_length = span_lengths(cfg.block_size, cfg.noise_density,
                                  cfg.mean_noise_span_length)[2]
    return T5ForConditionalGeneration(T5Config(
        vocab_size=tokenizer.vocab_size, d_model=cfg.n_embd,
        d_kv=cfg.d_kv or cfg.n_embd // cfg.n_head, d_ff=cfg.d_ff or 4 * cfg.n_embd,
        num_layers=cfg.n_layer, num_decoder_layers=cfg.num_decoder_layers,
        num_heads=cfg.n_head, relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        dropout_rate=cfg.dropout, feed_forward_proj=cfg.feed_forward_proj,
        tie_word_embeddings=(cfg.feed_forward_proj == "relu" if cfg.tie_word_embeddings is None
                             else cfg.tie_word_embeddings),
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        n_positions=max(cfg.block_size, targets_length),
    ))


def build_task(cfg: SpanCorruptionConfig, dataset: TokenDataset, model: torch.nn.Module, *,
               device: torch.device, rank: int, world_size: int) -> SpanCorruptionTask:
    """This rank's rows of every global batch (corrupted anew each step), and the evaluation on
    one fixed corruption of the validation split."""
    tokenizer = Tokenizer.from_pretrained(dataset.path)
    return SpanCorruptionTask(
        train_tokens=dataset.split("train"), val_tokens=validation_split(cfg, dataset),
        inputs_length=cfg.block_size, sentinel_ids=tokenizer.sentinel_ids,
        eos_token_id=tokenizer.eos_token_id, noise_density=cfg.noise_density,
        mean_noise_span_length=cfg.mean_noise_span_length, batch_size=cfg.optim.batch_size,
        grad_accum=cfg.optim.grad_accum, seed=cfg.optim.seed, device=device,
        eval_tokens=cfg.eval_tokens, rank=rank, world_size=world_size,
    )


@run_steps.undo_on_failure
def pretrain_span_corruption(cfg: SpanCorruptionConfig, *, run_dir: str | Path,
                             resume: bool = False, progress: bool = True) -> PretrainResult:
    return run_pretraining(cfg, recipe="span", build_model=build_model, build_task=build_task,
                           run_dir=run_dir, resume=resume, progress=progress)


register_recipe(Recipe(
    name="span", command="pretrain", config=SpanCorruptionConfig, run=pretrain_span_corruption,
    help="a T5 encoder–decoder on span corruption (T5's pretraining)",
))
