"""Compile the C kernels on first use, for the instruction set this CPU has, and load them.

The C sources ship with the package and are compiled once per machine and instruction set with
the system C compiler into a cache folder (`$LMLAB_CACHE_DIR`, else `$XDG_CACHE_HOME/lmlab`,
else `~/.cache/lmlab`), under a name that hashes the sources and flags, written to a temporary
name and renamed — so concurrent processes and upgrades never see half a library. The
instruction set is picked at load time: AVX-512 where the CPU (as torch sees it) has it, AVX2 +
FMA otherwise (`LMLAB_CPU_ISA=avx2` forces the narrower one, e.g. to compare the two); the
flags name an instruction set, never `-march=native`, so a shared cache folder stays valid.

Nothing here is required: without a C compiler, AVX2, or GNU OpenMP as torch's threading
runtime (a second OpenMP runtime would fight torch's for the cores), `load()` returns None and
`unavailable_reason()` says why, and callers use torch. `LMLAB_CPU_KERNELS=0` turns them off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

_HERE = Path(__file__).parent
_SOURCES = [_HERE / "decode_f32.c", _HERE / "train_f32.c", _HERE / "dropout_f32.c"]
_HEADERS = [_HERE / "simd.h", _HERE / "vec.h", _HERE / "gpt_layout.h"]
_COMMON_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-lm"]
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma"],
    "avx512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl"],
}
_lock = threading.Lock()
_loaded: dict[str, tuple[dict | None, str | None]] = {}  # isa -> (functions, reason)


def switched_off() -> bool:
    """LMLAB_CPU_KERNELS=0 (or false/off/no): the speed layer is off, read at each use."""
    return os.environ.get("LMLAB_CPU_KERNELS", "1").lower() in ("0", "false", "off", "no")


def cache_dir() -> Path:
    if os.environ.get("LMLAB_CACHE_DIR"):
        return Path(os.environ["LMLAB_CACHE_DIR"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lmlab" / "kernels"


def cpu_isa() -> str | None:
    """The instruction set to build for: 'avx512', 'avx2', or None when the CPU has neither."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return None
    forced = os.environ.get("LMLAB_CPU_ISA", "").lower()
    if forced == "avx2" or capability == "AVX2":
        return "avx2"
    return "avx512"


def _why_not_supported() -> str | None:
    if (not sys.platform.startswith("linux")
            or platform.machine().lower() not in ("x86_64", "amd64")):
        return f"only built on x86-64 Linux (this is {sys.platform}/{platform.machine()})"
    if cpu_isa() is None:
        return (f"the CPU lacks AVX2 + FMA (torch reports "
                f"{torch.backends.cpu.get_cpu_capability()})")
    try:
        with open("/proc/self/maps") as maps:
            if "libgomp" not in maps.read():
                return "torch does not use GNU OpenMP in this process"
    except OSError as error:
        return f"cannot read /proc/self/maps ({error})"
    return None


def _compile(compiler: str, flags: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        result = subprocess.run([compiler, *flags, "-o", tmp, *map(str, _SOURCES)],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            first = (result.stderr.strip().splitlines() or ["no message"])[0]
            raise RuntimeError(f"{compiler} failed: {first}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build(isa: str) -> tuple[dict | None, str | None]:
    reason = _why_not_supported()
    if reason:
        return None, reason
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return None, "no C compiler (cc / gcc / $CC) on PATH"
    flags = _COMMON_FLAGS + ISA_FLAGS[isa]
    text = b"".join(path.read_bytes() for path in [*_SOURCES, *_HEADERS])
    key = hashlib.sha256(text + " ".join([compiler, *flags]).encode()).hexdigest()
    target = cache_dir() / f"lmlab_kernels-{isa}-{key[:16]}.so"
    try:
        if not target.exists():
            _compile(compiler, flags, target)
        library = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return None, f"could not build the kernels: {error}"
    return _bind(library), None


def _bind(library: ctypes.CDLL) -> dict:
    pointer, integer, real, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    functions = {"linear": library.lmlab_linear_f32, "gpt_decode": library.lmlab_gpt_decode_f32}
    functions["linear"].argtypes = [pointer, integer, integer, pointer, integer, pointer, pointer,
                                    flag]
    functions["linear"].restype = None
    functions["gpt_decode"].argtypes = [pointer, pointer, integer, integer, integer, integer,
                                        integer, integer, integer, pointer, pointer, real, flag,
                                        pointer, pointer, pointer, integer, pointer, pointer, flag]
    functions["gpt_decode"].restype = flag  # 0, or -1: out of memory
    functions["dropout"] = library.lmlab_dropout_f32
    functions["dropout"].argtypes = [pointer, pointer, pointer, integer, ctypes.c_uint64,
                                     ctypes.c_uint32, real, flag]
    functions["dropout"].restype = None
    functions["dropout_backward"] = library.lmlab_dropout_backward_f32
    functions["dropout_backward"].argtypes = [pointer, pointer, pointer, integer, real, flag]
    functions["dropout_backward"].restype = None
    sgemm, threads_local = _torch_blas()
    if sgemm is not None:
        library.lmlab_set_blas(ctypes.c_void_p(sgemm), ctypes.c_void_p(threads_local))
        functions["train_workspace"] = library.lmlab_gpt_train_workspace
        functions["train_workspace"].argtypes = [integer] * 7
        functions["train_workspace"].restype = integer
        functions["train_forward"] = library.lmlab_gpt_train_forward
        functions["train_forward"].argtypes = [pointer, *[integer] * 7, real, flag, pointer,
                                               pointer, pointer, pointer, flag, flag]
        functions["train_forward"].restype = None
        functions["train_backward"] = library.lmlab_gpt_train_backward
        functions["train_backward"].argtypes = [pointer, *[integer] * 8, real, flag, pointer,
                                                pointer, pointer, real, pointer, pointer, pointer,
                                                integer, flag, flag]
        functions["train_backward"].restype = flag  # 0, or -1: out of memory
    return functions


def _torch_blas() -> tuple[int | None, int | None]:
    """Addresses of sgemm_ in the BLAS torch is linked with (MKL in the x86-64 wheels) and of
    MKL's MKL_Set_Num_Threads_Local; None for what is missing. Without sgemm the training step
    is not offered (it needs a BLAS as fast as torch's own)."""
    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        handle = ctypes.CDLL(str(library))
    except OSError:
        return None, None
    found = []
    for name in ("sgemm_", "MKL_Set_Num_Threads_Local"):
        symbol = getattr(handle, name, None)
        found.append(None if symbol is None else ctypes.cast(symbol, ctypes.c_void_p).value)
    return found[0], found[1]


def load() -> dict | None:
    """The kernels' functions for this CPU's instruction set, built on first use; None when
    they cannot be had here (see `unavailable_reason`) or are switched off."""
    if switched_off():
        return None
    isa = cpu_isa() or "avx2"
    if isa not in _loaded:
        with _lock:
            if isa not in _loaded:
                _loaded[isa] = _build(isa)
    return _loaded[isa][0]


def unavailable_reason() -> str | None:
    if switched_off():
        return "LMLAB_CPU_KERNELS=0"
    load()
    return _loaded[cpu_isa() or "avx2"][1]
