"""A minimal asyncio event loop for the guest runtime.

Why not the standard loop: it opens a self-pipe socket pair (unavailable under WASI), and the
runtime needs to know when the workflow is *idle* — every branch blocked on a suspended step —
which the standard loop cannot tell. This loop runs ``asyncio.Task``/``Future``/``gather`` as usual
and returns from :meth:`GuestLoop.run` when the main task is done or nothing can make progress.
"""

from __future__ import annotations

import asyncio
import heapq
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from contextvars import Context
from typing import Any, TypeVar

T = TypeVar("T")


class GuestLoop(asyncio.AbstractEventLoop):
    """Runs one workflow coroutine; sync step callbacks run in threads when ``threads`` is true."""

    def __init__(self, threads: bool = True) -> None:
        self._ready: deque[asyncio.Handle] = deque()
        self._timers: list[asyncio.TimerHandle] = []
        self._inbox: queue.SimpleQueue[asyncio.Handle] = queue.SimpleQueue()
        self._threads = threads
        self._in_flight = 0
        self._quiet_waiters: list[asyncio.Future[None]] = []
        self._closed = False
        self._running = False

    # -- scheduling -------------------------------------------------------------------------
    def time(self) -> float:
        return time.monotonic()

    def call_soon(  # type: ignore[override]
        self, callback: Callable[..., object], *args: Any, context: Context | None = None
    ) -> asyncio.Handle:
        handle = asyncio.Handle(callback, args, self, context)
        self._ready.append(handle)
        return handle

    def call_soon_threadsafe(  # type: ignore[override]
        self, callback: Callable[..., object], *args: Any, context: Context | None = None
    ) -> asyncio.Handle:
        handle = asyncio.Handle(callback, args, self, context)
        self._inbox.put(handle)
        return handle

    def call_later(  # type: ignore[override]
        self, delay: float, callback: Callable[..., object], *args: Any, context: Context | None = None
    ) -> asyncio.TimerHandle:
        return self.call_at(self.time() + delay, callback, *args, context=context)

    def call_at(  # type: ignore[override]
        self, when: float, callback: Callable[..., object], *args: Any, context: Context | None = None
    ) -> asyncio.TimerHandle:
        handle = asyncio.TimerHandle(when, callback, args, self, context)
        heapq.heappush(self._timers, handle)
        return handle

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        pass  # cancelled timers are skipped when they come due

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.Future(loop=self)

    def create_task(
        self, coro: Any, *, name: str | None = None, context: Context | None = None
    ) -> asyncio.Task[Any]:
        return asyncio.Task(coro, loop=self, name=name, context=context)

    def run_in_executor(self, executor: Any, func: Callable[..., T], *args: Any) -> asyncio.Future[T]:  # type: ignore[override]
        future: asyncio.Future[T] = self.create_future()
        if not self._threads:
            try:
                future.set_result(func(*args))
            except BaseException as exc:  # noqa: BLE001 - delivered to the awaiting step
                future.set_exception(exc)
            return future

        def settle(ok: bool, value: Any) -> None:
            self._in_flight -= 1
            if future.cancelled():
                return
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

        def work() -> None:
            try:
                result = func(*args)
            except BaseException as exc:  # noqa: BLE001
                self.call_soon_threadsafe(settle, False, exc)
            else:
                self.call_soon_threadsafe(settle, True, result)

        self._in_flight += 1
        threading.Thread(target=work, name="tenantflow-step", daemon=True).start()
        return future

    def alone(self) -> bool:
        """Whether nothing but the running callback could make progress now (no other callback
        ready, no thread or timer pending): a blocking call made now holds nothing else up."""
        return not self._ready and not self._in_flight and all(t.cancelled() for t in self._timers)

    def quiet(self) -> asyncio.Future[None]:
        """A future resolved once no callback is ready to run (only timers or threads pending)."""
        future: asyncio.Future[None] = self.create_future()
        self._quiet_waiters.append(future)
        return future

    # -- running ----------------------------------------------------------------------------
    def run(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run ``coro`` until it is done or the loop goes idle; return its task either way."""
        asyncio.events._set_running_loop(self)
        self._running = True
        try:
            task = self.create_task(coro)
            while not task.done():
                if not self._step():
                    break
            return task
        finally:
            self._running = False
            asyncio.events._set_running_loop(None)

    def _step(self) -> bool:
        """Run one batch of work; return False when nothing can ever make progress."""
        while True:
            try:
                self._ready.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        now = self.time()
        while self._timers and (self._timers[0].cancelled() or self._timers[0].when() <= now):
            timer = heapq.heappop(self._timers)
            if not timer.cancelled():
                self._ready.append(timer)
        if not self._ready and self._quiet_waiters:
            waiters, self._quiet_waiters = self._quiet_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        if self._ready:
            for _ in range(len(self._ready)):
                handle = self._ready.popleft()
                if not handle.cancelled():
                    handle._run()
            return True
        timeout = max(0.0, self._timers[0].when() - now) if self._timers else None
        if self._in_flight:
            try:
                self._ready.append(self._inbox.get(timeout=timeout))
            except queue.Empty:
                pass
            return True
        if timeout is not None:
            time.sleep(timeout)
            return True
        return False

    # -- the rest of the loop interface that asyncio primitives touch --------------------------
    def get_debug(self) -> bool:
        return False

    def is_running(self) -> bool:
        return self._running

    def is_closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        pass  # unretrieved task exceptions surface through the workflow's own result

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        pass
