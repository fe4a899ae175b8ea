"""The import graph: first-party modules import one another without cycles, and each layer only what it may.

Imports are read with `ast`, so nothing here imports the code it checks. An import inside a function counts
like one at the top of a module: a lazy import hides a cycle, it does not remove it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folder that holds each first-party package, and the package's name.
PACKAGES = {
    "models": ROOT,
    "service": ROOT,
    "training": ROOT,
    "bench": ROOT,
    "nnserve_client": ROOT / "clients" / "python",
}


def module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def first_party_modules() -> dict[str, Path]:
    """Every module of the first-party packages, by dotted name."""
    found: dict[str, Path] = {}
    for package, base in PACKAGES.items():
        for path in sorted((base / package).rglob("*.py")):
            found[module_name(path, base)] = path
    return found


def imported_names(path: Path, module: str, modules: set[str] | dict[str, Path]) -> set[str]:
    """The modules of `modules` that a module imports, at any depth of its body, relative imports resolved.

    `from a.b import c` imports module `a.b.c` when there is one, else the name `c` of module `a.b`.
    """
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {name for name in found if name in modules and name != module}


def import_graph() -> dict[str, set[str]]:
    """Module -> the first-party modules it imports."""
    modules = first_party_modules()
    return {name: imported_names(path, name, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a closed path [a, b, ..., a], or None; depth-first search with the usual three colours."""
    done: set[str] = set()
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> list[str] | None:
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_stack:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in done and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        on_stack.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (cycle := visit(start)):
            return cycle
    return None


def tangles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected groups of two or more modules (Tarjan): each holds at least one cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while (member := stack.pop()) != node:
                group.add(member)
            groups.append(group | {node})

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [g for g in groups if len(g) > 1]


def top_level_imports(package_dir: Path) -> dict[str, set[str]]:
    """File -> top-level names of the packages it imports (absolute imports only)."""
    out: dict[str, set[str]] = {}
    for path in sorted(package_dir.rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = names
    return out


def test_the_checker_sees_lazy_imports_and_cycles(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from pkg.b import f\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from . import a\n    return a\n")
    modules = {module_name(p, tmp_path): p for p in (tmp_path / "pkg").glob("*.py")}
    graph = {name: imported_names(path, name, modules) for name, path in modules.items()}
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
    assert tangles(graph) == [{"pkg.a", "pkg.b"}]
    graph["pkg.b"].discard("pkg.a")
    assert find_cycle(graph) is None and tangles(graph) == []


def test_the_graph_covers_every_package() -> None:
    graph = import_graph()
    assert {name.split(".")[0] for name in graph} == set(PACKAGES)
    assert "models.manifest" in graph["models.repository"]  # sanity: edges are found


def test_first_party_imports_have_no_cycle() -> None:
    graph = import_graph()
    cycles = [find_cycle({m: graph[m] & group for m in group}) or [] for group in tangles(graph)]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("clients", {"torch", "service", "training", "models", "bench"}),
        ("models", {"torch", "service", "training", "bench"}),
    ],
)
def test_layers_import_only_what_they_may(folder: str, forbidden: set[str]) -> None:
    offending = {path: sorted(names & forbidden) for path, names in top_level_imports(ROOT / folder).items()}
    assert top_level_imports(ROOT / folder), f"no Python files under {folder}/"
    assert not {path: names for path, names in offending.items() if names}
