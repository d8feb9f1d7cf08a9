"""A sandbox that is none: the guest runtime in the test's own process, for fast tenant tests.

It speaks the same step protocol as the real sandboxes (the guest runtime sends each step to the
kernel's host and waits for its answer), so a workflow is decided, committed and replayed exactly as
in a kernel, but without a process boundary or limits: a step's time-out, CPU and memory limits are
not enforced, and tenant code sees the test's environment. Use it for the tenant's own trusted code
in tests; run anything else in a real sandbox (``runtime="python"``).
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Mapping
from typing import Any

from tenantflow.kernel import hookimpl
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.sandbox import Host, Inspection, Limits, RunExit, Sandbox
from tenantflow.plugins.sandboxing.pysource import decode_files, inspect_python
from tenantflow.workflow._modules import module_name
from tenantflow.workflow._runtime import run_job

RUNTIME = "python"  # stands in for the subprocess sandbox's runtime, so published code is the same
_one_at_a_time = threading.Lock()  # a run swaps sys.stdout and the import system: never two at once


class _Transport:
    """The guest's side of the protocol, on a worker thread, calling the host on the kernel's loop."""

    def __init__(self, host: Host, loop: asyncio.AbstractEventLoop) -> None:
        self._host, self._loop = host, loop

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        return asyncio.run_coroutine_threadsafe(self._host.call(message), self._loop).result()

    def notify(self, message: dict[str, Any]) -> None:
        if self._host.admit(len(str(message))):
            asyncio.run_coroutine_threadsafe(self._host.notify(message), self._loop).result()


class InProcessSandbox:
    """Runs each wake-up's guest in a thread of this process (see the module docstring)."""

    runtime = RUNTIME

    def inspect(self, files: Mapping[str, bytes]) -> Inspection:
        return inspect_python(files)

    async def start(self) -> None:
        return None

    async def run(self, job: dict[str, Any], host: Host, limits: Limits) -> RunExit:
        job = {**job, "files": decode_files(job["files"])}
        transport = _Transport(host, asyncio.get_running_loop())
        try:
            await asyncio.to_thread(_isolated_run, job, transport)
        except Exception as exc:  # the guest runtime reports the tenant's errors itself; this is a crash
            return RunExit(crashed=True, detail=f"{type(exc).__name__}: {exc}")
        return RunExit(crashed=False)

    async def close(self) -> None:
        return None


def _isolated_run(job: dict[str, Any], transport: _Transport) -> None:
    """One run, leaving the import system as it found it (the tenant's modules are imported afresh
    by the next wake-up, as in a sandbox)."""
    tenant_modules = {module_name(p) for p in job["files"]}
    with _one_at_a_time:
        finders = list(sys.meta_path)
        try:
            run_job(job, transport)
        finally:
            sys.meta_path[:] = finders
            for name in [m for m in sys.modules if m in tenant_modules or m.split(".")[0] in tenant_modules]:
                del sys.modules[name]


class InProcessPlugin:
    """Registers :class:`InProcessSandbox` for the ``python`` runtime, ahead of the built-in one."""

    TENANTFLOW_CONTRACTS = {"hookspecs": [1], "sandbox": [1]}

    @hookimpl
    def tenantflow_sandboxes(self, config: KernelConfig) -> list[Sandbox]:
        return [InProcessSandbox()]
