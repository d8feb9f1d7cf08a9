"""Static checks of tenant Python source, shared by the sandboxes that run Python.

Tenant code is never imported, parsed or compiled in the kernel: :func:`inspect_python` parses and
compiles it (to report syntax errors with file and line) and searches it for top-level workflow
classes in a limited child process (:mod:`tenantflow.plugins.sandboxing.isolated`).
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Mapping
from typing import Any

from tenantflow.kernel.sandbox import CodeError, CodeWarning, Inspection
from tenantflow.plugins.sandboxing import hazards, isolated
from tenantflow.workflow._modules import module_name

MAX_WARNINGS = 100  # per Publish: past it, the first ones say enough


def decode_files(files: Mapping[str, bytes]) -> dict[str, str]:
    """Tenant files as text; reject bad paths and non-UTF-8 sources."""
    out: dict[str, str] = {}
    if not files:
        raise CodeError("no files: publish at least one .py module")
    for path, data in files.items():
        parts = path.split("/")
        if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise CodeError(f"bad file name {path!r}: use relative paths like 'pipeline.py' or 'pkg/util.py'")
        try:
            out[path] = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CodeError(f"{path}: not UTF-8 text ({exc})") from None
    return out


def python_entrypoints(files: Mapping[str, bytes], entry: str | None = None) -> dict[str, str]:
    """Compile every ``.py`` file; return ``{class name: module}`` for classes that define ``run``.

    Runs in the calling process: the kernel calls :func:`inspect_python` instead.

    ``entry`` (a file path) limits the search to that module. Raises :class:`CodeError` naming the
    file and line of the first syntax error.
    """
    return python_inspection(files, entry).workflows


def python_inspection(files: Mapping[str, bytes], entry: str | None = None) -> Inspection:
    """:func:`python_entrypoints`, and what a person should look at: determinism hazards in each
    workflow's ``run`` (:mod:`.hazards`), and classes that look like workflows but are ignored."""
    sources = decode_files(files)
    if not any(p.endswith(".py") for p in sources):
        raise CodeError("no .py files: a Python workflow needs at least one module")
    found: dict[str, str] = {}
    warnings: list[CodeWarning] = []
    for path, source in sorted(sources.items()):
        if not path.endswith(".py"):
            continue
        try:
            tree = ast.parse(source, filename=path)
            compile(tree, path, "exec")
        except SyntaxError as exc:
            where = f"{path}, line {exc.lineno}" if exc.lineno else path
            raise CodeError(f"{where}: {exc.msg}") from None
        except ValueError as exc:  # Python 3.11: "source code string cannot contain null bytes"
            raise CodeError(f"{path}: {exc}") from None
        if entry is not None and path != entry:
            continue
        here: set[str] = set()
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            if any(
                isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name == "run"
                for item in node.body
            ):
                found.setdefault(node.name, module_name(path))
                here.add(node.name)
            elif any(_base_name(base) == "WorkflowEntrypoint" for base in node.bases):
                warnings.append(CodeWarning(path, node.lineno, "ignored_class", (
                    f"class {node.name} subclasses WorkflowEntrypoint but defines no run method, so it is not "
                    "a workflow and cannot be created; add async def run(self, event, step)")))  # fmt: skip
        warnings += [CodeWarning(h.file, h.line, h.kind, h.message) for h in hazards.find(path, tree, here)]
    return Inspection(found, tuple(warnings))


def _base_name(base: ast.expr) -> str:
    return base.attr if isinstance(base, ast.Attribute) else base.id if isinstance(base, ast.Name) else ""


def inspect_python(files: Mapping[str, bytes], entry: str | None = None) -> Inspection:
    """:func:`python_inspection` in a limited child process (never in the kernel)."""
    found = isolated.call(f"{__name__}:inspection_packed", [isolated.pack_files(files), entry])
    return inspection_of(found)


def inspection_packed(packed: dict[str, str], entry: str | None) -> dict[str, Any]:
    """The child side of :func:`inspect_python` (JSON out)."""
    return inspection_json(python_inspection(isolated.unpack_files(packed), entry))


def inspection_json(inspection: Inspection) -> dict[str, Any]:
    return {
        "workflows": inspection.workflows,
        "warnings": [dataclasses.asdict(w) for w in inspection.warnings],
    }


def inspection_of(data: dict[str, Any]) -> Inspection:
    """An :class:`Inspection` from what a checker child sent (checked: it ran tenant-controlled parsing)."""
    workflows = {str(k): str(v) for k, v in dict(data["workflows"]).items()}
    warnings = tuple(
        CodeWarning(str(w["file"])[:300], int(w["line"]), str(w["kind"])[:40], str(w["message"])[:1000])
        for w in list(data["warnings"])[:MAX_WARNINGS]
    )
    return Inspection(workflows, warnings)
