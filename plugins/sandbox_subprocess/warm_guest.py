"""The guest side of a warm runner: one run process serving one tenant's code version for several
wake-ups in turn (the kernel side, and when it asks for this, is ``warm``).

Between two wake-ups the process must hold nothing of the one before: the runtime's objects go
(the run's tools unbound, then a full collection: cycles holding an event, a step's value or a
secret are freed, not left for ``gc.get_objects``), and the tenant's own modules are dropped from
``sys.modules`` and run again for the next wake-up, so their globals, caches and class attributes
start fresh (their code objects are kept: the same code version has the same files); every other
module's namespace gets back the names and values the template gave it (``json.x = ...`` is gone,
a replaced ``json.load`` is put back), and so do ``sys.path`` and ``os.environ``. What persists is
what tenant code changes *inside* an object the interpreter shares (an attribute set on a stdlib
class, an item added to a stdlib module's list, a module swapped in place in ``sys.modules``):
only ever within one tenant's one code version. A process is offered for another wake-up only
when it is back to how its first wake-up found it: one thread, the same open descriptors. Anything
less and it exits, as every run did before.
"""

from __future__ import annotations

import array
import ctypes
import gc
import linecache
import os
import sys
import threading
import types
from typing import Any

from tenantflow.workflow import _modules, _tools

_ABSENT = object()
# Every module's namespace and a copy of it, taken once in the template (``snapshot``); the copies
# keep each value alive, and children share them copy-on-write.
_TEMPLATE: list[tuple[dict[str, Any], dict[str, Any]]] = []
_TAGS = array.array("Q")  # each namespace's dict version when last known to match its copy
_ADDRS = array.array("Q")  # each namespace's address: read without touching (so copying) the objects
_MODULES: dict[str, types.ModuleType] = {}  # the modules imported then
_PATH: list[str] = []
_ENVIRON: dict[str, str] = {}
_ENV_DATA: dict[bytes, bytes] = {}
# CPython's dict version (PyDictObject.ma_version_tag: after the refcount, the type and ma_used)
# changes with every change to a dict: reading it tells which of ~240 namespaces a wake-up touched
# in ~0.2 ms, where comparing them name by name took ~1.6 ms a wake-up (and ~1,400 page faults the
# first time). Where it is not there (checked), every namespace is compared.
_TAG_OFFSET = 3 * ctypes.sizeof(ctypes.c_ssize_t)


def _tag(namespace: dict[str, Any]) -> int:
    return ctypes.c_uint64.from_address(id(namespace) + _TAG_OFFSET).value


def _tags_work() -> bool:
    if sys.implementation.name != "cpython" or not (3, 11) <= sys.version_info[:2] <= (3, 13):
        return False
    probe: dict[str, Any] = {"a": 1}
    before = _tag(probe)
    probe["a"] = 2
    middle = _tag(probe)
    probe["b"] = 3
    return before != middle != _tag(probe)


_TAGGED = _tags_work()


def snapshot() -> None:
    """In the template, before it forks its first run: what each warm runner's modules return to
    between wake-ups."""
    _TEMPLATE[:] = [(vars(module), dict(vars(module))) for name, module in list(sys.modules.items())
                    if module is not None and name != "__main__"]  # fmt: skip
    _TAGS[:] = array.array("Q", [_tag(namespace) if _TAGGED else 0 for namespace, _ in _TEMPLATE])
    _ADDRS[:] = array.array("Q", [id(namespace) for namespace, _ in _TEMPLATE])
    _MODULES.clear()
    _MODULES.update(sys.modules)
    _PATH[:] = sys.path
    _ENVIRON.clear()
    _ENVIRON.update(os.environ)
    _ENV_DATA.clear()
    _ENV_DATA.update(getattr(os.environ, "_data", {}))


def adopt(module: types.ModuleType) -> None:
    """Make ``module`` as the run's own set-up left it (before any tenant code) its baseline (the
    egress set-up patches ``socket``)."""
    namespace = vars(module)
    if id(namespace) in _ADDRS:  # searched in C: no shared object touched
        i = _ADDRS.index(id(namespace))
        _TEMPLATE[i] = (namespace, dict(namespace))
        _TAGS[i] = _tag(namespace) if _TAGGED else 0


def _restore_modules() -> None:
    """Undo what a wake-up bound, rebound or deleted in any module's namespace. By identity: no
    ``__eq__`` or ``__hash__`` of a value tenant code put there runs."""
    if _TAGGED:
        read = ctypes.c_uint64.from_address
        changed = [i for i, address in enumerate(_ADDRS) if read(address + _TAG_OFFSET).value != _TAGS[i]]
    else:
        changed = list(range(len(_TEMPLATE)))
    for i in changed:
        namespace, copy = _TEMPLATE[i]
        if len(namespace) != len(copy):
            for name in [name for name in namespace if name not in copy]:
                del namespace[name]
        for name, value in copy.items():
            if namespace.get(name, _ABSENT) is not value:
                namespace[name] = value
        if _TAGGED:
            _TAGS[i] = _tag(namespace)


class Baseline:
    """What the run process looked like before its first wake-up."""

    def __init__(self, max_fd: int) -> None:
        self.max_fd = max_fd
        self.fds = open_fds(max_fd)
        self.meta_path = list(sys.meta_path)
        self.modules = _MODULES if _MODULES else dict(sys.modules)  # the template's (no copy a run)
        self.code: dict[tuple[str, str], types.CodeType] = {}  # (path, source) -> its compiled code

    def clean(self) -> bool:
        """Whether the process is as its first wake-up found it (else it must not serve another)."""
        return threading.active_count() == 1 and open_fds(self.max_fd) == self.fds

    def reset(self, job: dict[str, Any]) -> None:
        """Forget the wake-up that ran ``job``: its tools, the tenant's modules, its garbage."""
        _tools.bind(None)
        sys.meta_path[:] = self.meta_path
        self._forget_modules()
        for path in _modules.TENANT_FILES:
            linecache.cache.pop(path, None)
        _modules.TENANT_FILES.clear()
        _modules.PRECOMPILED.clear()
        _restore_modules()  # what tenant code bound on shared modules (json.x = ..., os.getenv = ...)
        if sys.path != _PATH:  # compared item by identity first: no shared string is touched
            sys.path[:] = _PATH
        if getattr(os.environ, "_data", None) != _ENV_DATA:  # its raw bytes: nothing decoded
            os.environ.clear()
            os.environ.update(_ENVIRON)
        job.clear()
        gc.collect()

    def _forget_modules(self) -> None:
        """Drop the modules imported since the baseline (the tenant's, and what they imported: run
        again next time); put back baseline ones a wake-up deleted or re-imported. Reads the newest
        entries of ``sys.modules`` only (imports go to the end): reading every name would copy the
        pages of ~250 shared strings in a runner's first reuse (~0.3 ms of page faults)."""
        modules = sys.modules
        extra: list[str] = []
        replaced: list[str] = []
        for name in reversed(modules):
            if name not in self.modules:
                extra.append(name)
            elif modules[name] is self.modules[name]:
                break  # the newest baseline module, as it was: older entries are the baseline's
            else:
                replaced.append(name)  # deleted, then imported again
        for name in extra:
            del modules[name]
        for name in replaced:
            modules[name] = self.modules[name]
        if len(modules) != len(self.modules):  # a baseline module deleted: compare them all
            for name in [name for name in modules if name not in self.modules]:
                del modules[name]
            modules.update(self.modules)

    def precompile(self, files: dict[str, str]) -> None:
        """Hand the import of ``files`` the code objects compiled for an earlier wake-up of the same
        files; compile (and keep) the rest. A file that does not compile is left to its import,
        which reports the error as it always does."""
        for path, source in files.items():
            if not path.endswith(".py"):
                continue
            code = self.code.get((path, source))
            if code is None:
                try:
                    code = _modules.compile_module(source, path)
                except (SyntaxError, ValueError):
                    continue
                self.code[(path, source)] = code
            _modules.PRECOMPILED[path] = code


def open_fds(max_fd: int) -> frozenset[int]:
    """The descriptors below ``max_fd`` this process has open (no /proc: a run may not read it)."""
    found = set()
    for fd in range(max_fd):
        try:
            os.fstat(fd)
        except OSError:
            continue
        found.add(fd)
    return frozenset(found)
