"""scripts/translation_studies.py without its hour of training: the runs it starts are configured
as docs/translation.md says (same total time on both sides of each comparison, configs every
recipe accepts), and its tables read the runs' results right, paired bootstrap included."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from lmlab.config import load_config, read_yaml
from lmlab.recipes.span_corruption import SpanCorruptionConfig
from lmlab.recipes.translation import TranslationConfig

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "translation_studies.py"


@pytest.fixture
def studies(tmp_path, monkeypatch):
    """The script, run from a checkout with the shipped presets and a 3-pair Multi30k; its lmlab
    commands are recorded instead of run."""
    spec = importlib.util.spec_from_file_location("translation_studies", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    checkout = tmp_path / "checkout"
    for preset in ("finetune/translation_multilingual.yaml", "finetune/translation_en_de.yaml",
                   "pretrain/t5_span.yaml"):
        (checkout / "configs" / preset).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "configs" / preset, checkout / "configs" / preset)
    data = tmp_path / "shared" / "data" / "multi30k_en_de"
    data.mkdir(parents=True)
    pairs = [{"id": i, "en": f" A dog {i}.", "de": f"Ein Hund {i}. "} for i in range(3)]
    (data / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    commands: list[tuple[str, ...]] = []
    monkeypatch.setattr(module, "ROOT", checkout)
    monkeypatch.setattr(module, "lmlab", lambda *args: commands.append(args))
    module.commands = commands
    return module


def config_of(command: tuple[str, ...]) -> dict:
    return read_yaml(command[command.index("--config") + 1])


def test_multilingual_runs_share_the_total_time(studies, tmp_path):
    studies.multilingual_runs(tmp_path / "study", 5)
    outs = [Path(c[c.index("--out") + 1]).name for c in studies.commands]
    assert outs == ["bilingual_de", "bilingual_fr", "bilingual_cs", "multi_source_token",
                    "multi_forced_bos"]
    configs = [config_of(c) for c in studies.commands]
    for lang, config in zip(("de", "fr", "cs"), configs):
        assert config["target_lang"] == lang and "target_langs" not in config
        assert config["max_minutes"] == 5 and config["scratch"]["vocab_size"] == 8000
    for style, config in zip(("source_token", "forced_bos"), configs[3:]):
        assert config["target_langs"] == ["de", "fr", "cs"] and config["tag_style"] == style
        assert config["max_minutes"] == 15
    assert sum(c["max_minutes"] for c in configs[:3]) == configs[3]["max_minutes"]
    for command in studies.commands:  # every config is one the recipe accepts
        load_config(TranslationConfig, command[command.index("--config") + 1], skip=("recipe",))


def test_span_study_pretrains_on_both_sides_then_fine_tunes(studies, tmp_path):
    out = tmp_path / "study"
    studies.span_runs(out, 15, 5)
    scratch, pretrain, finetune = studies.commands
    assert scratch[:2] == ("finetune", "translation") and pretrain[0] == "pretrain"
    assert config_of(scratch)["max_minutes"] == 15 and "scratch" in config_of(scratch)
    pre = config_of(pretrain)
    assert pre["objective"] == "span" and pre["max_minutes"] == 5 and pre["dropout"] == 0.1
    # each side's sentence a line of its own, English first: no pair is seen whole
    assert Path(pre["data"]).read_text().splitlines() == (
        [f"A dog {i}." for i in range(3)] + [f"Ein Hund {i}." for i in range(3)])
    ft = config_of(finetune)
    assert ft["model"] == str(out / "pretrain") and "scratch" not in ft
    assert ft["max_minutes"] == 10  # the same total: 5 pretraining + 10
    load_config(SpanCorruptionConfig, pretrain[pretrain.index("--config") + 1])
    load_config(TranslationConfig, finetune[finetune.index("--config") + 1], skip=("recipe",))
    with pytest.raises(SystemExit, match="pretrain-minutes"):
        studies.span_runs(out, 5, 5)


REFS = ["Ein Hund läuft über die Wiese.", "Zwei Männer spielen Fußball im Park.",
        "Eine Frau liest ein Buch.", "Kinder spielen im Sand am Strand."] * 10


def write_run(run: Path, hypotheses: list[str], test: dict, *, to: str | None = None,
              steps: int = 100) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "results.json").write_text(json.dumps(
        {"steps": steps, "train_seconds": 300.0, "test": test}))
    rows = [{"source": "x", "reference": r, "hypothesis": h, **({"to": to} if to else {})}
            for r, h in zip(REFS, hypotheses)]
    with (run / "translations_test.jsonl").open("a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def test_the_multilingual_table(studies, tmp_path):
    out = tmp_path / "study"
    studies.multilingual_runs(out, 5)  # the configs, which give the table its minutes
    worse = [r.split()[0] + " Hund." for r in REFS]
    for lang, bleu in (("de", 30.0), ("fr", 40.0), ("cs", 20.0)):
        write_run(out / f"bilingual_{lang}", worse, {"bleu": bleu, "chrf": 50.0})
    for style in ("source_token", "forced_bos"):
        for lang in ("de", "fr", "cs"):  # one file, direction by direction
            write_run(out / f"multi_{style}", REFS if style == "source_token" else worse,
                      {"bleu": 31.0, **{f"{m}_{l}": 33.0 for m in ("bleu", "chrf")
                                        for l in ("de", "fr", "cs")}}, to=lang)
    table = studies.multilingual_table(out).splitlines()
    assert table[0].startswith("| direction | bilingual, 5 min each | multilingual, <2xx>")
    assert "15 min" in table[0]
    de = table[2].split(" | ")
    assert de[0] == "| en→de" and de[1] == "30.00 (50.0)"
    assert de[2].startswith("33.00 (33.0), p = 0.001*")  # perfect against poor: significant
    assert de[3].startswith("33.00 (33.0), p = 1.000")  # the same output: no difference
    assert table[5] == "| mean BLEU | 30.00 | 31.00 | 31.00 |"
    assert "100 steps, 5.0 min" in table[6]


def test_the_span_table(studies, tmp_path):
    out = tmp_path / "study"
    write_run(out / "scratch", REFS, {"bleu": 30.0, "chrf": 55.0})
    write_run(out / "finetune", REFS, {"bleu": 30.0, "chrf": 55.0}, steps=70)
    (out / "pretrain").mkdir()
    (out / "pretrain" / "metrics.jsonl").write_text(
        '{"step": 0, "val_loss": 9.0}\n{"step": 50, "train_loss": 4.0}\n'
        '{"step": 60, "val_loss": 3.5}\n')
    table = studies.span_table(out)
    assert "| 30.00 (55.0) | 30.00 (55.0), p = 1.000 |" in table
    assert "pretraining 60 steps (val loss 3.500), fine-tuning 70 steps" in table


def test_a_study_without_runs_says_so(studies, tmp_path):
    with pytest.raises(SystemExit, match="no results.json"):
        studies.main(["span", "--out", str(tmp_path / "none"), "--table-only"])
