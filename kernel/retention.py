"""Retention: instances that ended (complete, errored, terminated) are deleted with their journal,
events and history once unchanged for ``retention_seconds``, as Cloudflare Workflows and Temporal
do, so storage does not grow with every run a tenant ever made. ``0`` keeps them forever."""

from __future__ import annotations

import asyncio
import logging
import time

from tenantflow.kernel.storage import Storage

log = logging.getLogger("tenantflow.retention")
BATCH = 1000  # instances per write transaction: short, so running instances' commits interleave


async def purge_forever(storage: Storage, retention_seconds: float) -> None:
    """Purge expired instances now and then every quarter of the retention (at most hourly)."""
    if retention_seconds <= 0:
        return
    interval = min(3600.0, max(0.05, retention_seconds / 4))
    while True:
        try:
            await purge_once(storage, retention_seconds)
        except Exception:
            log.exception("purging expired instances failed; retrying in %g s", interval)
        await asyncio.sleep(interval)


async def purge_once(storage: Storage, retention_seconds: float) -> int:
    """Delete every instance that ended more than ``retention_seconds`` ago; return how many."""
    before = time.time() - retention_seconds
    total = 0
    while True:
        deleted = await asyncio.to_thread(storage.purge_ended, before, BATCH)
        total += deleted
        if deleted < BATCH:
            break
    if total:
        log.info(
            "retention: deleted %d instances that ended over %g days ago", total, retention_seconds / 86400
        )
    return total
