"""`lmlab pretrain`: data → tokenizer → GPT (or BERT) → the training loop → a Hugging Face-layout model.

The final model lands in RUN_DIR itself (config.json, model.safetensors, tokenizer files), so
`lmlab.from_pretrained(RUN_DIR)` loads it; RUN_DIR also holds the resolved config
(`train_config.yaml`), `metrics.jsonl`, TensorBoard logs, `loss.png` and `checkpoints/`.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lmlab import kernels
from lmlab.config import dump_yaml, read_yaml
from lmlab.data.dataset import META_FILE, TokenDataset
from lmlab.data.prepare import build_tokenizer, prepare_dataset
from lmlab.errors import ConfigError, DataError
from lmlab.models.bert import BertConfig, BertForMaskedLM, BertForPreTraining
from lmlab.models.gpt import GPT, GPTConfig
from lmlab.fileio import atomic_write_bytes
from lmlab.models.hf import from_pretrained
from lmlab.tasks.causal_lm import CausalLMTask
from lmlab.tasks.masked_lm import MaskedLMTask
from lmlab.tokenizer import Tokenizer
from lmlab.training.distributed import from_environment
from lmlab.training.loop import LoopConfig, TrainResult, train
from lmlab.training.plots import plot_run
from lmlab.training.runtime import autocast_dtype, checkpoint_blocks

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    # -- data
    data: str | None = None  # a prepared dataset (lmlab prepare), or raw text files/folders/globs/JSONL
    tokenizer: str = "auto"  # for raw text: "bpe", "wordpiece", "char", a tokenizer directory; "auto" = bpe (causal) / wordpiece (mlm)
    vocab_size: int = 8192  # BPE / WordPiece vocabulary size when a tokenizer is trained on the fly
    val_fraction: float = 0.1
    doc_separator: str | None = None  # raw text: a regex between documents, e.g. '\n\s*\n' (NSP needs documents)
    # -- objective
    objective: Literal["causal", "mlm", "mlm+nsp"] = "causal"  # GPT next-token, or BERT masked LM (+ next sentence)
    mask_prob: float = 0.15  # mlm: share of tokens predicted (80% -> [MASK], 10% random, 10% kept)
    whole_word_mask: bool = False  # mlm: mask a WordPiece word together with its '##' pieces
    # -- model
    init_from: str | None = None  # start from a pretrained model directory (continued pretraining)
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    block_size: int = 256
    dropout: float = 0.0
    activation: Literal["gelu_new", "gelu", "relu"] = "gelu_new"
    bias: bool = True  # causal: False drops the biases of linear layers and LayerNorms (nanoGPT)
    tie_word_embeddings: bool = True
    # -- optimisation
    batch_size: int = 12
    grad_accum: int = 1
    max_steps: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-8  # BERT's recipe used 1e-6
    grad_clip: float = 1.0
    # -- evaluation, checkpoints, logging
    eval_every: int = 250
    eval_tokens: int | None = None  # validation tokens per evaluation; None = the whole split
    save_every: int = 1000
    keep_last: int = 2
    log_every: int = 10
    tensorboard: bool = True
    max_minutes: float | None = None  # time budget: max_steps is cut to what fits
    max_bad_steps: int = 10  # non-finite steps in a row before the run stops
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"  # after the warmup
    early_stopping_patience: int = 0  # evaluations without improvement of val_loss; 0 = off
    early_stopping_min_delta: float = 0.0
    keep_best: bool = True  # keep the weights of the best val_loss in checkpoints/best
    restore_best: bool = False  # save the best weights as the final model, not the last ones
    # -- runtime
    seed: int = 1337
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate (DDP) or shard (FSDP2)
    activation_checkpointing: bool = False  # recompute each block's activations in backward

    def __post_init__(self):
        if self.tokenizer == "auto":  # masked LM needs [MASK] (and [CLS]/[SEP]): WordPiece
            self.tokenizer = "bpe" if self.objective == "causal" else "wordpiece"
        if not 0 < self.mask_prob < 1:
            raise ConfigError(f"mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.objective != "causal" and self.tokenizer in ("bpe", "char"):
            raise ConfigError(f"objective {self.objective} needs a tokenizer with a mask token;"
                              f" {self.tokenizer} has none: use tokenizer wordpiece (the default"
                              " for mlm) or a BERT tokenizer directory")
        if self.whole_word_mask and self.objective == "causal":
            raise ConfigError("whole_word_mask applies to objective mlm or mlm+nsp, not causal")
        if not self.bias and (self.objective != "causal" or self.init_from is not None):
            raise ConfigError("bias: false shapes a new GPT (objective causal, no init_from); "
                              "BERT and pretrained models keep their biases")
        positive = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum",
                    "max_steps", "log_every", "vocab_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "warmup_steps", "keep_last"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"max_minutes must be > 0, got {self.max_minutes}")
        self.loop_config(progress=False)  # its checks (early stopping, restore_best) now

    def loop_config(self, *, progress: bool) -> LoopConfig:
        return LoopConfig(
            max_steps=self.max_steps, lr=self.lr, min_lr=self.min_lr,
            warmup_steps=self.warmup_steps, weight_decay=self.weight_decay, beta1=self.beta1,
            beta2=self.beta2, adam_eps=self.adam_eps, grad_clip=self.grad_clip,
            eval_every=self.eval_every, save_every=self.save_every, keep_last=self.keep_last,
            log_every=self.log_every, max_minutes=self.max_minutes,
            max_bad_steps=self.max_bad_steps, tensorboard=self.tensorboard, progress=progress,
            lr_schedule=self.lr_schedule,
            early_stopping_patience=self.early_stopping_patience,
            early_stopping_min_delta=self.early_stopping_min_delta, keep_best=self.keep_best,
            restore_best=self.restore_best, compile=self.compile,
        )


def load_or_prepare_data(cfg: PretrainConfig, run_dir: Path) -> tuple[TokenDataset, Tokenizer]:
    """A prepared dataset is used as is; raw text is prepared once into RUN_DIR/data."""
    if cfg.data is None:
        raise ConfigError("data: no training data; pass --data PATH (text, folder, glob, JSONL or "
                          "a dataset made by `lmlab prepare`)")
    if (Path(cfg.data) / META_FILE).is_file():
        if cfg.doc_separator is not None:
            raise ConfigError(f"doc_separator: {cfg.data} is a prepared dataset, whose documents "
                              "are already fixed; it applies to raw text (or to `lmlab prepare "
                              "--doc-separator`)")
        directory = Path(cfg.data)
    else:
        directory = run_dir / "data"
        if (directory / META_FILE).is_file():
            _check_same_data_settings(cfg, run_dir)
        else:
            sources = [cfg.data]
            tokenizer = (Tokenizer.from_pretrained(cfg.init_from) if cfg.init_from is not None
                         else build_tokenizer(cfg.tokenizer, sources, vocab_size=cfg.vocab_size))
            prepare_dataset(sources, tokenizer=tokenizer, out_dir=directory,
                            val_fraction=cfg.val_fraction, document_separator=cfg.doc_separator)
    dataset = TokenDataset.open(directory)
    tokenizer = Tokenizer.from_pretrained(directory)
    return dataset, tokenizer


# What shapes RUN_DIR/data when raw text is prepared on the fly. A resumed run reuses that
# dataset, so a different value would be silently ignored: it is an error instead.
_DATA_SETTINGS = ("data", "tokenizer", "vocab_size", "val_fraction", "doc_separator", "init_from")


def _check_same_data_settings(cfg: PretrainConfig, run_dir: Path) -> None:
    saved = run_dir / "train_config.yaml"  # the previous run's (pretrain rewrites it after this)
    if not saved.is_file():
        return
    before = read_yaml(saved)
    for key in _DATA_SETTINGS:
        old, new = before.get(key), getattr(cfg, key)
        same = (Path(old).resolve() == Path(new).resolve() if key == "data" and old and new
                else old == new)
        if not same:
            raise ConfigError(
                f"{key}: {run_dir / 'data'} was prepared with {key} {old!r}, this run gives "
                f"{new!r}; resume with the run's data settings, or start a new --out")


def build_model(cfg: PretrainConfig, tokenizer: Tokenizer) -> torch.nn.Module:
    """The model to train, on the CPU: a new GPT (or BERT, for the mlm objectives) shaped by
    `cfg`, or `cfg.init_from`'s."""
    if cfg.objective != "causal":
        return build_bert(cfg, tokenizer)
    if cfg.init_from is not None:
        model = from_pretrained(cfg.init_from)
        if not isinstance(model, GPT):
            raise ConfigError(f"init_from {cfg.init_from}: a {type(model).__name__} cannot be "
                              "trained as a causal LM; use objective mlm or mlm+nsp")
        _check_context(cfg, model.config.n_positions)
        return model
    return GPT(GPTConfig(
        vocab_size=tokenizer.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, activation=cfg.activation, bias=cfg.bias,
        embd_dropout=cfg.dropout, resid_dropout=cfg.dropout, attn_dropout=cfg.dropout,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def _check_context(cfg: PretrainConfig, positions: int) -> None:
    if positions < cfg.block_size:
        raise ConfigError(f"block_size {cfg.block_size} exceeds {cfg.init_from}'s context "
                          f"window ({positions})")


def build_bert(cfg: PretrainConfig, tokenizer: Tokenizer) -> BertForPreTraining | BertForMaskedLM:
    """BertForPreTraining (mlm+nsp) or BertForMaskedLM (mlm): new, BERT-shaped from `cfg`
    (intermediate size 4 × n_embd), or `cfg.init_from`'s encoder with the heads it has."""
    cls = BertForPreTraining if cfg.objective == "mlm+nsp" else BertForMaskedLM
    if cfg.init_from is not None:
        model = cls.from_encoder(cfg.init_from)
        _check_context(cfg, model.config.max_position_embeddings)
        return model
    return cls(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, intermediate_size=4 * cfg.n_embd,
        hidden_act=cfg.activation, hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout, max_position_embeddings=cfg.block_size,
        pad_token_id=tokenizer.pad_token_id,
    ))


def build_task(cfg: PretrainConfig, dataset: TokenDataset, device: torch.device, rank: int,
               world_size: int, model=None) -> CausalLMTask | MaskedLMTask:
    """The objective: this rank's slice of every global batch, and the evaluation."""
    has_val = bool(dataset.meta.splits.get("val")) and \
        dataset.meta.splits["val"].tokens > cfg.block_size
    val = dataset.split("val") if has_val else None
    if cfg.objective != "causal":
        return MaskedLMTask(
            tokenizer=Tokenizer.from_pretrained(dataset.path), train_tokens=dataset.split("train"),
            train_doc_ends=dataset.document_ends("train"), val_tokens=val,
            val_doc_ends=dataset.document_ends("val") if has_val else None,
            block_size=cfg.block_size, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
            seed=cfg.seed, device=device, nsp=cfg.objective == "mlm+nsp", mask_prob=cfg.mask_prob,
            whole_word=cfg.whole_word_mask, eval_tokens=cfg.eval_tokens, rank=rank,
            world_size=world_size,
        )
    return CausalLMTask(
        train_tokens=dataset.split("train"), val_tokens=val, block_size=cfg.block_size,
        batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, seed=cfg.seed, device=device,
        eval_tokens=cfg.eval_tokens, rank=rank, world_size=world_size,
        fast_loss=kernels.training_loss_adapter(model) if model is not None else None,
    )


def check_compatible(cfg: PretrainConfig, model, dataset: TokenDataset,
                     tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer to save with the model; refuses data the model cannot read."""
    if cfg.init_from is not None:
        model_tokenizer = Tokenizer.from_pretrained(cfg.init_from)
        if model_tokenizer.fingerprint != dataset.tokenizer_fingerprint:
            raise DataError(f"{cfg.data}: tokenized with a different tokenizer than {cfg.init_from}'s; "
                            f"prepare it with `lmlab prepare … --tokenizer {cfg.init_from}`")
        tokenizer = model_tokenizer
    if dataset.vocab_size > model.config.vocab_size:
        raise DataError(f"{cfg.data}: dataset vocabulary ({dataset.vocab_size}) is larger than the "
                        f"model's ({model.config.vocab_size}); prepare it with the model's tokenizer")
    return tokenizer


@dataclass
class PretrainResult:
    run_dir: Path
    result: TrainResult
    num_parameters: int
    plot: Path | None


def pretrain(cfg: PretrainConfig, *, run_dir: str | Path, resume: bool = False,
             progress: bool = True) -> PretrainResult:
    """Train as configured. Under `torchrun` every process calls this: each trains on its slice
    of every global batch (batch_size × grad_accum × world_size sequences), rank 0 writes."""
    run_dir = Path(run_dir)
    dist, device = from_environment(cfg.parallel, cfg.device)
    try:
        if dist.is_main:
            _check_run_dir(run_dir, resume=resume)
            dataset, tokenizer = load_or_prepare_data(cfg, run_dir)  # prepares raw text once
            atomic_write_bytes(run_dir / "train_config.yaml", dump_yaml(cfg).encode())
        dist.barrier()
        if not dist.is_main:
            dataset, tokenizer = load_or_prepare_data(cfg, run_dir)
        # Same seed on every rank: the same initial weights (FSDP shards them without a
        # broadcast); then one stream per rank, so dropout masks differ between ranks.
        _seed_everything(cfg.seed)
        model = build_model(cfg, tokenizer)
        tokenizer = check_compatible(cfg, model, dataset, tokenizer)
        if cfg.activation_checkpointing:
            checkpoint_blocks(model)
        model = model.to(device)
        _seed_everything(cfg.seed + dist.rank)
        task = build_task(cfg, dataset, device, dist.rank, dist.world_size, model)
        flops_per_token = getattr(model, "flops_per_token", None)
        result = train(
            model, task, cfg.loop_config(progress=progress), run_dir=run_dir, device=device,
            amp_dtype=autocast_dtype(device, cfg.precision), resume=resume,
            tokens_per_step=task.tokens_per_step, dist=dist,
            flops_per_step=(flops_per_token(cfg.block_size) * task.tokens_per_step
                            if flops_per_token else 0.0),
        )
        num_parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        weights = dist.full_weights(model)
        plot = None
        if dist.is_main:
            _save_final(cfg, model, weights, tokenizer, run_dir, sharded=dist.active and
                        cfg.parallel == "fsdp")
            plot = plot_run(run_dir)
        dist.barrier()
    finally:
        dist.close()
    return PretrainResult(run_dir=run_dir, result=result, num_parameters=num_parameters,
                          plot=plot)


def _check_run_dir(run_dir: Path, *, resume: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir}: exists and is not a directory")
    if not resume and (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise ConfigError(f"--out {run_dir}: already holds a run; pass --resume to continue it "
                          "or choose another directory")
    run_dir.mkdir(parents=True, exist_ok=True)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _save_final(cfg: PretrainConfig, model, weights, tokenizer: Tokenizer, run_dir: Path, *,
                sharded: bool) -> None:
    """RUN_DIR/config.json + model.safetensors + tokenizer files (HF layout)."""
    if sharded:  # the trained model is in pieces across ranks: save a whole copy
        model = build_model(cfg, tokenizer)
        model.load_state_dict(weights, strict=False)
    config = model.config  # GPT's context is n_positions, BERT's max_position_embeddings
    tokenizer.model_max_length = getattr(config, "n_positions", None) or config.max_position_embeddings
    model.save_pretrained(run_dir, tokenizer=tokenizer)
