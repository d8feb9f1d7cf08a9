"""Group commit: every state change of every running instance goes through one queue, and each
batch is one storage transaction. Many concurrent instances share a commit, so the aggregate step
rate can exceed the storage's commit rate."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

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
            changes = [change for change, _ in batch]
            try:
                results = await asyncio.to_thread(self._storage.apply, changes)
            except Exception as exc:  # storage failure: every waiter learns it, nothing is acknowledged
                log.exception("commit of %d changes failed", len(changes))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches += 1
            self.changes += len(changes)
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
            self._on_applied(changes)
