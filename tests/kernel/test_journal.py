"""The step kinds driven against a Journal over real SQLite, without a sandbox or a running kernel."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tenantflow.kernel import children, stepkinds
from tenantflow.kernel.committer import Committer
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.journal import CHILD_EVENT, Journal, parent_notice
from tenantflow.kernel.model import Change, EventRecord, HistoryEntry, InstanceRecord, Status
from tenantflow.kernel.plugins import Plugins

CODE = "artifact://t/c@sha256:" + "0" * 64


async def _no_children(*_: object) -> InstanceRecord:
    raise AssertionError("these tests start no child")


def _store(tmp_path: Path, config: KernelConfig) -> tuple[object, InstanceRecord]:
    """A real SQLite store with a parent leased to this node and its child, ended with its notice sent."""
    storage = Plugins().storage(f"sqlite:///{tmp_path / 'db.sqlite3'}", config)
    now = time.time()

    def record(id: str, status: Status, parent: str = "") -> InstanceRecord:
        return InstanceRecord(tenant="t", id=id, workflow="W", code=CODE, runtime="python", module="wf",
                              params_json="null", status=status, created_at=now, updated_at=now, parent=parent,
                              lease_owner=config.node_id, lease_until=now + 600)  # fmt: skip

    parent, child = record("parent", Status.RUNNING), record("child", Status.RUNNING, "parent")
    storage.create_instances([parent, child], [HistoryEntry(kind="status", at=now)] * 2)  # type: ignore[attr-defined]
    end = Change(tenant="t", id="child", now=now, set={"status": Status.COMPLETE, "output_json": '"done"'})
    notice = parent_notice(child, Status.COMPLETE, now)
    assert notice is not None
    results = storage.apply([end, notice])  # type: ignore[attr-defined]
    assert all(r.ok for r in results), results
    return storage, parent


def test_two_parallel_waits_on_one_child_never_take_one_notice(tmp_path: Path) -> None:
    """Both waits read the child's one notice before either commits; the journal gives it to one of
    them, so the other's commit does not try to consume it again (which storage would refuse, and the
    run would stop as if its lease were lost)."""
    config = KernelConfig(data_dir=tmp_path)
    storage, parent = _store(tmp_path, config)

    async def main() -> list[dict[str, object]]:
        committer = Committer(storage, lambda _: None)  # type: ignore[arg-type]
        committer.start()
        try:
            journal = Journal(parent, config, storage, committer, _no_children)  # type: ignore[arg-type]
            await journal.load()
            a = journal.new_step("a#0", "a", "wait_instance")
            b = journal.new_step("b#0", "b", "wait_instance")
            m = {"id": "child", "seconds": 60}
            answers = await asyncio.gather(children.wait(journal, a, m), children.wait(journal, b, m))
            assert not journal.aborted
            return list(answers)
        finally:
            await committer.stop()

    try:
        answers = asyncio.run(main())
        assert answers == [{"do": "return", "value": "done"}] * 2
        steps = {s.key: s for s in storage.get_steps("t", "parent")}  # type: ignore[attr-defined]
        assert steps["a#0"].status == steps["b#0"].status == "complete"
        assert storage.get_events("t", "parent", unconsumed_only=True) == []  # type: ignore[attr-defined]
    finally:
        storage.close()  # type: ignore[attr-defined]


def test_a_wait_takes_the_oldest_event_of_its_type_and_two_waits_take_two(tmp_path: Path) -> None:
    config = KernelConfig(data_dir=tmp_path)
    storage, parent = _store(tmp_path, config)
    now = time.time()
    events = [EventRecord(seq=0, type=t, payload_json=p, created_at=now) for t, p in
              [("other", "0"), ("go", "1"), ("go", "2")]]  # fmt: skip
    assert storage.apply([Change(tenant="t", id="parent", now=now, add_events=events)])[0].ok  # type: ignore[attr-defined]

    async def main() -> list[object]:
        committer = Committer(storage, lambda _: None)  # type: ignore[arg-type]
        committer.start()
        try:
            journal = Journal(parent, config, storage, committer, _no_children)  # type: ignore[arg-type]
            await journal.load()
            m = {"type": "go", "seconds": 60}
            first, second, third = (journal.new_step(f"w#{n}", "w", "wait") for n in range(3))
            answers = await asyncio.gather(
                stepkinds.wait(journal, first, m), stepkinds.wait(journal, second, m)
            )
            # nothing left of its type: the third waits (hibernates) instead of taking one taken already
            waiting = await stepkinds.wait(journal, third, m)
            return [sorted(a["value"]["payload"] for a in answers), waiting, sorted(journal.wait_types)]  # type: ignore[index]
        finally:
            await committer.stop()

    try:
        assert asyncio.run(main()) == [[1, 2], {"do": "suspend"}, ["go"]]  # which wait gets which: either
        unread = storage.get_events("t", "parent", unconsumed_only=True)  # type: ignore[attr-defined]
        assert [e.type for e in unread] == [CHILD_EVENT + "child", "other"]  # only the two "go" were taken
    finally:
        storage.close()  # type: ignore[attr-defined]
