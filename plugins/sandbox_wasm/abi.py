"""The raw-module guest ABI, host side: turns a module's simple requests into the step protocol.

A raw module (see ``ABI.md``) asks for steps by name and runs them one at a time; this session
keys them (``name#occurrence``), answers recorded steps from the journal, checks the order against
the journal (a replay that asks for a different step fails with a non-determinism error), and
talks to the kernel's :class:`Host` with exactly the messages the Python guest runtime sends.
Every request is validated; a malformed one is answered with a ``raise``, never trusted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from tenantflow.plugins.sandboxing import guestmsg
from tenantflow.workflow._durations import parse_duration
from tenantflow.workflow._protocol import step_policy

_KINDS = ("do", "sleep", "wait")


class BadRequest(ValueError):
    """A request that breaks the ABI; the guest gets ``{"do": "raise"}`` with this message."""


def _error(raw: Any) -> dict[str, Any]:
    raw = raw if isinstance(raw, dict) else {}
    return {"name": str(raw.get("name") or "Error")[:200], "message": str(raw.get("message") or "")[:4000],
            "retryable": raw.get("retryable", True) is not False}  # fmt: skip


class RawSession:
    """One run of a raw module: ``handle(request bytes) -> reply bytes`` for each guest ``call``."""

    def __init__(self, job: dict[str, Any], call: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.job = job
        self._call = call
        journal = job.get("journal", [])
        self.journal: dict[str, dict[str, Any]] = {e["key"]: e for e in journal}
        self.order = [e["key"] for e in journal]
        self.counts: dict[str, int] = {}
        self.index = 0
        self.flight: tuple[str, str, int] | None = None  # (key, name, attempt) of the running attempt
        self.suspended = False
        self.finished = False
        self.pending = b""  # the reply the guest collects with tenantflow.reply

    # -- the ABI ------------------------------------------------------------------------------
    def handle(self, request: bytes) -> bytes:
        try:
            reply = self._dispatch(guestmsg.decode(request))  # bounded in size by the bridge
        except (BadRequest, ValueError, TypeError, KeyError) as exc:
            reply = {"do": "raise", "error": {"name": "ABIError", "message": str(exc)[:2000]}}
        return json.dumps(reply, separators=(",", ":")).encode()

    def _dispatch(self, m: dict[str, Any]) -> dict[str, Any]:
        op = m.get("op")
        if op == "event":
            return dict(self.job["event"])
        if self.finished or self.suspended:
            return {"do": "suspend" if self.suspended else "exit"}
        if op == "step":
            return self._step(m)
        if op == "result":
            return self._result(m)
        if op == "finish":
            return self._finish(m)
        raise BadRequest(f"unknown op {op!r}: use event, step, result or finish")

    def _step(self, m: dict[str, Any]) -> dict[str, Any]:
        kind, name = m.get("kind"), m.get("name")
        if kind not in _KINDS:
            raise BadRequest(f"step kind must be one of {_KINDS}, got {kind!r}")
        if not isinstance(name, str) or not 0 < len(name) <= 256:
            raise BadRequest("a step name must be a non-empty string of at most 256 characters")
        if self.flight is not None:
            raise BadRequest(f"step {self.flight[1]!r} is still running: report its result first")
        request: dict[str, Any] = {"op": "step", "kind": kind, "name": name}
        if kind == "do":
            request["policy"] = step_policy(name, m.get("retries"), m.get("timeout"))
        elif kind == "sleep":
            request["seconds"] = parse_duration(m.get("seconds", 0))
        else:
            if not isinstance(m.get("type"), str):
                raise BadRequest("a wait step needs an event type string")
            request["type"] = m["type"]
            request["seconds"] = parse_duration(m.get("timeout", 86400))
        occurrence = self.counts.get(name, 0)
        self.counts[name] = occurrence + 1
        key = request["key"] = f"{name}#{occurrence}"
        expected = self.order[self.index] if self.index < len(self.order) else None
        self.index += 1
        if expected is not None and expected != key:
            recorded = self.journal[expected]
            return self._fatal(
                f"the journal recorded step {recorded['name']!r} ({recorded['kind']}) next, but the workflow "
                f"asked for step {name!r}: code outside steps must be deterministic"
            )
        entry = self.journal.get(key)
        if entry is not None and entry.get("kind") != kind:
            return self._fatal(
                f"step {name!r} was recorded as {entry.get('kind')}, but the workflow now asks for {kind}"
            )
        if entry is not None and entry.get("status") == "complete":
            return {"do": "return", "value": entry.get("value")}
        if entry is not None and entry.get("status") == "failed":
            return {"do": "raise", "error": _error(entry.get("error"))}
        return self._answer(key, name, self._call(request))

    def _result(self, m: dict[str, Any]) -> dict[str, Any]:
        if self.flight is None:
            raise BadRequest("no step attempt is running: ask for a step first")
        key, name, attempt = self.flight
        self.flight = None
        request: dict[str, Any] = {"op": "result", "key": key, "name": name, "attempt": attempt}
        if m.get("ok") is True:
            request.update(ok=True, value=_finite(m.get("value")))
        else:
            request.update(ok=False, error=_error(m.get("error")))
        return self._answer(key, name, self._call(request))

    def _finish(self, m: dict[str, Any]) -> dict[str, Any]:
        if m.get("ok") is True:
            request = {"op": "finish", "ok": True, "value": _finite(m.get("value"))}
        else:
            request = {"op": "finish", "ok": False, "error": _error(m.get("error"))}
        self.finished = True
        self._call(request)
        return {"do": "ack"}

    def _answer(self, key: str, name: str, reply: dict[str, Any]) -> dict[str, Any]:
        action = reply.get("do")
        if action == "run":
            self.flight = (key, name, int(reply["attempt"]))
            return {"do": "run", "attempt": self.flight[2]}
        if action == "return":
            return {"do": "return", "value": reply.get("value")}
        if action == "raise":
            return {"do": "raise", "error": _error(reply.get("error"))}
        if action == "suspend":
            self.suspended = True
            return {"do": "suspend"}
        raise BadRequest(f"unexpected reply from the kernel: {reply!r}")

    def _fatal(self, message: str) -> dict[str, Any]:
        self.finished = True
        self._call({"op": "finish", "ok": False, "error": {"name": "NonDeterminismError", "message": message},
                    "fatal": True})  # fmt: skip
        return {"do": "exit"}

    # -- after the workflow function returned --------------------------------------------------
    def complete(self, workflow: str) -> None:
        """Report how the run ended if the module did not (suspend, or an error)."""
        if self.finished:
            return
        if self.suspended:
            self._call({"op": "suspend"})
            return
        running = f" while step {self.flight[1]!r} was running" if self.flight else ""
        error = {"name": "ABIError",
                 "message": f"workflow_{workflow} returned{running} without reporting finish"}  # fmt: skip
        self.finished = True
        self._call({"op": "finish", "ok": False, "error": error})


def _finite(value: Any) -> Any:
    """Reject NaN/Infinity, which are not JSON."""
    json.dumps(value, allow_nan=False)
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRequest("values must be finite JSON")
    return value
