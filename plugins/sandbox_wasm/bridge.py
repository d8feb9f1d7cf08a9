"""Runs a guest on a worker thread and carries its host calls to the kernel's event loop.

Wasm calls are blocking (and release the GIL), while the kernel's :class:`Host` is async: each
run gets a worker thread, and every guest request becomes ``host.call(...)`` scheduled on the
kernel's loop, the worker waiting for the reply. Cancelling the run (how the kernel stops a step
past its time-out) stops the guest at its next epoch tick or host call, whichever comes first.

Every message a guest sends is bounded here before the host decodes it: :meth:`Bridge.check_size`
on the length the guest claims (a raw module's pointer and length: before guest memory is copied),
:meth:`Bridge.admit` charges a log line to the kernel's log budgets (dropped lines are never
decoded), and :meth:`Bridge.decode` refuses JSON nested too deep. A message over the limit fails
the run at once.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import logging
import threading
from collections.abc import Callable
from typing import Any, NoReturn

from tenantflow.kernel.sandbox import Host, Limits, RunExit
from tenantflow.plugins.sandbox_wasm.wasmtime_engine import Budget
from tenantflow.plugins.sandboxing import guestmsg

log = logging.getLogger("tenantflow.sandbox.wasm")
STOPPED = "stopped by the kernel (step time-out, pause or termination)"


class GuestStopped(Exception):
    """Raised inside a host call to trap a guest that must not go on."""


class Bridge:
    """One run's link between its guest (on a worker thread) and the kernel's :class:`Host`."""

    def __init__(self, host: Host, loop: asyncio.AbstractEventLoop, limits: Limits) -> None:
        self.host = host
        self.loop = loop
        self.limits = limits
        self.budget = Budget(limits.cpu_seconds, limits.wall_seconds)
        self.ended = False  # the guest reported finish or suspend and got its ack
        self.failure: BaseException | None = None  # what host.call raised, re-raised to the kernel
        # Requests sent whose replies are not read yet, oldest first (see send); the host takes
        # every request in order, one at a time, as from the subprocess sandbox's socket.
        self.unread: collections.deque[concurrent.futures.Future[dict[str, Any]]] = collections.deque()
        self._pending: concurrent.futures.Future[dict[str, Any]] | None = None  # the call waited on
        self._in_order = asyncio.Lock()
        # python-wasm: takes the guest's compiled tenant modules, sent before any tenant code ran,
        # so only as the run's first message (see guest/app.py); the host never sees them.
        self.on_compiled: Callable[[dict[str, Any]], None] | None = None
        self._spoke = False  # the guest sent a message already

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        """``host.call`` from the worker thread; raises :class:`GuestStopped` when the run must end.
        The reply is this message's own, whatever requests :meth:`send` left unread before it."""
        self._spoke = True
        future = self._submit(message)
        self._pending = future
        try:
            reply = self._wait(future)
        finally:
            self._pending = None
        if message.get("op") in ("finish", "suspend"):
            self.ended = True
        return reply

    def send(self, message: dict[str, Any]) -> None:
        """Hand ``message`` to the host without waiting for its reply (:meth:`receive` reads it)."""
        self._spoke = True
        self.unread.append(self._submit(message))
        self.budget.new_step()  # a step running ahead starts its attempt now

    def receive(self) -> dict[str, Any]:
        """The reply to the oldest request :meth:`send` made that is not yet received (blocking)."""
        if not self.unread:
            self.fail("the guest asked for a reply to a request it never sent")
        future = self.unread[0]
        try:
            return self._wait(future)
        finally:
            self.unread.popleft()

    def _submit(self, message: dict[str, Any]) -> concurrent.futures.Future[dict[str, Any]]:
        reason = self.budget.check()
        if reason:
            self.budget.reason = reason
            raise GuestStopped(reason)
        return asyncio.run_coroutine_threadsafe(self._host_call(message), self.loop)

    async def _host_call(self, message: dict[str, Any]) -> dict[str, Any]:
        async with self._in_order:
            return await self.host.call(message)

    def _wait(self, future: concurrent.futures.Future[dict[str, Any]]) -> dict[str, Any]:
        try:
            reply: dict[str, Any] = future.result()
        except BaseException as exc:
            if not isinstance(exc, concurrent.futures.CancelledError):
                self.failure = exc
            self.budget.stop(STOPPED)
            self.budget.reason = self.budget.stop_reason
            raise GuestStopped(self.budget.stop_reason) from None
        self.budget.new_step()
        return reply

    def fail(self, reason: str) -> NoReturn:
        """End the run now with ``reason`` (raised in a host call: the guest traps)."""
        self.budget.stop(reason)
        self.budget.reason = reason
        raise GuestStopped(reason)

    def check_size(self, size: int) -> None:
        """Fail the run if the guest claims a message longer than the run's message limit."""
        if error := guestmsg.too_large(size, self.limits.message_bytes):
            self.fail(str(error))

    def decode(self, data: bytes | str) -> dict[str, Any]:
        """A guest message of a checked size, decoded; a malformed one fails the run."""
        try:
            return guestmsg.decode(data)
        except guestmsg.MessageError as exc:
            self.fail(str(exc))

    def admit(self, size: int) -> bool:
        """Charge a log line of ``size`` bytes to the kernel's log budgets (False: drop it unread);
        a run the kernel is stopping (a log flood) traps here."""
        self.check_size(size)
        if self.host.admit(size):
            return True
        if self.budget.stop_reason:
            self.fail(self.budget.stop_reason)
        return False

    def notify_text(self, data: str) -> None:
        """A guest's JSON notification (python-wasm ``notify``): budgeted, then decoded."""
        first, self._spoke = not self._spoke, True
        if first and self.on_compiled is not None and data.startswith('{"op": "compiled"'):
            self.check_size(_utf8_size(data, self.limits.message_bytes))
            self.on_compiled(self.decode(data))
            return
        if self.admit(_utf8_size(data, self.limits.message_bytes)):
            self.notify(self.decode(data))

    def call_text(self, data: str) -> str:
        """A guest's JSON request (python-wasm ``call``) and the host's JSON reply."""
        self.check_size(_utf8_size(data, self.limits.message_bytes))
        return json.dumps(self.call(self.decode(data)))

    def send_text(self, data: str) -> None:
        """A guest's JSON request whose reply it reads later (python-wasm ``send``)."""
        self.check_size(_utf8_size(data, self.limits.message_bytes))
        self.send(self.decode(data))

    def receive_text(self) -> str:
        """The host's JSON reply to the guest's oldest unread request (python-wasm ``receive``)."""
        return json.dumps(self.receive())

    def notify(self, message: dict[str, Any]) -> None:
        """``host.notify`` without waiting (messages still arrive in order, requests included: a
        line a step running ahead prints comes after its step request)."""
        future = asyncio.run_coroutine_threadsafe(self._host_notify(message), self.loop)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _host_notify(self, message: dict[str, Any]) -> None:
        async with self._in_order:
            await self.host.notify(message)

    def stop(self, reason: str = STOPPED) -> None:
        """From any thread: the guest traps at its next tick; pending host calls are abandoned."""
        self.budget.stop(reason)
        for pending in [self._pending, *self.unread]:
            if pending is not None:
                pending.cancel()


def _utf8_size(text: str, limit: int) -> int:
    """``text``'s UTF-8 length (at least its length in characters: no need to encode a huge one)."""
    return len(text) if len(text) > limit else len(text.encode("utf-8", "surrogatepass"))


_current = threading.local()


def current_bridge() -> Bridge:
    """The bridge of the run on this worker thread (host-call callbacks find their run here)."""
    bridge: Bridge | None = getattr(_current, "bridge", None)
    if bridge is None:
        raise GuestStopped("no run is active on this thread")
    return bridge


def _on_thread(bridge: Bridge, execute: Callable[[Bridge], RunExit]) -> RunExit:
    _current.bridge = bridge
    try:
        return execute(bridge)
    finally:
        _current.bridge = None


async def run_guest(
    pool: concurrent.futures.Executor,
    execute: Callable[[Bridge], RunExit],
    host: Host,
    limits: Limits,
) -> RunExit:
    """Run ``execute(bridge)`` on a worker; on cancellation stop the guest before returning."""
    loop = asyncio.get_running_loop()
    bridge = Bridge(host, loop, limits)
    future = asyncio.wrap_future(pool.submit(_on_thread, bridge, execute))
    try:
        result = await asyncio.shield(future)
    except asyncio.CancelledError:
        bridge.stop()
        done, _ = await asyncio.wait({future}, timeout=2.0)
        if not done:
            log.warning("a wasm guest did not stop within 2 s of cancellation (blocked in a WASI call?)")
        elif not future.cancelled():
            future.exception()  # retrieved: the run is over either way
        raise
    for unread in list(bridge.unread):  # sent before the guest ended: the host finishes it first
        try:
            await asyncio.wrap_future(unread)
        except BaseException as exc:  # noqa: BLE001 - as receive() would have seen it
            if not isinstance(exc, asyncio.CancelledError) and bridge.failure is None:
                bridge.failure = exc
    if bridge.failure is not None:
        raise bridge.failure
    return result


def guest_ended(bridge: Bridge, detail: str) -> RunExit:
    """How a run ended once the guest returned or trapped."""
    if bridge.ended:
        return RunExit(False)
    return RunExit(True, detail)
