"""The guest runtime: runs one wake-up of a tenant's workflow inside a sandbox.

It is the same for every sandbox; only the transport differs (a socket for the subprocess
sandbox, a host call for wasm). The runtime imports the tenant's files from memory, replays
``run(event, step)`` against the journal the kernel sent, asks the kernel what to do for every
step that is not settled yet, and ends by reporting ``finish`` (the run returned or raised) or
``suspend`` (every branch waits on a sleep, an event or a retry delay). The kernel decides and
commits everything; the runtime holds no durable state.

The protocol is described in :mod:`tenantflow.workflow._protocol`; the step drivers are
:mod:`~tenantflow.workflow._sync` and :mod:`~tenantflow.workflow._async`.
"""

from __future__ import annotations

import datetime as _dt
import inspect
import json
import sys
import threading
from collections.abc import Callable
from typing import Any

from tenantflow.workflow import _compose
from tenantflow.workflow._api import WorkflowEvent
from tenantflow.workflow._async import AsyncStep
from tenantflow.workflow._loop import GuestLoop
from tenantflow.workflow._modules import install_modules
from tenantflow.workflow._protocol import MAX_VALUE_BYTES, Core, Fatal, Suspend, Transport, error_dict
from tenantflow.workflow._sync import SyncStep


class _LogStream:
    """Stands in for stdout/stderr: each line the tenant prints becomes a log line in Watch.

    Lines printed by code outside steps while the workflow replays recorded steps were already
    logged by an earlier wake-up, so they are not logged again (as Temporal's replay-aware logger)."""

    def __init__(self, transport: Transport, stream: str) -> None:
        self._transport = transport
        self._stream = stream
        self._buffer = ""
        self.replaying: Callable[[], bool] = lambda: False

    def write(self, text: str) -> int:
        self._buffer += text
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            self._emit(line)
        return len(text)

    def _emit(self, line: str) -> None:
        # step callbacks run in worker threads (or after the replay), never "during" it
        if threading.current_thread() is threading.main_thread() and self.replaying():
            return
        self._transport.notify({"op": "log", "stream": self._stream, "line": line[:8192]})

    def flush(self) -> None:
        if self._buffer:
            self._emit(self._buffer)
            self._buffer = ""

    def isatty(self) -> bool:
        return False


def _replay_aware(core: Core) -> None:
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, _LogStream):
            stream.replaying = lambda: bool(core.unseen)


def _finish(transport: Transport, value: Any) -> None:
    try:
        encoded = json.dumps(value, allow_nan=False)  # RFC 8259: other languages read it
    except (TypeError, ValueError) as exc:
        error = {
            "name": "TypeError",
            "message": f"run() returned a value that is not JSON-serializable (NaN and Infinity are not JSON either): {exc}",
        }
        transport.call({"op": "finish", "ok": False, "error": error})
        return
    if len(encoded) > MAX_VALUE_BYTES:
        error = {
            "name": "ValueError",
            "message": f"run() returned {len(encoded)} bytes of JSON; the limit is 1 MiB",
        }
        transport.call({"op": "finish", "ok": False, "error": error})
        return
    transport.call({"op": "finish", "ok": True, "value": value})


def _never_awaited(names: list[str]) -> dict[str, Any]:
    listed = ", ".join(repr(n) for n in dict.fromkeys(names))
    return {"name": "StepNotAwaited", "message": (
        f"step {listed} was called but never awaited, so it never ran: write "
        f"`await step.do(...)`, or pass it to asyncio.gather")}  # fmt: skip


def run_job(job: dict[str, Any], transport: Transport, *, threads: bool = True) -> None:
    """Run one wake-up of ``job`` (files, module, workflow, event, journal) and report how it ended."""
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout = _LogStream(transport, "stdout")
    sys.stderr = _LogStream(transport, "stderr")
    try:
        _run(job, transport, threads)
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = stdout, stderr


def _run(job: dict[str, Any], transport: Transport, threads: bool) -> None:
    try:
        install_modules(job["files"])
        module = __import__(job["module"], fromlist=["_"])
        cls = getattr(module, job["workflow"], None)
        if not (isinstance(cls, type) and callable(getattr(cls, "run", None))):
            raise TypeError(
                f"module {job['module']!r} defines no workflow class {job['workflow']!r} with a run method"
            )
        workflow = cls()
    except BaseException as exc:  # noqa: BLE001 - the tenant's import-time errors fail the instance
        transport.call({"op": "finish", "ok": False, "error": error_dict(exc), "phase": "load"})
        return
    ev = job["event"]
    event = WorkflowEvent(
        payload=ev.get("payload"),
        instance_id=ev["instance_id"],
        timestamp=_dt.datetime.fromisoformat(ev["timestamp"]),
    )
    if inspect.iscoroutinefunction(workflow.run):
        loop = GuestLoop(threads=threads)  # type: ignore[abstract]
        core = Core(job, transport, loop)
        _replay_aware(core)
        step = AsyncStep(core, loop)
        task = loop.run(workflow.run(event, step))
        raised = task.exception() if task.done() and not task.cancelled() else None
        if task.done() and (lost := step.never_awaited()) and raised is None and not core.fatal:
            transport.call({"op": "finish", "ok": False, "error": _never_awaited(lost)})
            return
        if _compose.should_roll_back(core, raised is not None and not isinstance(raised, Suspend)):
            _compose.roll_back(core, raised)
            return
        if core.fatal:
            transport.call({"op": "finish", "ok": False, "error": core.fatal, "fatal": True})
        elif not task.done():
            if core.blocked:
                transport.call({"op": "suspend"})
            else:
                error = {
                    "name": "RuntimeError",
                    "message": "run() is stuck awaiting something that is not a step (nothing left to run)",
                }
                transport.call({"op": "finish", "ok": False, "error": error})
        elif task.cancelled():
            transport.call({"op": "finish", "ok": False, "error": {"name": "CancelledError", "message": ""}})
        elif isinstance(task.exception(), Suspend):
            transport.call({"op": "suspend"})
        elif task.exception() is not None:
            transport.call({"op": "finish", "ok": False, "error": error_dict(task.exception())})  # type: ignore[arg-type]
        else:
            _finish(transport, task.result())
        return
    core = Core(job, transport, None)
    _replay_aware(core)
    try:
        value = workflow.run(event, SyncStep(core))
    except Suspend:
        value = None
    except Fatal:
        value = None
    except Exception as exc:
        if _compose.should_roll_back(core, not core.suspended):
            _compose.roll_back(core, exc)
        elif core.fatal:
            transport.call({"op": "finish", "ok": False, "error": core.fatal, "fatal": True})
        elif core.suspended:
            transport.call({"op": "suspend"})
        else:
            transport.call({"op": "finish", "ok": False, "error": error_dict(exc)})
        return
    if _compose.should_roll_back(core, False):  # rolling back: the forward replay stopped or returned
        _compose.roll_back(core, None)
    elif core.fatal:
        transport.call({"op": "finish", "ok": False, "error": core.fatal, "fatal": True})
    elif core.suspended:
        transport.call({"op": "suspend"})
    else:
        _finish(transport, value)
