"""The strict dataclass ⇄ YAML / `--key value` loader, every shipped config, the pretraining
configs' checks. (Nesting, dotted keys, renamed keys and the recipes: tests/recipes.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import pytest

from lmlab.config import (build_config, convert_value, dump_yaml, from_dict, key_paths,
                          load_config, parse_overrides, upgrade_saved)
from lmlab.errors import ConfigError
from lmlab.recipes.causal_lm import CausalLMConfig
from lmlab.recipes.pretraining import pretrain_recipe

REPO = Path(__file__).resolve().parents[1]
# Pretraining presets; configs/finetune/* are fine-tuning configs, loaded by
# tests/cli/test_cli_finetune.py.
SHIPPED_CONFIGS = sorted((REPO / "configs" / "pretrain").rglob("*.y*ml"))


@dataclass
class Example:
    steps: int = 10
    lr: float = 1e-3
    flag: bool = False
    name: str = "run"
    limit: int | None = None
    mode: Literal["fast", "slow"] = "fast"
    sizes: list[int] = field(default_factory=list)


@dataclass
class Inner:
    RENAMED_KEYS: ClassVar[dict[str, str]] = {"old_rate": "rate"}
    rate: float = 0.1
    depth: int = 2

    def __post_init__(self):
        if self.depth < 0:
            raise ConfigError(f"depth must be >= 0, got {self.depth}")


@dataclass
class Outer:
    name: str = "run"
    inner: Inner = field(default_factory=lambda: Inner(rate=0.5))  # the parent's own default


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# -- type conversion --------------------------------------------------------------------------
@pytest.mark.parametrize("given, expected", [("7", 7), ("1_000", 1000), (7, 7), (3.0, 3)])
def test_int_conversion(given, expected):
    value = from_dict(Example, {"steps": given}).steps
    assert value == expected and type(value) is int


@pytest.mark.parametrize("given", ["7.5", "seven", True, 2.5])
def test_int_rejects_non_integers(given):
    with pytest.raises(ConfigError, match="'steps': expected an integer"):
        from_dict(Example, {"steps": given})


@pytest.mark.parametrize("given, expected", [("1e-3", 1e-3), ("3e-4", 3e-4), ("0.5", 0.5), (2, 2.0)])
def test_float_conversion(given, expected):
    value = from_dict(Example, {"lr": given}).lr
    assert value == expected and type(value) is float


def test_float_rejects_text_and_bool():
    with pytest.raises(ConfigError, match="'lr': expected a number, got 'fast'"):
        from_dict(Example, {"lr": "fast"})
    with pytest.raises(ConfigError, match="expected a number"):
        from_dict(Example, {"lr": True})


@pytest.mark.parametrize("given, expected", [
    ("true", True), ("True", True), ("1", True), ("yes", True), ("on", True), (True, True),
    ("false", False), ("FALSE", False), ("0", False), ("no", False), ("off", False), (False, False),
])
def test_bool_conversion(given, expected):
    assert from_dict(Example, {"flag": given}).flag is expected


@pytest.mark.parametrize("given", ["maybe", "2", 1])
def test_bool_rejects_other_values(given):
    with pytest.raises(ConfigError, match="'flag': expected true or false"):
        from_dict(Example, {"flag": given})


@pytest.mark.parametrize("given, expected", [(None, None), ("none", None), ("None", None),
                                             ("null", None), ("12", 12), (12, 12)])
def test_optional(given, expected):
    assert from_dict(Example, {"limit": given}).limit == expected


def test_optional_reports_the_inner_type_error():
    with pytest.raises(ConfigError, match="'limit': expected an integer, got 'many'"):
        from_dict(Example, {"limit": "many"})


def test_none_is_not_accepted_for_a_non_optional_field():
    with pytest.raises(ConfigError, match="'steps'"):
        from_dict(Example, {"steps": None})


def test_literal():
    assert from_dict(Example, {"mode": "slow"}).mode == "slow"
    with pytest.raises(ConfigError, match=r"'mode': expected one of \['fast', 'slow'\], got 'medium'"):
        from_dict(Example, {"mode": "medium"})


@pytest.mark.parametrize("given, expected", [("1,2,3", [1, 2, 3]), ([4, "5"], [4, 5]), ("", []),
                                             ("8", [8])])
def test_list(given, expected):
    assert from_dict(Example, {"sizes": given}).sizes == expected


def test_list_items_are_converted_strictly():
    with pytest.raises(ConfigError, match="'sizes': expected an integer, got 'x'"):
        from_dict(Example, {"sizes": "1,x"})
    with pytest.raises(ConfigError, match="expected a list"):
        convert_value(3, list[int], where="sizes")


def test_string_rejects_mappings():
    with pytest.raises(ConfigError, match="'name': expected a string"):
        from_dict(Example, {"name": {"a": 1}})


def test_from_dict_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"here: unknown key 'stpes' \(did you mean 'steps'\?\)"):
        from_dict(Example, {"stpes": 3}, where="here")


# -- nested sections ---------------------------------------------------------------------------
@pytest.mark.parametrize("values", [{"depth": 7}, {"inner.depth": 7}, {"inner": {"depth": 7}}],
                         ids=["flat", "dotted", "mapping"])
def test_section_keys_flat_dotted_or_as_a_mapping(values):
    cfg = from_dict(Outer, values)
    assert cfg.inner == Inner(rate=0.5, depth=7)  # the rest of the section keeps its default


def test_later_layers_win_whatever_the_spelling(tmp_path):
    path = write(tmp_path / "c.yaml", "inner:\n  rate: 1.0\n  depth: 3\n")
    cfg = load_config(Outer, path, {"rate": "2"})
    assert cfg.inner == Inner(rate=2.0, depth=3)
    assert build_config(Outer, [({"inner.rate": 3}, "a"), ({"inner": {"rate": 4}}, "b")]) \
        .inner.rate == 4.0


def test_section_errors_name_the_key():
    with pytest.raises(ConfigError, match="'inner.depth': expected an integer, got 'x'"):
        from_dict(Outer, {"inner.depth": "x"})
    with pytest.raises(ConfigError, match="unknown key 'inner.nope'"):
        from_dict(Outer, {"inner.nope": 1})
    with pytest.raises(ConfigError, match="depth must be >= 0, got -1"):
        from_dict(Outer, {"depth": -1})
    with pytest.raises(ConfigError, match="'inner': expected a mapping"):
        from_dict(Outer, {"inner": 3})


def test_a_renamed_key_names_its_replacement(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(Outer, None, {"old_rate": "1"})
    assert str(info.value) == "--old_rate: 'old_rate' was renamed to 'rate'; write rate instead"
    with pytest.raises(ConfigError, match=r"c.yaml: 'old_rate' was renamed to 'rate'"):
        load_config(Outer, write(tmp_path / "c.yaml", "old_rate: 1\n"))


def test_saved_configs_follow_renames_and_drop_vanished_keys():
    saved = {"name": "x", "old_rate": 0.7, "gone": 1, "inner": {"depth": 4, "also_gone": 2}}
    assert upgrade_saved(Outer, saved) == {"name": "x", "rate": 0.7, "inner": {"depth": 4}}


def test_key_paths_are_unique_across_the_nesting():
    assert key_paths(Outer) == {"name": ("name",), "inner": ("inner",), "rate": ("inner", "rate"),
                                "depth": ("inner", "depth")}

    @dataclass
    class Clash:
        depth: int = 1
        inner: Inner = field(default_factory=Inner)

    with pytest.raises(ValueError, match="'depth' names both depth and inner.depth"):
        key_paths(Clash)


def test_dump_yaml_puts_sections_last_and_round_trips(tmp_path):
    cfg = from_dict(Outer, {"name": "r", "rate": 0.25})
    text = dump_yaml(cfg)
    assert text == "name: r\ninner:\n  rate: 0.25\n  depth: 2\n"
    assert load_config(Outer, write(tmp_path / "c.yaml", text)) == cfg


# -- YAML files -------------------------------------------------------------------------------
def test_yaml_then_overrides(tmp_path):
    path = write(tmp_path / "c.yaml", "steps: 5\nlr: 1.0e-2\nmode: slow\nsizes: [1, 2]\n")
    cfg = load_config(Example, path, {"steps": "9", "flag": "true"})
    assert cfg == Example(steps=9, lr=1e-2, flag=True, mode="slow", sizes=[1, 2])


def test_yaml_scientific_notation_without_dot_is_a_float(tmp_path):
    # PyYAML reads "1e-3" (no dot) as a string; the loader must still give a float.
    cfg = load_config(Example, write(tmp_path / "c.yaml", "lr: 1e-3\n"))
    assert cfg.lr == 1e-3 and type(cfg.lr) is float


def test_empty_yaml_gives_defaults(tmp_path):
    assert load_config(Example, write(tmp_path / "c.yaml", "# nothing\n")) == Example()


def test_unknown_yaml_key_names_the_file_and_suggests(tmp_path):
    path = write(tmp_path / "bad.yaml", "n_layer: 2\nmax_step: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(CausalLMConfig, path)
    assert str(info.value).startswith(
        f"{path}: unknown key 'max_step' (did you mean 'max_steps'?); known keys: ")


def test_unknown_key_without_a_close_match_has_no_suggestion(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(CausalLMConfig, write(tmp_path / "bad.yaml", "qqqqqq: 1\n"))
    assert "unknown key 'qqqqqq'" in str(info.value) and "did you mean" not in str(info.value)


def test_unknown_key_lists_the_known_keys(tmp_path):
    with pytest.raises(ConfigError, match="known keys: flag, limit, lr, mode, name, sizes, steps"):
        load_config(Example, write(tmp_path / "c.yaml", "zzz: 1\n"))


def test_unknown_override_names_the_flag():
    with pytest.raises(ConfigError) as info:
        load_config(CausalLMConfig, None, {"learnin_rate": "1"})
    assert str(info.value).startswith("--learnin_rate: unknown key 'learnin_rate'")
    with pytest.raises(ConfigError, match=r"--n_layers: .*did you mean 'n_layer'"):
        load_config(CausalLMConfig, None, {"n_layers": "1"})


def test_bad_value_in_yaml_names_file_and_key(tmp_path):
    path = write(tmp_path / "c.yaml", "steps: lots\n")
    with pytest.raises(ConfigError, match=rf"{path}: 'steps': expected an integer, got 'lots'"):
        load_config(Example, path)


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path / "broken.yaml", "steps: 5\nlr: [1, 2\nname: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(Example, path)
    message = str(info.value)
    assert message.startswith(f"{path} line ")
    assert "not valid YAML" in message
    line = int(message.split(" line ", 1)[1].split(":", 1)[0])
    assert line in (2, 3, 4)  # the error is reported near the unclosed bracket, not at line 1


def test_tab_indented_yaml_reports_line(tmp_path):
    path = write(tmp_path / "tabs.yaml", "steps: 5\nname:\n\t- x\n")
    with pytest.raises(ConfigError, match=rf"{path} line 3: not valid YAML"):
        load_config(Example, path)


@pytest.mark.parametrize("text", ["- steps\n- 5\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    path = write(tmp_path / "list.yaml", text)
    with pytest.raises(ConfigError, match=rf"{path}: expected a mapping"):
        load_config(Example, path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(Example, tmp_path / "nope.yaml")


def test_non_utf8_config_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(Example, path)


# -- --key value overrides --------------------------------------------------------------------
def test_parse_overrides_both_forms():
    got = parse_overrides(["--lr", "3e-4", "--max_steps=10", "--eval-every", "0", "--name=a=b"])
    assert got == {"lr": "3e-4", "max_steps": "10", "eval_every": "0", "name": "a=b"}


def test_parse_overrides_value_may_look_negative():
    assert parse_overrides(["--seed", "-1"]) == {"seed": "-1"}


def test_parse_overrides_missing_value():
    with pytest.raises(ConfigError, match="^--max_steps: missing value$"):
        parse_overrides(["--lr", "1e-3", "--max_steps"])


@pytest.mark.parametrize("args", [["lr", "1"], ["--"], ["-x", "1"]])
def test_parse_overrides_rejects_non_flags(args):
    with pytest.raises(ConfigError, match="overrides are written --key value"):
        parse_overrides(args)


def test_overrides_end_to_end_into_pretrain_config():
    cfg = load_config(CausalLMConfig, None, parse_overrides(
        ["--lr=1e-3", "--min-lr", "1e-5", "--tensorboard", "false", "--eval_tokens", "none",
         "--max_minutes", "2.5", "--precision", "fp32", "--n_layer", "2"]))
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.tensorboard, cfg.eval_tokens) == \
        (1e-3, 1e-5, False, None)
    assert (cfg.optim.max_minutes, cfg.optim.precision, cfg.n_layer) == (2.5, "fp32", 2)


def test_dump_yaml_round_trips(tmp_path):
    cfg = from_dict(CausalLMConfig, {"data": "x.txt", "n_layer": 2, "lr": 3e-4, "min_lr": 0.0,
                                     "eval_tokens": None})
    path = write(tmp_path / "resolved.yaml", dump_yaml(cfg))
    assert load_config(CausalLMConfig, path) == cfg


# -- shipped configs --------------------------------------------------------------------------
def test_configs_are_found():
    assert SHIPPED_CONFIGS, f"no YAML files under {REPO / 'configs'}"


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads(path):
    recipe, cfg = pretrain_recipe(path)  # the recipe its objective names
    assert isinstance(cfg, recipe.config)
    # A shipped preset describes a model that can be built: the head divides the width.
    assert cfg.n_embd % cfg.n_head == 0


def test_shakespeare_preset_values():
    cfg = load_config(CausalLMConfig, REPO / "configs/pretrain/shakespeare_char.yaml")
    assert (cfg.tokenizer, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == ("char", 4, 4, 128, 64)
    assert (cfg.activation, cfg.optim.lr, cfg.optim.min_lr, cfg.eval_tokens) == \
        ("gelu", 1e-3, 1e-4, 16384)


# -- pretraining config validation (the causal recipe's) ----------------------------------------------------------------
@pytest.mark.parametrize("overrides, pattern", [
    ({"batch_size": "-1"}, "batch_size must be positive, got -1"),
    ({"n_layer": "0"}, "n_layer must be positive"),
    ({"eval_every": "-5"}, "eval_every must be >= 0"),
    ({"min_lr": "1e-2", "lr": "1e-3"}, "min_lr <= lr"),
    ({"lr": "0"}, "lr > 0"),
    ({"val_fraction": "1.0"}, r"val_fraction must be in \[0, 1\), got 1.0"),
    ({"val_fraction": "-0.1"}, "val_fraction must be in"),
    ({"max_minutes": "0"}, "max_minutes must be > 0"),
    ({"precision": "fp16"}, r"--precision: expected one of \['auto', 'fp32', 'bf16'\]"),
])
def test_pretrain_config_validation(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(CausalLMConfig, None, overrides)


def test_pretrain_config_validation_from_yaml_names_the_parameter(tmp_path):
    path = write(tmp_path / "neg.yaml", "batch_size: -4\n")
    with pytest.raises(ConfigError, match="batch_size must be positive, got -4"):
        load_config(CausalLMConfig, path)


def test_val_fraction_zero_is_allowed():
    assert load_config(CausalLMConfig, None, {"val_fraction": "0"}).val_fraction == 0.0


def test_a_bad_override_names_its_flag_not_the_file(tmp_path):
    path = write(tmp_path / "c.yaml", "max_steps: 10\n")
    with pytest.raises(ConfigError) as info:
        load_config(CausalLMConfig, path, {"max_steps": "abc"})
    assert str(info.value) == "--max_steps: expected an integer, got 'abc'"
    with pytest.raises(ConfigError) as info:  # a check in __post_init__: the flag that set it
        load_config(CausalLMConfig, path, {"max_steps": "-3"})
    assert str(info.value) == "--max_steps: max_steps must be positive, got -3"
    with pytest.raises(ConfigError) as info:  # ... and the file when the file set it
        load_config(CausalLMConfig, write(tmp_path / "d.yaml", "max_steps: -3\n"), {"lr": "1"})
    assert str(info.value).startswith(f"{tmp_path / 'd.yaml'}: max_steps must be positive")
