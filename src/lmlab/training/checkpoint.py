"""Training checkpoints: everything that decides the future of a run, written atomically.

Layout: `RUN_DIR/checkpoints/step-00000123/` holding
  model.safetensors   model weights (lmlab parameter names)
  state.pt            optimizer state, RNG states, step, schedule horizon (tensors and plain
                      Python values only, so it loads with `weights_only=True`)
  manifest.json       sha256 and size of the two files above — written last
and `RUN_DIR/checkpoints/best/`, the weights of the best evaluation (state.pt: its step and metrics).
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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lmlab.errors import CheckpointError

log = logging.getLogger(__name__)
FILES = ("model.safetensors", "state.pt")
BEST = "best"


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


def unique_tensors(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights without the second name of a tied tensor (safetensors refuses shared
    storage), detached, contiguous and on the CPU."""
    seen: set[int] = set()
    out = {}
    for name, tensor in weights.items():
        key = tensor.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous().cpu()
    return out


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return unique_tensors(model.state_dict())


def _write_directory(final: Path, weights: dict[str, torch.Tensor], state: dict[str, Any],
                     *, step: int) -> None:
    """Write weights, state and their manifest under a temporary name, then put it in place.

    A directory that already exists at `final` is moved aside first and deleted only once the
    new one is in place, so a crash at any moment leaves a complete old or new directory
    (`best` is rewritten in place; `step-N` only when a resumed run reaches N again)."""
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(unique_tensors(weights), tmp / "model.safetensors")
        _test_pause()
        torch.save(state, tmp / "state.pt")
        _test_pause()
        manifest = {
            "step": step,
            "files": {name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
                      for name in FILES},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        for name in (*FILES, "manifest.json"):
            with (tmp / name).open("rb") as f:
                os.fsync(f.fileno())
        old = root / f".old-{final.name}-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _test_pause() -> None:
    """Tests widen the window in which a checkpoint is half-written, to kill a run inside it."""
    pause = os.environ.get("LMLAB_TEST_SLOW_CHECKPOINT")
    if pause:
        time.sleep(float(pause))


def save_checkpoint(run_dir: Path, step: int, weights: dict[str, torch.Tensor],
                    state: dict[str, Any], *, keep_last: int) -> Path:
    """Write `checkpoints/step-N`, then delete all but the newest `keep_last` of them."""
    final = Path(run_dir) / "checkpoints" / f"step-{step:08d}"
    _write_directory(final, weights, state, step=step)
    prune(final.parent, keep_last=keep_last)
    return final


def save_best(run_dir: Path, step: int, weights: dict[str, torch.Tensor],
              metrics: dict[str, float]) -> Path:
    """Write `checkpoints/best`: the weights of the best evaluation so far (and its metrics).
    It is not a `step-N` directory, so `keep_last` never prunes it."""
    final = Path(run_dir) / "checkpoints" / BEST
    _write_directory(final, weights, {"step": step, "metrics": dict(metrics)}, step=step)
    return final


def prune(root: Path, *, keep_last: int) -> None:
    checkpoints = list_checkpoints(root.parent)
    for ckpt in checkpoints[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(ckpt.path, ignore_errors=True)
    for stale in [*root.glob(".tmp-*"), *root.glob(".old-*")]:  # left by a run killed mid-write
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
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return f"{manifest_path}: missing or unreadable"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(e, dict) and {"bytes", "sha256"} <= set(e) for e in files.values()):
        return f"{manifest_path}: not an lmlab checkpoint manifest"
    for name, expected in files.items():
        path = ckpt.path / name
        if not path.is_file():
            return f"{path}: missing"
        if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            return f"{path}: checksum mismatch (truncated or corrupted)"
    return None


def latest_valid(run_dir: Path) -> Checkpoint | None:
    """The newest checkpoint that passes verification; bad ones are reported and skipped. None
    when there is no checkpoint; a CheckpointError when every one is damaged (naming the newest
    and its problem): a run is never restarted over checkpoints it cannot read."""
    problems = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = verify(ckpt)
        if problem is None:
            for skipped in problems:
                log.warning("skipping checkpoint %s", skipped)
            return ckpt
        problems.append(problem)
    if problems:
        more = f" (and {len(problems) - 1} older ones)" if len(problems) > 1 else ""
        raise CheckpointError(f"{problems[0]}{more}; expected a complete checkpoint as lmlab "
                              "writes it — remove the damaged checkpoints/step-* to resume "
                              "from an older one, or start a new --out")
    return None


def best_checkpoint(run_dir: Path) -> Checkpoint | None:
    """`checkpoints/best` if it exists and passes verification (a bad one is reported)."""
    path = Path(run_dir) / "checkpoints" / BEST
    if not path.is_dir():
        return None
    try:
        step = json.loads((path / "manifest.json").read_text())["step"]
    except (OSError, json.JSONDecodeError, KeyError):
        step = -1
    ckpt = Checkpoint(path, step)
    problem = verify(ckpt)
    if problem is not None:
        log.warning("skipping the best checkpoint: %s", problem)
        return None
    return ckpt


def read_checkpoint(ckpt: Checkpoint) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights (CPU tensors, lmlab names) and the training state of a verified checkpoint."""
    try:
        weights = load_file(ckpt.path / "model.safetensors")
        state = torch.load(ckpt.path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 — verified files that still fail to parse
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{ckpt.path}: cannot be loaded ({first})") from None
    return weights, state


def check_weights(ckpt: Checkpoint, weights: dict[str, torch.Tensor], model,
                  names: set[str] | None = None) -> None:
    """Every parameter and buffer of `model` must be in `weights` (the second name of a tied
    parameter aside), and nothing else — or, for a model whose base is frozen (LoRA), exactly
    the trainable `names` its checkpoints hold."""
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    aliases = {name for names_ in names_of.values() for name in names_[1:]}
    expected = set(model.state_dict()) if names is None else set(names)
    missing = sorted(expected - set(weights) - aliases)
    unexpected = sorted(set(weights) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt.path}: weights do not match the model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for name, tensor in weights.items():
        if name in shapes and tuple(tensor.shape) != shapes[name]:
            raise CheckpointError(f"{ckpt.path}: weight '{name}' has shape "
                                  f"{tuple(tensor.shape)}, the model's is {shapes[name]}; the "
                                  "checkpoint is of a model shaped otherwise (resume with the "
                                  "run's own config)")
