"""Child workflows through a real kernel: step.create and step.wait_for_instance (issue 12)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from tenantflow.client import Client, TenantflowRpcError
from tenantflow.kernel import journal
from tenantflow.kernel.committer import Committer
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.model import Change, HistoryEntry, InstanceRecord, Status
from tenantflow.kernel.plugins import Plugins
from tenantflow.plugins.storage_sqlite.sqlite_storage import SQLiteStorage
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish, wait_for

FAMILY = """
import asyncio
import time
from tenantflow.workflow import WorkflowEntrypoint, InstanceError

class Parent(WorkflowEntrypoint):
    async def run(self, event, step):
        child = await step.create("start", "Child", params={"n": event.payload["n"]})
        again = await step.create("start", "Child", params={"n": 0}, id=event.instance_id + "-named")
        out = await step.wait_for_instance("join", child)
        await step.wait_for_instance("join named", again)
        return {"child": child, "out": out}

class Child(WorkflowEntrypoint):
    def run(self, event, step):
        return step.do("double", lambda: event.payload["n"] * 2)

class Failing(WorkflowEntrypoint):
    def run(self, event, step):
        raise ValueError("child broke")

class Waiter(WorkflowEntrypoint):
    def run(self, event, step):
        return step.wait_for_event("forever", type="never", timeout="1 hour")

class Catcher(WorkflowEntrypoint):
    async def run(self, event, step):
        kid = await step.create("start", event.payload["workflow"])
        try:
            await step.wait_for_instance("join", kid, timeout=event.payload.get("timeout", 60))
        except InstanceError as exc:
            return {"reason": exc.reason, "id": exc.instance_id, "message": str(exc)}
        return "no error"

class Slow(WorkflowEntrypoint):
    def run(self, event, step):
        kid = step.create("start", "Child", params={"n": 1})
        step.do("slow", lambda: time.sleep(3) or 1)
        return step.wait_for_instance("join", kid)

class Rerun(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.create("start", "Waiter")
        await step.create("named", "Waiter", id=event.instance_id + "-named")
        await step.wait_for_event("forever", type="never", timeout="1 hour")

class Tree(WorkflowEntrypoint):
    async def run(self, event, step):
        if event.payload["depth"] > 0:
            await step.create("start", "Tree", params={"depth": event.payload["depth"] - 1})
        await step.wait_for_event("forever", type="never", timeout="1 hour")
"""


@pytest.mark.parametrize("runtime", ["python", "python-wasm"])
def test_a_child_runs_in_the_callers_tenant_and_its_output_comes_back(
    client: Client, tenant: str, runtime: str
) -> None:
    ref = publish(client, tenant, FAMILY, runtime=runtime)
    parent = client.create(tenant, "Parent", ref, params={"n": 21})
    done = client.wait(tenant, parent.id, timeout=60)
    assert done.status == pb.STATUS_COMPLETE, done.error
    out = Client.output(done)
    assert out["out"] == 42
    child = client.get(tenant, out["child"])
    assert child.tenant == tenant and child.parent_id == parent.id and child.code == ref
    assert list(done.child_ids) == [out["child"], parent.id + "-named"]
    assert [s.kind for s in done.steps] == ["create", "create", "wait_for_instance", "wait_for_instance"]
    watched = list(client.watch(tenant, parent.id, timeout=30))
    assert [e.child_id for e in watched if e.kind == "child_created"] == list(done.child_ids)
    assert {e.child_id for e in watched if e.kind == "child_ended"} == set(done.child_ids)
    first = next(iter(client.watch(tenant, child.id, timeout=30)))
    assert json.loads(first.data_json) == {"parent": parent.id}


def test_step_create_never_starts_a_child_twice_across_a_kernel_kill(fresh_kernel: KernelProcess) -> None:
    tenant = "kill-create"
    with fresh_kernel.client() as client:
        ref = publish(client, tenant, FAMILY)
        parent = client.create(tenant, "Slow", ref)
        wait_for(
            lambda: any(
                s.name == "slow" and s.status == "running" for s in client.get(tenant, parent.id).steps
            )
        )
        child = client.get(tenant, parent.id).child_ids[0]
    fresh_kernel.kill()
    fresh_kernel.start()
    with fresh_kernel.client() as client:
        done = client.wait(tenant, parent.id, timeout=60)
        assert done.status == pb.STATUS_COMPLETE and Client.output(done) == 2
        assert list(done.child_ids) == [child]
        ids = sorted(i.id for i in client.iter_instances(tenant))
        assert ids == sorted([parent.id, child])  # the replayed create found its child, made none


@pytest.mark.parametrize(
    ("workflow", "timeout", "reason"),
    [("Failing", 60, "errored"), ("Waiter", 1, "timeout")],
)
def test_a_childs_failure_or_time_out_is_catchable(
    client: Client, tenant: str, workflow: str, timeout: float, reason: str
) -> None:
    ref = publish(client, tenant, FAMILY)
    parent = client.create(tenant, "Catcher", ref, params={"workflow": workflow, "timeout": timeout})
    done = client.wait(tenant, parent.id, timeout=60)
    out = Client.output(done)
    assert out["reason"] == reason and out["id"] == done.child_ids[0], out
    if reason == "errored":
        assert "child broke" in out["message"]


def test_a_hibernating_parent_wakes_when_its_child_is_terminated(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, FAMILY)
    parent = client.create(tenant, "Catcher", ref, params={"workflow": "Waiter"})
    wait_for(lambda: client.get(tenant, parent.id).status == pb.STATUS_WAITING)
    child = client.get(tenant, parent.id).child_ids[0]
    wait_for(lambda: client.get(tenant, child).status == pb.STATUS_WAITING)
    client.terminate(tenant, child)
    done = client.wait(tenant, parent.id, timeout=30)
    assert Client.output(done)["reason"] == "terminated"


def test_a_ref_of_another_tenant_is_refused(client: Client, tenant: str) -> None:
    other = f"{tenant}-other"
    theirs = publish(client, other, FAMILY)
    ours = publish(client, tenant, """
        from tenantflow.workflow import WorkflowEntrypoint, StepError

        class Thief(WorkflowEntrypoint):
            def run(self, event, step):
                try:
                    step.create("steal", "Child", code=event.payload, params={"n": 1})
                except StepError as exc:
                    return [exc.error_name, str(exc)]
    """)  # fmt: skip
    done = client.wait(tenant, client.create(tenant, "Thief", ours, params=theirs).id, timeout=30)
    name, message = Client.output(done)
    assert name == "PermissionDenied" and other in message, message
    assert [i.id for i in client.iter_instances(other)] == []
    assert len(list(client.iter_instances(tenant))) == 1


def test_children_count_against_the_live_cap(tmp_path: Path) -> None:
    kernel = KernelProcess(tmp_path / "kernel", [*TEST_LIMITS, "--tenant-max-live", "2"])
    kernel.start()
    try:
        with kernel.client() as client:
            ref = publish(client, "capped", FAMILY)
            parent = client.create("capped", "Tree", ref, params={"depth": 3})

            # the parent and one child are live: the grandchild's create is refused and retried
            def refused() -> bool:
                children = client.get("capped", parent.id).child_ids
                steps = client.get("capped", children[0]).steps if children else []
                return bool(steps) and steps[0].kind == "create" and steps[0].status == "retrying"

            wait_for(refused, timeout=30)
            child = client.get("capped", client.get("capped", parent.id).child_ids[0])
            assert child.steps[0].error.name == "QuotaExceeded", child.steps[0]
            assert len(list(client.iter_instances("capped"))) == 2
    finally:
        kernel.stop()


def test_terminating_a_parent_terminates_its_children_unless_kept(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, FAMILY)
    ids = []
    for keep in (False, True):
        root = client.create(tenant, "Tree", ref, params={"depth": 2})
        wait_for(lambda root=root: _descendants(client, tenant, root.id, 2))
        tree = _descendants(client, tenant, root.id, 2)
        client.terminate(tenant, root.id, keep_children=keep)
        ids.append(tree)
        statuses = {client.get(tenant, i).status for i in tree}
        expected = {pb.STATUS_WAITING} if keep else {pb.STATUS_TERMINATED}
        assert statuses == expected, (keep, statuses)
    for id in ids[1]:
        client.terminate(tenant, id, keep_children=True)


def _descendants(client: Client, tenant: str, id: str, depth: int) -> list[str]:
    """Ids of ``depth`` generations below ``id`` once all are waiting; [] before that."""
    found, level = [], [id]
    for _ in range(depth):
        level = [c for i in level for c in client.get(tenant, i).child_ids]
        if not level or any(client.get(tenant, c).status != pb.STATUS_WAITING for c in level):
            return []
        found += level
    return found


def test_the_kernels_own_event_types_cannot_be_sent(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, FAMILY)
    inst = client.create(tenant, "Waiter", ref)
    with pytest.raises(TenantflowRpcError) as err:
        client.send_event(tenant, inst.id, f"tenantflow.child-ended:{inst.id}")
    assert err.value.code.name == "INVALID_ARGUMENT" and "sent by the kernel" in err.value.message
    client.terminate(tenant, inst.id)


def test_a_database_made_before_parent_links_still_opens(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:  # the instances table as it was before the parent column
        conn.execute(
            "CREATE TABLE instances (rowid INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL, id TEXT NOT NULL,"
            " workflow TEXT NOT NULL, code TEXT NOT NULL, runtime TEXT NOT NULL, module TEXT NOT NULL,"
            " params_json TEXT NOT NULL, status INTEGER NOT NULL, output_json TEXT NOT NULL DEFAULT '',"
            " error_name TEXT NOT NULL DEFAULT '', error_message TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL,"
            " updated_at REAL NOT NULL, run_at REAL, generation INTEGER NOT NULL DEFAULT 0, lease_owner TEXT,"
            " lease_until REAL, UNIQUE (tenant, id))"
        )
        now = time.time()
        conn.execute(
            "INSERT INTO instances (tenant, id, workflow, code, runtime, module, params_json, status, created_at,"
            " updated_at) VALUES ('t', 'old', 'W', 'artifact://t/c', 'python', 'wf', 'null', 6, ?, ?)",
            (now, now),
        )
    storage = SQLiteStorage(path)
    try:
        old = storage.get_instance("t", "old")
        assert old is not None and old.parent == "" and old.status == Status.COMPLETE
    finally:
        storage.close()


def _family_store(tmp_path: Path) -> tuple[Any, InstanceRecord]:
    """A real SQLite store holding a waiting parent, its running child and a bystander instance."""
    storage = Plugins().storage(f"sqlite:///{tmp_path / 'db.sqlite3'}", KernelConfig(data_dir=tmp_path))
    now = time.time()
    code = "artifact://t/c@sha256:" + "0" * 64

    def record(id: str, status: Status, parent: str = "") -> InstanceRecord:
        return InstanceRecord(tenant="t", id=id, workflow="W", code=code, runtime="python", module="wf",
                              params_json="null", status=status, created_at=now, updated_at=now, parent=parent)  # fmt: skip

    records = [
        record("parent", Status.WAITING),
        record("child", Status.RUNNING, "parent"),
        record("other", Status.RUNNING),
    ]
    storage.create_instances(records, [HistoryEntry(kind="status", at=now) for _ in records])
    return storage, records[1]


@pytest.mark.parametrize("split_by", ["batch limit", "failed batch retried"])
def test_a_childs_end_and_its_parents_notice_never_split(tmp_path: Path, split_by: str) -> None:
    """The committer keeps a child's end and its parent's notice in one transaction, even with a batch
    limit of 1 or when the batch they ride in fails and is retried piece by piece: a kernel dying
    between two commits can never leave the child ended and the parent unaware."""
    storage, child = _family_store(tmp_path)
    transactions: list[list[tuple[str, str]]] = []
    now = time.time()
    end = Change(tenant="t", id="child", now=now, set={"status": Status.COMPLETE, "output_json": "1"})
    notice = journal.parent_notice(child, Status.COMPLETE, now)
    assert notice is not None
    bad = Change(
        tenant="t", id="other", now=now, history=[HistoryEntry(kind="log", at=now, message="\ud800")]
    )

    async def main() -> None:
        committer = Committer(
            storage, lambda changes: transactions.append([(c.tenant, c.id) for c in changes])
        )
        committer.start()
        if split_by == "batch limit":
            committer.max_batch = 1
            first = committer.submit(Change(tenant="t", id="other", now=now))
            result = await committer.commit(end, [notice])
            await first
        else:
            # Hold the database so the writer thread blocks, then queue a change storage refuses and
            # the unit: they form one batch, which fails and is retried piece by piece.
            lock = sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None)
            lock.execute("BEGIN EXCLUSIVE")
            blocker = committer.submit(Change(tenant="t", id="other", now=now))
            await asyncio.sleep(0.2)
            refused = committer.submit(bad)
            pending = asyncio.ensure_future(committer.commit(end, [notice]))
            await asyncio.sleep(0.2)
            lock.execute("ROLLBACK")
            lock.close()
            await blocker
            result = await pending
            with pytest.raises(UnicodeEncodeError):
                await refused
        assert result.ok
        await committer.stop()

    try:
        asyncio.run(main())
        assert [("t", "child"), ("t", "parent")] in transactions, transactions
        stored = storage.get_instance("t", "child")
        assert stored is not None and stored.status == Status.COMPLETE
        inbox = storage.get_events("t", "parent", unconsumed_only=True)
        assert [e.type for e in inbox] == [journal.CHILD_EVENT + "child"]
    finally:
        storage.close()


def test_deleting_a_live_child_wakes_its_waiting_parent(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, FAMILY)
    parent = client.create(tenant, "Catcher", ref, params={"workflow": "Waiter", "timeout": 3600})
    wait_for(lambda: client.get(tenant, parent.id).status == pb.STATUS_WAITING)
    child = client.get(tenant, parent.id).child_ids[0]
    wait_for(lambda: client.get(tenant, child).status == pb.STATUS_WAITING)
    client.delete(tenant, child)
    done = client.wait(tenant, parent.id, timeout=30)  # not the hour of its time-out
    assert Client.output(done)["reason"] in ("terminated", "not_found"), Client.output(done)
    assert [i.id for i in client.iter_instances(tenant)] == [parent.id]


def test_restart_terminates_the_children_of_the_create_steps_it_deletes(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, FAMILY)
    parent = client.create(tenant, "Rerun", ref)
    wait_for(lambda: client.get(tenant, parent.id).status == pb.STATUS_WAITING)
    old, named = client.get(tenant, parent.id).child_ids
    wait_for(lambda: {client.get(tenant, c).status for c in (old, named)} == {pb.STATUS_WAITING})
    client.restart(tenant, parent.id, from_step="start")
    wait_for(lambda: client.get(tenant, parent.id).status == pb.STATUS_WAITING)
    new, again = client.get(tenant, parent.id).child_ids
    assert new != old and again == named  # a named child is adopted by the new run, not ended
    assert client.get(tenant, old).status == pb.STATUS_TERMINATED
    assert client.get(tenant, named).status == pb.STATUS_WAITING
    wait_for(lambda: client.get(tenant, new).status == pb.STATUS_WAITING)
    client.terminate(tenant, parent.id)
    assert {client.get(tenant, c).status for c in (new, named)} == {pb.STATUS_TERMINATED}
    # the old child ended without a notice: the parent had stopped waiting for it
    ended = [e.child_id for e in client.watch(tenant, parent.id, timeout=10) if e.kind == "child_ended"]
    assert old not in ended, ended
