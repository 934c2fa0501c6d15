"""Hand-written CPU kernels for decoding, compiled on first use; torch is the fallback.

Two (decode_f32.c says why each beats eager PyTorch): `linear`, a few rows times a weight
matrix, and `GPTDecoder`, one decode step of a whole GPT-2-style model. The C source ships
with the package and is compiled once per machine with the system C compiler (flags for any
AVX2 + FMA CPU, not -march=native, so a shared cache folder stays valid) into a cache folder
(`$LMLAB_CACHE_DIR`, else `$XDG_CACHE_HOME/lmlab`, else `~/.cache/lmlab`), under a name that
hashes the source and flags, written to a temporary name and renamed — so concurrent processes
and upgrades never see half a library. Nothing here is required: without a C compiler, AVX2, or
GNU OpenMP as torch's threading runtime (a second OpenMP runtime would fight torch's for the
cores), `available()` is False, `unavailable_reason()` says why, and callers use torch.
`LMLAB_CPU_KERNELS=0` turns the kernels off.
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

# Up to this many rows the kernel beats oneDNN's prepacked product here (A/B on 124M-shaped
# weights: 1 row 25% less time, 5 rows 18% less); at 16 rows the two are level and the GEMM's
# register blocking wins beyond that.
MAX_ROWS = 8
# The fused GPT step also saves a step's ~100 operations and runs attention in-line (SDPA's
# single-query attention costs ~0.4 ms per layer at batch 16 here), so it pays up to 16 rows.
# The C code holds at most 16 rows' dot products per weight row.
FUSED_MAX_ROWS = 16
_C_MAX_ROWS = 16

_HERE = Path(__file__).parent
_SOURCES = [_HERE / "decode_f32.c", _HERE / "train_f32.c"]
_HEADERS = [_HERE / "simd.h", _HERE / "gpt_layout.h"]
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-lm"]
_lock = threading.Lock()
_state: dict = {}  # "functions" once built (None if not), and "reason" why not


def _cache_dir() -> Path:
    if os.environ.get("LMLAB_CACHE_DIR"):
        return Path(os.environ["LMLAB_CACHE_DIR"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lmlab" / "kernels"


def _why_not_supported() -> str | None:
    if os.environ.get("LMLAB_CPU_KERNELS", "1").lower() in ("0", "false", "off", "no"):
        return "LMLAB_CPU_KERNELS=0"
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"only built on x86-64 Linux (this is {sys.platform}/{platform.machine()})"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"the CPU lacks AVX2 + FMA (torch reports {capability})"
    try:
        with open("/proc/self/maps") as maps:
            if "libgomp" not in maps.read():
                return "torch does not use GNU OpenMP in this process"
    except OSError as error:
        return f"cannot read /proc/self/maps ({error})"
    return None


def _compile(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        result = subprocess.run([compiler, *_FLAGS, "-o", tmp, *map(str, _SOURCES)],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            first = (result.stderr.strip().splitlines() or ["no message"])[0]
            raise RuntimeError(f"{compiler} failed: {first}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build():
    reason = _why_not_supported()
    if reason:
        return None, reason
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return None, "no C compiler (cc / gcc / $CC) on PATH"
    text = b"".join(path.read_bytes() for path in [*_SOURCES, *_HEADERS])
    key = hashlib.sha256(text + " ".join([compiler, *_FLAGS]).encode()).hexdigest()
    target = _cache_dir() / f"lmlab_kernels-{key[:16]}.so"
    try:
        if not target.exists():
            _compile(compiler, target)
        library = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return None, f"could not build the kernels: {error}"
    pointer, integer, real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    functions = {"linear": library.lmlab_linear_f32, "gpt_decode": library.lmlab_gpt_decode_f32}
    functions["linear"].argtypes = [pointer, integer, integer, pointer, integer, pointer, pointer,
                                    ctypes.c_int]
    functions["gpt_decode"].argtypes = [pointer, pointer, integer, integer, integer, integer,
                                        integer, integer, integer, integer, pointer, real,
                                        ctypes.c_int,
                                        pointer, pointer, pointer, integer, pointer, pointer,
                                        ctypes.c_int]
    functions["linear"].restype = None
    functions["gpt_decode"].restype = ctypes.c_int  # 0, or -1: out of memory
    sgemm, threads_local = _torch_blas()
    if sgemm is not None:
        library.lmlab_set_blas(ctypes.c_void_p(sgemm), ctypes.c_void_p(threads_local))
        functions["train_workspace"] = library.lmlab_gpt_train_workspace
        functions["train_workspace"].argtypes = [integer] * 7
        functions["train_workspace"].restype = integer
        functions["train_forward"] = library.lmlab_gpt_train_forward
        functions["train_forward"].argtypes = [pointer, *[integer] * 7, real, ctypes.c_int,
                                               pointer, pointer, pointer, pointer, ctypes.c_int,
                                               ctypes.c_int]
        functions["train_forward"].restype = None
        functions["train_backward"] = library.lmlab_gpt_train_backward
        functions["train_backward"].argtypes = [pointer, *[integer] * 8, real, ctypes.c_int,
                                                pointer, pointer, pointer, real, pointer,
                                                pointer, pointer, integer, ctypes.c_int,
                                                ctypes.c_int]
        functions["train_backward"].restype = ctypes.c_int  # 0, or -1: out of memory
    return functions, None


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


def _load():
    with _lock:
        if not _state:
            _state["functions"], _state["reason"] = _build()
    return _state["functions"]


def available() -> bool:
    return (_state["functions"] if _state else _load()) is not None


def unavailable_reason() -> str | None:
    _load()
    return _state["reason"]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (rows, in) @ weight (out, in).T + bias, for CPU fp32 tensors and rows ≤ MAX_ROWS.

    The caller checks `available()`; this checks what the C code would otherwise misread."""
    rows, width = x.shape
    out_features = weight.shape[0]
    if rows > _C_MAX_ROWS:
        raise ValueError(f"linear: at most {_C_MAX_ROWS} rows, got {rows}")
    if not all(_is_cpu_f32(t) for t in (x, weight, bias) if t is not None):
        raise ValueError("linear: x, weight and bias must be CPU float32 tensors")
    if weight.shape[1] != width or (bias is not None and bias.shape != (out_features,)):
        raise ValueError(f"linear: shapes {tuple(x.shape)} @ {tuple(weight.shape)}.T do not match")
    x, weight = x.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = torch.empty(rows, out_features, dtype=torch.float32)
    _state["functions"]["linear"](x.data_ptr(), rows, width, weight.data_ptr(), out_features,
                                 _address(bias), y.data_ptr(), torch.get_num_threads())
    return y


def _address(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _is_cpu_f32(tensor: torch.Tensor) -> bool:
    return tensor.dtype == torch.float32 and tensor.device.type == "cpu"


# The activations the fused step computes, by GPTConfig.activation name.
GPT_ACTIVATIONS = {"gelu_new": 0, "gelu_pytorch_tanh": 0, "gelu": 1, "relu": 2}


class GPTDecoder:
    """One decode step of a GPT-2-style model, all of it in one C call.

    Built once per decoding block from the model's tensors (the pointer table is the costly
    part in Python: ~0.4 ms per step on the 6-layer model if rebuilt from module attributes).
    The kernel reads the weights through their addresses, so in-place updates are seen; the
    tensors are kept alive here.

    layers: per block the twelve tensors (ln_1 weight, bias, c_attn weight, bias, attn c_proj
    weight, bias, ln_2 weight, bias, c_fc weight, bias, mlp c_proj weight, bias), biases None
    when absent. All CPU fp32 and contiguous — the caller (GPT) checks.
    """

    def __init__(self, layers, *, ln_f: tuple[torch.Tensor, torch.Tensor | None],
                 head: torch.Tensor, eps: float, activation: str):
        self._tensors = [t for layer in layers for t in layer] + [*ln_f, head]
        self._table = (ctypes.c_int64 * (12 * len(layers)))(
            *[0 if t is None else t.data_ptr() for layer in layers for t in layer])
        self.n_layer = len(layers)
        self.n_embd = layers[0][2].shape[1]
        self.n_inner = layers[0][8].shape[0]
        self.vocab = head.shape[0]
        self._ln_f = (ln_f[0].data_ptr(), _address(ln_f[1]))
        self._head = head.data_ptr()
        self._eps = eps
        self._activation = GPT_ACTIVATIONS[activation]

    @staticmethod
    def accepts(keys, values, batch: int) -> bool:
        """Whether `step` can use this cache (CPU fp32, contiguous, `batch` rows) — callers
        with another cache take their module path; `step` refuses it."""
        return (keys[0].shape[0] == batch
                and all(_is_cpu_f32(t) and t.is_contiguous() for t in (*keys, *values)))

    def step(self, x: torch.Tensor, keys, values, *, position: int, tokens_per_row: int = 1,
             mask: torch.Tensor | None) -> torch.Tensor:
        """Logits (rows, vocab), rows = batch × tokens_per_row (row-major: a batch row's tokens
        are consecutive). x: (rows, n_embd) input embeddings, contiguous, overwritten (it
        becomes the residual stream). keys/values: per block the contiguous (batch, n_head,
        max_len, head_dim) caches; token t of a row is written at `position + t` and attends to
        the positions up to its own. mask: (batch, position + tokens_per_row), nonzero where a
        key may be attended (a token always attends to itself), or None for all."""
        rows = x.shape[0]
        if rows > _C_MAX_ROWS:
            raise ValueError(f"the fused step takes at most {_C_MAX_ROWS} rows, got {rows}")
        batch, n_head, max_len, head_dim = keys[0].shape
        shape = keys[0].shape
        if (len(keys) != self.n_layer or len(values) != self.n_layer or n_head * head_dim != self.n_embd
                or any(t.shape != shape for t in (*keys, *values))):
            raise ValueError(f"the cache must hold {self.n_layer} key and value buffers of one shape "
                             f"(batch, n_head, max_len, head_dim) with n_head·head_dim = {self.n_embd}")
        if position + tokens_per_row > max_len:
            raise ValueError(f"KV cache holds {max_len} positions; cannot write position "
                             f"{position + tokens_per_row - 1}")
        if not self.accepts(keys, values, batch):
            raise ValueError("the cache must be contiguous CPU float32 buffers")
        if (x.shape != (batch * tokens_per_row, self.n_embd) or not x.is_contiguous()
                or not _is_cpu_f32(x)):
            raise ValueError(f"x must be a contiguous CPU float32 ({batch * tokens_per_row}, "
                             f"{self.n_embd}) tensor, got {tuple(x.shape)} {x.dtype}")
        if mask is not None and mask.shape != (batch, position + tokens_per_row):
            raise ValueError(f"mask must be ({batch}, {position + tokens_per_row}), "
                             f"got {tuple(mask.shape)}")
        caches = (ctypes.c_int64 * (2 * self.n_layer))(
            *[t.data_ptr() for pair in zip(keys, values) for t in pair])
        if mask is not None:
            mask = mask.to(torch.uint8).contiguous()
        logits = torch.empty(rows, self.vocab, dtype=torch.float32)
        status = _state["functions"]["gpt_decode"](
            self._table, caches, self.n_layer, rows, tokens_per_row, self.n_embd, n_head,
            self.n_inner, max_len, position, _address(mask), self._eps, self._activation,
            *self._ln_f, self._head, self.vocab, x.data_ptr(), logits.data_ptr(),
            torch.get_num_threads())
        if status != 0:
            raise MemoryError("the fused decode step could not allocate its scratch memory")
        return logits


# -- training ----------------------------------------------------------------------------------
# The fused training step keeps the attention probabilities of every layer (batch · heads · T²
# floats each) for its backward pass; beyond this many floats in all, the module path (SDPA's
# flash attention, which recomputes them) is the better use of memory.
TRAIN_MAX_ATTENTION_FLOATS = 64 * 2**20
# Each shard beyond the first holds a gradient copy of every parameter until they are added up.
TRAIN_MAX_SHARD_GRAD_FLOATS = 256 * 2**20


def training_available() -> bool:
    """Whether `gpt_causal_lm_loss` can run here (the kernels, and a BLAS sgemm from torch)."""
    return available() and "train_forward" in _state["functions"]


def training_shards(batch: int, n_params: int) -> int:
    """How many shards (groups of whole sequences, one per thread) a step of `batch` rows is
    cut into: one per thread, so every thread works; 0 when that cannot be done — fewer
    sequences than threads, or too many gradient copies — and the module path should run."""
    threads = torch.get_num_threads()
    if batch < threads or (threads - 1) * n_params > TRAIN_MAX_SHARD_GRAD_FLOATS:
        return 0
    return threads


def _take(pool: dict, kind: str, size: int) -> torch.Tensor:
    """A float buffer of at least `size` elements from the pool (taken out while in use)."""
    buffer = pool.pop(kind, None)
    return (buffer if buffer is not None and buffer.numel() >= size
            else torch.empty(size, dtype=torch.float32))


def _give_back(pool: dict, kind: str, buffer: torch.Tensor) -> None:
    """Keep one buffer per kind, the largest seen (an evaluation batch's workspace serves the
    smaller training batches after it: a step uses the front part it needs)."""
    if kind not in pool or pool[kind].numel() < buffer.numel():
        pool[kind] = buffer


def _forward(spec, input_ids, labels, params):
    """The C forward pass: (summed loss as a 0-d fp32 tensor, workspace holding the
    activations, pointer table)."""
    batch, T = input_ids.shape
    fn = _load()
    size = fn["train_workspace"](spec.n_layer, batch, T, spec.n_embd, spec.n_head, spec.n_inner,
                                 spec.vocab)
    ws = _take(spec.pool, "workspace", size)
    losses = torch.empty(spec.shards, dtype=torch.float64)
    table = spec.table(params)
    fn["train_forward"](table, spec.n_layer, batch, T, spec.n_embd, spec.n_head, spec.n_inner,
                        spec.vocab, spec.eps, spec.activation, input_ids.data_ptr(),
                        labels.data_ptr(), ws.data_ptr(), losses.data_ptr(), spec.shards,
                        torch.get_num_threads())
    return torch.tensor(float(sum(losses.tolist())), dtype=torch.float32), ws, table


class _GPTCausalLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, input_ids, labels, *params):
        loss, ctx.ws, ctx.table = _forward(spec, input_ids, labels, params)
        ctx.spec = spec
        ctx.save_for_backward(input_ids, labels, *params)
        return loss

    @staticmethod
    def backward(ctx, grad):
        if ctx.ws is None:
            raise RuntimeError("the fused GPT loss was already back-propagated (its logits became "
                               "their gradient); retain_graph is not supported")
        spec, ws = ctx.spec, ctx.ws
        ctx.ws = None
        input_ids, labels, *params = ctx.saved_tensors
        batch, T = input_ids.shape
        sizes = [p.numel() for p in params]
        total = sum(sizes)
        grads = torch.empty(total, dtype=torch.float32)
        scratch = _take(spec.pool, "scratch", max(1, (spec.shards - 1) * total))
        status = _load()["train_backward"](
            ctx.table, spec.n_layer, batch, T, spec.n_embd, spec.n_head, spec.n_inner, spec.vocab,
            spec.positions, spec.eps, spec.activation, input_ids.data_ptr(), labels.data_ptr(),
            ws.data_ptr(), float(grad), spec.offsets(sizes), grads.data_ptr(),
            scratch.data_ptr(), total, spec.shards, torch.get_num_threads())
        # Fresh buffers of tens of MB cost a page fault per 4 KiB on every step (~10% of a
        # small model's step): the caller's pool keeps them for the next one.
        _give_back(spec.pool, "workspace", ws)
        _give_back(spec.pool, "scratch", scratch)
        if status != 0:
            raise MemoryError("the fused GPT backward pass could not allocate its scratch memory")
        views = [g.view(p.shape) for g, p in zip(grads.split(sizes), params)]
        return (None, None, None, *views)


class _TrainSpec:
    """The C table layout of a GPT's parameters: per layer the twelve slots of GPTDecoder, then
    wte, wpe, ln_f weight, ln_f bias, head; `slots[i]` indexes the unique parameters (or -1)."""

    def __init__(self, slots, unique, *, n_layer, n_head, eps, activation, shards, pool):
        self.slots, self.n_layer, self.n_head, self.eps = slots, n_layer, n_head, eps
        self.pool = pool
        self.activation, self.shards = GPT_ACTIVATIONS[activation], shards
        wte, wpe = unique[slots[12 * n_layer]], unique[slots[12 * n_layer + 1]]
        self.vocab, self.n_embd = wte.shape
        self.positions = wpe.shape[0]
        self.n_inner = unique[slots[8]].shape[0]

    def table(self, params):
        return (ctypes.c_int64 * len(self.slots))(
            *[0 if i < 0 else params[i].data_ptr() for i in self.slots])

    def offsets(self, sizes):
        """Where each slot's gradient starts in the flat buffer (-1: no such tensor). A tied
        head shares wte's slice; the C code sees the same address and writes it once."""
        starts = [0]
        for size in sizes[:-1]:
            starts.append(starts[-1] + size)
        return (ctypes.c_int64 * len(self.slots))(*[-1 if i < 0 else starts[i] for i in self.slots])


def gpt_causal_lm_loss(layers, *, wte: torch.Tensor, wpe: torch.Tensor,
                       ln_f: tuple[torch.Tensor, torch.Tensor | None], head: torch.Tensor,
                       n_head: int, eps: float, activation: str, input_ids: torch.Tensor,
                       labels: torch.Tensor, shards: int, pool: dict) -> torch.Tensor:
    """Summed next-token cross-entropy of a GPT-2-style model (fp32 CPU, no dropout) on
    `input_ids` (batch, T) against `labels` (batch, T), with autograd: its backward fills every
    parameter's gradient in one C call (without grad mode, the forward pass alone). `layers` as
    for GPTDecoder; `head` may be `wte` (tied). The caller checks eligibility
    (`training_available`, `training_shards`, stock architecture, ids and labels in range,
    positions within wpe). `pool` (a dict the caller keeps, e.g. per
    model) holds the step's large buffers between steps; a buffer is taken out while a step
    uses it, so overlapping steps each get their own."""
    tensors = [t for layer in layers for t in layer] + [wte, wpe, *ln_f, head]
    # The gradient buffer mirrors the parameters' memory order: parameters laid out back to
    # back (training.optim.flatten_parameters) get gradients laid out the same way, which the
    # optimizer and the gradient clipping then treat as one tensor.
    unique = sorted({id(t): t for t in tensors if t is not None}.values(),
                    key=lambda t: t.data_ptr())
    index = {id(t): i for i, t in enumerate(unique)}
    slots = [-1 if t is None else index[id(t)] for t in tensors]
    spec = _TrainSpec(slots, unique, n_layer=len(layers), n_head=n_head, eps=eps,
                      activation=activation, shards=shards, pool=pool)
    input_ids, labels = input_ids.contiguous(), labels.contiguous()
    if not torch.is_grad_enabled():  # evaluation: the forward pass alone
        loss, ws, _ = _forward(spec, input_ids, labels, unique)
        _give_back(pool, "workspace", ws)
        return loss
    return _GPTCausalLMLoss.apply(spec, input_ids, labels, *unique)
