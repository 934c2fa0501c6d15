"""The one device rule (lmlab.training.runtime.pick_device) and the CUDA-side training runtime,
with CUDA faked where a CPU can show the behaviour: device resolution (cuda, cuda:N, torchrun's
LOCAL_RANK), native-bf16 detection, RNG restore with fewer visible GPUs, FSDP's build order."""

from __future__ import annotations

import logging

import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.training import distributed as distributed_mod
from lmlab.training.distributed import Distributed, rng_state, set_rng_state
from lmlab.training.runtime import autocast_dtype, native_bf16, pick_device


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_cuda(monkeypatch, no_torchrun):
    """A machine with two CUDA devices, as far as the device rule can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def torchrun(monkeypatch, local_rank: int, world_size: int) -> None:
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))


def test_auto_is_the_cpu_without_cuda(monkeypatch, no_torchrun):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_cuda_is_a_config_error(monkeypatch, no_torchrun, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"--device: .* CUDA is not available"):
        pick_device(name, flag="--device")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cuda:-1", "tpu", ""])
def test_unknown_names_say_what_is_expected(name):
    with pytest.raises(ConfigError, match="expected auto .*cpu, cuda or cuda:N"):
        pick_device(name)


def test_auto_and_cuda_resolve_to_an_indexed_cuda_device(fake_cuda):
    # torch.cuda.set_device and DDP need the index: `cuda` alone crashed `pretrain --device cuda`
    assert pick_device("auto") == torch.device("cuda", 0)
    assert pick_device("cuda") == torch.device("cuda", 0)
    assert pick_device("cuda:1") == torch.device("cuda", 1)


def test_cuda_index_out_of_range(fake_cuda):
    with pytest.raises(ConfigError, match=r"'cuda:2' but only 2 CUDA device\(s\)"):
        pick_device("cuda:2")


def test_torchrun_local_rank_decides(fake_cuda, monkeypatch):
    torchrun(monkeypatch, local_rank=1, world_size=2)
    assert pick_device("auto") == torch.device("cuda", 1)
    assert pick_device("cuda") == torch.device("cuda", 1)
    assert pick_device("cpu") == torch.device("cpu")  # gloo on a GPU machine


def test_explicit_cuda_index_under_torchrun_is_refused(fake_cuda, monkeypatch):
    torchrun(monkeypatch, local_rank=1, world_size=2)
    with pytest.raises(ConfigError, match="every process on GPU 0"):
        pick_device("cuda:0")
    torchrun(monkeypatch, local_rank=0, world_size=1)  # one process: honoured
    assert pick_device("cuda:1") == torch.device("cuda", 1)


def test_more_processes_than_gpus(fake_cuda, monkeypatch):
    torchrun(monkeypatch, local_rank=3, world_size=4)
    with pytest.raises(ConfigError, match="LOCAL_RANK 3 but only 2 CUDA"):
        pick_device("auto")


# -- precision ------------------------------------------------------------------------------------
def test_auto_precision_is_bf16_only_where_it_is_native(monkeypatch):
    cuda = torch.device("cuda", 0)
    assert autocast_dtype(torch.device("cpu"), "auto") is None
    calls = []

    def supported(including_emulation=True):
        calls.append(including_emulation)
        return native

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    native = False  # a V100 or T4: bf16 only emulated
    assert autocast_dtype(cuda, "auto") is None
    native = True  # an A100 or H100
    assert autocast_dtype(cuda, "auto") is torch.bfloat16
    assert calls == [False, False]  # emulation never counts
    assert autocast_dtype(cuda, "bf16") is torch.bfloat16  # asked for explicitly: honoured


def test_native_bf16_falls_back_to_the_compute_capability(monkeypatch):
    def old_torch():  # no including_emulation keyword
        return True

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", old_torch)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert not native_bf16(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert native_bf16(torch.device("cuda", 0))


# -- resuming on fewer GPUs -----------------------------------------------------------------------
def test_rng_restore_with_fewer_visible_gpus(monkeypatch, caplog):
    state = rng_state()  # CPU-only: no "cuda" entry
    assert "cuda" not in state
    saved = [torch.full((8,), i, dtype=torch.uint8) for i in range(4)]  # 4 GPUs at save time
    state["cuda"] = saved
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.extend(states))
    with caplog.at_level(logging.WARNING):
        set_rng_state(state)
    assert [int(s[0]) for s in restored] == [0, 1]
    assert "4 device(s), 2 are visible" in caplog.text


# -- FSDP: shard before the model reaches the device ------------------------------------------------
class _Blocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Embedding(10, 4)
        self.h = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))


def test_place_keeps_an_fsdp_model_off_the_device():
    # "meta" stands in for the GPU: DDP moves the model there, FSDP leaves it on the CPU
    ddp = Distributed(world_size=2, parallel="ddp").place(_Blocks(), torch.device("meta"))
    assert {p.device.type for p in ddp.parameters()} == {"meta"}
    fsdp = Distributed(world_size=2, parallel="fsdp").place(_Blocks(), torch.device("meta"))
    assert {p.device.type for p in fsdp.parameters()} == {"cpu"}
    alone = Distributed().place(_Blocks(), torch.device("meta"))  # one process: no FSDP at all
    assert {p.device.type for p in alone.parameters()} == {"meta"}


def test_fsdp_wrap_shards_blocks_then_root_on_an_explicit_mesh_in_bf16(monkeypatch):
    import torch.distributed.device_mesh as device_mesh

    calls = []

    def fake_fully_shard(module, **options):
        devices = {p.device.type for p in module.parameters()}
        calls.append((module, options, devices))
        return module

    monkeypatch.setattr(distributed_mod, "_fully_shard", lambda: fake_fully_shard)
    monkeypatch.setattr(device_mesh, "init_device_mesh",
                        lambda kind, shape: ("mesh", kind, shape))
    model = _Blocks()
    out = Distributed(world_size=2, parallel="fsdp").wrap(model, torch.device("cpu"),
                                                          param_dtype=torch.bfloat16)
    assert out is model
    assert [c[0] for c in calls] == [*model.h, model]  # every block, then the root
    for _, options, devices in calls:
        assert options["mesh"] == ("mesh", "cpu", (2,))  # --device cpu: a CPU (gloo) mesh
        policy = options["mp_policy"]
        assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
        assert devices == {"cpu"}  # nothing was materialised on a device before sharding
    calls.clear()
    Distributed(world_size=2, parallel="fsdp").wrap(_Blocks(), torch.device("cpu"))
    assert all("mp_policy" not in options for _, options, _ in calls)  # fp32: no policy


def test_forced_distributed_needs_a_process_group(monkeypatch, no_torchrun):
    monkeypatch.setenv(distributed_mod.FORCE_ENV, "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node=1"):
        distributed_mod.from_environment("ddp", "cpu")
    monkeypatch.setenv(distributed_mod.FORCE_ENV, "maybe")
    with pytest.raises(ConfigError, match="expected 0 or 1"):
        distributed_mod.from_environment("ddp", "cpu")
    assert Distributed(forced=True).active and not Distributed().active
