"""Imports point down (docs/architecture.md): no module imports one in a higher layer, even inside a function, and
no chain of imports, lazy ones included, leads back to where it started."""

from __future__ import annotations

import ast
from pathlib import Path

import stackwise_cli

PACKAGE = Path(stackwise_cli.__file__).parent

# docs/architecture.md's layers, lowest first; a module may import its own layer or any below it.
LAYERS = ("base", "store", "data", "model", "train", "evaluate", "stages", "cli")

# Module or package (dotted, under stackwise_cli) -> layer; the longest matching prefix wins.
LAYER_OF = {
    "": "base",  # stackwise_cli/__init__.py
    "errors": "base",
    "schema": "base",
    "progress": "base",
    "recipe": "base",
    "objectives": "base",
    "curricula": "base",
    "model.config": "base",
    "flops": "base",
    "device": "base",
    "store": "store",
    "data": "data",
    "model": "model",
    "kernels": "model",
    "train": "train",
    "evaluate": "evaluate",
    "build": "stages",
    "fuse": "stages",
    "settings": "stages",
    "preflight": "stages",
    "bench": "stages",
    "app": "cli",
    "__main__": "cli",
    "commands": "cli",
    "console": "cli",
}


def module_name(path: Path) -> str:
    """``stackwise_cli/store/project.py`` -> ``store.project``; a package's ``__init__`` is the package."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    prefixes = [p for p in LAYER_OF if p == "" or module == p or module.startswith(p + ".")]
    return LAYER_OF[max(prefixes, key=len)]


def imports(module: str) -> list[tuple[str, int]]:
    """Every stackwise module ``module`` imports, anywhere in its body, with the line it does so on. ``from
    stackwise_cli.train import checkpoint`` imports the module ``train.checkpoint``, not just the package."""
    found = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [node.module] + [s for s in subs if s.removeprefix("stackwise_cli.") in MODULES]
        else:
            continue
        for name in names:
            if name == "stackwise_cli" or name.startswith("stackwise_cli."):
                found.append((name.removeprefix("stackwise_cli").lstrip("."), node.lineno))
    return found


def test_every_module_has_a_layer():
    """A new top-level module or package must be placed in a layer here (and in docs/architecture.md)."""
    unplaced = {m.split(".")[0] for m in MODULES if m} - {p.split(".")[0] for p in LAYER_OF if p}
    assert not unplaced, f"give {sorted(unplaced)} a layer in LAYER_OF"
    assert {layer(m) for m in MODULES} <= set(LAYERS)


# Upward imports not yet removed, each with why (docs/architecture.md lists them too). Exact: a leak that is fixed
# fails the test until its line here goes.
KNOWN_LEAKS: dict[tuple[str, str], str] = {}


def test_no_import_goes_up_a_layer():
    upward, leaks = [], set()
    for module in MODULES:
        for target, line in imports(module):
            if LAYERS.index(layer(target)) > LAYERS.index(layer(module)):
                if (module, target) in KNOWN_LEAKS:
                    leaks.add((module, target))
                else:
                    upward.append(f"{module}:{line} ({layer(module)}) imports {target} ({layer(target)})")
    assert not upward, "\n".join(upward)
    fixed = sorted(set(KNOWN_LEAKS) - leaks)
    assert not fixed, f"no longer leaking, remove from KNOWN_LEAKS: {fixed}"


def test_no_import_cycle():
    """Depth-first search over every import, lazy ones included: a lazy import that closes a circle only hides it
    from the interpreter. A submodule importing its own package (which runs the package's ``__init__``) is not a
    cycle of ours."""
    graph = {m: {t for t, _ in imports(m) if t != m and not m.startswith(t + ".") and t in MODULES} for m in MODULES}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return None
        for target in sorted(graph[module]):
            if cycle := visit(target, path + [module]):
                return cycle
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module, [])
        assert cycle is None, " -> ".join(cycle)
