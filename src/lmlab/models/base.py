"""What every lmlab model class shares: saving in the Hugging Face layout, and starting from
another checkpoint's weights.

The conversion lives in lmlab.models.hf, one record per family; that package imports the model
files, so a model file cannot import it back (an import circle). The methods here reach it
through the functions lmlab.models.hf registers when it is imported — and importing any model
imports the lmlab.models package first, which imports lmlab.models.hf, so they always are.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

_checkpoint_io = None  # lmlab.models.hf.checkpoints, once registered


def register_checkpoint_io(module) -> None:
    global _checkpoint_io
    _checkpoint_io = module


def checkpoint_io():
    if _checkpoint_io is None:  # only if lmlab.models was bypassed entirely
        raise RuntimeError("lmlab.models.hf is not loaded; import lmlab.models first")
    return _checkpoint_io


class PreTrainedModel(nn.Module):
    """An nn.Module with a `config` that saves to and starts from Hugging Face checkpoints."""

    def save_pretrained(self, directory, *, tokenizer=None) -> None:
        """Write config.json + model.safetensors (and the tokenizer's files) in the Hugging Face
        layout of this model's family: transformers loads the directory unchanged."""
        checkpoint_io().save_pretrained(self, directory, tokenizer=tokenizer)

    @classmethod
    def from_encoder(cls, path: str | Path, **config_overrides):
        """This model with the base model (and any matching head) of the checkpoint at `path`;
        weights the checkpoint lacks (a new task head) are freshly initialised and listed in
        the log, like transformers' "newly initialized" warning."""
        return checkpoint_io().load_encoder(cls, Path(path), config_overrides)
