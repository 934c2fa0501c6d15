"""What the pretraining recipes (causal_lm.py, masked_lm.py, span_corruption.py) share: the
config keys of data, model shape and step horizon; data preparation; and the run itself — data →
model → the one training loop → a Hugging Face-layout model in RUN_DIR — into which each recipe
plugs how it builds its model and its task.

RUN_DIR ends up holding the final model (config.json, model.safetensors, tokenizer files:
`lmlab.from_pretrained(RUN_DIR)` loads it), `train_config.yaml`, `metrics.jsonl`, TensorBoard
logs, `loss.png`, `throughput.png` and `checkpoints/`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lmlab.config import read_yaml
from lmlab.data.dataset import META_FILE, TokenDataset
from lmlab.data.prepare import build_tokenizer, prepare_dataset
from lmlab.errors import ConfigError, DataError
from lmlab.models.hf import from_pretrained
from lmlab.recipes import run_steps
from lmlab.recipes.registry import Recipe, find_recipe, load_recipe_config
from lmlab.tokenizer import Tokenizer
from lmlab.training.distributed import from_environment
from lmlab.training.loop import LoopConfig, OptimConfig, TrainResult, train
from lmlab.training.plots import plot_run
from lmlab.training.runtime import autocast_dtype, checkpoint_blocks

log = logging.getLogger(__name__)


def pretraining_optim() -> OptimConfig:
    """Pretraining's loop defaults (nanoGPT's small-model recipe)."""
    return OptimConfig(lr=1e-3, min_lr=1e-4, weight_decay=0.1, beta2=0.99, batch_size=12,
                       tensorboard=True, seed=1337, keep_last=2)


@dataclass
class PretrainConfig:
    """The keys every pretraining recipe has; each recipe's config adds its objective's."""

    objective: str = "causal"  # the recipe: causal, mlm, mlm+nsp or span (each config narrows it)
    # -- data
    # a prepared dataset (lmlab prepare), or raw text: files, folders, globs, JSONL — one, or a
    # list of them (a YAML list: several corpora in one run)
    data: str | list[str] | None = None
    # raw text: a held-out validation corpus (instead of val_fraction of `data`), e.g. a
    # domain's own validation split when continuing pretraining on it
    val_data: str | list[str] | None = None
    text_field: str = "text"  # the string field of JSONL records
    # for raw text: "bpe", "wordpiece", "unigram" (T5's, with sentinels), "char" or a tokenizer
    # directory; "auto": the recipe's
    tokenizer: str = "auto"
    vocab_size: int = 8192  # size of a BPE / WordPiece / Unigram tokenizer trained on the fly
    val_fraction: float = 0.1  # raw text without val_data: the share held out for validation
    # raw text: a regex between documents, e.g. '\n\s*\n' (NSP needs documents)
    doc_separator: str | None = None
    # -- model
    init_from: str | None = None  # start from a pretrained model directory (continued pretraining)
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # attention heads per block
    n_embd: int = 384  # width: embedding and hidden size
    block_size: int = 256  # context length in tokens
    dropout: float = 0.0  # dropout probability in embeddings, attention and residuals
    activation: Literal["gelu_new", "gelu", "relu"] = "gelu_new"  # the MLP's nonlinearity
    # -- the horizon: steps, and evaluations and checkpoints along them
    max_steps: int = 2000  # optimizer steps of the run
    warmup_steps: int = 100  # steps of linear learning-rate warmup
    eval_every: int = 250  # 0 = evaluate only before training and at the end
    eval_tokens: int | None = None  # validation tokens per evaluation; None = the whole split
    save_every: int = 1000  # 0 = checkpoint only at the end
    # -- processes
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate (DDP) or shard (FSDP2)
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    # -- the loop: optimizer, schedule, batches, early stopping, runtime (training/loop.py)
    optim: OptimConfig = field(default_factory=pretraining_optim)

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "block_size", "max_steps", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        self.loop_config(progress=False)  # its checks (patience needs eval_every) now

    def loop_config(self, *, progress: bool) -> LoopConfig:
        return LoopConfig(max_steps=self.max_steps, optim=self.optim,
                          warmup_steps=self.warmup_steps, eval_every=self.eval_every,
                          save_every=self.save_every, progress=progress)


def pretrain_recipe(path: str | Path | None,
                    overrides: dict[str, Any] | None = None) -> tuple[Recipe, PretrainConfig]:
    """The pretraining recipe that the config's `objective` names (causal when it names none),
    and its config."""
    overrides = dict(overrides or {})
    values = read_yaml(path) if path is not None else {}
    where = "--objective" if "objective" in overrides else f"{path}: objective"
    name = str(overrides.get("objective", values.get("objective", "causal")))
    recipe = find_recipe(name, command="pretrain", where=where)
    return recipe, load_recipe_config(recipe, path, overrides)


# -- data -----------------------------------------------------------------------------------------
def load_or_prepare_data(cfg: PretrainConfig, run_dir: Path) -> tuple[TokenDataset, Tokenizer]:
    """A prepared dataset is used as is; raw text is prepared once into RUN_DIR/data."""
    if cfg.data is None:
        raise ConfigError("data: no training data; pass --data PATH (text, folder, glob, JSONL or "
                          "a dataset made by `lmlab prepare`)")
    if isinstance(cfg.data, str) and (Path(cfg.data) / META_FILE).is_file():
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
            sources = cfg.data if isinstance(cfg.data, list) else [cfg.data]
            tokenizer = (Tokenizer.from_pretrained(cfg.init_from) if cfg.init_from is not None
                         else build_tokenizer(cfg.tokenizer, sources, vocab_size=cfg.vocab_size,
                                              text_field=cfg.text_field))
            val_sources = (None if cfg.val_data is None else
                           cfg.val_data if isinstance(cfg.val_data, list) else [cfg.val_data])
            prepare_dataset(sources, tokenizer=tokenizer, out_dir=directory,
                            val_sources=val_sources, val_fraction=cfg.val_fraction,
                            text_field=cfg.text_field, document_separator=cfg.doc_separator)
    dataset = TokenDataset.open(directory)
    tokenizer = Tokenizer.from_pretrained(directory)
    return dataset, tokenizer


# What shapes RUN_DIR/data when raw text is prepared on the fly. A resumed run reuses that
# dataset, so a different value would be silently ignored: it is an error instead.
_DATA_SETTINGS = ("data", "val_data", "text_field", "tokenizer", "vocab_size", "val_fraction",
                  "doc_separator", "init_from")


def _check_same_data_settings(cfg: PretrainConfig, run_dir: Path) -> None:
    # The previous run's config (rewritten after this check). These keys are top-level in every
    # train_config.yaml lmlab has written, flat (before recipes/) or with an optim: block.
    saved = run_dir / run_steps.CONFIG_FILE
    if not saved.is_file():
        return
    before = read_yaml(saved)
    for key in _DATA_SETTINGS:
        old, new = before.get(key), getattr(cfg, key)
        same = (_resolved(old) == _resolved(new) if key in ("data", "val_data") and old and new
                else old == new or (key == "text_field" and old is None and new == "text"))
        if not same:
            raise ConfigError(
                f"{key}: {run_dir / 'data'} was prepared with {key} {old!r}, this run gives "
                f"{new!r}; resume with the run's data settings, or start a new --out")


def _resolved(data: str | list[str]) -> list[Path]:
    return [Path(d).resolve() for d in ([data] if isinstance(data, str) else data)]


def load_init_from(cfg: PretrainConfig, cls: type, refusal: str):
    """`cfg.init_from`'s model, which must be a `cls` whose context window holds block_size;
    `refusal` says what another class cannot be trained as (and what to do instead)."""
    model = from_pretrained(cfg.init_from)
    if not isinstance(model, cls):
        raise ConfigError(f"init_from {cfg.init_from}: a {type(model).__name__} cannot be "
                          f"{refusal}")
    check_context(cfg, model)
    return model


def check_context(cfg: PretrainConfig, model) -> None:
    positions = run_steps.context_window(model)
    if positions < cfg.block_size:
        raise ConfigError(f"block_size {cfg.block_size} exceeds {cfg.init_from}'s context "
                          f"window ({positions})")


def check_compatible(cfg: PretrainConfig, model, dataset: TokenDataset,
                     tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer to save with the model; refuses data the model cannot read."""
    if cfg.init_from is not None:
        model_tokenizer = Tokenizer.from_pretrained(cfg.init_from)
        if model_tokenizer.fingerprint != dataset.tokenizer_fingerprint:
            raise DataError(f"{cfg.data}: tokenized with a different tokenizer than "
                            f"{cfg.init_from}'s; prepare it with `lmlab prepare … --tokenizer "
                            f"{cfg.init_from}`")
        tokenizer = model_tokenizer
    if dataset.vocab_size > model.config.vocab_size:
        raise DataError(f"{cfg.data}: dataset vocabulary ({dataset.vocab_size}) is larger than "
                        f"the model's ({model.config.vocab_size}); prepare it with the model's "
                        "tokenizer")
    return tokenizer


def validation_split(cfg: PretrainConfig, dataset: TokenDataset):
    """The validation tokens, or None when the split is missing or shorter than one window."""
    split = dataset.meta.splits.get("val")
    return dataset.split("val") if split and split.tokens > cfg.block_size else None


# -- the run --------------------------------------------------------------------------------------
@dataclass
class PretrainResult:
    run_dir: Path
    result: TrainResult
    num_parameters: int
    plot: Path | None


# build_model(cfg, tokenizer) -> the model on the CPU;
# build_task(cfg, dataset, model, *, device, rank, world_size) -> the loop's Task
ModelBuilder = Callable[[Any, Tokenizer], torch.nn.Module]
TaskBuilder = Callable[..., Any]


def run_pretraining(cfg: PretrainConfig, *, recipe: str, build_model: ModelBuilder,
                    build_task: TaskBuilder, run_dir: str | Path, resume: bool = False,
                    progress: bool = True) -> PretrainResult:
    """Train as configured. Under `torchrun` every process calls this: each trains on its slice
    of every global batch (batch_size × grad_accum × world_size sequences), rank 0 writes."""
    run_dir = Path(run_dir)
    dist, device = from_environment(cfg.parallel, cfg.optim.device)
    try:
        if dist.is_main:
            run_steps.check_run_dir(run_dir, resume=resume)
            dataset, tokenizer = load_or_prepare_data(cfg, run_dir)  # prepares raw text once
            run_steps.write_config(run_dir, recipe, cfg)
        dist.barrier()
        if not dist.is_main:
            dataset, tokenizer = load_or_prepare_data(cfg, run_dir)
        # Same seed on every rank: the same initial weights (FSDP shards them without a
        # broadcast); then one stream per rank, so dropout masks differ between ranks.
        run_steps.seed_everything(cfg.optim.seed)
        model = build_model(cfg, tokenizer)
        tokenizer = check_compatible(cfg, model, dataset, tokenizer)
        if cfg.activation_checkpointing:
            checkpoint_blocks(model)
        # On the device — or, under FSDP, kept on the CPU until the loop shards it block by
        # block: the whole model never reaches one GPU.
        model = dist.place(model, device)
        run_steps.seed_everything(cfg.optim.seed + dist.rank)
        task = build_task(cfg, dataset, model, device=device, rank=dist.rank,
                          world_size=dist.world_size)
        flops_per_token = getattr(model, "flops_per_token", None)
        result = train(
            model, task, cfg.loop_config(progress=progress), run_dir=run_dir, device=device,
            amp_dtype=autocast_dtype(device, cfg.optim.precision), resume=resume,
            tokens_per_step=task.tokens_per_step, dist=dist,
            flops_per_step=(flops_per_token(cfg.block_size) * task.tokens_per_step
                            if flops_per_token else 0.0),
        )
        num_parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        weights = dist.full_weights(model)
        plot = None
        if dist.is_main:
            if dist.active and cfg.parallel == "fsdp":  # the model is in pieces: a whole copy
                model = build_model(cfg, tokenizer)
                model.load_state_dict(weights, strict=False)
            run_steps.save_model(model, tokenizer, run_dir,
                                 max_length=run_steps.context_window(model))
            plot = plot_run(run_dir)
        dist.barrier()
    finally:
        dist.close()
    return PretrainResult(run_dir=run_dir, result=result, num_parameters=num_parameters,
                          plot=plot)
