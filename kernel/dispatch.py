"""The dispatch and timer contracts: lease runnable instances (new, timer due, event arrived,
resumed), run them, keep their leases alive. Fairness comes from the storage's round-robin claim."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from tenantflow.kernel import metrics
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.engine import Engine
from tenantflow.kernel.storage import Storage

log = logging.getLogger("tenantflow.dispatch")


class Dispatcher:
    """Claims due instances up to the concurrency limit and runs each wake-up as a task."""

    def __init__(self, storage: Storage, engine: Engine, config: KernelConfig) -> None:
        self._storage = storage
        self._engine = engine
        self._config = config
        self._poke = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self.claimed = 0

    def poke(self) -> None:
        """Something may have become runnable: look now instead of at the next tick."""
        self._poke.set()

    def start(self) -> None:
        self._loops = [
            asyncio.create_task(self._dispatch_loop(), name="tenantflow-dispatch"),
            asyncio.create_task(self._lease_loop(), name="tenantflow-leases"),
        ]

    async def stop(self) -> None:
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        for wake in list(self._engine.active.values()):
            wake.abort("kernel shutting down")
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)

    async def _dispatch_loop(self) -> None:
        while True:
            self._poke.clear()  # before claiming: a poke that arrives meanwhile must not be lost
            try:
                claimed = await self._claim_once()
            except Exception:
                log.exception("claiming runnable instances failed; retrying")
                claimed = 0
            if claimed:
                continue
            timeout = 1.0
            with contextlib.suppress(Exception):
                next_at = await asyncio.to_thread(self._storage.next_run_at)
                # Due work that could not be claimed (slots or tenant caps full) waits for a poke:
                # every wake-up that ends pokes.
                if next_at is not None and next_at > time.time():
                    timeout = min(timeout, next_at - time.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), timeout=max(timeout, 0.005))

    async def _claim_once(self) -> int:
        # Count our own tasks, not engine.active: a task created by the previous claim has not
        # started yet (so is not active) and must still hold its slot.
        free = self._config.max_concurrent_runs - len(self._tasks)
        if free <= 0:
            return 0
        now = time.time()
        started = time.perf_counter()
        records = await asyncio.to_thread(
            self._storage.claim,
            self._config.node_id,
            now,
            self._config.lease_seconds,
            free,
            self._config.max_running_per_tenant,
        )
        metrics.claimed(len(records), time.perf_counter() - started)
        for record in records:
            task = asyncio.create_task(self._engine.execute(record), name=f"wake {record.tenant}/{record.id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self.claimed += len(records)
        return len(records)

    async def _lease_loop(self) -> None:
        interval = self._config.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            keys = list(self._engine.active)
            if not keys:
                continue
            try:
                until = time.time() + self._config.lease_seconds
                lost = await asyncio.to_thread(self._storage.renew_leases, self._config.node_id, keys, until)
            except Exception:
                log.exception("renewing leases failed")
                continue
            for tenant, id in lost:
                self._engine.kill(tenant, id, "the lease on the instance was lost")
