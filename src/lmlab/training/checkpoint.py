"""Training checkpoints: everything that decides the future of a run, written atomically.

Layout: `RUN_DIR/checkpoints/step-00000123/` holding
  model.safetensors   model weights (lmlab parameter names)
  state.pt            optimizer state, RNG states, step, schedule horizon (tensors and plain
                      Python values only, so it loads with `weights_only=True`)
  manifest.json       sha256 and size of the two files above — written last
The directory is built under a temporary name and renamed, so a crash mid-write never leaves a
directory that looks complete; a checkpoint whose files do not match its manifest is reported and
skipped in favour of the previous good one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lmlab.errors import CheckpointError

log = logging.getLogger(__name__)
FILES = ("model.safetensors", "state.pt")


@dataclass
class Checkpoint:
    path: Path
    step: int


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the second name of a tied weight (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous().cpu()
    return out


def save_checkpoint(run_dir: Path, step: int, model, state: dict[str, Any], *, keep_last: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(unique_state_dict(model), tmp / "model.safetensors")
        torch.save(state, tmp / "state.pt")
        manifest = {
            "step": step,
            "files": {name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
                      for name in FILES},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        for name in (*FILES, "manifest.json"):
            with (tmp / name).open("rb") as f:
                os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(root, keep_last=keep_last)
    return final


def prune(root: Path, *, keep_last: int, keep: set[Path] | None = None) -> None:
    checkpoints = list_checkpoints(root.parent)
    for ckpt in checkpoints[:-keep_last] if keep_last > 0 else []:
        if keep and ckpt.path in keep:
            continue
        shutil.rmtree(ckpt.path, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):  # left by a run killed mid-write
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Checkpoint]:
    root = Path(run_dir) / "checkpoints"
    out = []
    for path in root.glob("step-*") if root.is_dir() else []:
        try:
            out.append(Checkpoint(path, int(path.name.split("-", 1)[1])))
        except ValueError:
            continue
    return sorted(out, key=lambda c: c.step)


def verify(ckpt: Checkpoint) -> str | None:
    """None if the checkpoint matches its manifest, else what is wrong (one line)."""
    manifest_path = ckpt.path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        return f"{manifest_path}: missing or unreadable"
    for name, expected in manifest.get("files", {}).items():
        path = ckpt.path / name
        if not path.is_file():
            return f"{path}: missing"
        if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            return f"{path}: checksum mismatch (truncated or corrupted)"
    return None


def latest_valid(run_dir: Path) -> Checkpoint | None:
    """The newest checkpoint that passes verification; bad ones are reported and skipped."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        log.warning("skipping checkpoint %s: %s", ckpt.path.name, problem)
    return None


def load_checkpoint(ckpt: Checkpoint, model) -> dict[str, Any]:
    """Load weights into `model` in place and return the training state."""
    try:
        weights = load_file(ckpt.path / "model.safetensors")
        state = torch.load(ckpt.path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 — verified files that still fail to parse
        raise CheckpointError(f"{ckpt.path}: cannot be loaded ({err})") from None
    device = next(model.parameters()).device
    missing, unexpected = model.load_state_dict(
        {k: v.to(device) for k, v in weights.items()}, strict=False
    )
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to wte
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt.path}: weights do not match the model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    return state
