"""lm-evaluation-harness on lmlab models: the `lmlab` model type for `lm_eval`.

    from lm_eval import simple_evaluate
    from lmlab.evaluation.harness import LmlabLM, task_manager
    lm = LmlabLM(pretrained="runs/demo", batch_size=32)      # or LmlabLM(model=m, tokenizer=tok)
    results = simple_evaluate(model=lm, tasks=["sst2_lmlab"], task_manager=task_manager())

Importing this module registers the model type `lmlab` with the harness
(`simple_evaluate(model="lmlab", model_args="pretrained=DIR,batch_size=32")`). The harness's own
command line cannot load outside models (no plugin entry point; `--include_path` is for tasks),
so `python -m lmlab.evaluation.harness run --model lmlab …` registers it and then hands the
arguments to `lm-eval` unchanged (with the shipped tasks on `--include_path` unless one is given).

**Scores do not depend on the batch** (the harness's best-known flaw, lm-eval #704 and #1645:
padding and batch composition change logits). Every scored row is right-padded to a length
bucket that depends on its own length only (a power of two from 16, at most the window), pads
form a separate "document" so real positions never attend to them, and the attention always
takes the explicit-mask path. A row's arithmetic is then the same whatever rows share its batch:
on the CPU in float32 the loglikelihoods are bit-identical at batch size 1 and 32 (tested).
Generation decodes one request at a time for the same reason.

`loglikelihood_rolling` cuts a document into the harness's own disjoint windows
(`lm_eval.utils.get_rolling_token_windows` with context 1, as its Hugging Face model does): each
token is scored once, the first conditioned on the EOS token, the last window with a full
context. `lmlab eval perplexity` is the strided sliding-window computation.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from lmlab.errors import ConfigError, DataError

# The harness's datasets must never reach for the network: the tasks lmlab ships read local
# files, and a task that names a hub dataset fails at once instead of hanging offline.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as err:  # lm_eval is an optional extra: lmlab imports without it
    raise ImportError("lm-evaluation-harness is not installed: pip install 'lmlab[eval]' "
                      "(or pip install lm_eval==0.4.13)") from err

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).with_name("harness_tasks")
SHIPPED_TASKS = ("sst2_lmlab", "ag_news_lmlab", "wikitext2_lmlab")
MIN_BUCKET = 16
DEFAULT_MAX_GEN_TOKS = 256

# gen_kwargs a task may send -> the GenerationConfig knob it sets ("until" and "max_gen_toks"
# are handled apart). Anything else is refused: a typo must not silently change decoding.
GEN_KNOBS = {"do_sample": "do_sample", "temperature": "temperature", "top_k": "top_k",
             "top_p": "top_p", "min_p": "min_p", "typical_p": "typical_p",
             "repetition_penalty": "repetition_penalty", "num_beams": "num_beams",
             "no_repeat_ngram_size": "no_repeat_ngram_size", "seed": "seed"}


def bucket_length(n: int, window: int) -> int:
    """The padded length of a row of `n` tokens: a function of `n` alone (never of the other
    rows), so the row's matrix shapes — and its float arithmetic — never change with the batch."""
    return min(window, max(MIN_BUCKET, 1 << (n - 1).bit_length()))


@register_model("lmlab")
class LmlabLM(LM):
    """An lmlab causal LM (GPT family) as an `lm_eval` model.

    Build it from a model directory (`pretrained=DIR`, as `model_args` passes it) or from a
    loaded `model` and its `tokenizer`. `batch_size` rows are scored per forward pass; it changes
    speed only, never a score. `device` (cpu, cuda:0, …) moves the model there; without it the
    model stays where it is. `max_batch_size` is accepted because the harness always passes
    it, and unused (there is no automatic batch size).
    """

    def __init__(self, pretrained: str | None = None, *, model=None, tokenizer=None,
                 batch_size: int | str = 1, max_batch_size: int | None = None,
                 device: str | None = None) -> None:
        super().__init__()
        from lmlab.models.gpt import GPT
        from lmlab.tokenizer import Tokenizer

        if (pretrained is None) == (model is None):
            raise ConfigError("LmlabLM: give either pretrained=DIR or model=… (with tokenizer=…)")
        if pretrained is not None:
            from lmlab.models import from_pretrained

            where = Path(pretrained)
            if not (where / "config.json").is_file():
                raise ConfigError(f"pretrained={pretrained}: not a model directory "
                                  "(no config.json)")
            model = from_pretrained(where)
            tokenizer = Tokenizer.from_pretrained(where)
        elif tokenizer is None:
            raise ConfigError("LmlabLM(model=…) needs tokenizer=… too")
        if not isinstance(model, GPT):
            raise ConfigError(f"lm-evaluation-harness scores causal language models (the GPT "
                              f"family); got {type(model).__name__}")
        if device is not None:  # the CLI resolves `auto` (lmlab.training.runtime's rule)
            try:
                model = model.to(torch.device(device))
            except (RuntimeError, ValueError) as err:
                raise ConfigError(f"device: cannot use {device!r} ({err})") from None
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = _batch_size(batch_size)
        del max_batch_size  # see the docstring
        self.window = model.context_window
        eos = tokenizer.eos_token_id
        if eos is None:
            eos = model.config.eos_token_id
        if eos is None:
            raise ConfigError("the tokenizer has no eos_token (the harness conditions a "
                              "document's first token on it)")
        self.eos_token_id = int(eos)
        self._device = next(model.parameters()).device

    # -- the harness's three requests ----------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the continuation given the context, whether greedy
        decoding would produce exactly that continuation) per (context, continuation)."""
        pairs = [self._encode_pair(*req.args) for req in requests]
        results = self.score(pairs)
        for req, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Log-likelihood of each whole document, window by window (see the module docstring)."""
        pairs, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            tokens = self.tokenizer.encode(text)
            for window in get_rolling_token_windows(token_list=tokens,
                                                    prefix_token=self.eos_token_id,
                                                    max_seq_len=self.window, context_len=1):
                pairs.append(make_disjoint_window(window))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self.score(pairs)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests) -> list[str]:
        """Greedy (unless the task asks to sample) continuation of each context, cut before the
        first `until` string. One request at a time, so no batch neighbour changes an output."""
        outputs = []
        for req in requests:
            context, gen_kwargs = req.args
            text = self.generate_one(context, dict(gen_kwargs or {}))
            self.cache_hook.add_partial("generate_until", req.args, text)
            outputs.append(text)
        return outputs

    # -- scoring ---------------------------------------------------------------------------------
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation), cut where the two meet in the tokenization of
        the whole text (so a merge across the boundary is scored as the model would see it);
        trailing spaces of the context belong to the continuation, as in the harness's models."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.eos_token_id], self.tokenizer.encode(continuation)
        whole = self.tokenizer.encode(context + continuation)
        n = len(self.tokenizer.encode(context))
        return whole[:n], whole[n:]

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log-probability, is_greedy) of each continuation after its context, batched by
        length bucket; each row's numbers are independent of which rows share its batch."""
        rows = []
        for i, (context, continuation) in enumerate(pairs):
            if len(continuation) > self.window:
                raise DataError(f"a continuation of {len(continuation)} tokens does not fit the "
                                f"model's context window ({self.window})")
            ids = (context + continuation)[-(self.window + 1):][:-1]
            rows.append((i, ids, continuation))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        # Longest first (as the harness orders them), grouped by bucket: a batch is one shape.
        rows.sort(key=lambda row: (-bucket_length(len(row[1]), self.window), -len(row[1]), row[0]))
        start = 0
        while start < len(rows):
            length = bucket_length(len(rows[start][1]), self.window)
            stop = start
            while (stop < len(rows) and stop - start < self.batch_size
                   and bucket_length(len(rows[stop][1]), self.window) == length):
                stop += 1
            for index, result in self._score_batch(rows[start:stop], length):
                results[index] = result
            start = stop
        return results

    def _score_batch(self, rows, length: int):
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        # Real tokens are document 0 and padding document 1: block-causal attention with an
        # explicit mask for every row, whether or not it is padded.
        documents = torch.ones(len(rows), length, dtype=torch.long)
        for r, (_, tokens, _) in enumerate(rows):
            ids[r, :len(tokens)] = torch.tensor(tokens)
            documents[r, :len(tokens)] = 0
        logits = self.model(ids.to(self._device), document_ids=documents.to(self._device))
        for r, (index, tokens, continuation) in enumerate(rows):
            if not continuation:
                yield index, (0.0, True)
                continue
            end = len(tokens)
            # Per row, a (len(continuation), vocab) slice: the same shape in any batch.
            logprobs = logits[r, end - len(continuation):end].float().log_softmax(-1)
            target = torch.tensor(continuation, device=logprobs.device)
            picked = logprobs.gather(-1, target[:, None]).squeeze(-1)
            greedy = bool((logprobs.argmax(-1) == target).all())
            yield index, (float(picked.sum()), greedy)

    # -- generation ------------------------------------------------------------------------------
    def generate_one(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        from lmlab.generation import generate

        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        unknown = sorted(set(gen_kwargs) - set(GEN_KNOBS))
        if unknown:
            raise ConfigError(f"generation setting(s) {', '.join(unknown)} are not supported by "
                              f"the lmlab model; known: until, max_gen_toks, "
                              f"{', '.join(GEN_KNOBS)}")
        knobs = {GEN_KNOBS[k]: v for k, v in gen_kwargs.items()}
        if knobs.get("temperature") == 0:  # the harness's spelling of greedy
            knobs.pop("temperature")
            knobs["do_sample"] = False
        if max_new >= self.window:
            raise ConfigError(f"max_gen_toks {max_new} leaves no room for a prompt in the "
                              f"model's context window ({self.window})")
        prompt = self.tokenizer.encode(context)[-(self.window - max_new):] or [self.eos_token_id]
        ids = torch.tensor([prompt], device=self._device)
        out = generate(self.model, ids, max_new_tokens=max_new, eos_token_id=self.eos_token_id,
                       tokenizer=self.tokenizer, stop_strings=until or None, **knobs)
        new = out[0, len(prompt):].tolist()
        new = new[:new.index(self.eos_token_id)] if self.eos_token_id in new else new
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        for stop in until:
            text = text.split(stop)[0]
        return text

    # -- what the harness records ------------------------------------------------------------
    def get_model_info(self) -> dict[str, Any]:
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype),
                "batch_size": self.batch_size}


def _batch_size(value: int | str) -> int:
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"batch_size: expected a positive integer, got {value!r} (the lmlab "
                          "model has no automatic batch size; scores never depend on it)")
    return int(text)


def task_manager(*, include_paths: list[str | Path] = (), data_root: str | Path | None = None,
                 builtin: bool = False):
    """A harness TaskManager that knows the tasks lmlab ships (reading the shared datasets
    under `data_root`, default ../shared/data) plus any folders of the user's own task YAMLs;
    with `builtin`, the harness's own catalogue too (about 15 s to index; its datasets come from
    the hub, so only those already in the local cache will load)."""
    from lm_eval.tasks import TaskManager

    for path in include_paths:
        if not Path(path).is_dir():
            raise ConfigError(f"--include-path {path}: no such directory")
    metadata = {} if data_root is None else {"data_root": str(Path(data_root).resolve())}
    return TaskManager(include_path=[str(TASKS_DIR), *map(str, include_paths)],
                       include_defaults=builtin, metadata=metadata)


def evaluate_tasks(model_dir: str | Path, *, tasks: list[str], include_paths: list[str | Path] = (),
                   data_root: str | Path | None = None, batch_size: int = 1,
                   limit: int | None = None, num_fewshot: int | None = None,
                   device: str | None = None, builtin: bool = False) -> dict[str, Any]:
    """The harness's results dict (`simple_evaluate`) for an lmlab model directory on `tasks`
    (names of shipped tasks, of tasks in `include_paths`, or — with `builtin` — the harness's)."""
    from lm_eval import simple_evaluate

    if not tasks:
        raise ConfigError("--tasks: give at least one task name")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit: expected a positive number of documents, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"--num-fewshot: expected 0 or more, got {num_fewshot}")
    manager = task_manager(include_paths=include_paths, data_root=data_root, builtin=builtin)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        hint = "" if builtin else "; the harness's own tasks need --builtin-tasks"
        raise ConfigError(f"--tasks: unknown task(s) {', '.join(unknown)} (shipped: "
                          f"{', '.join(SHIPPED_TASKS)}; more with --include-path DIR{hint})")
    if (data_root is not None and not Path(data_root).is_dir()
            and any(t in SHIPPED_TASKS for t in tasks)):
        raise ConfigError(f"--data-root {data_root}: no such directory (the shipped tasks read "
                          "sst2/, ag_news/ and wikitext2/ there)")
    lm = LmlabLM(pretrained=str(model_dir), batch_size=batch_size, device=device)
    return simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                           num_fewshot=num_fewshot)


def main(argv: list[str] | None = None) -> None:
    """The harness's own command line with the `lmlab` model type registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"] and not any(a.startswith("--include_path") for a in argv):
        argv += ["--include_path", str(TASKS_DIR)]
    sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
