"""The package's import graph, read from the sources: no cycle, and the core never imports its extra.

Every import counts, at module level or inside a function (a lazy import hides a cycle, it does
not remove it); importing a submodule runs its packages' ``__init__`` first, so it counts as an
import of those too. Only ``if TYPE_CHECKING:`` blocks, which never run, are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

from heterofl_core.data import repo_root

PACKAGES = ("heterofl_core", "heterofl_flower")


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in (repo_root() / package).rglob("*.py"):
            parts = path.relative_to(repo_root()).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_by(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``name`` (at ``path``) imports, with the packages they sit in."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    named: set[str] = set()

    class Imports(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if "TYPE_CHECKING" in ast.unparse(node.test):
                for statement in node.orelse:
                    self.visit(statement)
            else:
                self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            named.update(alias.name for alias in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                if node.level else node.module or ""
            named.add(base)
            named.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import extraction`

    Imports().visit(ast.parse(path.read_text()))
    with_packages = {".".join(dotted.split(".")[:k]) for dotted in named for k in range(1, dotted.count(".") + 2)}
    return {m for m in with_packages if m in modules and m != name and not name.startswith(m + ".")}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_by(name, path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, str] = {}  # "open" while on the path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_reader_finds_a_cycle_and_the_packages_of_a_submodule():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "heterofl_core.models" in graph["heterofl_core.families"], "from .models.conv import ... runs models/__init__"
    assert "heterofl_core.server" in graph["heterofl_core.federated"]


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_the_core_never_imports_the_flower_extra():
    offending = {name: sorted(m for m in imports if m.startswith("heterofl_flower"))
                 for name, imports in import_graph().items() if name.startswith("heterofl_core")}
    assert not {name: found for name, found in offending.items() if found}
