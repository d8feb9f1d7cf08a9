"""The step driver of an ``async def run``: step calls are awaitables, parallel under ``asyncio.gather``."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from tenantflow.workflow import _compose
from tenantflow.workflow._callbacks import call_blocking, call_inline, invoke
from tenantflow.workflow._durations import parse_duration, until
from tenantflow.workflow._loop import GuestLoop
from tenantflow.workflow._protocol import Core, check_callable, step_policy

T = TypeVar("T")


class AsyncStep:
    """``step`` for an ``async def run``: every call returns an awaitable; use ``asyncio.gather``
    for parallel steps."""

    def __init__(self, core: Core, loop: GuestLoop) -> None:
        self._core = core
        self._loop = loop
        # Every step call's coroutine, to find those run() never awaited (they never ran).
        self.calls: list[tuple[str, Coroutine[Any, Any, Any]]] = []

    def _track(self, name: str, coro: Coroutine[Any, Any, T]) -> Coroutine[Any, Any, T]:
        self.calls.append((name, coro))
        return coro

    def never_awaited(self) -> list[str]:
        """The names of step calls whose awaitable was never awaited (closed now, so Python does
        not warn about them as well)."""
        names = []
        for name, coro in self.calls:
            if inspect.getcoroutinestate(coro) == inspect.CORO_CREATED:
                coro.close()
                names.append(name)
        return names

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
                value = await invoke(fn, key, attempt)
            elif self._inline(fn):
                value = call_inline(fn, key, attempt)
            else:
                value = await self._loop.run_in_executor(None, call_blocking, fn, key, attempt)
        except Exception as exc:
            failure = exc
        return self._core.outcome(key, name, attempt, value, failure)

    def do(
        self, name: str, fn: Callable[..., Any], *, retries: Any = None, timeout: Any = None,
        rollback: Callable[..., Any] | None = None, rollback_config: Any = None,
    ) -> Coroutine[Any, Any, Any]:  # fmt: skip
        check_callable(name, fn)  # at the call, not in an attempt: no retry can fix it
        return self._track(name, self._do(name, fn, retries, timeout, rollback, rollback_config))

    async def _do(
        self, name: str, fn: Callable[..., Any], retries: Any, timeout: Any,
        rollback: Callable[..., Any] | None, rollback_config: Any,
    ) -> Any:  # fmt: skip
        _compose.check_rollback(name, rollback, rollback_config)
        key, entry = self._core.begin(name, "do")
        if self._core.settled(entry):
            return _compose.register(
                self._core, key, rollback, rollback_config, self._core.replay(name, entry)
            )
        if entry is None:
            await self._core.gate(key)
        policy = step_policy(name, retries, timeout)
        reply = None
        if entry is None and self._inline(fn):
            reply = self._core.ahead(key, name, policy, fn, call_inline)
        if reply is None:
            reply = self._core.call({"op": "step", "kind": "do", "key": key, "name": name, "policy": policy})
        value = await self._drive(key, name, "do", reply, fn)
        return _compose.register(self._core, key, rollback, rollback_config, value)

    def create(
        self, name: str, workflow: str, *, code: str | None = None, params: Any = None, id: str | None = None
    ) -> Coroutine[Any, Any, Any]:
        return self._track(name, self._create(name, workflow, code, params, id))

    async def _create(self, name: str, workflow: str, code: str | None, params: Any, id: str | None) -> Any:
        key, entry = self._core.begin(name, "create")
        if self._core.settled(entry):
            return self._core.replay(name, entry)
        if entry is None:
            await self._core.gate(key)
        message = _compose.create_message(
            key, name, step_policy(name, None, None), workflow, code, params, id
        )
        return await self._drive(key, name, "create", self._core.call(message), None)

    def wait_for_instance(self, name: str, id: str, *, timeout: Any = None) -> Coroutine[Any, Any, Any]:
        return self._track(name, self._wait_for_instance(name, id, timeout))

    async def _wait_for_instance(self, name: str, id: str, timeout: Any) -> Any:
        key, entry = self._core.begin(name, "wait_instance")
        if self._core.settled(entry):
            return self._core.replay(name, entry)
        if entry is None:
            await self._core.gate(key)
        message = _compose.wait_message(key, name, id, timeout)
        return await self._drive(key, name, "wait_instance", self._core.call(message), None)

    def sleep(self, name: str, duration: Any) -> Coroutine[Any, Any, None]:
        return self._track(name, self._sleep(name, {"seconds": parse_duration(duration)}))

    def sleep_until(self, name: str, when: Any) -> Coroutine[Any, Any, None]:
        return self._track(name, self._sleep(name, {"until": until(when)}))

    async def _sleep(self, name: str, when: dict[str, float]) -> None:
        key, entry = self._core.begin(name, "sleep")
        if self._core.settled(entry):
            return
        if entry is None:
            await self._core.gate(key)
        reply = self._core.call({"op": "step", "kind": "sleep", "key": key, "name": name, **when})
        await self._drive(key, name, "sleep", reply, None)

    def wait_for_event(self, name: str, *, type: str, timeout: Any = None) -> Coroutine[Any, Any, Any]:
        _compose.check_event_type(type)
        return self._track(name, self._wait_for_event(name, type, timeout))

    async def _wait_for_event(self, name: str, type: str, timeout: Any) -> Any:
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
