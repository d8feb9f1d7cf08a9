"""Group commit on real SQLite: one bad change fails alone, the rest of its batch commits."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from tenantflow.kernel import journal
from tenantflow.kernel.committer import Committer
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.errors import Conflict, Unavailable
from tenantflow.kernel.model import ApplyResult, Change, HistoryEntry, InstanceRecord, Status
from tenantflow.kernel.plugins import Plugins
from tenantflow.kernel.storage import Storage


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


def sqlite_storage(tmp_path: Path) -> Storage:
    storage = Plugins().storage(f"sqlite:///{tmp_path / 'db.sqlite3'}", KernelConfig(data_dir=tmp_path))
    now = time.time()
    storage.create_instances(
        [InstanceRecord(tenant="t", id=id, workflow="W", code="artifact://t/c@sha256:" + "0" * 64,
                        runtime="python", module="wf", params_json="null", status=Status.RUNNING,
                        created_at=now, updated_at=now, lease_owner="node-b", lease_until=now + 60)
         for id in ("child", "parent")],
        [HistoryEntry(kind="status", at=now)] * 2,
    )  # fmt: skip
    return storage


def test_a_refused_end_sends_no_notice_to_the_parent(tmp_path: Path) -> None:
    storage = sqlite_storage(tmp_path)
    child = storage.get_instance("t", "child")
    assert child is not None
    child.parent = "parent"
    end = Change(tenant="t", id="child", owner="node-a", now=time.time(), set={"status": Status.COMPLETE})

    async def main() -> None:
        committer = Committer(storage, lambda changes: None)
        committer.start()
        notice = journal.parent_notice(child, Status.COMPLETE, time.time())
        assert notice is not None and not notice.after_previous  # the committer makes it a rider
        with pytest.raises(Conflict, match="lease"):  # node-b took the lease meanwhile
            await committer.commit(end, [notice])
        ended = dataclasses.replace(end, owner="node-b")
        await committer.commit(ended, [notice])
        await committer.stop()

    try:
        asyncio.run(main())
        events = storage.get_events("t", "parent", unconsumed_only=True)
        assert [e.type for e in events] == [journal.CHILD_EVENT + "child"]  # once: the end that applied
    finally:
        storage.close()


def test_a_submit_after_stop_fails_at_once(tmp_path: Path) -> None:
    storage = sqlite_storage(tmp_path)

    async def main() -> None:
        committer = Committer(storage, lambda changes: None)
        committer.start()
        await committer.commit(Change(tenant="t", id="parent", now=1.0))
        assert await committer.stop()
        with pytest.raises(Unavailable, match="stopping"):
            await asyncio.wait_for(committer.submit(Change(tenant="t", id="parent", now=2.0)), 5)

    try:
        asyncio.run(main())
    finally:
        storage.close()


def test_a_raising_callback_does_not_hang_stop(tmp_path: Path) -> None:
    storage = sqlite_storage(tmp_path)

    def broken(changes: list[Change]) -> None:
        raise RuntimeError("callback bug")

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: None)
        committer = Committer(storage, broken)
        committer.stop_seconds = 600  # a drain that never ends would hang the wait_for below
        committer.start()
        assert (await committer.commit(Change(tenant="t", id="parent", now=1.0))).ok
        assert await asyncio.wait_for(committer.stop(), 30)

    try:
        asyncio.run(main())
    finally:
        storage.close()


class GatedStorage:
    """Real SQLite whose ``apply`` waits for a gate: a commit that outlives the committer's stop."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.gate = threading.Event()

    def apply(self, changes: Sequence[Change]) -> list[ApplyResult]:
        self.gate.wait(30)
        return self.inner.apply(changes)


def test_a_writer_still_committing_after_the_join_is_reported_not_closed_under(tmp_path: Path) -> None:
    storage = GatedStorage(sqlite_storage(tmp_path))

    async def main() -> None:
        committer = Committer(storage, lambda changes: None)  # type: ignore[arg-type]
        committer.stop_seconds = 0.2
        committer.start()
        future = committer.submit(Change(tenant="t", id="parent", now=1.0))  # its commit hangs
        assert not await committer.stop()  # still inside apply: the caller must not close storage
        storage.gate.set()
        assert (await asyncio.wait_for(future, 30)).ok  # the late commit still reaches its waiter

    try:
        asyncio.run(main())
    finally:
        storage.inner.close()
