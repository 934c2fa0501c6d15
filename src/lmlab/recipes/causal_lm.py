"""Recipe `causal` (`lmlab pretrain`, the default objective): a GPT trained on next-token
prediction — a new one shaped by the config, or `init_from`'s (continued pretraining)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lmlab import kernels
from lmlab.data.dataset import TokenDataset
from lmlab.errors import ConfigError
from lmlab.models.gpt import GPT, GPTConfig
from lmlab.recipes import run_steps
from lmlab.recipes.pretraining import (PretrainConfig, PretrainResult, load_init_from,
                                       run_pretraining, validation_split)
from lmlab.recipes.registry import Recipe, register_recipe
from lmlab.tasks.causal_lm import CausalLMTask
from lmlab.tokenizer import Tokenizer


@dataclass
class CausalLMConfig(PretrainConfig):
    objective: Literal["causal"] = "causal"
    bias: bool = True  # False drops the biases of linear layers and LayerNorms (nanoGPT)
    tie_word_embeddings: bool = True  # the output layer shares the token embedding's weights

    def __post_init__(self):
        if self.tokenizer == "auto":
            self.tokenizer = "bpe"
        if not self.bias and self.init_from is not None:
            raise ConfigError("bias: false shapes a new GPT (no init_from); pretrained models "
                              "keep their biases")
        super().__post_init__()


def build_model(cfg: CausalLMConfig, tokenizer: Tokenizer) -> GPT:
    """A new GPT shaped by `cfg`, or `cfg.init_from`'s, on the CPU."""
    if cfg.init_from is not None:
        return load_init_from(cfg, GPT, "trained as a causal LM; use objective mlm or mlm+nsp")
    return GPT(GPTConfig(
        vocab_size=tokenizer.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, activation=cfg.activation, bias=cfg.bias,
        embd_dropout=cfg.dropout, resid_dropout=cfg.dropout, attn_dropout=cfg.dropout,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def build_task(cfg: CausalLMConfig, dataset: TokenDataset, model: torch.nn.Module, *,
               device: torch.device, rank: int, world_size: int) -> CausalLMTask:
    """This rank's slice of every global batch, and the evaluation; on CPU the C training step
    where it applies (lmlab/kernels), unless the config switches the speed layer off."""
    return CausalLMTask(
        train_tokens=dataset.split("train"), val_tokens=validation_split(cfg, dataset),
        block_size=cfg.block_size, batch_size=cfg.optim.batch_size,
        grad_accum=cfg.optim.grad_accum, seed=cfg.optim.seed, device=device,
        eval_tokens=cfg.eval_tokens, rank=rank, world_size=world_size,
        fast_loss=kernels.training_loss_adapter(model) if cfg.optim.cpu_kernels else None,
    )


@run_steps.undo_on_failure
def pretrain_causal_lm(cfg: CausalLMConfig, *, run_dir: str | Path, resume: bool = False,
                       progress: bool = True) -> PretrainResult:
    return run_pretraining(cfg, recipe="causal", build_model=build_model, build_task=build_task,
                           run_dir=run_dir, resume=resume, progress=progress)


register_recipe(Recipe(
    name="causal", command="pretrain", config=CausalLMConfig, run=pretrain_causal_lm,
    help="a GPT on next-token prediction (new, or continued from init_from)",
))
