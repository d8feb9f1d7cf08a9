"""Tenant modules from memory: the tenant's files become importable by module name, in the guest."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import linecache
import sys
import types
from collections.abc import Sequence

# The tenant's file paths: a traceback keeps only their frames (the SDK's are not the author's).
TENANT_FILES: set[str] = set()
# Code objects for tenant paths, compiled before any tenant code ran (the python-wasm guest's cache).
PRECOMPILED: dict[str, types.CodeType] = {}


def compile_module(source: str, path: str) -> types.CodeType:
    """A tenant module's code, compiled as its import compiles it (the same flags)."""
    return compile(source, path, "exec")


def module_name(path: str) -> str:
    """``pkg/util.py`` -> ``pkg.util``; ``pkg/__init__.py`` -> ``pkg``."""
    name = path[:-3] if path.endswith(".py") else path
    name = name.replace("/", ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


class _MemoryFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, files: dict[str, str]) -> None:
        self._sources = {module_name(p): (p, src) for p, src in files.items() if p.endswith(".py")}
        self._packages = {module_name(p) for p in files if p.endswith("__init__.py")}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self._sources:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=fullname in self._packages)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        path, source = self._sources[module.__name__]
        module.__file__ = path
        if module.__name__ in self._packages:
            module.__path__ = []
        code = PRECOMPILED.pop(path, None) or compile_module(source, path)
        exec(code, module.__dict__)


def install_modules(files: dict[str, str]) -> None:
    """Make the tenant's files importable by module name, their lines readable by tracebacks."""
    for path, source in files.items():
        if path.endswith(".py"):
            TENANT_FILES.add(path)
            linecache.cache[path] = (len(source), None, source.splitlines(keepends=True), path)
    sys.meta_path.insert(0, _MemoryFinder(files))
