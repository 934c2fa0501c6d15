"""Dataclass configs that load from YAML files and `--key value` overrides.

Keys are strict: an unknown key in a YAML file or on the command line is an error that names
the file (or flag) and lists the keys that exist, because a silently ignored typo costs a whole
training run. Values are converted to the field's declared type with a clear error on failure.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lmlab.errors import ConfigError

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _unknown_key_error(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{where}: unknown key '{key}'{hint}; known keys: {', '.join(sorted(known))}")


def convert_value(value: Any, annotation: Any, *, where: str) -> Any:
    """Convert `value` (from YAML, or a CLI string) to `annotation`; raise ConfigError if impossible."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in options:
                return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return convert_value(value, option, where=where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be None")
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        for option in allowed:
            if value == option or (isinstance(value, str) and str(option) == value):
                return option
        raise ConfigError(f"{where}: expected one of {list(allowed)}, got {value!r}")
    if origin in (list, tuple):
        (item_type, *_rest) = typing.get_args(annotation) or (str,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        items = [convert_value(v, item_type, where=where) for v in value]
        return items if origin is list else tuple(items)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if annotation is Any:
        return value
    raise ConfigError(f"{where}: unsupported config type {annotation!r}")


def from_dict(cls: type[T], values: dict[str, Any], *, where: str = "config") -> T:
    """Build dataclass `cls` from a mapping, converting types and rejecting unknown keys."""
    types_by_name = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_by_name:
            raise _unknown_key_error(key, list(types_by_name), where)
        kwargs[key] = convert_value(value, types_by_name[key], where=f"{where}: '{key}'")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value at the top level")
    return data


def parse_overrides(args: list[str]) -> dict[str, str]:
    """Turn ['--lr', '3e-4', '--max_steps=10'] into {'lr': '3e-4', 'max_steps': '10'}."""
    overrides: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument '{arg}'; overrides are written --key value")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key}: missing value")
            value = args[i + 1]
            i += 1
        overrides[key.replace("-", "_")] = value
        i += 1
    return overrides


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> T:
    """YAML file (optional) then overrides, strictly checked, into dataclass `cls`."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(read_yaml(path))
        for key in values:
            if key not in _field_types(cls):
                raise _unknown_key_error(key, list(_field_types(cls)), str(path))
    for key in overrides or {}:
        if key not in _field_types(cls):
            raise _unknown_key_error(key, list(_field_types(cls)), f"--{key}")
    values.update(overrides or {})
    return from_dict(cls, values, where=str(path) if path is not None else "config")


def to_dict(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
