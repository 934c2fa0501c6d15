"""Data-parallel training on torch.distributed, launched by `torchrun`: DDP or FSDP2.

Model-agnostic: a model is wrapped as a whole (DDP) or sharded per element of each
`nn.ModuleList` — the transformer blocks of any family — and then at the root (FSDP2's
`fully_shard`). Checkpoints always hold the full, unsharded state in plain parameter names
(`torch.distributed.checkpoint.state_dict` with `full_state_dict=True`), so a run saved by N
processes resumes in M: rank 0 reads the files and the tensors are broadcast and re-sharded.

A single process is the same object with world_size 1, where every collective is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from lmlab.errors import ConfigError
from lmlab.training.runtime import blocks, pick_device

log = logging.getLogger(__name__)
Parallel = Literal["ddp", "fsdp"]
# LMLAB_FORCE_DISTRIBUTED=1: join the process group and wrap the model (DDP / FSDP2) even with
# one process, where torchrun alone runs plain single-process training. For testing the
# distributed path on one GPU (scripts/gpu_smoke.py); launch with `torchrun --nproc_per_node=1`.
FORCE_ENV = "LMLAB_FORCE_DISTRIBUTED"


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    parallel: Parallel = "ddp"
    forced: bool = False  # the distributed path with one process (FORCE_ENV)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 or self.forced

    # -- the model -----------------------------------------------------------------------------
    def place(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The model where training needs it before `wrap`: on `device` — except under FSDP,
        where it stays where it was built (the CPU) and `wrap` shards it first, so that only
        this rank's shards (and one block at a time) ever reach the device."""
        if self.active and self.parallel == "fsdp":
            return model
        return model.to(device)

    def wrap(self, model: torch.nn.Module, device: torch.device, *,
             param_dtype: torch.dtype | None = None) -> torch.nn.Module:
        """The module to run training forwards through. With FSDP `model` itself is sharded in
        place (and returned); with DDP a wrapper is returned and `model` stays the plain module.

        FSDP shards over an explicit 1-D mesh of `device`'s type (gloo/CPU for `--device cpu`
        even on a GPU machine), block by block, each block moved to the device as it is
        sharded. `param_dtype` bf16 gathers parameters in bf16 and reduces gradients in fp32
        (the sharded master weights stay fp32)."""
        if not self.active:
            return model
        if self.parallel == "fsdp":
            fully_shard = _fully_shard()
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(device.type, (self.world_size,))
            options: dict[str, Any] = {"mesh": mesh}
            if param_dtype is not None and param_dtype != torch.float32:
                from torch.distributed.fsdp import MixedPrecisionPolicy

                options["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype,
                                                            reduce_dtype=torch.float32)
            for block in blocks(model):
                fully_shard(block, **options)
            fully_shard(model, **options)
            # Allocate the gathered-parameter buffers now, outside inference mode: made first
            # inside a Task's @torch.inference_mode() evaluation, they could not be reused by
            # training ("Inplace update to inference tensor outside InferenceMode").
            for module in model.modules():
                if hasattr(module, "unshard") and hasattr(module, "reshard"):
                    module.unshard()
                    module.reshard()
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def sync_gradients(self, wrapped: torch.nn.Module, sync: bool):
        """Accumulation micro-batches skip the gradient all-reduce; only the last one syncs."""
        if not self.active or sync:
            if self.active and self.parallel == "fsdp":
                wrapped.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.parallel == "fsdp":
            wrapped.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return wrapped.no_sync()

    # -- collectives (no-ops in one process) ---------------------------------------------------
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (on every rank)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    # -- full (unsharded) state ----------------------------------------------------------------
    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, **kw)

    def full_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The full state dict on rank 0 ({} elsewhere). A collective under FSDP."""
        if not self.active:
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=self._options(cpu_offload=True))

    def full_optimizer_state(self, model, optimizer) -> dict[str, Any]:
        """Optimizer state keyed by parameter name (not position), full, on rank 0."""
        if not self.active:
            return named_optimizer_state(model, optimizer)
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=self._options(cpu_offload=True))

    def load_full_state(self, model, optimizer, weights: dict[str, torch.Tensor],
                        optimizer_state: dict[str, Any] | None) -> None:
        """Load rank 0's full state into every rank's (possibly sharded) model and optimizer."""
        if not self.active:
            # torch.distributed.checkpoint costs seconds to import; one process does not need it
            model.load_state_dict(weights, strict=False)  # checked by checkpoint.check_weights
            if optimizer is not None:
                optimizer.load_state_dict(
                    positional_optimizer_state(model, optimizer, optimizer_state))
            return
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        # Tied weights are stored once; the second name is filled by the tie itself.
        options = self._options(broadcast_from_rank0=self.active, strict=False)
        set_model_state_dict(model, weights if self.is_main else {}, options=options)
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer,
                                     optimizer_state if self.is_main else {},
                                     options=self._options(broadcast_from_rank0=self.active))

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def named_optimizer_state(model: torch.nn.Module, optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` with parameter names in place of positions — the layout of
    torch.distributed.checkpoint's full optimizer state dict, so both load either."""
    state = optimizer.state_dict()
    names = _names_by_position(model, optimizer)
    return {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                         for g in state["param_groups"]],
    }


def positional_optimizer_state(model: torch.nn.Module, optimizer,
                               named: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `named_optimizer_state`, for `optimizer.load_state_dict`."""
    positions = {name: i for i, name in _names_by_position(model, optimizer).items()}
    return {
        "state": {positions[name]: value for name, value in named["state"].items()},
        "param_groups": [{**g, "params": [positions[n] for n in g["params"]]}
                         for g in named["param_groups"]],
    }


def _names_by_position(model, optimizer) -> dict[int, str]:
    """Position i of `optimizer.state_dict()` (groups in order) -> parameter name."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {i: name_of[id(p)] for i, p in enumerate(params)}


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise ConfigError(f"parallel: fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard), "
                          f"which torch {torch.__version__} lacks; use --parallel ddp or a "
                          "newer torch") from None
    return fully_shard


def from_environment(parallel: str, device_name: str) -> tuple[Distributed, torch.device]:
    """Join the process group `torchrun` describes in the environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT), or run alone when it is absent. The device defaults to
    cuda:LOCAL_RANK when CUDA is available, else the CPU (gloo)."""
    if parallel not in ("ddp", "fsdp"):
        raise ConfigError(f"parallel: expected ddp or fsdp, got {parallel!r}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)  # cuda:LOCAL_RANK under torchrun
    if device.type == "cuda":
        torch.cuda.set_device(device)
    forced = _forced()
    if forced and "MASTER_ADDR" not in os.environ:
        raise ConfigError(f"{FORCE_ENV}=1 needs a process group to join: launch with "
                          "`torchrun --nproc_per_node=1 -m lmlab …`")
    if parallel == "fsdp" and (world_size > 1 or forced):
        _fully_shard()  # fail before joining the group
    if (world_size > 1 or forced) and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        if rank == 0:
            log.info("torch.distributed: %s backend, %d process(es)%s, %s on %s", backend,
                     world_size, " (forced)" if forced else "", parallel.upper(), device)
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank,
                       parallel=parallel, forced=forced), device  # type: ignore[arg-type]


def _forced() -> bool:
    value = os.environ.get(FORCE_ENV, "").strip().lower()
    if value not in ("", "0", "1", "false", "true"):
        raise ConfigError(f"{FORCE_ENV}: expected 0 or 1, got {os.environ[FORCE_ENV]!r}")
    return value in ("1", "true")


# -- random number generators: everything a resumed run needs to draw the same numbers ----------
def rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        # as plain lists and ints, so the checkpoint loads with weights_only=True
        "numpy": {"key": numpy_state["state"]["key"].tolist(), "pos": numpy_state["state"]["pos"],
                  "has_gauss": numpy_state["has_gauss"], "gauss": numpy_state["gauss"]},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np.array(n["key"], dtype=np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        saved, visible = list(state["cuda"]), torch.cuda.device_count()
        if len(saved) != visible:  # saved with another CUDA_VISIBLE_DEVICES
            log.warning("the checkpoint holds the CUDA RNG state of %d device(s), %d are visible: "
                        "restoring the first %d", len(saved), visible, min(len(saved), visible))
        torch.cuda.set_rng_state_all(saved[:visible])
