"""The engine: runs wake-ups and tracks which are active in this process.

The work is split along the step contract: :mod:`~tenantflow.kernel.wakeup` runs one wake-up (the
sandbox conversation and its deadlines), the step kinds (:mod:`~tenantflow.kernel.stepkinds`,
:mod:`~tenantflow.kernel.children`, :mod:`~tenantflow.kernel.rollback`) decide each guest request
against the instance's :class:`~tenantflow.kernel.journal.Journal`, which commits.
This module only starts wake-ups and lets control RPCs reach the active ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from tenantflow.kernel import metrics
from tenantflow.kernel.code import CodeCatalog
from tenantflow.kernel.committer import Committer
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.journal import Spawn, Stop
from tenantflow.kernel.logbudget import TenantLogRate
from tenantflow.kernel.model import InstanceRecord
from tenantflow.kernel.storage import Storage
from tenantflow.kernel.wakeup import WakeUp

log = logging.getLogger("tenantflow.engine")


class Engine:
    """Runs wake-ups; tracks which are active in this process so control RPCs can reach them."""

    def __init__(
        self,
        storage: Storage,
        committer: Committer,
        catalog: CodeCatalog,
        config: KernelConfig,
        spawn: Spawn,
        on_idle: Callable[[float | None], None] = lambda quiet_until: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.storage = storage
        self.committer = committer
        self.catalog = catalog
        self.config = config
        self.active: dict[tuple[str, str], WakeUp] = {}
        self._on_idle = on_idle
        self.log_rate = TenantLogRate(config.tenant_log_lines_per_second, config.tenant_log_bytes_per_second)
        self._spawn = spawn  # step.create's way to the kernel's create path
        self._clock = clock  # the step kinds' time (a local run skips it ahead)

    async def execute(self, record: InstanceRecord, fresh: bool = False) -> None:
        """Run one wake-up of ``record`` (``fresh``: created just now by this node, so it has no steps)."""
        key = (record.tenant, record.id)
        wake = WakeUp(record, config=self.config, storage=self.storage, committer=self.committer,
                      catalog=self.catalog, log_rate=self.log_rate, spawn=self._spawn, fresh=fresh,
                      clock=self._clock)  # fmt: skip
        self.active[key] = wake
        try:
            with metrics.wakeup(wake.journal):
                await wake.execute()
        except Stop:
            pass
        except Exception:
            log.exception("wake-up of %s/%s failed", record.tenant, record.id)
        finally:
            if self.active.get(key) is wake:
                del self.active[key]
            self._on_idle(wake.journal.quiet_until)  # a slot is free, and maybe work due

    def kill(self, tenant: str, id: str, reason: str) -> None:
        wake = self.active.get((tenant, id))
        if wake is not None:
            wake.abort(reason)

    def request_pause(self, tenant: str, id: str, pause: bool = True) -> None:
        wake = self.active.get((tenant, id))
        if wake is not None:
            wake.journal.pause_requested = pause
