"""Publish-time check of tenant Python for the python-wasm runtime: every import must exist there."""

from __future__ import annotations

import ast
from collections.abc import Mapping, Set
from typing import Any

from tenantflow.kernel.sandbox import CodeError, Inspection
from tenantflow.plugins.sandboxing import isolated
from tenantflow.plugins.sandboxing.pysource import (
    decode_files,
    inspection_json,
    inspection_of,
    python_inspection,
)
from tenantflow.workflow._modules import module_name

_GUARDS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


def _guarded(handler: ast.ExceptHandler) -> bool:
    """Whether ``except`` clause catches a failed import."""
    kinds = handler.type
    if kinds is None:
        return True
    names = kinds.elts if isinstance(kinds, ast.Tuple) else [kinds]
    return any(isinstance(n, ast.Name) and n.id in _GUARDS for n in names)


def _imports(tree: ast.AST) -> list[tuple[str, int]]:
    """Absolute imports as (dotted name, line), skipping those inside ``try: ... except ImportError``."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Try) and any(_guarded(h) for h in node.handlers):
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def check_imports(sources: Mapping[str, str], available: Set[str]) -> None:
    """Raise :class:`CodeError` for the first import the python-wasm runner cannot satisfy."""
    own = {module_name(p) for p in sources if p.endswith(".py")}
    own_roots = {name.split(".")[0] for name in own}
    for path, source in sorted(sources.items()):
        if not path.endswith(".py"):
            continue
        for name, line in _imports(ast.parse(source, filename=path)):
            if name.split(".")[0] in own_roots or name in available:
                continue
            raise CodeError(
                f"{path}, line {line}: module {name!r} is not available in the python-wasm runtime "
                "(it has the standard library modules its runner was built with, tenantflow.workflow "
                "and your own files; use runtime 'python' for anything else)"
            )


def inspect_python_wasm(files: Mapping[str, bytes], available: Set[str]) -> Inspection:
    """Workflow classes of python-wasm code, checked (syntax, imports) in a limited child process,
    with the warnings the python sandbox's check gives."""
    return inspection_of(
        isolated.call(f"{__name__}:inspect_packed", [isolated.pack_files(files), sorted(available)])
    )


def inspect_packed(packed: dict[str, str], available: list[str]) -> dict[str, Any]:
    """The child side of :func:`inspect_python_wasm` (JSON out)."""
    files = isolated.unpack_files(packed)
    inspection = python_inspection(files)
    check_imports(decode_files(files), frozenset(available))
    return inspection_json(inspection)
