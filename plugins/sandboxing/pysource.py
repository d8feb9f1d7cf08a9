"""Static checks of tenant Python source, shared by the sandboxes that run Python.

Tenant code is never imported, parsed or compiled in the kernel: :func:`inspect_python` parses and
compiles it (to report syntax errors with file and line) and searches it for top-level workflow
classes in a limited child process (:mod:`tenantflow.plugins.sandboxing.isolated`).
"""

from __future__ import annotations

import ast
from collections.abc import Mapping

from tenantflow.kernel.sandbox import CodeError
from tenantflow.plugins.sandboxing import isolated
from tenantflow.workflow._modules import module_name


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
    sources = decode_files(files)
    if not any(p.endswith(".py") for p in sources):
        raise CodeError("no .py files: a Python workflow needs at least one module")
    found: dict[str, str] = {}
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
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and any(
                isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name == "run"
                for item in node.body
            ):
                found.setdefault(node.name, module_name(path))
    return found


def inspect_python(files: Mapping[str, bytes], entry: str | None = None) -> dict[str, str]:
    """:func:`python_entrypoints` in a limited child process (never in the kernel)."""
    found: dict[str, str] = isolated.call(
        f"{__name__}:entrypoints_packed", [isolated.pack_files(files), entry]
    )
    return found


def entrypoints_packed(packed: dict[str, str], entry: str | None) -> dict[str, str]:
    """The child side of :func:`inspect_python`."""
    return python_entrypoints(isolated.unpack_files(packed), entry)
