"""Warm runners: a run process kept after its wake-up ended, for the same tenant's next wake-up of
the same code version, instead of forking a new one (the fork, its copy-on-write faults and its
exit were most of a returning tenant's wake-up: ~5 of 6 ms of sandbox CPU).

What holds per wake-up, reused or not: one wake-up at a time (a runner is out of the pool while it
serves one); the per-step CPU watchdog, the wake-up's wall limit and its log budget are the new
wake-up's own; its memory and pids cgroups and rlimits are the process's, so a runner is kept only
while it stays well inside them (``MAX_RSS_SHARE`` of its memory limit, ``MAX_CPU_SHARE`` of its
CPU backstop, ``MAX_USES`` wake-ups). It is never shared across tenants or code versions (the pool
is keyed by both, and the limits), never kept after a wake-up that had a workspace (an instance's
Landlock grant cannot be given back) or made a network connection, and never when the guest does
not say, after the wake-up, that it is back to one thread and the descriptors it started with
(``warm_guest``, which also drops everything of the wake-up). The kernel checks what it can see
itself (threads, CPU, resident memory) when it parks a runner, and every second while it is
parked: a runner that used CPU while parked, or died, is killed.
Idle runners go after ``idle_seconds``; at most ``size`` are kept, the least recently used go first.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from tenantflow.plugins.sandbox_subprocess.spares import Child

log = logging.getLogger("tenantflow.sandbox.subprocess")
MAX_USES = 256  # wake-ups one process serves
MAX_RSS_SHARE = 0.25  # of the run's memory limit a parked runner may hold resident
MAX_RSS_BYTES = 128 * 1024 * 1024
MAX_CPU_SHARE = 0.25  # of the run's RLIMIT_CPU backstop a runner may have used (it is cumulative)
MAX_CPU_SECONDS = 10.0
PER_KEY = 4  # idle runners kept for one tenant's code version
SEEN_KEYS = 4096  # recent wake-ups' keys remembered (see ``WarmPool.wanted``)
SWEEP_SECONDS = 1.0
_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")

Key = tuple[str, str, str]  # tenant, pinned code ref, the run's limits


@dataclasses.dataclass
class WarmRunner:
    """A run process between two wake-ups of one tenant's code, and the kernel's ends of it."""

    key: Key
    child: Child
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    exited: asyncio.Future[int]  # its exit status, from the template
    uses: int = 0  # wake-ups served
    cpu: float = 0.0  # its CPU seconds when parked
    parked: float = 0.0  # monotonic time it was parked


@dataclasses.dataclass(frozen=True)
class Usage:
    """What the kernel sees of a run process in /proc."""

    cpu: float
    threads: int
    resident: int


def usage(pid: int) -> Usage | None:
    """CPU seconds, threads and resident bytes of ``pid`` (None once it is gone)."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
        try:
            fields = os.read(fd, 4096).rsplit(b")", 1)[1].split()
        finally:
            os.close(fd)
    except (OSError, IndexError):
        return None
    return Usage((int(fields[11]) + int(fields[12])) / _TICKS, int(fields[17]), int(fields[21]) * _PAGE)


def keepable(seen: Usage | None, memory_bytes: int, cpu_backstop: float) -> str:
    """Why a runner that ended a wake-up must not serve another, or ""."""
    if seen is None:
        return "it exited"
    if seen.threads != 1:
        return f"{seen.threads} threads"
    if seen.resident > min(MAX_RSS_BYTES, memory_bytes * MAX_RSS_SHARE):
        return f"{seen.resident >> 20} MiB resident"
    if seen.cpu > min(MAX_CPU_SECONDS, cpu_backstop * MAX_CPU_SHARE):
        return f"{seen.cpu:.1f} s of CPU used"
    return ""


class WarmPool:
    """Idle runners by key, least recently parked first out when the pool is full."""

    def __init__(self, size: int, idle_seconds: float, retire: Callable[[WarmRunner], None]) -> None:
        self.size, self.idle_seconds, self._retire = size, idle_seconds, retire
        self._idle: OrderedDict[Key, deque[WarmRunner]] = OrderedDict()
        self._count = 0
        self._sweeper: asyncio.Task[None] | None = None
        # Keys woken recently: once the pool is full, only a key seen before gets its runner parked,
        # so a stream of tenants that wake once each does not push out the runners of those that return.
        self._seen: OrderedDict[Key, None] = OrderedDict()
        self.hits = self.misses = 0  # wake-ups that found a runner, and that did not

    def __len__(self) -> int:
        return self._count

    def wanted(self, key: Key) -> bool:
        """Whether a runner of ``key`` is worth parking after this wake-up: while the pool has
        room, or when ``key`` woke recently. Notes this wake-up."""
        seen = key in self._seen or self._count < self.size
        self._seen[key] = None
        self._seen.move_to_end(key)
        while len(self._seen) > max(SEEN_KEYS, 4 * self.size):
            self._seen.popitem(last=False)
        return seen

    def take(self, key: Key) -> WarmRunner | None:
        """An idle runner for ``key`` that is still as it was parked, or None."""
        runners = self._idle.get(key)
        while runners:
            runner = runners.pop()
            self._count -= 1
            if not runners:
                del self._idle[key]
            if runner.exited.done():  # what it did while parked is the sweep's to see (within a second)
                self._retire(runner)
                continue
            self.hits += 1
            return runner
        self.misses += 1
        return None

    def park(self, runner: WarmRunner) -> None:
        """Keep ``runner`` for its key's next wake-up (or retire it, when there is no room)."""
        if self.size <= 0 or runner.uses >= MAX_USES:
            self._retire(runner)
            return
        runners = self._idle.setdefault(runner.key, deque())
        self._idle.move_to_end(runner.key)
        runners.append(runner)
        self._count += 1
        if len(runners) > PER_KEY:
            self._drop(runner.key, runners.popleft())
        while self._count > self.size:
            oldest_key, oldest = next(iter(self._idle.items()))
            self._drop(oldest_key, oldest.popleft())
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep(), name="tenantflow-warm-runners")

    def _drop(self, key: Key, runner: WarmRunner) -> None:
        self._count -= 1
        if not self._idle.get(key):
            self._idle.pop(key, None)
        self._retire(runner)

    async def _sweep(self) -> None:
        """Retire runners idle too long, or that died or worked while parked."""
        while self._count:
            await asyncio.sleep(SWEEP_SECONDS)
            now = time.monotonic()
            for key in list(self._idle):
                runners = self._idle[key]
                for runner in list(runners):
                    seen = usage(runner.child.pid)
                    stale = now - runner.parked > self.idle_seconds
                    if stale or seen is None or seen.cpu > runner.cpu + 0.02 or runner.exited.done():
                        runners.remove(runner)
                        self._drop(key, runner)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(BaseException):
                await self._sweeper
        for key in list(self._idle):
            for runner in self._idle.pop(key):
                self._retire(runner)
        self._count = 0
