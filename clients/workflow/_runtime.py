"""The guest runtime: runs one wake-up of a tenant's workflow inside a sandbox.

It is the same for every sandbox; only the transport differs (a socket for the subprocess
sandbox, a host call for wasm). The runtime imports the tenant's files from memory, replays
``run(event, step)`` against the journal the kernel sent, asks the kernel what to do for every
step that is not settled yet, and ends by reporting ``finish`` (the run returned or raised) or
``suspend`` (every branch waits on a sleep, an event or a retry delay). The kernel decides and
commits everything; the runtime holds no durable state.

The protocol (JSON objects; ``call`` expects a reply, ``notify`` does not):

guest -> kernel                                                   kernel reply ``{"do": ...}``
``{"op": "step", "kind": "do", "key", "name", "policy": {limit, delay, backoff, timeout}}``
``{"op": "step", "kind": "sleep", "key", "name", "seconds" | "until"}``
``{"op": "step", "kind": "wait", "key", "name", "type", "seconds"}``
``{"op": "result", "key", "name", "attempt", "ok": true, "value"}``
``{"op": "result", ..., "ok": false, "error": {name, message, traceback, retryable}}``
    -> ``run`` (``attempt``: call the step callback), ``return`` (``value``), ``raise``
       (``error``), ``suspend`` (this branch waits for the next wake-up)
``{"op": "finish", "ok": true, "value"}`` / ``{"op": "finish", "ok": false, "error"}`` -> ``ack``
``{"op": "suspend"}`` (every branch is suspended) -> ``ack``
``{"op": "log", "stream", "line"}`` (notify)

Running ahead: when the job says ``"ahead": true`` (no pause pending) and the transport can ``send``
and ``receive`` apart (the subprocess sandbox's socket), a new ``do`` step's first attempt need not
wait for the kernel's ``run``. The runtime sends the step request with ``"ahead": true``, calls the
callback at once, sends its ``result``, and only then reads both replies, in order: ``run``
(attempt 1, which the kernel always grants a new step asked for this way, a pending pause included)
and the answer to the result. A reply with ``"ahead": false`` (a pause is pending) stops running
ahead for the rest of the wake-up. A step then costs one round trip instead of two, and the kernel
still learns of the attempt when it starts (its time-out runs from there). Only where nothing else
can send meanwhile: sync workflows, and async ones whose callback runs inline (a sequential step,
not a rollback).

Keys are ``"<name>#<occurrence>"``. Durations are seconds; ``until`` is epoch seconds.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import importlib.abc
import importlib.util
import inspect
import json
import sys
import threading
import traceback
import types
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeGuard

from tenantflow.workflow import _compose
from tenantflow.workflow._api import (
    EventTimeoutError,
    NonRetryableError,
    StepContext,
    StepError,
    WorkflowEvent,
)
from tenantflow.workflow._durations import parse_duration
from tenantflow.workflow._loop import GuestLoop

MAX_VALUE_BYTES = 1024 * 1024
_BACKOFFS = ("constant", "linear", "exponential")


class Transport(Protocol):
    """How the runtime talks to the kernel: ``call`` waits for a reply, ``notify`` does not."""

    def call(self, message: dict[str, Any]) -> dict[str, Any]: ...

    def notify(self, message: dict[str, Any]) -> None: ...


class _Suspend(BaseException):
    """Unwinds a sync workflow whose current step must wait (not catchable by ``except Exception``)."""


class _Fatal(BaseException):
    """Unwinds a workflow that broke the determinism contract."""


def error_dict(exc: BaseException, *, with_traceback: bool = True) -> dict[str, Any]:
    """Describe an exception for the kernel."""
    # Bounded like the kernel keeps it, so a huge message never exceeds the kernel's message limit.
    info: dict[str, Any] = {"name": type(exc).__name__[:200], "message": str(exc)[:16384]}
    if with_traceback:
        info["traceback"] = "".join(traceback.format_exception(exc)[-6:])[-4000:]
    return info


# -- tenant modules from memory ------------------------------------------------------------------
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
        exec(compile(source, path, "exec"), module.__dict__)


def install_modules(files: dict[str, str]) -> None:
    """Make the tenant's files importable by module name."""
    sys.meta_path.insert(0, _MemoryFinder(files))


# -- the step core shared by sync and async workflows ----------------------------------------
class _Core:
    def __init__(self, job: dict[str, Any], transport: Transport, loop: GuestLoop | None) -> None:
        self.transport = transport
        self.loop = loop
        self.journal: dict[str, dict[str, Any]] = {e["key"]: e for e in job.get("journal", [])}
        self.order = [e["key"] for e in job.get("journal", [])]
        self.unseen = set(self.order)
        self.counts: dict[str, int] = {}
        self.calls = 0
        self.blocked = 0
        self.suspended = False
        self.fatal: dict[str, Any] | None = None
        # Ask before every step: running ahead was not granted, or a pause is pending.
        self.no_ahead = job.get("ahead") is not True
        self.rollback: dict[str, Any] | None = job.get("rollback")  # rolling back: no new forward step
        self.undos: dict[str, _compose.Undo] = {}

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        if self.suspended and self.loop is None:
            raise _Suspend()
        if self.rollback is not None and message["op"] == "step":
            return {"do": "suspend"}
        return self._heed(self.transport.call(message))

    def _heed(self, reply: dict[str, Any]) -> dict[str, Any]:
        if reply.get("ahead") is False:  # a pause is pending: ask before every step from now on
            self.no_ahead = True
        return reply

    def ahead(
        self, key: str, name: str, policy: dict[str, Any], fn: Callable[..., Any],
        call: Callable[[Callable[..., Any], str, int], Any],
    ) -> dict[str, Any] | None:  # fmt: skip
        """Run a new ``do`` step's first attempt ahead of the kernel's grant (see the module
        docstring); the kernel's answer to its result, or None where the transport cannot (then
        the caller asks first)."""
        send = getattr(self.transport, "send", None)
        receive = getattr(self.transport, "receive", None)
        if send is None or receive is None or self.no_ahead or self.rollback is not None:
            return None
        if self.suspended or self.fatal:  # the branch stops at this step: the call path says how
            return None
        send({"op": "step", "kind": "do", "key": key, "name": name, "policy": policy, "ahead": True})
        value: Any = None
        failure: BaseException | None = None
        try:
            value = call(fn, key, 1)
        except Exception as exc:
            failure = exc
        send(self.outcome(key, name, 1, value, failure))
        granted = receive()
        if granted.get("do") != "run" or granted.get("attempt") != 1:
            raise RuntimeError(f"the kernel did not grant a step run ahead: {granted!r}")
        return self._heed(receive())

    def fail(self, message: str) -> _Fatal:
        self.fatal = {"name": "NonDeterminismError", "message": message}
        return _Fatal(message)

    def begin(self, name: str, kind: str) -> tuple[str, dict[str, Any] | None]:
        """Key the step call by (name, occurrence) and check it against the journal."""
        if self.fatal:
            raise _Fatal(self.fatal["message"])
        if not isinstance(name, str) or not name or len(name) > 256:
            raise ValueError(
                f"a step name must be a non-empty string of at most 256 characters, got {name!r}"
            )
        occurrence = self.counts.get(name, 0)
        self.counts[name] = occurrence + 1
        key = f"{name}#{occurrence}"
        index, self.calls = self.calls, self.calls + 1
        entry = self.journal.get(key)
        if entry is not None and entry["kind"] != kind:
            raise self.fail(
                f"step {name!r} (occurrence {occurrence}) was recorded as {entry['kind']}, "
                f"but the workflow now asks for {kind}"
            )
        if self.loop is None and index < len(self.order) and self.order[index] != key:
            raise self.fail(self._mismatch(self.order[index], key))
        self.unseen.discard(key)
        return key, entry

    def _mismatch(self, expected_key: str, asked_key: str) -> str:
        expected = self.journal[expected_key]
        return (
            f"the journal recorded step {expected['name']!r} ({expected['kind']}) next, but the workflow asked "
            f"for step {asked_key.rsplit('#', 1)[0]!r}: code outside steps must be deterministic"
        )

    async def gate(self, key: str) -> None:
        """Before a new step: let every recorded step replay, then check none was skipped."""
        if not self.unseen:  # nothing left to replay: the gate cannot fail (and costs nothing)
            return
        assert self.loop is not None
        await self.loop.quiet()
        if self.unseen:
            first = min(self.unseen, key=self.order.index)
            raise self.fail(self._mismatch(first, key))

    def settled(self, entry: dict[str, Any] | None) -> TypeGuard[dict[str, Any]]:
        return entry is not None and entry.get("status") in ("complete", "failed")

    def replay(self, name: str, entry: dict[str, Any]) -> Any:
        if entry["status"] == "complete":
            return entry.get("value")
        raise self.error(name, entry["kind"], entry.get("error") or {})

    def error(self, name: str, kind: str, error: dict[str, Any]) -> Exception:
        if kind == "wait":
            return EventTimeoutError(name, error.get("type", ""), error.get("message", ""))
        if kind == "wait_instance":
            return _compose.instance_error(name, error)
        return StepError(name, str(error.get("name", "Error")), str(error.get("message", "")))

    def outcome(
        self, key: str, name: str, attempt: int, value: Any, exc: BaseException | None
    ) -> dict[str, Any]:
        """Describe how one attempt of a step callback ended, for the kernel."""
        message: dict[str, Any] = {"op": "result", "key": key, "name": name, "attempt": attempt}
        if exc is not None:
            retryable = not isinstance(exc, NonRetryableError)
            message.update(ok=False, error={**error_dict(exc), "retryable": retryable})
            return message
        problem: Exception
        try:
            encoded = json.dumps(value, allow_nan=False)  # RFC 8259: other languages read it
        except (TypeError, ValueError) as err:
            problem = TypeError(
                f"step {name!r} returned a value that is not JSON-serializable (NaN and Infinity are not JSON either): {err}"
            )
            message.update(ok=False, error={**error_dict(problem, with_traceback=False), "retryable": False})
            return message
        if len(encoded) > MAX_VALUE_BYTES:
            problem = ValueError(
                f"step {name!r} returned {len(encoded)} bytes of JSON; the limit is {MAX_VALUE_BYTES}: "
                "store large data elsewhere and return a reference"
            )
            message.update(ok=False, error={**error_dict(problem, with_traceback=False), "retryable": False})
            return message
        message.update(ok=True, value=value)
        return message


def _policy(name: str, retries: dict[str, Any] | None, timeout: Any) -> dict[str, Any]:
    retries = dict(retries or {})
    unknown = set(retries) - {"limit", "delay", "backoff"}
    if unknown:
        raise ValueError(
            f"step {name!r}: unknown retry option(s) {sorted(unknown)}; use limit, delay, backoff"
        )
    limit = retries.get("limit", 5)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise ValueError(f"step {name!r}: retries limit must be an integer >= 0, got {limit!r}")
    backoff = retries.get("backoff", "exponential")
    if backoff not in _BACKOFFS:
        raise ValueError(f"step {name!r}: backoff must be one of {_BACKOFFS}, got {backoff!r}")
    return {
        "limit": limit,
        "delay": parse_duration(retries.get("delay", 10)),
        "backoff": backoff,
        "timeout": parse_duration(timeout if timeout is not None else 600),
    }


def _invoke(fn: Callable[..., Any], key: str, attempt: int) -> Any:
    name, _, occurrence = key.rpartition("#")
    name, count = (name, int(occurrence) + 1) if occurrence.isdecimal() else (key, 1)
    if not callable(fn):
        raise TypeError(f"step {name!r}: expected a callable, got {type(fn).__name__}")
    return fn(StepContext(name, attempt, count)) if _wants_context(fn) else fn()


def _wants_context(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` has a positional parameter without a default (it gets the step context)."""
    if type(fn) is types.FunctionType and not hasattr(fn, "__wrapped__") and not hasattr(fn, "__signature__"):
        # What inspect.signature says, read off the code object (it was most of a trivial step's cost).
        return fn.__code__.co_argcount > len(fn.__defaults__ or ())
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        for p in params.values()
    )


def _until(when: _dt.datetime | float | int) -> float:
    if isinstance(when, _dt.datetime):
        if when.tzinfo is None:
            raise ValueError("sleep_until needs a timezone-aware datetime (e.g. datetime.now(timezone.utc))")
        return when.timestamp()
    if isinstance(when, int | float) and not isinstance(when, bool):
        return float(when)
    raise ValueError(f"sleep_until needs a datetime or epoch seconds, got {when!r}")


class SyncStep:
    """``step`` for a plain ``def run``: every call blocks and returns the value."""

    def __init__(self, core: _Core) -> None:
        self._core = core

    def _drive(
        self, key: str, name: str, kind: str, reply: dict[str, Any], fn: Callable[..., Any] | None
    ) -> Any:
        while True:
            action = reply.get("do")
            if action == "run" and fn is not None:
                attempt = int(reply["attempt"])

                value: Any = None
                failure: BaseException | None = None
                try:
                    value = _call_blocking(fn, key, attempt)
                except Exception as exc:
                    failure = exc
                reply = self._core.call(self._core.outcome(key, name, attempt, value, failure))
            elif action == "return":
                return reply.get("value")
            elif action == "raise":
                raise self._core.error(name, kind, reply.get("error") or {})
            elif action == "suspend":
                self._core.suspended = True
                raise _Suspend()
            else:
                raise RuntimeError(f"unexpected reply from the kernel: {reply!r}")

    def do(
        self, name: str, fn: Callable[..., Any], *, retries: Any = None, timeout: Any = None,
        rollback: Callable[..., Any] | None = None, rollback_config: Any = None,
    ) -> Any:  # fmt: skip
        _compose.check_rollback(name, rollback, rollback_config)
        key, entry = self._core.begin(name, "do")
        if self._core.settled(entry):
            return _compose.register(
                self._core, key, rollback, rollback_config, self._core.replay(name, entry)
            )
        policy = _policy(name, retries, timeout)
        reply = (
            self._core.ahead(key, name, policy, fn, _call_blocking) if entry is None else None
        ) or self._core.call({"op": "step", "kind": "do", "key": key, "name": name, "policy": policy})
        return _compose.register(
            self._core, key, rollback, rollback_config, self._drive(key, name, "do", reply, fn)
        )

    def create(
        self, name: str, workflow: str, *, code: str | None = None, params: Any = None, id: str | None = None
    ) -> Any:
        key, entry = self._core.begin(name, "create")
        if self._core.settled(entry):
            return self._core.replay(name, entry)
        message = _compose.create_message(key, name, _policy(name, None, None), workflow, code, params, id)
        return self._drive(key, name, "create", self._core.call(message), None)

    def wait_for_instance(self, name: str, id: str, *, timeout: Any = None) -> Any:
        key, entry = self._core.begin(name, "wait_instance")
        if self._core.settled(entry):
            return self._core.replay(name, entry)
        message = _compose.wait_message(key, name, id, timeout)
        return self._drive(key, name, "wait_instance", self._core.call(message), None)

    def sleep(self, name: str, duration: Any) -> None:
        self._sleep(name, {"seconds": parse_duration(duration)})

    def sleep_until(self, name: str, when: Any) -> None:
        self._sleep(name, {"until": _until(when)})

    def _sleep(self, name: str, when: dict[str, float]) -> None:
        key, entry = self._core.begin(name, "sleep")
        if self._core.settled(entry):
            return
        reply = self._core.call({"op": "step", "kind": "sleep", "key": key, "name": name, **when})
        self._drive(key, name, "sleep", reply, None)

    def wait_for_event(self, name: str, *, type: str, timeout: Any = None) -> Any:
        _compose.check_event_type(type)
        key, entry = self._core.begin(name, "wait")
        if self._core.settled(entry):
            return _compose.event(self._core.replay(name, entry))
        seconds = parse_duration(timeout if timeout is not None else "24 hours")
        reply = self._core.call(
            {"op": "step", "kind": "wait", "key": key, "name": name, "type": type, "seconds": seconds}
        )
        return _compose.event(self._drive(key, name, "wait", reply, None))


async def _await(value: Any) -> Any:
    return await value


def _call_blocking(fn: Callable[..., Any], name: str, attempt: int) -> Any:
    """Call a step callback to completion (an async callback in a sync context gets its own loop)."""
    value = _invoke(fn, name, attempt)
    if inspect.isawaitable(value):
        loop = GuestLoop(threads=False)  # type: ignore[abstract]
        return loop.run(_await(value)).result()
    return value


def _call_inline(fn: Callable[..., Any], key: str, attempt: int) -> Any:
    """:func:`_call_blocking` on the workflow's own thread (an awaitable it returns still gets a
    loop of its own, as on a worker thread; the workflow's loop is restored after)."""
    value = _invoke(fn, key, attempt)
    if not inspect.isawaitable(value):
        return value
    outer = asyncio.events._get_running_loop()
    try:
        return GuestLoop(threads=False).run(_await(value)).result()  # type: ignore[abstract]
    finally:
        asyncio.events._set_running_loop(outer)


class AsyncStep:
    """``step`` for an ``async def run``: every call returns an awaitable; use ``asyncio.gather``
    for parallel steps."""

    def __init__(self, core: _Core, loop: GuestLoop) -> None:
        self._core = core
        self._loop = loop

    async def _block(self) -> None:
        self._core.blocked += 1
        await self._loop.create_future()  # never resolved: this branch waits for the next wake-up

    async def _drive(
        self, key: str, name: str, kind: str, reply: dict[str, Any], fn: Callable[..., Any] | None
    ) -> Any:
        while True:
            action = reply.get("do")
            if action == "run" and fn is not None:
                attempt = int(reply["attempt"])
                outcome = await self._attempt(key, name, attempt, fn)
                reply = self._core.call(outcome)
            elif action == "return":
                return reply.get("value")
            elif action == "raise":
                raise self._core.error(name, kind, reply.get("error") or {})
            elif action == "suspend":
                await self._block()
            else:
                raise RuntimeError(f"unexpected reply from the kernel: {reply!r}")

    def _inline(self, fn: Callable[..., Any]) -> bool:
        """Whether ``fn`` runs on the workflow's own thread: nothing else could run meanwhile (a
        sequential step), so a thread would only add two hand-offs; parallel branches (gather) still
        get a thread each."""
        return not inspect.iscoroutinefunction(fn) and self._loop.alone() and not self._core.unseen

    async def _attempt(self, key: str, name: str, attempt: int, fn: Callable[..., Any]) -> dict[str, Any]:
        value: Any = None
        failure: BaseException | None = None
        try:
            if inspect.iscoroutinefunction(fn):
                value = await _invoke(fn, key, attempt)
            elif self._inline(fn):
                value = _call_inline(fn, key, attempt)
            else:
                value = await self._loop.run_in_executor(None, _call_blocking, fn, key, attempt)
        except Exception as exc:
            failure = exc
        return self._core.outcome(key, name, attempt, value, failure)

    async def do(
        self, name: str, fn: Callable[..., Any], *, retries: Any = None, timeout: Any = None,
        rollback: Callable[..., Any] | None = None, rollback_config: Any = None,
    ) -> Any:  # fmt: skip
        _compose.check_rollback(name, rollback, rollback_config)
        key, entry = self._core.begin(name, "do")
        if self._core.settled(entry):
            return _compose.register(
                self._core, key, rollback, rollback_config, self._core.replay(name, entry)
            )
        if entry is None:
            await self._core.gate(key)
        policy = _policy(name, retries, timeout)
        reply = None
        if entry is None and self._inline(fn):
            reply = self._core.ahead(key, name, policy, fn, _call_inline)
        if reply is None:
            reply = self._core.call({"op": "step", "kind": "do", "key": key, "name": name, "policy": policy})
        value = await self._drive(key, name, "do", reply, fn)
        return _compose.register(self._core, key, rollback, rollback_config, value)

    async def create(
        self, name: str, workflow: str, *, code: str | None = None, params: Any = None, id: str | None = None
    ) -> Any:
        key, entry = self._core.begin(name, "create")
        if self._core.settled(entry):
            return self._core.replay(name, entry)
        if entry is None:
            await self._core.gate(key)
        message = _compose.create_message(key, name, _policy(name, None, None), workflow, code, params, id)
        return await self._drive(key, name, "create", self._core.call(message), None)

    async def wait_for_instance(self, name: str, id: str, *, timeout: Any = None) -> Any:
        key, entry = self._core.begin(name, "wait_instance")
        if self._core.settled(entry):
            return self._core.replay(name, entry)
        if entry is None:
            await self._core.gate(key)
        message = _compose.wait_message(key, name, id, timeout)
        return await self._drive(key, name, "wait_instance", self._core.call(message), None)

    async def sleep(self, name: str, duration: Any) -> None:
        await self._sleep(name, {"seconds": parse_duration(duration)})

    async def sleep_until(self, name: str, when: Any) -> None:
        await self._sleep(name, {"until": _until(when)})

    async def _sleep(self, name: str, when: dict[str, float]) -> None:
        key, entry = self._core.begin(name, "sleep")
        if self._core.settled(entry):
            return
        if entry is None:
            await self._core.gate(key)
        reply = self._core.call({"op": "step", "kind": "sleep", "key": key, "name": name, **when})
        await self._drive(key, name, "sleep", reply, None)

    async def wait_for_event(self, name: str, *, type: str, timeout: Any = None) -> Any:
        _compose.check_event_type(type)
        key, entry = self._core.begin(name, "wait")
        if self._core.settled(entry):
            return _compose.event(self._core.replay(name, entry))
        if entry is None:
            await self._core.gate(key)
        seconds = parse_duration(timeout if timeout is not None else "24 hours")
        reply = self._core.call(
            {"op": "step", "kind": "wait", "key": key, "name": name, "type": type, "seconds": seconds}
        )
        return _compose.event(await self._drive(key, name, "wait", reply, None))


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


def _replay_aware(core: _Core) -> None:
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
        core = _Core(job, transport, loop)
        _replay_aware(core)
        task = loop.run(workflow.run(event, AsyncStep(core, loop)))
        raised = task.exception() if task.done() and not task.cancelled() else None
        if _compose.should_roll_back(core, raised is not None and not isinstance(raised, _Suspend)):
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
        elif isinstance(task.exception(), _Suspend):
            transport.call({"op": "suspend"})
        elif task.exception() is not None:
            transport.call({"op": "finish", "ok": False, "error": error_dict(task.exception())})  # type: ignore[arg-type]
        else:
            _finish(transport, task.result())
        return
    core = _Core(job, transport, None)
    _replay_aware(core)
    try:
        value = workflow.run(event, SyncStep(core))
    except _Suspend:
        value = None
    except _Fatal:
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
