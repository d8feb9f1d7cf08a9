"""The kernel's imports flow one way: no circles, type-only and function-level imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import tenantflow.kernel

KERNEL = Path(tenantflow.kernel.__file__).parent
PREFIX = "tenantflow.kernel"
# The step kinds decide against the journal and know nothing of what drives them.
STEP_KINDS = ("stepkinds", "children", "rollback")
ABOVE_STEP_KINDS = ("wakeup", "executor", "dispatch", "service", "server", "serve", "cli")


def imports(path: Path) -> set[str]:
    """The kernel modules ``path`` imports anywhere in it (``if TYPE_CHECKING:`` and functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            if node.module == PREFIX:
                found.update(alias.name for alias in node.names)
            elif node.module.startswith(PREFIX + "."):
                found.add(node.module[len(PREFIX) + 1 :].split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PREFIX + "."):
                    found.add(alias.name[len(PREFIX) + 1 :].split(".")[0])
    return found


def graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in KERNEL.glob("*.py") if p.stem != "__init__"}
    return {name: imports(path) & set(modules) - {name} for name, path in modules.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_kernel_has_no_import_circles() -> None:
    edges = graph()
    assert len(edges) > 20, sorted(edges)  # the walk found the kernel's modules
    assert circles(edges) == [], "import circles in tenantflow.kernel (move the shared type down a floor)"


def test_the_step_kinds_import_nothing_that_drives_them() -> None:
    edges = graph()
    for kind in STEP_KINDS:
        assert "journal" in edges[kind], kind
        assert not edges[kind] & set(ABOVE_STEP_KINDS), (kind, sorted(edges[kind] & set(ABOVE_STEP_KINDS)))


def test_the_circle_finder_finds_circles() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
