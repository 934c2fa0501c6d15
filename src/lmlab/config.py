"""Dataclass configs that load from YAML files and `--key value` overrides.

Keys are strict: an unknown key in a YAML file or on the command line is an error that names
the file (or flag) and lists the keys that exist, because a silently ignored typo costs a whole
training run. Values are converted to the field's declared type with a clear error on failure.

Configs nest: a field whose type is itself a config dataclass is a *section* (a recipe's
`optim`, the training loop's settings). A section's keys are written flat (`lr: 3e-4`,
`--lr 3e-4`), dotted (`optim.lr: 3e-4`, `--optim.lr 3e-4`) or as a YAML mapping
(`optim: {lr: 3e-4}`); that is why a name may appear only once across the nesting
(`key_paths` refuses a config class where it does not). A section starts from the default its
parent gives it — a fine-tuning recipe's learning rate is not pretraining's — and each key
replaces one value in it. A config class may list `RENAMED_KEYS` (old name → new name): an old
name is an error that names its replacement, except in a run's saved config, which a newer
lmlab must still read (`upgrade_saved`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import io
import json
import re
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lmlab.errors import ConfigError

T = TypeVar("T")
KeyPath = tuple[str, ...]  # ("optim", "lr"): where a key lives in a nested config


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _section(annotation: Any) -> type | None:
    """The config class of a section field (also of an optional one, `LoraConfig | None`,
    which is off until one of its keys is given), or None for a plain value."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = options[0] if len(options) == 1 else None
    return annotation if isinstance(annotation, type) and dataclasses.is_dataclass(annotation) \
        else None


@functools.cache
def key_paths(cls: type) -> dict[str, KeyPath]:
    """Every key `cls` accepts — plain fields, sections, and the fields inside sections — with
    its path: {"lr": ("optim", "lr"), "optim": ("optim",), "data": ("data",), …}. A name used
    twice anywhere in the nesting would make a flat key ambiguous: ValueError (a bug in the
    config class, not in the user's input)."""
    paths: dict[str, KeyPath] = {}

    def walk(config: type, prefix: KeyPath) -> None:
        for name, annotation in _field_types(config).items():
            path = (*prefix, name)
            if name in paths:
                raise ValueError(f"{cls.__name__}: '{name}' names both {'.'.join(paths[name])} "
                                 f"and {'.'.join(path)}; keys must be unique across the nesting")
            paths[name] = path
            if (section := _section(annotation)) is not None:
                walk(section, path)

    walk(cls, ())
    return paths


def renamed_keys(cls: type) -> dict[str, str]:
    """Old key → its new name, for `cls` and every section in it."""
    renamed = dict(getattr(cls, "RENAMED_KEYS", {}))
    for annotation in _field_types(cls).values():
        if (section := _section(annotation)) is not None:
            renamed.update(renamed_keys(section))
    return renamed


def _unknown_key_error(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{where}: unknown key '{key}'{hint}; known keys: {', '.join(sorted(known))}")


def _path_of(cls: type, key: str) -> KeyPath | None:
    """The path of a flat or dotted key; None if `cls` does not know it."""
    paths = key_paths(cls)
    if key in paths:
        return paths[key]
    dotted = tuple(key.split("."))
    return dotted if len(dotted) > 1 and paths.get(dotted[-1]) == dotted else None


def _resolve(cls: type, values: dict[str, Any], where: str | None,
             prefix: KeyPath = ()) -> dict[KeyPath, tuple[str, Any, str | None]]:
    """{path: (key as written, value, where it came from)}; a section given as a mapping is
    opened up. `where` None: command-line overrides (an unknown one is named --key)."""
    found: dict[KeyPath, tuple[str, Any, str | None]] = {}
    for key, value in values.items():
        at = where or f"--{key}"
        path = _path_of(cls, key)
        if path is None:
            renamed = renamed_keys(cls)
            if key in renamed:
                raise ConfigError(f"{at}: '{key}' was renamed to '{renamed[key]}'; "
                                  f"write {renamed[key]} instead")
            raise _unknown_key_error(key, list(key_paths(cls)), at)
        section = _section(_annotation(cls, path))
        if section is not None and isinstance(value, dict):
            found.update(_resolve(section, value, at, (*prefix, *path)))
        else:
            found[(*prefix, *path)] = (key, value, where)
    return found


def _annotation(cls: type, path: KeyPath) -> Any:
    for name in path[:-1]:
        cls = _section(_field_types(cls)[name])
    return _field_types(cls)[path[-1]]


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
    if origin is dict:
        key_type, value_type = typing.get_args(annotation) or (str, str)
        if isinstance(value, str) and value.strip().startswith("{"):  # --key '{A: b}'
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping such as {{A: b}}, got {value!r}")
        return {convert_value(k, key_type, where=where): convert_value(v, value_type, where=where)
                for k, v in value.items()}
    if _section(annotation) is not None:
        if isinstance(value, annotation):
            return value
        raise ConfigError(f"{where}: expected a mapping of its keys, got {value!r}")
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


def _default(cls: type, name: str) -> Any:
    """A field's default (a section's default instance), or None if it has none."""
    spec = next(f for f in dataclasses.fields(cls) if f.name == name)
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return None if spec.default is dataclasses.MISSING else spec.default


def _construct(cls: type[T], values: dict[KeyPath, Any], base: Any = None) -> T:
    """`cls` from converted values by path; a section starts from `base`'s (or the default)."""
    kwargs: dict[str, Any] = {}
    inner: dict[str, dict[KeyPath, Any]] = {}
    for path, value in values.items():
        if len(path) == 1:
            kwargs[path[0]] = value
        else:
            inner.setdefault(path[0], {})[path[1:]] = value
    for name, section_values in inner.items():
        start = kwargs.get(name, getattr(base, name) if base is not None else _default(cls, name))
        kwargs[name] = _construct(_section(_field_types(cls)[name]), section_values, start)
    if base is not None:
        kwargs = {**{f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init},
                  **kwargs}
    return cls(**kwargs)


def build_config(cls: type[T], layers: list[tuple[dict[str, Any], str | None]]) -> T:
    """Dataclass `cls` from layers of values, each (mapping, where it came from: a file name,
    or None for command-line overrides); later layers win, key by key."""
    resolved: dict[KeyPath, tuple[str, Any, str | None]] = {}
    for values, where in layers:
        resolved.update(_resolve(cls, values, where))
    converted = {path: convert_value(value, _annotation(cls, path), where=_origin(key, at))
                 for path, (key, value, at) in resolved.items()}
    try:
        return _construct(cls, converted)
    except (TypeError, ValueError) as err:  # a check in __post_init__: blame who set the key
        where = next((w for _, w in layers if w is not None), "config")
        named = [(key, at) for path, (key, _, at) in resolved.items()
                 if re.search(rf"\b{re.escape(path[-1])}\b", str(err))]
        flags = [f"--{key}" for key, at in named if at is None]
        raise ConfigError(f"{(flags or [at for _, at in named] or [where])[0]}: {err}") from None


def _origin(key: str, where: str | None) -> str:
    """Where a value was set, for an error: the flag (`--max_steps`), or the file and key."""
    return f"--{key}" if where is None else f"{where}: '{key}'"


def from_dict(cls: type[T], values: dict[str, Any], *, where: str = "config") -> T:
    """Build dataclass `cls` from a mapping (flat, dotted or nested keys), converting types and
    rejecting unknown keys."""
    return build_config(cls, [(values, where)])


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


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: dict[str, Any] | None = None, *, skip: tuple[str, ...] = ()) -> T:
    """YAML file (optional) then overrides, strictly checked, into dataclass `cls`. `skip`: keys
    of the file that the caller reads itself (a run's `recipe`)."""
    layers: list[tuple[dict[str, Any], str | None]] = []
    if path is not None:
        values = read_yaml(path)
        layers.append(({k: v for k, v in values.items() if k not in skip}, str(path)))
    layers.append((dict(overrides or {}), None))
    return build_config(cls, layers)


def upgrade_saved(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """A run's saved config as this version reads it: renamed keys under their new names, and
    keys this version no longer has left out (a run directory outlives the lmlab that wrote it)."""
    renamed, kept = renamed_keys(cls), {}
    for key, value in values.items():
        key = renamed.get(key, key)
        path = _path_of(cls, key)
        if path is None:
            continue
        section = _section(_annotation(cls, path))
        kept[key] = upgrade_saved(section, value) if section and isinstance(value, dict) else value
    return kept


def to_dict(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def dump_yaml(config: Any) -> str:
    """The config as YAML, sections after the plain keys (so they read as blocks)."""
    values = to_dict(config)
    ordered = {k: v for k, v in values.items() if not isinstance(v, dict)}
    ordered.update({k: v for k, v in values.items() if isinstance(v, dict)})
    return yaml.safe_dump(ordered, sort_keys=False)


# -- the keys described (`--help`, docs/config-reference.md), read from the config classes
@dataclasses.dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted below a section: "optim.lr"
    type: str  # "float", "str | None", "cosine | linear | constant"
    default: str  # as YAML writes it: "0.001", "null", "[greedy]"
    help: str  # one line: the comment beside the field (field_comments)


def field_comments(cls: type) -> dict[str, str]:
    """Each field's description, from the class's source: the comment on the field's line, else
    the comment lines right above it, less a group header (a first line starting `# --`). A
    subclass that redeclares a field without a comment keeps its parent's description."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update({k: v for k, v in _declared_comments(klass).items() if v})
    return docs


@functools.cache
def _declared_comments(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (a class made at run time)
        return {}
    lines = source.splitlines()
    trailing = {token.start[0]: token.string for token in
                tokenize.generate_tokens(io.StringIO(source).readline)
                if token.type == tokenize.COMMENT and not token.line.lstrip().startswith("#")}
    docs = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        text = [trailing[n] for n in range(node.lineno, node.end_lineno + 1) if n in trailing]
        if not text:
            first = node.lineno - 1
            while first > 0 and lines[first - 1].lstrip().startswith("#"):
                first -= 1
            text = [line.strip() for line in lines[first:node.lineno - 1]]
            if text and text[0].removeprefix("#").strip().startswith("--"):
                text = text[1:]
        docs[node.target.id] = " ".join(t.removeprefix("#").strip() for t in text)
    return docs


def describe_keys(cls: type) -> list[KeyDoc]:
    """Every key of `cls`, plain ones first, then each section's as `section.key` with the
    defaults the parent gives it. An optional section (`lora: LoraConfig | None = None`) has a
    row of its own: off until one of its keys is set."""
    plain: list[KeyDoc] = []
    sections: list[KeyDoc] = []

    def walk(config: type, defaults: Any, prefix: str) -> None:
        docs = field_comments(config)
        for spec in dataclasses.fields(config):
            if not spec.init:
                continue
            annotation = _field_types(config)[spec.name]
            default = getattr(defaults, spec.name) if defaults is not None \
                else _default_or_missing(spec)
            key = prefix + spec.name
            section = _section(annotation)
            if section is None:
                (sections if prefix else plain).append(
                    KeyDoc(key, _type_text(annotation), _value_text(default),
                           docs.get(spec.name, "")))
                continue
            if default is None:
                sections.append(KeyDoc(key, "section", "null (off)", docs.get(spec.name, "")))
            walk(section, default, key + ".")

    walk(cls, None, "")
    return plain + sections


def _default_or_missing(spec: dataclasses.Field) -> Any:
    if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
        return dataclasses.MISSING
    return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default


def _type_text(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_text(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if annotation is type(None):
        return "None"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_text(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _value_text(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if isinstance(value, str):
        return value if value else '""'
    return json.dumps(value, default=str)
