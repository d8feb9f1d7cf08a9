"""The engine: runs wake-ups and tracks which are active in this process.

The work is split along the step contract: :mod:`~tenantflow.kernel.wakeup` runs one wake-up (the
sandbox, deadlines, commits), :mod:`~tenantflow.kernel.stepkinds` decides ``do``/``sleep``/``wait``/
``finish``/``suspend``, :mod:`~tenantflow.kernel.children` and :mod:`~tenantflow.kernel.rollback`
the child and rollback step kinds, :mod:`~tenantflow.kernel.guestdata` validates guest values.
This module only starts wake-ups and lets control RPCs reach the active ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from tenantflow.kernel import children, metrics
from tenantflow.kernel.code import CodeCatalog
from tenantflow.kernel.committer import Committer
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.logbudget import TenantLogRate
from tenantflow.kernel.model import InstanceRecord
from tenantflow.kernel.storage import Storage
from tenantflow.kernel.wakeup import WakeUp, _Abort

__all__ = ["Engine", "WakeUp"]
log = logging.getLogger("tenantflow.engine")


class Engine:
    """Runs wake-ups; tracks which are active in this process so control RPCs can reach them."""

    def __init__(
        self,
        storage: Storage,
        committer: Committer,
        catalog: CodeCatalog,
        config: KernelConfig,
        on_idle: Callable[[], None] = lambda: None,
    ) -> None:
        self.storage = storage
        self.committer = committer
        self.catalog = catalog
        self.config = config
        self.active: dict[tuple[str, str], WakeUp] = {}
        self._on_idle = on_idle
        self.log_rate = TenantLogRate(config.tenant_log_lines_per_second, config.tenant_log_bytes_per_second)
        self.spawn: children.Spawn | None = None  # step.create's way to the kernel's create (set by it)

    async def execute(self, record: InstanceRecord, fresh: bool = False) -> None:
        """Run one wake-up of ``record`` (``fresh``: created just now by this node, so it has no steps)."""
        key = (record.tenant, record.id)
        wake = WakeUp(self, record, fresh)
        self.active[key] = wake
        try:
            with metrics.wakeup(wake):
                await wake.execute()
        except _Abort:
            pass
        except Exception:
            log.exception("wake-up of %s/%s failed", record.tenant, record.id)
        finally:
            if self.active.get(key) is wake:
                del self.active[key]
            self._on_idle()

    def kill(self, tenant: str, id: str, reason: str) -> None:
        wake = self.active.get((tenant, id))
        if wake is not None:
            wake.abort(reason)

    def request_pause(self, tenant: str, id: str, pause: bool = True) -> None:
        wake = self.active.get((tenant, id))
        if wake is not None:
            wake.pause_requested = pause
