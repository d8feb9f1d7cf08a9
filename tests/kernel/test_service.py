"""The kernel facade's own parts, in process."""

from __future__ import annotations

import asyncio

from tenantflow.kernel.model import Change
from tenantflow.kernel.service import Notifier


def test_watch_notifier_wakes_every_watcher_and_forgets_finished_ones() -> None:
    async def main() -> None:
        notifier = Notifier()
        watchers = [asyncio.create_task(notifier.wait("t", "i", timeout=5)) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert len(notifier) == 1
        notifier.touch([Change(tenant="t", id="i")])
        await asyncio.wait_for(asyncio.gather(*watchers), 1)  # all woken, none left to its time-out
        await notifier.wait("t", "other", timeout=0.01)
        assert len(notifier) == 0

    asyncio.run(main())
