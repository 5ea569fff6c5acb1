"""The shape of the code (docs/architecture.md, "Layout" and "Import directions"): which package may
import which, and no import cycles, counting imports inside functions too (a deferred import hides a
cycle from Python, not from a reader). Read from the sources with `ast`, nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "data", "train")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The project modules `path` imports, anywhere in the file."""
    tree = ast.parse(path.read_text())
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)] if node.level > 1 else anchor
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {name for name in found if name.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (REPO / package).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            # the longest prefix that is one of our modules (`train.engines.base.StepResult` -> train.engines.base)
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                targets.add(imported)
        graph[name] = targets
    return graph


def test_packages_import_only_downwards():
    """models and data know nothing of training, nor of each other; engines know nothing of the loop,
    the builders, the checkpoint layout or the commands."""
    graph = _graph()
    rules = {"models": ("data", "train"), "data": ("models", "train"),
             "train.engines": ("train.loop", "train.builders", "train.checkpoint", "train.cli", "train.sweep")}
    broken = [(module, target) for module, targets in graph.items() for prefix, banned in rules.items()
              if module == prefix or module.startswith(prefix + ".")
              for target in targets if any(target == b or target.startswith(b + ".") for b in banned)]
    assert broken == []


def test_no_import_cycles():
    graph = _graph()
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            # a package's __init__ that re-exports its own submodules is not a cycle with them
            if target.startswith(node + "."):
                continue
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert cycles == []
