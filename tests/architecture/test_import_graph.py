"""The import graph of src/lmlab: no circles, and every arrow in the direction docs/architecture.md
draws (STYLE: cli → recipes → {training, tasks, serving, evaluation} → generation → {models,
tokenizer, data}; kernels beside models, never imported by a model file). Imports are read from
the source (function-level ones included), so a lazy import cannot hide an arrow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "lmlab"

# What each subpackage may import, besides itself and the leaf modules (errors, config, fileio).
# An arrow not listed here is a layering change: add it here only with docs/architecture.md.
LEAVES = {"errors", "config", "fileio"}
ALLOWED = {
    "models": set(),
    "tokenizer": set(),
    "data": {"tokenizer"},
    "kernels": {"models"},
    "generation": {"models", "kernels"},
    "tasks": {"data", "evaluation", "tokenizer"},
    "evaluation": {"generation", "models", "tokenizer"},
    "training": {"kernels", "models"},
    "recipes": {"data", "evaluation", "kernels", "models", "tasks", "tokenizer", "training",
                "generation"},
    "serving": {"generation", "models", "tokenizer", "evaluation"},
    "cli": {"data", "evaluation", "generation", "kernels", "models", "recipes", "tokenizer",
            "training", "serving", "demo"},
    "demo": {"data", "generation", "models", "recipes", "tokenizer", "training"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The lmlab modules `path` imports anywhere in its body."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            for alias in node.names:  # `from lmlab.x import y` imports module lmlab.x.y if any
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_module_imports_itself_through_a_circle():
    edges = graph()
    # Tarjan's strongly connected components: any component of two or more is a circle.
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert circles == [], f"import circles: {circles}"


def test_subpackages_import_only_downwards():
    wrong = []
    for module, targets in graph().items():
        source = layer(module)
        if source in ("", *LEAVES, "__main__"):
            continue
        assert source in ALLOWED, f"{module}: subpackage {source!r} is not in the layering table"
        for target in targets:
            to = layer(target)
            if to in (source, "", *LEAVES) or to in ALLOWED[source]:
                continue
            wrong.append(f"{module} -> {target}")
    assert wrong == [], "arrows against the layering: " + ", ".join(sorted(wrong))


def test_the_package_itself_is_never_imported_from_inside():
    """`import lmlab` inside the package would pull every subpackage in (a hidden circle)."""
    offenders = [m for m, targets in graph().items() if "lmlab" in targets and m != "lmlab"]
    assert offenders == []


@pytest.mark.parametrize("source, target", [("models", "generation"), ("models", "kernels"),
                                            ("generation", "training"), ("kernels", "generation")])
def test_key_arrows_stay_absent(source, target):
    arrows = [f"{m} -> {t}" for m, ts in graph().items() for t in ts
              if layer(m) == source and layer(t) == target]
    assert arrows == []
