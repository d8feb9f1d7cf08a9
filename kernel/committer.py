"""Group commit: every state change of every running instance goes through one queue, and each
batch is one storage transaction. Many concurrent instances share a commit, so the aggregate step
rate can exceed the storage's commit rate."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from tenantflow.kernel import metrics
from tenantflow.kernel.errors import Conflict
from tenantflow.kernel.model import ApplyResult, Change
from tenantflow.kernel.storage import Storage

log = logging.getLogger("tenantflow.committer")
MAX_BATCH = 512


class Committer:
    """Queues changes and applies them in batches, in order; a change is acknowledged only once durable."""

    def __init__(self, storage: Storage, on_applied: Callable[[list[Change]], None]) -> None:
        self._storage = storage
        self._on_applied = on_applied
        self._queue: asyncio.Queue[tuple[Change, asyncio.Future[ApplyResult]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.changes = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tenantflow-committer")

    async def stop(self) -> None:
        if self._task is not None:
            while not self._queue.empty():
                await asyncio.sleep(0.01)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def submit(self, change: Change) -> asyncio.Future[ApplyResult]:
        """Queue ``change``; the future resolves once it is committed (or its guard failed)."""
        future: asyncio.Future[ApplyResult] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((change, future))
        return future

    async def commit(self, change: Change) -> ApplyResult:
        """Commit ``change`` durably; raise :class:`Conflict` if its guard failed."""
        result = await self.submit(change)
        if not result.ok:
            raise Conflict(result.reason)
        return result

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
            try:
                await self._apply([change for change, _ in batch], [future for _, future in batch])
            except Exception as exc:
                if len(batch) == 1:
                    self._fail(batch, exc)
                    continue
                # One bad change must not fail the others riding in its transaction: retry alone.
                log.warning("commit of %d changes failed (%s); committing them one by one", len(batch), exc)
                for change, future in batch:
                    try:
                        await self._apply([change], [future])
                    except Exception as one:
                        self._fail([(change, future)], one)

    async def _apply(self, changes: list[Change], futures: list[asyncio.Future[ApplyResult]]) -> None:
        started = time.perf_counter()
        results = await asyncio.to_thread(self._storage.apply, changes)
        metrics.committed(len(changes), time.perf_counter() - started)
        self.batches += 1
        self.changes += len(changes)
        for future, result in zip(futures, results, strict=True):
            if not future.done():
                future.set_result(result)
        self._on_applied(changes)

    @staticmethod
    def _fail(batch: list[tuple[Change, asyncio.Future[ApplyResult]]], exc: Exception) -> None:
        """Storage failed: the waiters learn it, nothing is acknowledged."""
        log.error("commit of a change to %s/%s failed: %s", batch[0][0].tenant, batch[0][0].id, exc)
        for _, future in batch:
            if not future.done():
                future.set_exception(exc)
