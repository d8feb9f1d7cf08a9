"""Group commit on real SQLite: one bad change fails alone, the rest of its batch commits."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tenantflow.kernel.committer import Committer
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.model import Change, HistoryEntry, InstanceRecord, Status
from tenantflow.kernel.plugins import Plugins


def test_a_change_storage_refuses_fails_alone(tmp_path: Path) -> None:
    storage = Plugins().storage(f"sqlite:///{tmp_path / 'db.sqlite3'}", KernelConfig(data_dir=tmp_path))
    now = time.time()
    records = [
        InstanceRecord(tenant=t, id="i", workflow="W", code="artifact://t/c@sha256:" + "0" * 64, runtime="python",
                       module="wf", params_json="null", status=Status.RUNNING, created_at=now, updated_at=now)
        for t in ("good", "bad")
    ]  # fmt: skip
    storage.create_instances(records, [HistoryEntry(kind="status", at=now) for _ in records])

    def log(tenant: str, line: str) -> Change:
        return Change(
            tenant=tenant, id="i", now=now, history=[HistoryEntry(kind="log", at=now, message=line)]
        )

    async def main() -> None:
        committer = Committer(storage, lambda changes: None)
        committer.start()
        futures = [committer.submit(log("good", "one")), committer.submit(log("bad", "\ud800")),
                   committer.submit(log("good", "two"))]  # fmt: skip
        await asyncio.wait(futures)
        await committer.stop()
        assert futures[0].result().ok and futures[2].result().ok
        with pytest.raises(UnicodeEncodeError):
            futures[1].result()

    try:
        asyncio.run(main())
        assert [h.message for h in storage.get_history("good", "i", 0, 10) if h.kind == "log"] == [
            "one",
            "two",
        ]
        assert [h.kind for h in storage.get_history("bad", "i", 0, 10)] == ["status"]
    finally:
        storage.close()
