"""The step protocol's guest side: the core that keys steps, checks them against the journal and
talks to the kernel, shared by the sync and async step drivers.

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
and ``receive`` apart (the subprocess sandbox's socket, python-wasm's ``send``/``receive`` imports), a
new ``do`` step's first attempt need not wait for the kernel's ``run``. The runtime sends the step
request with ``"ahead": true``, calls the callback at once, sends its ``result``, and only then reads
both replies, in order: ``run`` (attempt 1, which the kernel always grants a new step asked for this
way, a pending pause included) and the answer to the result. A reply with ``"ahead": false`` (a
pause is pending) stops running ahead for the rest of the wake-up. A step then costs one round trip
instead of two, and the kernel still learns of the attempt when it starts (its time-out runs from
there). Only where nothing else can send meanwhile: sync workflows, and async ones whose callback
runs inline (a sequential step, not a rollback).

Keys are ``"<name>#<occurrence>"``. Durations are seconds; ``until`` is epoch seconds.
"""

from __future__ import annotations

import inspect
import json
import traceback
from collections.abc import Callable
from typing import Any, Protocol, TypeGuard

from tenantflow.workflow import _compose, _tools
from tenantflow.workflow._api import EventTimeoutError, NonRetryableError, StepError
from tenantflow.workflow._durations import parse_duration
from tenantflow.workflow._loop import GuestLoop
from tenantflow.workflow._modules import TENANT_FILES

MAX_VALUE_BYTES = 1024 * 1024
MAX_TRACEBACK_BYTES = 4096
_BACKOFFS = ("constant", "linear", "exponential")


class Transport(Protocol):
    """How the runtime talks to the kernel: ``call`` waits for a reply, ``notify`` does not."""

    def call(self, message: dict[str, Any]) -> dict[str, Any]: ...

    def notify(self, message: dict[str, Any]) -> None: ...


class Suspend(BaseException):
    """Unwinds a sync workflow whose current step must wait (not catchable by ``except Exception``)."""


class Fatal(BaseException):
    """Unwinds a workflow that broke the determinism contract."""


def error_dict(exc: BaseException, *, with_traceback: bool = True) -> dict[str, Any]:
    """Describe an exception for the kernel."""
    # Bounded like the kernel keeps it, so a huge message never exceeds the kernel's message limit.
    info: dict[str, Any] = {"name": type(exc).__name__[:200], "message": str(exc)[:16384]}
    if with_traceback:
        info["traceback"] = tenant_traceback(exc)
    return info


def tenant_traceback(exc: BaseException) -> str:
    """Where the tenant's code raised ``exc``: only the frames of the tenant's own files, most
    recent call last, at most 4 KiB (the oldest frames go first); empty if none of its frames is
    the tenant's (the SDK raised it)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename in TENANT_FILES]
    if not frames:
        return ""
    head = "Traceback (most recent call last):\n"
    tail = "".join(traceback.format_exception_only(exc))
    if len(tail) > 1024:  # a huge message: the kernel keeps it whole in Error.message
        tail = tail[:1020] + "...\n"
    lines = traceback.format_list(frames)
    text = head + "".join(lines) + tail
    while len(text.encode("utf-8", "surrogatepass")) > MAX_TRACEBACK_BYTES and len(lines) > 1:
        lines = lines[1:]
        text = head + "  ...\n" + "".join(lines) + tail
    return text.encode("utf-8", "surrogatepass")[:MAX_TRACEBACK_BYTES].decode("utf-8", "ignore")


# -- the step core shared by sync and async workflows ----------------------------------------
class Core:
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
        self.grant_pending = False  # running ahead: the kernel's grant of the attempt is unread
        self.grant: dict[str, Any] | None = None  # ... read early by a ctx.kv or ctx.secrets read
        _tools.bind(_tools.Tools(self.ask, job.get("kv_limits")))

    def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        """A read of ``ctx.kv`` or ``ctx.secrets``. Replies come in order: while an attempt runs
        ahead, the grant of its step comes first, and is kept for :meth:`ahead`."""
        if self.grant_pending:
            self.grant_pending = False
            self.transport.send(message)  # type: ignore[attr-defined]
            self.grant = self.transport.receive()  # type: ignore[attr-defined]
            return self.transport.receive()  # type: ignore[attr-defined,no-any-return]
        return self.transport.call(message)

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        if self.suspended and self.loop is None:
            raise Suspend()
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
        self.grant_pending, self.grant = True, None
        try:
            value = call(fn, key, 1)
        except Exception as exc:
            failure = exc
        finally:
            self.grant_pending = False
        send(self.outcome(key, name, 1, value, failure))
        granted = self.grant if self.grant is not None else receive()
        self.grant = None
        if granted.get("do") != "run" or granted.get("attempt") != 1:
            raise RuntimeError(f"the kernel did not grant a step run ahead: {granted!r}")
        return self._heed(receive())

    def fail(self, message: str) -> Fatal:
        self.fatal = {"name": "NonDeterminismError", "message": message}
        return Fatal(message)

    def begin(self, name: str, kind: str) -> tuple[str, dict[str, Any] | None]:
        """Key the step call by (name, occurrence) and check it against the journal."""
        if self.fatal:
            raise Fatal(self.fatal["message"])
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
        writes = _tools.end(key, attempt)  # an attempt that failed writes nothing
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
        if writes:
            message["kv"] = writes
        return message


def check_callable(name: str, fn: Any) -> None:
    """``TypeError`` at the ``step.do`` call for a ``fn`` no attempt could call: it fails the run at
    once instead of being retried with back-off."""
    if callable(fn):
        return
    if inspect.isawaitable(fn):
        if inspect.iscoroutine(fn):
            fn.close()  # it never runs: Python would warn that it was never awaited
        raise TypeError(
            f"step {name!r}: step.do needs a function to call, got {type(fn).__name__} (the result of "
            f"calling one?): pass the function itself, e.g. step.do({name!r}, fetch) or "
            f"step.do({name!r}, lambda: fetch(url))"
        )
    raise TypeError(f"step {name!r}: step.do needs a function to call, got {type(fn).__name__}")


def step_policy(name: str, retries: dict[str, Any] | None, timeout: Any) -> dict[str, Any]:
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
