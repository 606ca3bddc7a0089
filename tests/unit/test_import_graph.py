"""The library's modules import each other without a circle, lazy imports included.

A circle hides the design (which module owns a decision) and makes import order matter;
one made lazy by an import inside a function is still a circle. Imports under
``TYPE_CHECKING`` are left out: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import outbox

LIBRARY = Path(outbox.__file__).parent


def module_names() -> dict[str, Path]:
    names = {}
    for path in LIBRARY.rglob("*.py"):
        parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The library's modules ``name`` imports, at the top or in a function."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(node)
        for statement in ast.walk(tree)
        if isinstance(statement, ast.If) and "TYPE_CHECKING" in ast.unparse(statement.test)
        for node in ast.walk(statement)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph[module]:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    return found


def test_no_module_of_the_library_imports_itself_through_others() -> None:
    """No circle in the import graph of ``outbox``, lazy imports included."""
    modules = module_names()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert [] == circles(graph)


def test_the_check_finds_a_circle() -> None:
    """A lazy import back to an importer is a circle to the check."""
    assert [["a", "b"]] == circles({"a": {"b"}, "b": {"a"}, "c": {"a"}})


#: The wings, each importing only those before it: the core first (the top-level
#: modules), the integrations, then what sits on everything (the package's own
#: re-exports, ``python -m outbox``, the helpers for users' tests) last.
WINGS = [
    "core",
    "data",
    "ordering",
    "consumers",
    "enqueue",
    "transports",
    "maintenance",
    "postgres",
    "observability",
    "relays",
    "admin",
    "contrib",
    "top",
]
#: Top-level modules that sit above every wing.
TOP = {"outbox", "outbox.__main__", "outbox.testing"}


def wing_of(module: str) -> str:
    """``outbox.relays.loop`` is in ``relays``; ``outbox.settings`` (a top-level module)
    in ``core``."""
    if module in TOP:
        return "top"
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in WINGS):
        return parts[1]
    return "core"


def test_each_wing_imports_only_the_wings_below_it() -> None:
    """The layout's order holds: the core below all, data below the rest, the
    integrations above them."""
    modules = module_names()
    upward = sorted(
        f"{name} imports {target}"
        for name, path in modules.items()
        for target in imports_of(name, path, modules)
        if WINGS.index(wing_of(target)) > WINGS.index(wing_of(name))
    )
    assert [] == upward


def test_every_package_of_the_library_is_a_wing() -> None:
    packages = {
        name.split(".")[1]
        for name, path in module_names().items()
        if path.name == "__init__.py" and name.count(".") == 1
    }
    assert set() == packages - set(WINGS) - {"migrations"}


def test_modules_are_placed_in_their_wings() -> None:
    assert WINGS.index(wing_of("outbox.relays.batch")) > WINGS.index(wing_of("outbox.data"))
    assert "core" == wing_of("outbox.settings")
    assert "top" == wing_of("outbox.testing")
