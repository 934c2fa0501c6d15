#!/usr/bin/env python
"""Two translation studies on Multi30k (test = test2016), each ending in a table of sacreBLEU.

    python scripts/translation_studies.py multilingual --minutes 5 --out runs/multilingual_study
    python scripts/translation_studies.py span --minutes 15 --pretrain-minutes 5 --out runs/span_study
    python scripts/translation_studies.py span --out runs/span_study --table-only

**multilingual** — is one model for en→{de, fr, cs} as good as three? One bilingual model per
direction, each trained from scratch for `--minutes` (configs/finetune/translation_multilingual.yaml
with a single target language and the bilingual presets' 8,000-piece vocabulary), against one
model for all three directions trained for 3 × `--minutes` — the same total training time — with
each tag style: the target language's token first in the source (`<2de>`, Google's) and the
forced first decoder token (mBART's, M2M-100's).

**span** — does span-corruption pretraining help? From scratch for `--minutes`
(configs/finetune/translation_en_de.yaml) against span-corruption pretraining for
`--pretrain-minutes` (configs/pretrain/t5_span.yaml, same shape, with fine-tuning's dropout 0.1)
on the monolingual text of both sides of the training pairs (every English and every German
sentence a line of its own: no pairing is seen), then translation fine-tuning for the rest.

Every cell is the test set's sacreBLEU (chrF2 beside it) with beam 5; a paired bootstrap (1,000
resamples, sacreBLEU's --paired-bs) against the baseline column says whether a difference is
significant (* for p < 0.05). The runs' configs are written to OUT/configs, the table to
OUT/table.md. Run it alone: each run's `max_minutes` fits its steps to the CPU it finds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from lmlab.config import read_yaml  # noqa: E402
from lmlab.evaluation.translation import paired_bootstrap  # noqa: E402
from lmlab.fileio import atomic_write_text  # noqa: E402

TARGETS = ("de", "fr", "cs")
TAG_STYLES = {"source_token": "<2xx> on the source", "forced_bos": "forced first token"}


def write_config(out: Path, name: str, values: dict) -> Path:
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def lmlab(*args: str) -> None:
    """One lmlab command; a run that already finished (its model saved) is not made again."""
    out = Path(args[args.index("--out") + 1])
    if (out / "model.safetensors").is_file():
        print(f"{out}: done before, kept", flush=True)
        return
    print("$ lmlab " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "lmlab", *args, "--no-progress"], cwd=ROOT, check=True)


def multilingual_runs(out: Path, minutes: float) -> None:
    preset = read_yaml(ROOT / "configs/finetune/translation_multilingual.yaml")
    for lang in TARGETS:
        bilingual = {k: v for k, v in preset.items() if k not in ("target_langs", "tag_style")}
        bilingual.update(target_lang=lang, max_minutes=minutes,
                         scratch={**preset["scratch"], "vocab_size": 8000})
        config = write_config(out, f"bilingual_{lang}", bilingual)
        lmlab("finetune", "translation", "--config", str(config), "--out",
              str(out / f"bilingual_{lang}"))
    for style in TAG_STYLES:
        config = write_config(out, f"multi_{style}",
                              {**preset, "tag_style": style, "max_minutes": 3 * minutes})
        lmlab("finetune", "translation", "--config", str(config), "--out",
              str(out / f"multi_{style}"))


def span_runs(out: Path, minutes: float, pretrain_minutes: float) -> None:
    if not 0 < pretrain_minutes < minutes:
        raise SystemExit(f"--pretrain-minutes must be in (0, --minutes = {minutes})")
    preset = read_yaml(ROOT / "configs/finetune/translation_en_de.yaml")
    config = write_config(out, "scratch", {**preset, "max_minutes": minutes})
    lmlab("finetune", "translation", "--config", str(config), "--out", str(out / "scratch"))
    # The monolingual text: each side of each training pair, one sentence per line.
    text = out / "monolingual_en_de.txt"
    if not text.is_file():
        pairs = [json.loads(line) for line in (ROOT / preset["train"]).read_text().splitlines()]
        atomic_write_text(text, "".join(f"{pair[preset[side]].strip()}\n" for side in
                                        ("source_lang", "target_lang") for pair in pairs))
    pretrain = {**read_yaml(ROOT / "configs/pretrain/t5_span.yaml"), "data": str(text),
                "dropout": preset["scratch"]["dropout_rate"], "max_minutes": pretrain_minutes}
    config = write_config(out, "pretrain", pretrain)
    lmlab("pretrain", "--config", str(config), "--out", str(out / "pretrain"))
    finetune = {k: v for k, v in preset.items() if k != "scratch"}
    finetune.update(model=str(out / "pretrain"), max_minutes=minutes - pretrain_minutes)
    config = write_config(out, "finetune", finetune)
    lmlab("finetune", "translation", "--config", str(config), "--out", str(out / "finetune"))


# -- tables --------------------------------------------------------------------------------------
def results(run: Path) -> dict:
    path = run / "results.json"
    if not path.is_file():
        raise SystemExit(f"{run}: no results.json (run the study first)")
    return json.loads(path.read_text())


def hypotheses(run: Path, lang: str | None = None) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in (run / "translations_test.jsonl").open()]
    rows = [row for row in rows if lang is None or row.get("to", lang) == lang]
    return [row["hypothesis"] for row in rows], [row["reference"] for row in rows]


def cell(run: Path, suffix: str = "", baseline: Path | None = None,
         lang: str | None = None) -> str:
    scores = results(run)["test"]
    text = f"{scores['bleu' + suffix]:.2f} ({scores['chrf' + suffix]:.1f})"
    if baseline is not None:
        base_hyps, refs = hypotheses(baseline)
        hyps, refs_b = hypotheses(run, lang)  # a multilingual run's rows of that direction
        if refs != refs_b:
            raise SystemExit(f"{run} and {baseline} translated different test sets")
        test = paired_bootstrap(base_hyps, hyps, refs, target_lang=lang)
        text += f", p = {test.p_value:.3f}{'*' if test.significant else ''}"
    return text


def training(run: Path) -> str:
    figures = results(run)
    return f"{figures['steps']:,} steps, {figures['train_seconds'] / 60:.1f} min"


def multilingual_table(out: Path) -> str:
    minutes = read_yaml(out / "configs" / f"bilingual_{TARGETS[0]}.yaml")["max_minutes"]
    head = (f"| direction | bilingual, {minutes:g} min each | "
            + " | ".join(f"multilingual, {label}, {3 * minutes:g} min" for label in
                         TAG_STYLES.values()) + " |")
    lines = [head, "|---" * (2 + len(TAG_STYLES)) + "|"]
    for lang in TARGETS:
        bilingual = out / f"bilingual_{lang}"
        lines.append(f"| en→{lang} | {cell(bilingual)} | " + " | ".join(
            cell(out / f"multi_{style}", f"_{lang}", bilingual, lang)
            for style in TAG_STYLES) + " |")
    mean = sum(results(out / f"bilingual_{lang}")["test"]["bleu"] for lang in TARGETS) / len(TARGETS)
    lines.append(f"| mean BLEU | {mean:.2f} | " + " | ".join(
        f"{results(out / f'multi_{style}')['test']['bleu']:.2f}" for style in TAG_STYLES) + " |")
    lines.append("| training | " + " / ".join(training(out / f"bilingual_{lang}")
                                               for lang in TARGETS) + " | "
                 + " | ".join(training(out / f"multi_{style}") for style in TAG_STYLES) + " |")
    return "\n".join(lines)


def span_table(out: Path) -> str:
    scratch = cell(out / "scratch")
    # Pretraining writes no results.json: its last validation line says where it ended.
    metrics = out / "pretrain" / "metrics.jsonl"
    if not metrics.is_file():
        raise SystemExit(f"{metrics.parent}: no metrics.jsonl (run the study first)")
    log = [json.loads(line) for line in metrics.open()]
    last = [row for row in log if "val_loss" in row][-1]
    return "\n".join([
        "| en→de | from scratch | span-corruption pretraining, then fine-tuning |",
        "|---|---|---|",
        f"| test BLEU (chrF2) | {scratch} | "
        f"{cell(out / 'finetune', baseline=out / 'scratch', lang='de')} |",
        f"| training | {training(out / 'scratch')} | pretraining {last['step']:,} steps "
        f"(val loss {last['val_loss']:.3f}), fine-tuning {training(out / 'finetune')} |"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=("multilingual", "span"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=15.0,
                        help="multilingual: each bilingual model's budget (a multilingual model "
                             "gets three); span: the total of each column")
    parser.add_argument("--pretrain-minutes", type=float, default=5.0)
    parser.add_argument("--table-only", action="store_true", help="the table of runs made before")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()  # the runs start in the repository's root
    if args.study == "multilingual":
        if not args.table_only:
            multilingual_runs(args.out, args.minutes)
        table = multilingual_table(args.out)
    else:
        if not args.table_only:
            span_runs(args.out, args.minutes, args.pretrain_minutes)
        table = span_table(args.out)
    atomic_write_text(args.out / "table.md", table + "\n")
    print(table)


if __name__ == "__main__":
    main()
