"""Group commit: every state change of every running instance goes through one queue, and each
batch is one storage transaction. Many concurrent instances share a commit, so the aggregate step
rate can exceed the storage's commit rate.

The batches are applied by one writer thread of the committer's own: a change handed over wakes
it at once (no hop through the event loop, no timer), it takes everything queued meanwhile (the
changes that arrived during the previous commit's fsync ride in the next one), and one callback
per batch hands the results back to the loop.

Changes submitted together (:meth:`Committer.commit` with riders: an instance's end and the notice
to its parent) are one unit: a unit is never split across batches, and when a failed batch is
retried piece by piece, it is retried unit by unit, so a unit's changes always share one
transaction. Riders are marked ``after_previous``: storage applies them only if the unit's main
change applied (a child's end refused for a lost lease sends no notice); a rider whose own guard
fails does not fail the others.

A failed batch is retried only when ``Storage.apply`` raised, which means nothing of it applied;
an engine that committed part of a batch reports the rest not ok instead, so nothing applies twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from tenantflow.kernel import metrics
from tenantflow.kernel.errors import Conflict, ResourceExhausted, Unavailable
from tenantflow.kernel.model import ApplyResult, Change
from tenantflow.kernel.storage import Storage
from tenantflow.kernel.tenantkv import KVConflictError

log = logging.getLogger("tenantflow.committer")
MAX_BATCH = 512
STOP_SECONDS = 10.0  # how long stop() waits for the writer thread's last commit

_Item = tuple[Change, "asyncio.Future[ApplyResult]"]
_Unit = list[_Item]  # committed in one transaction, never split
_Settled = tuple["asyncio.Future[ApplyResult]", ApplyResult | None, BaseException | None]


@dataclasses.dataclass(frozen=True)
class _Barrier:
    """A place in the queue: its future resolves once everything queued before it is settled."""

    future: asyncio.Future[None]


class Committer:
    """Queues changes and applies them in batches, in order; a change is acknowledged only once durable."""

    def __init__(self, storage: Storage, on_applied: Callable[[list[Change]], None]) -> None:
        self._storage = storage
        self._on_applied = on_applied
        self._queue: queue.SimpleQueue[_Unit | _Barrier | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unsettled = 0  # changes queued or being applied, counted on the loop
        self._drained: asyncio.Event | None = None
        self._stopping = False  # stop() let the writer thread go: nothing more is accepted
        self.batches = 0
        self.changes = 0
        self.max_batch = MAX_BATCH  # changes per transaction; a unit may pass it, never be split
        self.stop_seconds = STOP_SECONDS

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._drained = asyncio.Event()
        self._drained.set()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="tenantflow-committer", daemon=True)
        self._thread.start()

    async def stop(self) -> bool:
        """Commit what is queued, then end the writer thread; later submits fail at once. Return
        False if the writer is still inside a commit after waiting ``stop_seconds`` for the queue to
        drain and as long again for the thread: the caller must then leave storage open (closing it
        under a live write transaction is unsafe; process exit ends both)."""
        thread = self._thread
        if thread is None:
            return True
        assert self._drained is not None
        with contextlib.suppress(TimeoutError):  # a commit that hangs: the join below reports it
            await asyncio.wait_for(self._drained.wait(), self.stop_seconds)
        self._stopping = True  # the writer ends at the marker, after what is queued before it
        self._queue.put(None)
        await asyncio.to_thread(thread.join, self.stop_seconds)
        self._thread = None
        if thread.is_alive():
            log.error("the committer's writer thread is still committing after %g s; storage is left "
                      "open for the process exit to close", self.stop_seconds)  # fmt: skip
            return False
        return True

    def submit(self, change: Change, riders: Sequence[Change] = ()) -> asyncio.Future[ApplyResult]:
        """Queue ``change``; the future resolves once it is committed (or its guard failed).
        ``riders`` commit in the same transaction, whatever the batching, and only if ``change``
        applies; their results are not awaited (a rider whose guard fails changes nothing else).
        After :meth:`stop` the future fails at once with :class:`Unavailable`."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ApplyResult] = loop.create_future()
        if self._thread is None or self._stopping:
            future.set_exception(
                Unavailable("the kernel is stopping: nothing more is committed; retry on a running kernel")
            )
            return future
        assert self._drained is not None
        if change.after_previous:  # a main change never rides on the unit queued before it
            change = dataclasses.replace(change, after_previous=False)
        unit: _Unit = [(change, future)]
        for rider in riders:
            ignored: asyncio.Future[ApplyResult] = loop.create_future()
            ignored.add_done_callback(_retrieve)
            unit.append((dataclasses.replace(rider, after_previous=True), ignored))
        self._unsettled += len(unit)
        self._drained.clear()
        self._queue.put(unit)
        return future

    async def commit(self, change: Change, riders: Sequence[Change] = ()) -> ApplyResult:
        """Commit ``change`` durably (with ``riders`` in its transaction); raise :class:`Conflict`
        if its guard failed (``ResourceExhausted`` past its key-value quota, ``KVConflictError``
        if its read set no longer held)."""
        result = await self.submit(change, riders)
        if not result.ok:
            if result.kv_refused:  # not a lost race: the tenant's key-value quota
                raise ResourceExhausted(result.kv_refused)
            if result.kv_conflict:  # a race the step's attempt lost, not the instance
                raise KVConflictError(result.kv_conflict)
            raise Conflict(result.reason)
        return result

    async def barrier(self) -> None:
        """Wait until every change queued before this call has been applied or refused: the writer
        takes the queue in order (how a node knows the writes of a stopped wake-up are through)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._thread is None or self._stopping:
            raise Unavailable("the kernel is stopping: nothing more is committed; retry on a running kernel")
        self._queue.put(_Barrier(future))
        await future

    # -- the writer thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            if isinstance(first, _Barrier):
                self._pass(first)
                continue
            units = [first]
            size = len(first)
            stop = False
            barrier: _Barrier | None = None
            while size < self.max_batch:
                try:
                    unit = self._queue.get_nowait()
                except queue.Empty:
                    break
                if unit is None:
                    stop = True
                    break
                if isinstance(unit, _Barrier):
                    barrier = unit
                    break
                units.append(unit)
                size += len(unit)
            self._apply_batch(units)
            if barrier is not None:
                self._pass(barrier)
            if stop:
                return

    def _pass(self, barrier: _Barrier) -> None:
        """Resolve ``barrier`` on the loop, after the results handed back before it."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(_resolve, barrier.future)

    def _apply_batch(self, units: list[_Unit]) -> None:
        batch = [item for unit in units for item in unit]
        changes = [change for change, _ in batch]
        started = time.perf_counter()
        try:
            results = self._storage.apply(changes)
        except Exception as exc:
            if len(units) == 1:
                self._fail(batch, exc)
                return
            # One bad change must not fail the others riding in its transaction: retry each unit alone.
            log.warning("commit of %d changes failed (%s); committing them one by one", len(batch), exc)
            for unit in units:
                self._apply_batch([unit])
            return
        self._hand_back(changes, [(f, r, None) for (_, f), r in zip(batch, results, strict=True)],
                        time.perf_counter() - started)  # fmt: skip

    def _fail(self, batch: list[_Item], exc: Exception) -> None:
        """Storage failed: the waiters learn it, nothing is acknowledged."""
        log.error("commit of a change to %s/%s failed: %s", batch[0][0].tenant, batch[0][0].id, exc)
        self._hand_back([], [(f, None, exc) for _, f in batch], None)

    def _hand_back(self, applied: list[Change], settled: list[_Settled], seconds: float | None) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(self._settle, applied, settled, seconds)

    # -- back on the loop -------------------------------------------------------------------------
    def _settle(self, applied: list[Change], settled: list[_Settled], seconds: float | None) -> None:
        if seconds is not None:
            metrics.committed(len(applied), seconds)
            self.batches += 1
            self.changes += len(applied)
        for future, result, exc in settled:
            if future.done():
                continue
            if exc is not None:
                future.set_exception(exc)
            else:
                assert result is not None
                future.set_result(result)
        self._unsettled -= len(settled)
        try:
            if applied:
                self._on_applied(applied)
        finally:  # a callback that raises must not hang stop()
            if self._unsettled == 0:
                assert self._drained is not None
                self._drained.set()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _retrieve(future: asyncio.Future[ApplyResult]) -> None:
    if not future.cancelled():
        future.exception()  # a rider's failure is its change's own: nobody awaits it
