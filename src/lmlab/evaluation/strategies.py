"""Decoding strategies compared on the same prompts: quality signals and speed, as a table
(Markdown, CSV) and a quality-vs-speed plot. The one implementation behind
`lmlab eval generation` and `lmlab generate --compare`.

Each strategy is a dict of `generate` knobs (GenerationConfig's fields), plus `speculative: true`
(and optionally `num_draft_tokens`) for speculative decoding with a draft model. Every prompt is
decoded alone, so the figures do not depend on batching; a sampling strategy samples prompt i with
seed `seed + i` (its own "seed" knob, if given, replaces `seed`), so a run is reproducible.

The text signals are computed on whitespace-separated words of the decoded continuations, so that
models with different tokenizers (a character-level one, a BPE one) compare; length, EOS rate,
log-probability and speed count the model's own tokens.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from lmlab.evaluation.text_metrics import (distinct_n, mean_token_logprob, ngrams,
                                           repeated_ngram_rate, self_bleu)
from lmlab.generation.config import GenerationConfig
from lmlab.generation.generate import generate
from lmlab.generation.protocol import default_token_id, model_device

# What runs when no strategies are named. lmlab samples without top-k unless told (transformers'
# top_k=0), so the temperature sweep is plain sampling at each temperature.
DEFAULT_STRATEGIES: dict[str, dict[str, Any]] = {
    "greedy": {},
    "beam4": {"num_beams": 4},
    "beam4_norepeat3": {"num_beams": 4, "no_repeat_ngram_size": 3},
    "top_k50": {"do_sample": True, "top_k": 50},
    "top_p0.9": {"do_sample": True, "top_p": 0.9},
    "min_p0.05": {"do_sample": True, "min_p": 0.05},
    "typical0.9": {"do_sample": True, "typical_p": 0.9},
    "temp0.7": {"do_sample": True, "temperature": 0.7},
    "temp1.0": {"do_sample": True, "temperature": 1.0},
    "temp1.3": {"do_sample": True, "temperature": 1.3},
}
# Added to the defaults when a draft model is given: greedy, so its tokens equal greedy's.
SPECULATIVE: dict[str, dict[str, Any]] = {"speculative": {"speculative": True}}
_OWN_KNOBS = ("speculative", "num_draft_tokens")  # ours, not GenerationConfig's

# column -> (header, format) of the table; the CSV holds the same columns unformatted.
COLUMNS: dict[str, tuple[str, str]] = {
    "tokens_per_s": ("tokens/s", "{:,.0f}"),
    "mean_length": ("length", "{:.1f}"),
    "eos_rate": ("EOS rate", "{:.2f}"),
    "mean_logprob": ("log-prob", "{:.3f}"),
    "distinct_1": ("distinct-1", "{:.3f}"),
    "distinct_2": ("distinct-2", "{:.3f}"),
    "rep_2": ("rep-2", "{:.3f}"),
    "rep_3": ("rep-3", "{:.3f}"),
    "rep_4": ("rep-4", "{:.3f}"),
    "self_bleu": ("self-BLEU", "{:.1f}"),
}


@dataclass
class StrategyResult:
    name: str
    knobs: dict[str, Any]
    texts: list[str] = field(default_factory=list)  # the continuations, prompt left out
    new_ids: list[list[int]] = field(default_factory=list)  # up to and including EOS
    ended: list[bool] = field(default_factory=list)  # stopped at EOS before the budget
    seconds: float = 0.0  # in generate, summed over prompts
    logprob_sum: float = 0.0  # of every generated token under the model (nats)
    metrics: dict[str, float] = field(default_factory=dict)  # COLUMNS' keys


def parse_strategies(specs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`NAME=JSON` items (the JSON defaults to {}) → {name: knobs}; a ValueError naming the item
    when one is malformed. The knobs are checked by `check_strategy`."""
    strategies = {}
    for item in specs:
        name, _, text = item.partition("=")
        if not name:
            raise ValueError(f"expected NAME=JSON, got {item!r}")
        try:
            strategies[name] = json.loads(text or "{}")
        except json.JSONDecodeError as err:
            raise ValueError(f"strategy {name}: not valid JSON ({err.msg}): {text!r}") from None
    return strategies


def check_strategy(name: str, knobs: Any, *, max_new_tokens: int, has_draft: bool) -> None:
    """A ValueError naming the strategy when its knobs are not a dict of generate's knobs."""
    if not isinstance(knobs, dict):
        raise ValueError(f"strategy {name}: expected a JSON object of knobs, got {knobs!r}")
    if knobs.get("speculative") and not has_draft:
        raise ValueError(f"strategy {name}: speculative decoding needs a draft model")
    config_knobs = {k: v for k, v in knobs.items() if k not in _OWN_KNOBS}
    if knobs.get("speculative") and (config_knobs.get("num_beams", 1) != 1):
        raise ValueError(f"strategy {name}: speculative decoding does not combine with num_beams")
    unknown = sorted(set(config_knobs) - set(GenerationConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"strategy {name}: unknown knob {', '.join(map(repr, unknown))}; knobs "
                         "are generate's (GenerationConfig's fields) and 'speculative'")
    try:
        GenerationConfig(**{"max_new_tokens": max_new_tokens, **config_knobs})
    except (TypeError, ValueError) as err:
        raise ValueError(f"strategy {name}: {err}") from None


def compare_strategies(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    strategies: dict[str, dict[str, Any]],
    max_new_tokens: int,
    seed: int = 0,
    eos_token_id: list[int] | None = None,
    draft_model=None,
) -> list[StrategyResult]:
    """Each strategy on every prompt (one at a time), with its quality signals and speed."""
    if not prompts:
        raise ValueError("no prompts to compare strategies on")
    for name, knobs in strategies.items():
        check_strategy(name, knobs, max_new_tokens=max_new_tokens,
                       has_draft=draft_model is not None)
    if eos_token_id is None:
        eos = default_token_id(model, "eos_token_id")
        eos_token_id = [] if eos is None else [eos]
    encoded = [torch.tensor([tokenizer.encode(p)], device=model_device(model)) for p in prompts]
    results = []
    for name, knobs in strategies.items():
        result = StrategyResult(name=name, knobs=dict(knobs))
        calls = [_call(knobs, seed=knobs.get("seed", seed) + i, max_new_tokens=max_new_tokens,
                       eos_token_id=eos_token_id, draft=draft_model) for i in range(len(prompts))]
        generate(model, encoded[0], **{**calls[0], "max_new_tokens": 1})  # warm-up, untimed
        for ids, call in zip(encoded, calls):
            t0 = time.perf_counter()
            new = generate(model, ids, **call)[0, ids.shape[1]:].tolist()
            result.seconds += time.perf_counter() - t0
            end = next((i + 1 for i, t in enumerate(new) if t in eos_token_id), None)
            result.new_ids.append(new[:end] if end else new)
            result.ended.append(end is not None)
            result.texts.append(tokenizer.decode(result.new_ids[-1], skip_special_tokens=True))
            if result.new_ids[-1]:
                result.logprob_sum += len(result.new_ids[-1]) * mean_token_logprob(
                    model, ids[0].tolist(), result.new_ids[-1])
        result.metrics = {**quality_signals(result.texts),
                          **_token_figures(result)}
        results.append(result)
    return results


def _call(knobs: dict, *, seed: int, max_new_tokens: int, eos_token_id: list[int], draft) -> dict:
    """The keyword arguments of `generate` for one prompt under one strategy."""
    call = {k: v for k, v in knobs.items() if k not in _OWN_KNOBS}
    call.setdefault("max_new_tokens", max_new_tokens)
    call["eos_token_id"] = eos_token_id
    if call.get("do_sample"):
        call["seed"] = seed
    if knobs.get("speculative"):
        call["draft_model"] = draft
        call["num_draft_tokens"] = knobs.get("num_draft_tokens", 4)
    return call


def quality_signals(texts: Sequence[str]) -> dict[str, float]:
    """distinct-1/2 over all outputs, rep-2/3/4 averaged over outputs (those long enough to have
    an n-gram), self-BLEU among the outputs — on whitespace-separated words."""
    words = [text.split() for text in texts]
    signals = {"distinct_1": distinct_n(words, 1), "distinct_2": distinct_n(words, 2)}
    for n in (2, 3, 4):
        rates = [repeated_ngram_rate(w, n) for w in words if ngrams(w, n)]
        signals[f"rep_{n}"] = sum(rates) / len(rates) if rates else float("nan")
    signals["self_bleu"] = self_bleu(texts)
    return signals


def _token_figures(result: StrategyResult) -> dict[str, float]:
    tokens = sum(len(ids) for ids in result.new_ids)
    return {
        "tokens_per_s": tokens / result.seconds if result.seconds else float("nan"),
        "mean_length": tokens / len(result.new_ids),
        "eos_rate": sum(result.ended) / len(result.ended),
        "mean_logprob": result.logprob_sum / tokens if tokens else float("nan"),
    }


# -- the report ---------------------------------------------------------------------------------
def markdown_table(results: Sequence[StrategyResult]) -> str:
    lines = ["| strategy | knobs | " + " | ".join(h for h, _ in COLUMNS.values()) + " |",
             "|---|---|" + "---:|" * len(COLUMNS)]
    for r in results:
        cells = [_cell(r.metrics[key], fmt) for key, (_, fmt) in COLUMNS.items()]
        lines.append(f"| {r.name} | `{json.dumps(r.knobs)}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: float, fmt: str) -> str:
    return "–" if math.isnan(value) else fmt.format(value)


def write_csv(results: Sequence[StrategyResult], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["strategy", "knobs", *COLUMNS])
        for r in results:
            writer.writerow([r.name, json.dumps(r.knobs), *(r.metrics[k] for k in COLUMNS)])


def plot_quality_vs_speed(results: Sequence[StrategyResult], path: Path, *, title: str) -> None:
    """Two panels against tokens/s (log scale): distinct-2 (diversity, higher is more varied) and
    rep-3 (repetition inside an output, lower is better); one point per strategy, each with its
    own colour and marker, named in the legend (sampling strategies run at much the same speed,
    so labels beside the points would overlap)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    markers, colours = "osD^vP*Xh<>p", plt.get_cmap("tab20").colors
    for ax, key, label in ((axes[0], "distinct_2", "distinct-2 (higher: more varied)"),
                           (axes[1], "rep_3", "rep-3 (lower: less repetition)")):
        for i, r in enumerate(results):
            x, y = r.metrics["tokens_per_s"], r.metrics[key]
            if not (math.isnan(x) or math.isnan(y)):
                ax.scatter(x, y, s=45, marker=markers[i % len(markers)],
                           color=colours[(2 * i) % 20 + (i // 10) % 2], label=r.name,
                           edgecolors="black", linewidths=0.4)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("new tokens/s (log scale)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report(results: Sequence[StrategyResult], out_dir: Path, *, prompts: Sequence[str],
                 title: str) -> list[Path]:
    """table.md, table.csv, quality_vs_speed.png and samples.jsonl (every continuation) in
    `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / name for name in ("table.md", "table.csv", "quality_vs_speed.png",
                                         "samples.jsonl")]
    paths[0].write_text(markdown_table(results), encoding="utf-8")
    write_csv(results, paths[1])
    plot_quality_vs_speed(results, paths[2], title=title)
    with open(paths[3], "w", encoding="utf-8") as f:
        for r in results:
            for prompt, text, ended in zip(prompts, r.texts, r.ended):
                f.write(json.dumps({"strategy": r.name, "prompt": prompt, "continuation": text,
                                    "eos": ended}) + "\n")
    return paths
