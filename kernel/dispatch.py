"""The dispatch and timer contracts: lease runnable instances (new, timer due, event arrived,
resumed), run them, keep their leases alive. Fairness comes from the storage's round-robin claim.

Several kernel nodes may share one storage. A node renews the leases of the wake-ups it runs every
``lease_renew_interval`` (a quarter of the lease by default), so a node that dies stops renewing
and its instances are claimed by the others once the lease runs out. A node that lost a lease is
fenced: storage refuses every write it makes for that instance (the lease owner guard), its
wake-up is stopped, and it claims nothing until the changes that wake-up had queued are through,
so it can never take the instance back while a stale write of its own is still on its way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor

from tenantflow.kernel import metrics
from tenantflow.kernel.config import KernelConfig, lease_problem
from tenantflow.kernel.executor import Engine
from tenantflow.kernel.model import InstanceRecord
from tenantflow.kernel.storage import Storage
from tenantflow.kernel.wakeup import WakeUp

log = logging.getLogger("tenantflow.dispatch")
# How soon an idle node looks again for work another node made due (an expired lease, a timer set or
# an event sent through another node); its own wake-ups and RPCs poke it at once.
IDLE_POLL_SECONDS = 1.0

Key = tuple[str, str]


class Dispatcher:
    """Claims due instances up to the concurrency limit and runs each wake-up as a task."""

    def __init__(self, storage: Storage, engine: Engine, config: KernelConfig) -> None:
        if problem := lease_problem(config.lease_seconds, config.lease_renew_seconds):
            raise ValueError(problem)
        self._storage = storage
        self._engine = engine
        self._config = config
        self._poke = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._running: dict[Key, asyncio.Task[None]] = {}
        self._leases: dict[Key, float] = {}  # lease expiry this node last secured, per running instance
        self._fenced: set[Key] = set()  # lost leases whose wake-up may still have writes queued
        self._renewing = asyncio.Lock()
        # Renewals never wait behind reads or loads in the shared default thread pool.
        self._renewer = ThreadPoolExecutor(1, thread_name_prefix="tenantflow-leases")
        self._loops: list[asyncio.Task[None]] = []
        self.claimed = 0
        self._claimed_up_to = math.inf  # the due time up to which the last claim looked
        self._starved = True  # the last claim may have left due work unclaimed (no slot, a cap)
        self._next_look = 0.0  # when the dispatch loop claims again by itself (epoch seconds)
        self._reserved_for: dict[str, int] = {}  # slots held per tenant for creates in flight (see reserve)

    def reserve(self, tenant: str, wanted: int) -> int:
        """How many of ``wanted`` new instances of ``tenant`` this node starts as it creates them
        (each then created already leased to it, so no claim is needed: a Create's first step
        starts one transaction sooner). Held as slots until :meth:`adopt` or :meth:`release`; 0 when
        the slots or the tenant's cap are taken, or while lost leases are being drained."""
        if self._fenced or not self._loops:
            return 0
        free = self._config.max_concurrent_runs - len(self._tasks) - self._reserved
        running = sum(1 for key in self._running if key[0] == tenant) + self._reserved_for.get(tenant, 0)
        cap = self._config.tenant_running_cap or wanted + running  # 0: no cap
        granted = max(0, min(wanted, free, cap - running))
        if granted:
            self._reserved_for[tenant] = self._reserved_for.get(tenant, 0) + granted
        return granted

    @property
    def _reserved(self) -> int:
        """Slots held for instances being created leased to this node (few: creates in flight)."""
        return sum(self._reserved_for.values())

    def release(self, tenant: str, count: int) -> None:
        """Give back slots :meth:`reserve` held (the create failed, or fewer were started)."""
        if count <= 0:
            return
        left = self._reserved_for.get(tenant, 0) - count
        if left > 0:
            self._reserved_for[tenant] = left
        else:
            self._reserved_for.pop(tenant, None)

    def adopt(self, records: list[InstanceRecord]) -> None:
        """Run instances just created leased to this node (in the slots :meth:`reserve` held)."""
        for record in records:
            self.release(record.tenant, 1)
            self._run(record, record.lease_until or time.time() + self._config.lease_seconds, fresh=True)
        self.claimed += len(records)
        metrics.started_at_create(len(records))

    def poke(self) -> None:
        """Something may have become runnable: look now instead of at the next tick."""
        self._poke.set()

    def ended(self, quiet_until: float | None) -> None:
        """A wake-up ended: look now if its slot may let due work run (the last claim left some),
        or if what it wrote may be due before this node looks anyway (``quiet_until``, see
        ``Journal.quiet_until``; None: now). Else an empty claim a wake-up is saved: P4 made ~0.4
        claims a wake-up, ~1 ms of a worker thread's time each."""
        if quiet_until is None or self._starved or quiet_until <= self._next_look:
            self._poke.set()

    def start(self) -> None:
        self._loops = [
            asyncio.create_task(self._dispatch_loop(), name="tenantflow-dispatch"),
            asyncio.create_task(self._lease_loop(), name="tenantflow-leases"),
        ]

    async def stop(self) -> bool:
        """Stop claiming and renewing, and stop running wake-ups; False if a lease renewal is still
        inside storage (then storage must not be closed under it: process exit does that)."""
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        for wake in list(self._engine.active.values()):
            wake.abort("kernel shutting down")
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)
        renewer = asyncio.ensure_future(asyncio.to_thread(self._renewer.shutdown, True))
        done, _ = await asyncio.wait({renewer}, timeout=5)
        if not done:
            log.error("a lease renewal is still inside storage after 5 s; leaving storage open")
        return bool(done)

    async def _dispatch_loop(self) -> None:
        while True:
            self._poke.clear()  # before claiming: a poke that arrives meanwhile must not be lost
            next_at: float | None = None
            self._next_look = 0.0  # claiming now: a wake-up that ends meanwhile pokes
            try:
                claimed, next_at = await self._claim_once()
            except Exception:
                log.exception("claiming runnable instances failed; retrying")
                claimed, self._starved = 0, True
            if claimed:
                continue
            timeout = IDLE_POLL_SECONDS
            # Due work that could not be claimed (slots or tenant caps full) waits for a poke:
            # every wake-up that ends then pokes. Work that fell due after the claim looked (a timer
            # due in between) is claimed at once, not at the next idle poll a second later.
            if next_at is not None and next_at > self._claimed_up_to:
                timeout = min(timeout, max(next_at - time.time(), 0.0))
            self._next_look = time.time() + timeout
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), timeout=timeout)

    async def _claim_once(self) -> tuple[int, float | None]:
        """Claim what is due into the free slots: (how many, the next due time when none was
        claimed). Both in one thread hop: most claims after a wake-up ends find nothing."""
        # Count our own tasks, not engine.active: a task created by the previous claim has not
        # started yet (so is not active) and must still hold its slot.
        self._claimed_up_to = math.inf  # nothing claimable is known to be missed until a claim runs
        self._starved = True
        free = self._config.max_concurrent_runs - len(self._tasks) - self._reserved
        if free <= 0:
            return 0, await self._next_run_at()
        now = time.time()
        if not await self._fence(now):
            return 0, await self._next_run_at()
        self._claimed_up_to = now
        started = time.perf_counter()
        records, next_at = await asyncio.to_thread(self._claim_or_next, now, free)
        # Starved: every slot taken (more may be due), or due work left (a tenant's cap).
        self._starved = len(records) >= free or (not records and next_at is not None and next_at <= now)
        metrics.claimed(len(records), time.perf_counter() - started)
        for record in records:
            self._run(record, record.lease_until or now + self._config.lease_seconds)
        self.claimed += len(records)
        return len(records), next_at

    def _claim_or_next(self, now: float, free: int) -> tuple[list[InstanceRecord], float | None]:
        """In a worker thread: the claim, and when it found nothing, the next due time."""
        records = self._storage.claim(
            self._config.node_id, now, self._config.lease_seconds, free, self._config.tenant_running_cap
        )
        if records:
            return records, None
        with contextlib.suppress(Exception):
            return records, self._storage.next_run_at()
        return records, None

    async def _next_run_at(self) -> float | None:
        with contextlib.suppress(Exception):
            return await asyncio.to_thread(self._storage.next_run_at)
        return None

    def _run(self, record: InstanceRecord, lease_until: float, fresh: bool = False) -> None:
        key = (record.tenant, record.id)
        task = asyncio.create_task(
            self._engine.execute(record, fresh), name=f"wake {record.tenant}/{record.id}"
        )
        self._tasks.add(task)
        self._running[key] = task
        self._leases[key] = lease_until

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            if self._running.get(key) is task:
                del self._running[key]
                self._leases.pop(key, None)

        task.add_done_callback(done)

    async def _fence(self, now: float) -> bool:
        """Whether claiming with ``now`` is safe: no wake-up of ours whose lease ``now`` counts as
        expired may still write, or the claim could hand the instance back to this node while the
        old wake-up's writes pass the owner guard. After a stall (a paused process, a frozen event
        loop) leases still ours are renewed first; lost ones are stopped and drained."""
        stale = {k: w for k, w in self._engine.active.items() if self._leases.get(k, now) <= now}
        if stale:
            await self._renew(stale)
        if not self._fenced:
            return True
        if any(key in self._running for key in self._fenced):
            return False  # their wake-ups are stopping; each pokes the dispatcher as it ends
        # The committer applies changes in order: past this barrier, every change the stopped
        # wake-ups queued has been refused.
        await self._engine.committer.barrier()
        self._fenced.clear()
        return True

    async def _renew(self, wakes: dict[Key, WakeUp]) -> None:
        """Extend the leases of ``wakes``; stop every wake-up whose lease another node took over,
        or that an RPC on another node ended, restarted or terminated meanwhile."""
        async with self._renewing:
            started = time.time()
            until = started + self._config.lease_seconds
            loop = asyncio.get_running_loop()
            lost = set(
                await loop.run_in_executor(
                    self._renewer, self._storage.renew_leases, self._config.node_id, list(wakes), until
                )
            )
            if (took := time.time() - started) > self._config.lease_renew_interval:
                log.warning("renewing %d leases took %.1f s (storage busy); at %g s they expire and other "
                            "nodes take the instances over", len(wakes), took, self._config.lease_seconds)  # fmt: skip
            for key, wake in wakes.items():
                if self._engine.active.get(key) is not wake:
                    continue  # ended meanwhile; a new wake-up of the same instance has its own lease
                if key not in lost:
                    self._leases[key] = max(self._leases.get(key, until), until)
                    continue
                if not wake.journal.ended and not wake.journal.aborted:
                    log.info("lost the lease on %s/%s (another node took it, or an RPC ended or "
                             "restarted it); its wake-up stops without writing", *key)  # fmt: skip
                self._fenced.add(key)
                self._leases.pop(key, None)
                wake.abort("the lease on the instance was lost")

    async def _lease_loop(self) -> None:
        interval = self._config.lease_renew_interval
        due = time.monotonic() + interval
        while True:
            await asyncio.sleep(max(due - time.monotonic(), 0))
            late = time.monotonic() - due
            if late > self._config.lease_seconds - interval:
                log.warning("lease renewal ran %.1f s late (the process or its event loop stalled); leases "
                            "may have expired and their instances moved to other nodes", late)  # fmt: skip
            due = max(due + interval, time.monotonic())
            # A wake-up that ended has made (or is making) the commit that releases its lease.
            wakes = {k: w for k, w in self._engine.active.items() if not w.journal.ended}
            if not wakes:
                continue
            try:
                await self._renew(wakes)
            except Exception:
                log.exception("renewing leases failed; retrying in %g s", interval)
