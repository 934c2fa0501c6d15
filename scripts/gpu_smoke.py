#!/usr/bin/env python
"""GPU smoke test: lmlab's CUDA paths end to end, on one GPU, in about five minutes.

    python scripts/gpu_smoke.py            run every step, print a pass/fail table
    python scripts/gpu_smoke.py --list     the steps (name, time limit, what it checks)
    python scripts/gpu_smoke.py --only decode-parity --only cli-generate   some steps only
    python scripts/gpu_smoke.py --workdir DIR --keep   keep the runs (default: a temp dir)

Every step runs in its own subprocess under a time limit (a hang fails the step, never the
script); a step whose prerequisite failed is skipped. Steps marked optional (torch.compile)
report FAIL but do not fail the script.

Exit status: 0 every required step passed; 1 a required step failed or timed out;
3 no CUDA device here (nothing was run; `--list` still works) — so CI on a CPU machine can
tell "skipped" from "passed".

What it checks: pretraining a tiny GPT and a tiny BERT (bf16, fp32 with activation
checkpointing, torch.compile), --resume, DDP and FSDP2 over real NCCL in a process group of
size 1 (LMLAB_FORCE_DISTRIBUTED=1 under torchrun — without it one process never starts them),
FSDP with --device cpu (gloo) on the GPU machine, fine-tuning classification and QA (and
classification under forced DDP over NCCL), evaluate and predict, every decoding strategy and logits processor on CUDA (greedy and beam
token-identical to the same model on the CPU in fp32; seeded runs repeat), a bf16 model, a
detector that fails when a large op of a GPU run executes on the CPU, and `lmlab generate` /
`lmlab serve` on the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

NO_GPU_EXIT = 3
SCRIPT = Path(__file__).resolve()
# `--device cpu` (hidden; the environment variable carries it to the step processes) runs the
# same steps on the CPU, gloo for NCCL: a check of the script's own plumbing on a machine
# without a GPU. It proves nothing about CUDA.
DEVICE = os.environ.get("LMLAB_SMOKE_DEVICE", "cuda")
ON_GPU = DEVICE == "cuda"
BACKEND = "nccl" if ON_GPU else "gloo"


# -- the steps ------------------------------------------------------------------------------------
@dataclass
class Step:
    name: str
    timeout: float  # seconds, the whole step (all its subprocesses)
    what: str
    run: Callable[["Ctx"], None]
    needs: tuple[str, ...] = ()
    optional: bool = False


class Failure(Exception):
    pass


@dataclass
class Ctx:
    """What a step runs in: the work directory and the step's deadline."""

    work: Path
    deadline: float = 0.0
    log: list[str] = field(default_factory=list)

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise subprocess.TimeoutExpired("step", 0)
        return left

    def sh(self, argv: list, *, env: dict | None = None, expect: int = 0) -> subprocess.CompletedProcess:
        """Run argv (within the step's time), fail unless it exits `expect`."""
        argv = [str(a) for a in argv]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        # its own session, so a timeout kills torchrun's workers too (the whole group)
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=full_env, cwd=self.work, start_new_session=True)
        try:
            out, err = child.communicate(timeout=self.left())
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            raise
        proc = subprocess.CompletedProcess(argv, child.returncode, out, err)
        self.log.append(f"$ {' '.join(argv)}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        if proc.returncode != expect:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise Failure(f"exit {proc.returncode} (expected {expect}): " + " | ".join(tail))
        return proc

    def lmlab(self, *args, env: dict | None = None, expect: int = 0):
        return self.sh([sys.executable, "-m", "lmlab", *args], env=env, expect=expect)

    def torchrun(self, *args, env: dict | None = None):
        return self.sh([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=1", "-m", "lmlab", *args], env=env)

    def check(self, name: str):
        """An in-process check (CHECKS[name]) in a fresh interpreter."""
        return self.sh([sys.executable, SCRIPT, "--step", name, "--workdir", self.work])


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise Failure(message)


TINY = ["--n_layer", 2, "--n_head", 4, "--n_embd", 128, "--block_size", 64, "--batch_size", 16,
        "--eval_every", 0, "--eval_tokens", 4096, "--vocab_size", 512, "--no-progress",
        "--log_every", 5, "--warmup_steps", 5, "--device", DEVICE]


def pretrain(ctx: Ctx, out: str, *extra, objective: str = "causal", steps: int = 30):
    return ctx.lmlab("pretrain", "--objective", objective, "--data", ctx.work / "corpus.txt",
                     "--out", ctx.work / "runs" / out, "--max_steps", steps,
                     "--save_every", steps // 2, *TINY, *extra)


def metrics(ctx: Ctx, run: str) -> list[dict]:
    path = ctx.work / "runs" / run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_pretrain_run(ctx: Ctx, run: str, *, loss_key: str = "val_loss") -> None:
    records = metrics(ctx, run)
    evals = [r[loss_key] for r in records if loss_key in r]
    expect(len(evals) >= 2, f"{run}: fewer than two evaluations in metrics.jsonl")
    expect(all(v == v and v < 1e4 for v in evals), f"{run}: non-finite {loss_key} {evals}")
    expect(evals[-1] < evals[0], f"{run}: {loss_key} did not fall ({evals[0]:.3f} → "
                                 f"{evals[-1]:.3f})")
    peaks = [r["peak_mem_mb"] for r in records if "peak_mem_mb" in r]
    # a tiny model: the FLOPs probe's 8192² matrices (768 MiB in fp32) must not be counted
    expect(peaks and max(peaks) < 500, f"{run}: peak_mem_mb {peaks[-1:]} counts the probe?")
    expect((ctx.work / "runs" / run / "model.safetensors").is_file(), f"{run}: no model saved")


def step_data(ctx: Ctx) -> None:
    make_data(ctx.work)


def step_env(ctx: Ctx) -> None:
    ctx.check("env")


def step_gpt_bf16(ctx: Ctx) -> None:
    pretrain(ctx, "gpt-bf16", "--precision", "bf16")
    check_pretrain_run(ctx, "gpt-bf16")


def step_gpt_fp32(ctx: Ctx) -> None:
    pretrain(ctx, "gpt-fp32", "--precision", "fp32", "--activation_checkpointing", "true")
    check_pretrain_run(ctx, "gpt-fp32")


def step_resume(ctx: Ctx) -> None:
    proc = pretrain(ctx, "gpt-bf16", "--precision", "bf16", "--resume", steps=40)
    expect("after 40 steps" in proc.stdout, "resumed run did not reach step 40")
    expect("resumed from" in proc.stderr, "no 'resumed from' in the log")


def step_gpt_compile(ctx: Ctx) -> None:
    pretrain(ctx, "gpt-compile", "--precision", "bf16", "--compile", "true", steps=20)
    check_pretrain_run(ctx, "gpt-compile")


def step_bert(ctx: Ctx) -> None:
    pretrain(ctx, "bert-bf16", "--precision", "bf16", objective="mlm", steps=40)
    check_pretrain_run(ctx, "bert-bf16")


def _distributed(ctx: Ctx, run: str, parallel: str, *extra, backend: str) -> None:
    proc = ctx.torchrun("pretrain", "--data", ctx.work / "corpus.txt",
                        "--out", ctx.work / "runs" / run, "--max_steps", 20, "--save_every", 10,
                        *TINY, "--parallel", parallel, *extra,
                        env={"LMLAB_FORCE_DISTRIBUTED": "1"})
    expect(f"{backend} backend" in proc.stderr and "(forced)" in proc.stderr,
           f"{run}: the {backend} process group was not started (no log line)")
    check_pretrain_run(ctx, run)


def step_ddp(ctx: Ctx) -> None:
    _distributed(ctx, "ddp", "ddp", "--precision", "bf16", backend=BACKEND)


def step_fsdp(ctx: Ctx) -> None:
    _distributed(ctx, "fsdp", "fsdp", "--precision", "bf16", backend=BACKEND)
    # and it resumes from its own (full-state) checkpoint
    proc = ctx.torchrun("pretrain", "--data", ctx.work / "corpus.txt", "--out",
                        ctx.work / "runs" / "fsdp", "--max_steps", 24, "--save_every", 12,
                        *TINY, "--parallel", "fsdp", "--precision", "bf16", "--resume",
                        env={"LMLAB_FORCE_DISTRIBUTED": "1"})
    expect("after 24 steps" in proc.stdout, "FSDP resume did not reach step 24")


def step_fsdp_cpu(ctx: Ctx) -> None:
    cpu = ["cpu" if a == DEVICE else a for a in TINY]
    proc = ctx.torchrun("pretrain", "--data", ctx.work / "corpus.txt", "--out",
                        ctx.work / "runs" / "fsdp-cpu", "--max_steps", 6, "--save_every", 0,
                        *cpu, "--n_embd", 64, "--parallel", "fsdp",
                        env={"LMLAB_FORCE_DISTRIBUTED": "1"})
    expect("gloo backend" in proc.stderr, "--device cpu did not use gloo")


def step_finetune_cls(ctx: Ctx) -> None:
    out, data = ctx.work / "runs" / "cls", ctx.work / "cls"
    ctx.lmlab("finetune", "classification", "--model", ctx.work / "runs" / "bert-bf16",
              "--train", data / "train.jsonl", "--validation", data / "validation.jsonl",
              "--out", out, "--max_length", 32, "--batch_size", 16, "--epochs", 3, "--lr", 1e-3,
              "--no-progress", "--device", DEVICE)
    best = json.loads((out / "results.json").read_text())["validation"]
    proc = ctx.lmlab("evaluate", out, "--data", data / "validation.jsonl", "--json",
                     "--device", DEVICE)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    expect(abs(got["accuracy"] - best["val_accuracy"]) <= 0.05,
           f"evaluate accuracy {got['accuracy']} vs training's {best['val_accuracy']}")
    ctx.lmlab("predict", out, "--data", data / "validation.jsonl", "--out",
              ctx.work / "cls-pred.jsonl", "--device", DEVICE)
    rows = (ctx.work / "cls-pred.jsonl").read_text().splitlines()
    expect(len(rows) == CLS_VAL, f"predict wrote {len(rows)} rows, expected {CLS_VAL}")


def step_finetune_ddp(ctx: Ctx) -> None:
    """`lmlab finetune` under torchrun: DDP over NCCL in a process group of one (forced), one
    epoch of classification; rank 0 evaluates and writes the run."""
    out, data = ctx.work / "runs" / "cls-ddp", ctx.work / "cls"
    proc = ctx.torchrun("finetune", "classification", "--model", ctx.work / "runs" / "bert-bf16",
                        "--train", data / "train.jsonl", "--validation",
                        data / "validation.jsonl", "--out", out, "--max_length", 32,
                        "--batch_size", 16, "--epochs", 1, "--lr", 1e-3, "--no-progress",
                        "--precision", "bf16", "--device", DEVICE,
                        env={"LMLAB_FORCE_DISTRIBUTED": "1"})
    expect(f"{BACKEND} backend" in proc.stderr and "(forced)" in proc.stderr,
           f"finetune: the {BACKEND} process group was not started (no log line)")
    best = json.loads((out / "results.json").read_text())["validation"]
    expect(0 <= best.get("val_accuracy", -1) <= 1, f"finetune under DDP: validation {best}")
    expect((out / "model.safetensors").is_file(), "finetune under DDP: no model saved")


def step_finetune_qa(ctx: Ctx) -> None:
    out, data = ctx.work / "runs" / "qa", ctx.work / "qa"
    ctx.lmlab("finetune", "qa", "--model", ctx.work / "runs" / "bert-bf16",
              "--train", data / "train.json", "--validation", data / "validation.json",
              "--out", out, "--max_length", 32, "--stride", 8, "--batch_size", 16,
              "--epochs", 3, "--lr", 2e-3, "--no-progress", "--device", DEVICE)
    proc = ctx.lmlab("evaluate", out, "--data", data / "validation.json", "--json",
                     "--device", DEVICE)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    expect(set(got) >= {"exact_match", "f1"}, f"QA evaluate printed {got}")
    ctx.lmlab("predict", out, "--data", data / "validation.json", "--out",
              ctx.work / "qa-pred.jsonl", "--device", DEVICE)


def step_decode_parity(ctx: Ctx) -> None:
    ctx.check("decode-parity")


def step_decode_all(ctx: Ctx) -> None:
    ctx.check("decode-all")


def step_bf16_model(ctx: Ctx) -> None:
    ctx.check("bf16-model")


def step_no_cpu_ops(ctx: Ctx) -> None:
    ctx.check("no-cpu-ops")


def step_cli_generate(ctx: Ctx) -> None:
    model = ctx.work / "runs" / "gpt-fp32"
    common = ["generate", "--model", model, "--prompt", "the king", "--prompt", "a small",
              "--max-new-tokens", 24]
    for extra in ([], ["--num-beams", 3]):
        cpu = ctx.lmlab(*common, *extra, "--device", "cpu").stdout
        for device in (("cuda", "cuda:0", "auto") if ON_GPU else ("auto",)):
            gpu = ctx.lmlab(*common, *extra, "--device", device).stdout
            expect(gpu == cpu, f"lmlab generate {' '.join(map(str, extra))} --device {device} "
                               f"differs from the CPU:\n{gpu}\nvs\n{cpu}")
    proc = ctx.lmlab(*common, "--device", "cuda:99" if ON_GPU else "gpu", expect=2)
    expect(proc.stderr.count("\n") == 1 and "--device" in proc.stderr,
           f"--device cuda:99: not one clear line: {proc.stderr!r}")


def step_cli_serve(ctx: Ctx) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [sys.executable, "-m", "lmlab", "serve", "--model", ctx.work / "runs" / "gpt-fp32",
            "--port", port, "--device", DEVICE]
    log_path = ctx.work / "serve.log"
    with log_path.open("w") as log_file:
        server = subprocess.Popen([str(a) for a in argv], cwd=ctx.work, stdout=log_file,
                                  stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            ctx.left()
            if server.poll() is not None:
                raise Failure(f"lmlab serve exited {server.returncode}: "
                              + log_path.read_text()[-2000:])
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200 and json.loads(r.read()).get("status") in ("ok", "ready"):
                        break
            except OSError:
                pass
            time.sleep(0.5)
        with urllib.request.urlopen(base + "/v1/models", timeout=10) as r:
            name = json.loads(r.read())["data"][0]["id"]
        body = json.dumps({"model": name, "prompt": "the king", "max_tokens": 8,
                           "temperature": 0}).encode()
        request = urllib.request.Request(base + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=min(60, ctx.left())) as r:
            reply = json.loads(r.read())
        expect(r.status == 200 and reply["choices"][0]["text"] != "",
               f"/v1/completions: {reply}")
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        ctx.log.append("lmlab serve:\n" + log_path.read_text()[-3000:])


STEPS = [
    Step("data", 30, "tiny corpus, classification JSONL, SQuAD JSON", step_data),
    Step("env", 60, "CUDA visible; the device rule picks cuda:0; bf16 native?; TF32 set by "
         "training's setup", step_env),
    Step("pretrain-gpt-bf16", 90, "tiny GPT, 30 steps, bf16 autocast; loss falls; peak memory "
         "excludes the FLOPs probe", step_gpt_bf16, needs=("data",)),
    Step("pretrain-gpt-fp32", 90, "tiny GPT, fp32 (TF32) with activation checkpointing",
         step_gpt_fp32, needs=("data",)),
    Step("resume", 90, "--resume the bf16 run to step 40 (RNG states restored on CUDA)",
         step_resume, needs=("pretrain-gpt-bf16",)),
    Step("pretrain-gpt-compile", 180, "torch.compile'd training forward", step_gpt_compile,
         needs=("data",), optional=True),
    Step("pretrain-bert-bf16", 90, "tiny BERT, masked LM, bf16", step_bert, needs=("data",)),
    Step("ddp-nccl", 120, "DDP over NCCL, process group of 1 (forced)", step_ddp,
         needs=("data",)),
    Step("fsdp-nccl", 150, "FSDP2 over NCCL, bf16 mixed precision, then --resume", step_fsdp,
         needs=("data",)),
    Step("fsdp-cpu-gloo", 120, "FSDP with --device cpu on the GPU machine: gloo, CPU mesh",
         step_fsdp_cpu, needs=("data",)),
    Step("finetune-classification", 120, "fine-tune the BERT for classification; evaluate "
         "and predict --device cuda", step_finetune_cls, needs=("pretrain-bert-bf16",)),
    Step("finetune-ddp-nccl", 90, "fine-tune classification under torchrun: DDP over NCCL, "
         "process group of 1 (forced)", step_finetune_ddp, needs=("pretrain-bert-bf16",)),
    Step("finetune-qa", 120, "fine-tune the BERT for extractive QA; evaluate and predict",
         step_finetune_qa, needs=("pretrain-bert-bf16",)),
    Step("decode-parity", 90, "greedy and beam on CUDA token-identical to the CPU (fp32), "
         "CPU prompt ids follow the model", step_decode_parity, needs=("pretrain-gpt-fp32",)),
    Step("decode-all", 120, "every strategy and processor on CUDA; seeded runs repeat; "
         "speculative greedy = greedy", step_decode_all, needs=("pretrain-gpt-fp32",)),
    Step("bf16-model", 60, "a bf16 model decodes (greedy, sampling in fp32 softmax, beam)",
         step_bf16_model, needs=("pretrain-gpt-fp32",)),
    Step("no-cpu-ops", 90, "no large op of a GPU decode or training step runs on the CPU",
         step_no_cpu_ops, needs=("pretrain-gpt-fp32",)),
    Step("cli-generate", 120, "lmlab generate --device cuda, cuda:0 and auto = --device cpu; "
         "cuda:99 is one clear line", step_cli_generate, needs=("pretrain-gpt-fp32",)),
    Step("cli-serve", 90, "lmlab serve --device cuda answers /v1/completions", step_cli_serve,
         needs=("pretrain-gpt-fp32",)),
]


# -- in-process checks (run as `gpu_smoke.py --step NAME`, in a fresh interpreter) ----------------
def check_env(work: Path) -> None:
    import torch

    from lmlab.training.runtime import autocast_dtype, native_bf16, pick_device, setup_cuda

    device = pick_device("auto")
    if not ON_GPU:
        expect(pick_device(DEVICE) == torch.device("cpu"), "cpu")
        return
    expect(device == torch.device("cuda", 0), f"auto resolved to {device}")
    name = torch.cuda.get_device_name(device)
    print(f"{name}, capability {torch.cuda.get_device_capability(device)}, "
          f"{torch.cuda.device_count()} visible, torch {torch.__version__}, "
          f"native bf16 {native_bf16(device)}, auto precision {autocast_dtype(device, 'auto')}")
    setup_cuda(device)
    expect(torch.backends.cuda.matmul.allow_tf32, "setup_cuda did not enable TF32")


def _models(work: Path):
    import torch

    from lmlab.models import from_pretrained
    from lmlab.tokenizer import Tokenizer

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity with the CPU
    directory = work / "runs" / "gpt-fp32"
    cpu = from_pretrained(directory).eval()
    gpu = from_pretrained(directory, device=DEVICE).eval()
    return cpu, gpu, Tokenizer.from_pretrained(directory)


PROMPTS = ["the king of", "a small house", "and then the"]


def check_decode_parity(work: Path) -> None:
    import torch

    from lmlab.generation import generate

    cpu, gpu, tok = _models(work)
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])  # built on the CPU: follows the model
        for knobs in ({}, {"num_beams": 4}, {"num_beams": 3, "num_return_sequences": 2}):
            a = generate(cpu, ids, max_new_tokens=24, eos_token_id=[], **knobs)
            b = generate(gpu, ids, max_new_tokens=24, eos_token_id=[], **knobs)
            expect(b.device.type == DEVICE, f"output on {b.device}")
            expect(torch.equal(a, b.cpu()), f"{prompt!r} {knobs}: CUDA {b.tolist()} != CPU "
                                            f"{a.tolist()}")
    # a left-padded batch with its mask
    batch = [tok.encode(p) for p in PROMPTS]
    width = max(map(len, batch))
    ids = torch.tensor([[0] * (width - len(b)) + b for b in batch])
    mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
    a = generate(cpu, ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[])
    b = generate(gpu, ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[])
    expect(torch.equal(a, b.cpu()), "left-padded batch: CUDA differs from the CPU")


STRATEGIES = {
    "sample": {"do_sample": True, "temperature": 0.8},
    "top_k": {"do_sample": True, "top_k": 20},
    "top_p": {"do_sample": True, "top_p": 0.9},
    "min_p": {"do_sample": True, "min_p": 0.05},
    "typical_p": {"do_sample": True, "typical_p": 0.9},
    "epsilon": {"do_sample": True, "epsilon_cutoff": 3e-4},
    "eta": {"do_sample": True, "eta_cutoff": 3e-4},
    "repetition_penalty": {"do_sample": True, "repetition_penalty": 1.3},
    "no_repeat_ngram": {"do_sample": True, "no_repeat_ngram_size": 2},
    "freq_presence": {"do_sample": True, "frequency_penalty": 0.5, "presence_penalty": 0.5},
    "n_samples": {"do_sample": True, "num_return_sequences": 3, "top_k": 40},
    "beam": {"num_beams": 4, "length_penalty": 0.8, "early_stopping": True},
    "beam_sample": {"num_beams": 3, "do_sample": True},
    "greedy_processors": {"repetition_penalty": 1.2, "no_repeat_ngram_size": 3,
                          "min_new_tokens": 4},
}


def check_decode_all(work: Path) -> None:
    import torch

    from lmlab.generation import generate

    _, gpu, tok = _models(work)
    ids = torch.tensor([tok.encode(p) for p in PROMPTS[:1]] * 2)
    banned = int(generate(gpu, ids[:1], max_new_tokens=1, eos_token_id=[])[0, -1])
    biases = {
        "logit_bias": {"logit_bias": {banned: -100.0}},
        "bad_words": {"bad_words_ids": [[banned]]},
        "sequence_bias": {"sequence_bias": {(banned,): -50.0}},
    }
    for name, knobs in {**STRATEGIES, **{k: {**v, "do_sample": True} for k, v in biases.items()},
                        **{k + "_greedy": v for k, v in biases.items()},
                        **{k + "_beam": {**v, "num_beams": 3} for k, v in biases.items()}}.items():
        seed = {"seed": 7} if knobs.get("do_sample") else {}
        runs = [generate(gpu, ids, max_new_tokens=16, eos_token_id=[], **seed, **knobs)
                for _ in range(2)]
        expect(runs[0].device.type == DEVICE, f"{name}: output on {runs[0].device}")
        expect(torch.equal(*runs), f"{name}: the same seed gave different tokens")
        if name.split("_")[0] in ("logit", "bad", "sequence"):
            new = runs[0][:, ids.shape[1]:]
            expect(not (new == banned).any(), f"{name}: banned token {banned} was generated")
    # stop strings (need the tokenizer), speculative decoding with a draft on the same GPU
    out = generate(gpu, ids[:1], tokenizer=tok, stop_strings=[" "], max_new_tokens=32,
                   eos_token_id=[])
    expect(out.shape[1] <= ids.shape[1] + 32, "stop_strings")
    greedy = generate(gpu, ids, max_new_tokens=20, eos_token_id=[])
    stats: dict = {}
    spec = generate(gpu, ids, draft_model=gpu, max_new_tokens=20, eos_token_id=[], stats=stats)
    expect(torch.equal(greedy, spec), "speculative greedy differs from greedy")
    expect(stats["acceptance_rate"] == 1.0, f"draft = target accepted {stats}")
    sampled = [generate(gpu, ids, draft_model=gpu, do_sample=True, seed=3, max_new_tokens=16,
                        eos_token_id=[], logit_bias={banned: -100.0}) for _ in range(2)]
    expect(torch.equal(*sampled), "seeded speculative sampling did not repeat")
    cpu_draft = _models(work)[0].to("meta" if not ON_GPU else "cpu")
    try:
        generate(gpu, ids, draft_model=cpu_draft, max_new_tokens=4)
        raise Failure("a CPU draft with a CUDA target was accepted")
    except ValueError as err:
        expect("one device" in str(err), f"unclear device error: {err}")


def check_bf16_model(work: Path) -> None:
    import torch

    from lmlab.generation import generate
    from lmlab.models import from_pretrained
    from lmlab.tokenizer import Tokenizer

    directory = work / "runs" / "gpt-fp32"
    model = from_pretrained(directory, dtype=torch.bfloat16, device=DEVICE).eval()
    tok = Tokenizer.from_pretrained(directory)
    ids = torch.tensor([tok.encode(PROMPTS[0])])
    seen = []
    real = torch.multinomial

    def spy(probs, *args, **kwargs):
        seen.append(probs.dtype)
        return real(probs, *args, **kwargs)

    torch.multinomial = spy
    try:
        for knobs in ({}, {"do_sample": True, "top_p": 0.9, "seed": 1}, {"num_beams": 3}):
            out = generate(model, ids, max_new_tokens=16, eos_token_id=[], **knobs)
            expect(out.device.type == DEVICE and out.shape[1] == ids.shape[1] + 16,
                   f"bf16 {knobs}: {out.shape} on {out.device}")
            expect(int(out.max()) < model.config.vocab_size, f"bf16 {knobs}: bad token ids")
    finally:
        torch.multinomial = real
    expect(seen and set(seen) == {torch.float32}, f"sampling softmax dtypes {set(seen)}")


HEAVY_OPS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "mv", "addmv", "embedding",
             "native_layer_norm", "_softmax", "_log_softmax", "topk", "sort", "multinomial",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math",
             "scaled_dot_product_attention", "gelu", "cumsum"}
HEAVY_NUMEL = 4096  # elements: anything smaller is bookkeeping (token lists, lengths)


def cpu_op_detector():
    """A TorchDispatchMode recording every large op (HEAVY_OPS, an input of HEAVY_NUMEL elements
    or more) that runs on CPU tensors."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class CpuOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.found: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func.overloadpacket.__name__
            if name in HEAVY_OPS:
                for t in tree_flatten((args, kwargs))[0]:
                    if isinstance(t, torch.Tensor) and t.device.type == "cpu" \
                            and t.numel() >= HEAVY_NUMEL:
                        self.found.append(f"{name}{tuple(t.shape)}")
                        break
            return func(*args, **kwargs)

    return CpuOps()


def check_no_cpu_ops(work: Path) -> None:
    import torch

    from lmlab.generation import generate

    _, gpu, tok = _models(work)
    ids = torch.tensor([tok.encode(PROMPTS[0])] * 2)
    # the detector must see a CPU op when there is one (else it proves nothing)
    with cpu_op_detector() as probe:
        torch.randn(128, 128) @ torch.randn(128, 128)
    expect(probe.found, "the detector missed a CPU matmul")
    if not ON_GPU:
        return
    with cpu_op_detector() as mode:
        for knobs in ({}, {"do_sample": True, "top_p": 0.9, "seed": 1}, {"num_beams": 3},
                      {"logit_bias": {5: -100.0}, "repetition_penalty": 1.2}):
            generate(gpu, ids, max_new_tokens=12, eos_token_id=[], **knobs)
        generate(gpu, ids, draft_model=gpu, max_new_tokens=12, eos_token_id=[])
        gpu.train()
        x = ids.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = gpu(x)
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x.flatten()).backward()
    expect(not mode.found, f"large ops on the CPU during a GPU run: {sorted(set(mode.found))}")


CHECKS = {"env": check_env, "decode-parity": check_decode_parity, "decode-all": check_decode_all,
          "bf16-model": check_bf16_model, "no-cpu-ops": check_no_cpu_ops}


# -- data -----------------------------------------------------------------------------------------
WORDS = ("the a king queen house small great old new river city and then of to in was is had "
         "his her it they said came went over under light dark long time day night men women "
         "good bad war peace land sea ship gold stone fire water tree").split()
CLS_TRAIN, CLS_VAL = 256, 64


def make_data(work: Path) -> None:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))) + "."
             for _ in range(12000)]
    # blank lines between "documents" of 20 sentences (the masked-LM recipe reads documents)
    text = "\n\n".join("\n".join(lines[i:i + 20]) for i in range(0, len(lines), 20))
    (work / "corpus.txt").write_text(text + "\n")
    (work / "cls").mkdir(exist_ok=True)
    for split, n in (("train", CLS_TRAIN), ("validation", CLS_VAL)):
        rows = []
        for _ in range(n):
            label = rng.choice(["pos", "neg"])
            cue = rng.choice(["good light peace gold", "bad dark war fire"]
                             [label == "neg"].split())
            words = [rng.choice(WORDS) for _ in range(8)] + [cue, cue]
            rng.shuffle(words)
            rows.append({"text": " ".join(words), "label": label})
        (work / "cls" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "qa").mkdir(exist_ok=True)
    for split, n, seed in (("train", 128, 1), ("validation", 32, 2)):
        rng = random.Random(seed)
        paragraphs = []
        for i in range(n):
            order = rng.sample(WORDS[:20], 12)
            k = rng.randrange(len(order) - 1)
            order[k] = "river"
            context = " ".join(order)
            start = len(" ".join(order[:k + 1])) + 1
            paragraphs.append({"context": context, "qas": [{
                "id": f"{split}-{i}", "question": "what follows river",
                "answers": [{"text": order[k + 1], "answer_start": start}]}]})
        (work / "qa" / f"{split}.json").write_text(json.dumps(
            {"version": "1.1", "data": [{"title": split, "paragraphs": paragraphs}]}))


# -- the driver -----------------------------------------------------------------------------------
def list_steps() -> str:
    rows = ["| step | limit (s) | needs | checks |", "|---|---:|---|---|"]
    for s in STEPS:
        what = s.what + (" (optional)" if s.optional else "")
        rows.append(f"| {s.name} | {s.timeout:.0f} | {', '.join(s.needs) or '-'} | {what} |")
    return "\n".join(rows)


def run_steps(work: Path, only: list[str] | None, verbose: bool) -> int:
    results: dict[str, tuple[str, float, str]] = {}
    t_start = time.monotonic()
    for step in STEPS:
        if only and step.name not in only and step.name not in ("data",):
            continue
        # a prerequisite left out by --only is taken as done (an earlier run in --workdir)
        missing = [n for n in step.needs if n in results and results[n][0] != "PASS"]
        if missing:
            results[step.name] = ("SKIP", 0.0, f"needs {', '.join(missing)}")
            print(f"[skip] {step.name}: needs {', '.join(missing)}", flush=True)
            continue
        ctx = Ctx(work=work, deadline=time.monotonic() + step.timeout)
        t0 = time.monotonic()
        print(f"[run ] {step.name} (≤ {step.timeout:.0f} s): {step.what}", flush=True)
        try:
            step.run(ctx)
            status, note = "PASS", ""
        except subprocess.TimeoutExpired:
            status, note = "TIMEOUT", f"over {step.timeout:.0f} s"
        except Failure as err:
            status, note = "FAIL", str(err)
        except Exception as err:  # noqa: BLE001 — any error of a step is its failure
            status, note = "FAIL", f"{type(err).__name__}: {err}"
        seconds = time.monotonic() - t0
        results[step.name] = (status, seconds, note)
        print(f"[{status.lower():4}] {step.name} {seconds:.1f} s {note[:300]}", flush=True)
        if verbose or status != "PASS":
            for entry in ctx.log[-2:]:
                print("    " + entry[-2500:].replace("\n", "\n    "), flush=True)
    total = time.monotonic() - t_start
    print("\n| step | result | seconds | note |\n|---|---|---:|---|")
    failed = False
    for step in STEPS:
        if step.name not in results:
            continue
        status, seconds, note = results[step.name]
        shown = status + (" (optional)" if step.optional and status != "PASS" else "")
        print(f"| {step.name} | {shown} | {seconds:.1f} | {note[:120].replace('|', '/')} |")
        failed |= status != "PASS" and not step.optional
    print(f"\ntotal {total:.0f} s; {'FAILED' if failed else 'all required steps passed'}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--list", action="store_true", help="print the steps and exit")
    parser.add_argument("--only", action="append", metavar="STEP", help="run only these steps "
                        "(and 'data'); repeatable")
    parser.add_argument("--workdir", help="where runs and data go (default: a temporary dir)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work dir")
    parser.add_argument("--verbose", action="store_true", help="show every step's output")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # internal: one in-process check
    parser.add_argument("--device", choices=["cuda", "cpu"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device and args.device != DEVICE:  # the module's constants follow the variable
        os.environ["LMLAB_SMOKE_DEVICE"] = args.device
        return subprocess.call([sys.executable, SCRIPT, *(argv or sys.argv[1:])])
    if args.list:
        print(list_steps())
        return 0
    if args.step:
        CHECKS[args.step](Path(args.workdir))
        return 0
    import torch

    if ON_GPU and not torch.cuda.is_available():
        print(f"gpu_smoke: no CUDA device here (torch {torch.__version__}); nothing was run "
              f"(exit {NO_GPU_EXIT})")
        return NO_GPU_EXIT
    unknown = sorted(set(args.only or []) - {s.name for s in STEPS})
    if unknown:
        parser.error(f"--only: unknown steps {unknown}; see --list")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lmlab-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"gpu_smoke: work dir {work}", flush=True)
    try:
        return run_steps(work, args.only, args.verbose)
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Failure as err:  # an in-process check (--step) failed
        print(f"FAIL: {err}", file=sys.stderr)
        sys.exit(1)
