"""The step driver of a plain ``def run``: every step call blocks until the kernel settles it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tenantflow.workflow import _compose
from tenantflow.workflow._callbacks import call_blocking
from tenantflow.workflow._durations import parse_duration, until
from tenantflow.workflow._protocol import Core, Suspend, check_callable, step_policy


class SyncStep:
    """``step`` for a plain ``def run``: every call blocks and returns the value."""

    def __init__(self, core: Core) -> None:
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
                    value = call_blocking(fn, key, attempt)
                except Exception as exc:
                    failure = exc
                reply = self._core.call(self._core.outcome(key, name, attempt, value, failure))
            elif action == "return":
                return reply.get("value")
            elif action == "raise":
                raise self._core.error(name, kind, reply.get("error") or {})
            elif action == "suspend":
                self._core.suspended = True
                raise Suspend()
            else:
                raise RuntimeError(f"unexpected reply from the kernel: {reply!r}")

    def do(
        self, name: str, fn: Callable[..., Any], *, retries: Any = None, timeout: Any = None,
        rollback: Callable[..., Any] | None = None, rollback_config: Any = None,
    ) -> Any:  # fmt: skip
        check_callable(name, fn)  # at the call, not in an attempt: no retry can fix it
        _compose.check_rollback(name, rollback, rollback_config)
        key, entry = self._core.begin(name, "do")
        if self._core.settled(entry):
            return _compose.register(
                self._core, key, rollback, rollback_config, self._core.replay(name, entry)
            )
        policy = step_policy(name, retries, timeout)
        reply = (
            self._core.ahead(key, name, policy, fn, call_blocking) if entry is None else None
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
        message = _compose.create_message(
            key, name, step_policy(name, None, None), workflow, code, params, id
        )
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
        self._sleep(name, {"until": until(when)})

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
