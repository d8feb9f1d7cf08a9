"""The guest side of a warm runner: one run process serving one tenant's code version for several
wake-ups in turn (the kernel side, and when it asks for this, is ``warm``).

Between two wake-ups the process must hold nothing of the one before: the runtime's objects go
(the run's tools unbound, then a full collection: cycles holding an event, a step's value or a
secret are freed, not left for ``gc.get_objects``), and the tenant's own modules are dropped from
``sys.modules`` and run again for the next wake-up, so their globals, caches and class attributes
start fresh (their code objects are kept: the same code version has the same files). A process
is offered for another wake-up only when it is back to how its first wake-up found it: one
thread, the same open descriptors. Anything less and it exits, as every run did before.
"""

from __future__ import annotations

import gc
import linecache
import os
import sys
import threading
import types
from typing import Any

from tenantflow.workflow import _modules, _tools


class Baseline:
    """What the run process looked like before its first wake-up."""

    def __init__(self, max_fd: int) -> None:
        self.max_fd = max_fd
        self.fds = open_fds(max_fd)
        self.meta_path = list(sys.meta_path)
        self.modules = set(sys.modules)
        self.code: dict[tuple[str, str], types.CodeType] = {}  # (path, source) -> its compiled code

    def clean(self) -> bool:
        """Whether the process is as its first wake-up found it (else it must not serve another)."""
        return threading.active_count() == 1 and open_fds(self.max_fd) == self.fds

    def reset(self, job: dict[str, Any]) -> None:
        """Forget the wake-up that ran ``job``: its tools, the tenant's modules, its garbage."""
        _tools.bind(None)
        sys.meta_path[:] = self.meta_path
        for name in [n for n in sys.modules if n not in self.modules]:
            del sys.modules[name]  # the tenant's modules (and what they imported): run again next time
        for path in _modules.TENANT_FILES:
            linecache.cache.pop(path, None)
        _modules.TENANT_FILES.clear()
        _modules.PRECOMPILED.clear()
        job.clear()
        gc.collect()

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
