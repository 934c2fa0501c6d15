"""The config keys described from the config classes themselves: every key of every recipe has a
description, docs/config-reference.md is what the generator writes, and `--help` lists the keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lmlab.cli import main
from lmlab.config import describe_keys, field_comments
from lmlab.recipes import RECIPES
from lmlab.recipes.reference import markdown

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Section:
    depth: int = 2  # how deep


@dataclass
class Toy:
    # -- a group header, not a description
    # what comes above
    above: int = 1
    beside: str = "x"  # what comes beside
    # the comment above loses to the one beside
    both: float = 0.5  # beside wins
    # -- a header alone describes nothing
    bare: bool = False
    hashed: str = "#not-a-comment"
    inner: Section = field(default_factory=lambda: Section(depth=5))
    maybe: Section | None = None  # off unless set


@dataclass
class ToyChild(Toy):
    beside: str = "y"


def test_field_comments_beside_then_above_without_group_headers():
    assert field_comments(Toy) == {"above": "what comes above", "beside": "what comes beside",
                                   "both": "beside wins", "maybe": "off unless set"}
    assert field_comments(ToyChild)["beside"] == "what comes beside"  # redeclared, inherited


def test_describe_keys_dots_sections_with_the_parents_defaults():
    rows = {d.key: d for d in describe_keys(Toy)}
    assert list(rows)[:5] == ["above", "beside", "both", "bare", "hashed"]  # plain keys first
    assert (rows["inner.depth"].type, rows["inner.depth"].default) == ("int", "5")
    assert rows["inner.depth"].help == "how deep"
    assert (rows["maybe"].default, rows["maybe.depth"].default) == ("null (off)", "2")
    assert rows["hashed"].default == "#not-a-comment" and rows["bare"].default == "false"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_key_of_every_recipe_has_a_description(name):
    missing = [d.key for d in describe_keys(RECIPES[name].config) if not d.help.strip()]
    assert not missing, f"{name}: add a comment beside these fields: {missing}"


def test_the_checked_in_reference_is_what_the_generator_writes():
    checked_in = (ROOT / "docs" / "config-reference.md").read_text(encoding="utf-8")
    assert checked_in == markdown(), ("docs/config-reference.md is stale: run "
                                      "python -m lmlab.recipes.reference > docs/config-reference.md")


def run_help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_help_of_a_picked_recipe_lists_its_keys_with_types_defaults_and_descriptions(capsys):
    out = run_help(capsys, "finetune", "sft", "--help")
    assert "config keys of `lmlab finetune sft`" in out
    assert "--optim.lr float (default: 5e-05)" in out
    assert "--packing bool (default: false)" in out and "block-diagonal attention" in out
    assert "--lora.r int (default: 8)" in out
    assert "--mask_prob" not in out  # another recipe's key
    out = run_help(capsys, "pretrain", "--objective", "mlm", "--help")
    assert "--mask_prob float (default: 0.15)" in out and "--optim.lr float (default: 0.001)" in out


def test_help_before_a_recipe_is_picked_lists_the_shared_and_own_keys(capsys):
    out = run_help(capsys, "finetune", "--help")
    assert "lmlab finetune TASK --help" in out and "docs/config-reference.md" in out
    assert "all: model, train," in out
    own = {line.split(" also:")[0].strip() for line in out.splitlines() if " also:" in line}
    assert own == {"classification", "qa", "sft", "translation"}
    assert "mlm+nsp also: mask_prob" in run_help(capsys, "pretrain", "--help")
