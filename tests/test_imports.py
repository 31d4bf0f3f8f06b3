"""The package's import graph: no cycles, and a config module that imports nothing of the project.

Read from the source with `ast` (nothing is imported), counting imports inside functions too: a
lazy import that closes a cycle is still two modules that need each other. `from stmoe.data import
tasks` is an edge to stmoe.data.tasks (the package's __init__ runs first, as for any submodule),
`from stmoe.config import check` one to stmoe.config.
"""
from __future__ import annotations

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "stmoe")


def package_modules() -> dict[str, str]:
    """{dotted module name: file} of every module under stmoe/."""
    modules = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join(parts)] = path
    return modules


def imported_modules(module: str, path: str, known: set[str] | None = None) -> set[str]:
    """The modules `path` imports, anywhere in the file (relative imports resolved). With `known`
    (the package's modules), `from pkg import name` counts as pkg.name where that is a module, and
    as pkg otherwise."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                source = ".".join(parts[:len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                source = node.module
            submodules = {f"{source}.{alias.name}" for alias in node.names} & (known or set())
            found.update(submodules)
            if len(submodules) < len(node.names):
                found.add(source)
    return found


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules it imports}."""
    modules = package_modules()
    return {module: (imported_modules(module, path, set(modules)) & set(modules)) - {module}
            for module, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of `graph`, or None (depth-first search, three colours)."""
    state = {}
    stack = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_on_hand_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"d"}}) == ["d", "d"]


def test_imported_modules_resolves_relative_and_from_imports(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text("import os\nfrom . import sibling\nfrom .. import up\nfrom .sibling import name\n"
                    "def f():\n    from stmoe.data import tasks\n")
    known = {"stmoe.sub.sibling", "stmoe.up", "stmoe.data.tasks"}
    assert imported_modules("stmoe.sub.mod", str(path), known) == {
        "os", "stmoe.sub.sibling", "stmoe.up", "stmoe.data.tasks"}
    assert imported_modules("stmoe.sub.mod", str(path)) >= {"stmoe.sub", "stmoe", "stmoe.data"}


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "stmoe.config" in graph and "stmoe.data.tasks" in graph["stmoe.data.pipeline"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_config_imports_only_the_standard_library_and_ml_collections():
    path = os.path.join(PACKAGE, "config.py")
    top_level = {name.split(".")[0] for name in imported_modules("stmoe.config", path)}
    allowed = set(sys.stdlib_module_names) | {"__future__", "ml_collections"}
    assert top_level <= allowed, f"stmoe/config.py imports {sorted(top_level - allowed)}"
