"""Recipes `mlm` and `mlm+nsp` (`lmlab pretrain --objective …`): a BERT encoder trained with
masked language modelling, and with next-sentence prediction too (BERT's pair of objectives) —
a new one shaped by the config, or `init_from`'s encoder with the heads it has."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch

from lmlab.data.dataset import TokenDataset
from lmlab.errors import ConfigError
from lmlab.models.bert import BertConfig, BertForMaskedLM, BertForPreTraining
from lmlab.recipes import run_steps
from lmlab.recipes.pretraining import (PretrainConfig, PretrainResult, check_context,
                                       run_pretraining, validation_split)
from lmlab.recipes.registry import Recipe, register_recipe
from lmlab.tasks.masked_lm import MaskedLMTask
from lmlab.tokenizer import Tokenizer

@dataclass
class MaskedLMConfig(PretrainConfig):
    NSP: ClassVar[bool] = False  # next-sentence prediction too
    MODEL: ClassVar[type] = BertForMaskedLM  # the model that carries the objective's heads

    objective: Literal["mlm"] = "mlm"
    mask_prob: float = 0.15  # share of tokens predicted (80% -> [MASK], 10% random, 10% kept)
    whole_word_mask: bool = False  # mask a WordPiece word together with its '##' pieces

    def __post_init__(self):
        if self.tokenizer == "auto":  # masked LM needs [MASK] (and [CLS]/[SEP]): WordPiece
            self.tokenizer = "wordpiece"
        if self.tokenizer in ("bpe", "unigram", "char"):
            raise ConfigError(f"objective {self.objective} needs a tokenizer with a mask token;"
                              f" {self.tokenizer} has none: use tokenizer wordpiece (the default"
                              " for mlm) or a BERT tokenizer directory")
        if not 0 < self.mask_prob < 1:
            raise ConfigError(f"mask_prob must be in (0, 1), got {self.mask_prob}")
        super().__post_init__()


@dataclass
class MaskedLMNSPConfig(MaskedLMConfig):
    NSP: ClassVar[bool] = True
    MODEL: ClassVar[type] = BertForPreTraining

    objective: Literal["mlm+nsp"] = "mlm+nsp"


def build_model(cfg: MaskedLMConfig, tokenizer: Tokenizer) -> BertForMaskedLM | BertForPreTraining:
    """New, BERT-shaped from `cfg` (intermediate size 4 × n_embd), or `cfg.init_from`'s encoder
    with the heads it has."""
    cls = cfg.MODEL
    if cfg.init_from is not None:
        model = cls.from_encoder(cfg.init_from)
        check_context(cfg, model)
        return model
    return cls(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, intermediate_size=4 * cfg.n_embd,
        hidden_act=cfg.activation, hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout, max_position_embeddings=cfg.block_size,
        pad_token_id=tokenizer.pad_token_id,
    ))


def build_task(cfg: MaskedLMConfig, dataset: TokenDataset, model: torch.nn.Module, *,
               device: torch.device, rank: int, world_size: int) -> MaskedLMTask:
    """This rank's rows of every global batch (masked anew each step), and the evaluation on
    one fixed masking of the validation split."""
    val = validation_split(cfg, dataset)
    return MaskedLMTask(
        tokenizer=Tokenizer.from_pretrained(dataset.path), train_tokens=dataset.split("train"),
        train_doc_ends=dataset.document_ends("train"), val_tokens=val,
        val_doc_ends=dataset.document_ends("val") if val is not None else None,
        block_size=cfg.block_size, batch_size=cfg.optim.batch_size,
        grad_accum=cfg.optim.grad_accum, seed=cfg.optim.seed, device=device,
        nsp=cfg.NSP, mask_prob=cfg.mask_prob, whole_word=cfg.whole_word_mask,
        eval_tokens=cfg.eval_tokens, rank=rank, world_size=world_size,
    )


@run_steps.undo_on_failure
def pretrain_masked_lm(cfg: MaskedLMConfig, *, run_dir: str | Path, resume: bool = False,
                       progress: bool = True) -> PretrainResult:
    return run_pretraining(cfg, recipe=cfg.objective, build_model=build_model,
                           build_task=build_task, run_dir=run_dir, resume=resume,
                           progress=progress)


register_recipe(Recipe(
    name="mlm", command="pretrain", config=MaskedLMConfig, run=pretrain_masked_lm,
    help="a BERT encoder on masked language modelling",
))
register_recipe(Recipe(
    name="mlm+nsp", command="pretrain", config=MaskedLMNSPConfig, run=pretrain_masked_lm,
    help="a BERT encoder on masked LM and next-sentence prediction (BERT's pretraining)",
))
