"""Spare run processes: forked from the template and moved into their cgroups ahead of the run
that takes them, so neither cost is on a run's critical path.

Moving a process into a cgroup waits for an RCU grace period when no process moved recently:
9-25 ms measured on this project's machines (0.13 ms when moves follow each other closely), which
was most of a cold start and, done on the event loop, capped the kernel at ~110 runs/s. A spare is
confined and limited like any run and blocked reading its job, so no tenant code has run in it; it
is named ``tf-spare`` until a job arrives (then ``tf-run``). A few spares (never more than
``size``, whatever the number of tenants) wait while the kernel is idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from tenantflow.plugins.sandbox_subprocess.cgroups import RunCgroup

log = logging.getLogger("tenantflow.sandbox.subprocess")
SPARES = 2  # spare processes kept per template
# A replacement is forked this long after a spare is taken, not at once: on two cores the fork (the
# template's CPU) competed with the run that just took the spare (P3 python 5-9 -> 3-5 ms from the
# job to the first step).
REFILL_DELAY = 0.02


@dataclasses.dataclass
class Child:
    """A forked run process blocked reading its job, and the kernel's ends of its pipes."""

    pid: int
    sock: socket.socket  # the kernel's end of the job/host-call stream
    output: int  # read end of the child's own stdout/stderr
    cgroup: RunCgroup | None  # its pids and memory cgroups (None where none could be made)
    limits: str  # the fork request's limits: a spare serves only runs with the same ones
    template: Any  # the template process that forked it (a replaced template's spares are dead)
    egress: socket.socket | None = None  # the kernel's end of its egress channel (no network granted)


class SparePool:
    """Up to ``size`` spare children, refilled in the background as runs take them."""

    def __init__(
        self,
        make: Callable[[str], Awaitable[Child]],
        discard: Callable[[Child], None],
        usable: Callable[[Child], bool],
        size: int = SPARES,
    ) -> None:
        self._make, self._discard, self._usable, self._size = make, discard, usable, size
        self._spares: deque[Child] = deque()
        self._filling: asyncio.Task[None] | None = None
        self._closed = False

    def take(self, limits: str) -> Child | None:
        """A spare for a run with ``limits`` (one that died or no longer fits is discarded), and
        start making its replacement."""
        found = None
        while self._spares and found is None:
            spare = self._spares.popleft()
            if spare.limits == limits and self._usable(spare):
                found = spare
            else:
                self._discard(spare)
        asyncio.get_running_loop().call_later(REFILL_DELAY, self.refill, limits)
        return found

    def refill(self, limits: str) -> None:
        if self._closed or self._size <= 0 or (self._filling is not None and not self._filling.done()):
            return
        self._filling = asyncio.create_task(self._fill(limits), name="tenantflow-sandbox-spares")

    async def _fill(self, limits: str) -> None:
        while not self._closed and len(self._spares) < self._size:
            try:
                spare = await self._make(limits)
            except Exception as exc:  # the template is being replaced: the next take tries again
                log.debug("could not make a spare run process (%s)", exc)
                return
            if self._closed:
                self._discard(spare)
                return
            self._spares.append(spare)

    async def close(self) -> None:
        """Stop refilling and discard every spare."""
        self._closed = True
        if self._filling is not None:
            self._filling.cancel()
            with contextlib.suppress(BaseException):
                await self._filling
        while self._spares:
            self._discard(self._spares.popleft())


def close_child_ends(child: Child) -> None:
    """Close the kernel's ends of a child's pipes (once it will never run)."""
    child.sock.close()
    if child.egress is not None:
        child.egress.close()
    with contextlib.suppress(OSError):
        os.close(child.output)
