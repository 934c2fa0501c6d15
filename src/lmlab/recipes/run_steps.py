"""The steps every recipe takes around the training loop, in the order a run takes them: check
and create RUN_DIR, write its train_config.yaml, seed, save the final model with its tokenizer,
write results.json and the plots."""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.config import dump_yaml
from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write_bytes
from lmlab.models.hf.peft import save_adapter
from lmlab.models.lora import lora_modules
from lmlab.tokenizer import Tokenizer
from lmlab.training import checkpoint as ckpt_io
from lmlab.training.loop import TrainResult
from lmlab.training.plots import plot_run

CONFIG_FILE = "train_config.yaml"


def check_run_dir(run_dir: Path, *, resume: bool | str) -> None:
    """RUN_DIR may be new, or hold a run that --resume continues; nothing is created here (a run
    writes RUN_DIR once its inputs are checked: write_config). Plain --resume (True) needs a checkpoint to continue from; --resume auto ("auto") does not."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir}: exists and is not a directory")
    if resume is True and not ckpt_io.list_checkpoints(run_dir):
        raise ConfigError(f"--resume: {run_dir} holds no checkpoint to continue from; drop "
                          "--resume to start a new run, or pass --resume auto")
    checkpoints = run_dir / "checkpoints"
    if not resume and checkpoints.is_dir() and any(checkpoints.iterdir()):
        raise ConfigError(f"--out {run_dir}: already holds a run; pass --resume to continue it "
                          "or choose another directory")


def undo_on_failure(run: Callable[..., Any]) -> Callable[..., Any]:
    """A recipe's run function that, failing before it has written a checkpoint, leaves RUN_DIR
    as it found it: gone if it did not exist, else without the entries this run added (what was
    there is never touched, so a run to --resume is never lost; its train_config.yaml, which a
    resumed run rewrites, is put back). A run that failed after a checkpoint keeps everything:
    --resume continues it."""

    @functools.wraps(run)
    def guarded(cfg: Any, *, run_dir: str | Path, resume: bool | str = False,
                progress: bool = True) -> Any:
        directory = Path(run_dir)
        existed = directory.is_dir()
        before = set(os.listdir(directory)) if existed else set()
        checkpoints = _checkpoint_names(directory)
        config = directory / CONFIG_FILE
        saved = config.read_bytes() if config.is_file() else None
        try:
            return run(cfg, run_dir=run_dir, resume=resume, progress=progress)
        except BaseException:
            # Under torchrun rank 0 alone writes RUN_DIR, and alone undoes.
            main = int(os.environ.get("RANK", "0")) == 0
            if main and _checkpoint_names(directory) <= checkpoints:
                added = set(os.listdir(directory)) - before if directory.is_dir() else set()
                for path in [directory] if not existed else [directory / n for n in added]:
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
                if saved is not None and (not config.is_file() or config.read_bytes() != saved):
                    atomic_write_bytes(config, saved)
            raise

    return guarded


def _checkpoint_names(run_dir: Path) -> set[str]:
    return {c.path.name for c in ckpt_io.list_checkpoints(run_dir)}


def config_text(recipe: str, cfg: Any) -> str:
    """The resolved config as printed at start and saved: the recipe's name, then its keys
    (the loop's settings as the `optim:` block). `lmlab.config.load_config` reads it back."""
    return f"recipe: {recipe}\n" + dump_yaml(cfg)


def write_config(run_dir: Path, recipe: str, cfg: Any) -> None:
    """RUN_DIR (created here, once the run's inputs are checked) and its train_config.yaml."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / CONFIG_FILE, config_text(recipe, cfg).encode())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def context_window(model) -> int:
    """The model's number of positions, from its config (GPT's n_positions, BERT's
    max_position_embeddings)."""
    config = model.config
    return getattr(config, "n_positions", None) or config.max_position_embeddings


def save_model(model, tokenizer: Tokenizer, run_dir: Path, *, max_length: int,
               base: Path | None = None) -> None:
    """RUN_DIR/config.json + model.safetensors + the tokenizer's files (Hugging Face layout);
    the tokenizer records the longest input the model was trained for. A model with LoRA
    adapters saves the adapter instead (PEFT's adapter_config.json + adapter_model.safetensors,
    naming `base`, the pretrained model it applies to) with the tokenizer beside it."""
    tokenizer.model_max_length = max_length
    if lora_modules(model):
        tokenizer.save_pretrained(run_dir)
        save_adapter(model, run_dir, base_model_name_or_path=None if base is None
                     else str(Path(base).resolve()))
    else:
        model.save_pretrained(run_dir, tokenizer=tokenizer)


def write_results(run_dir: Path, result: TrainResult, *, wall_seconds: float,
                  extra: dict[str, Any]) -> None:
    """RUN_DIR/results.json (steps, best step, early stop, timings, the best validation figures
    and `extra`, e.g. the test figures) and the plots."""
    summary = {"steps": result.steps, "best_step": result.best_step,
               "stopped_early": result.stopped_early, "train_seconds": result.train_seconds,
               "wall_seconds": wall_seconds, "validation": result.best_metrics or result.metrics,
               **extra}
    atomic_write_bytes(run_dir / "results.json", (json.dumps(summary, indent=2) + "\n").encode())
    plot_run(run_dir)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_bytes(Path(path), text.encode())
    return Path(path)
