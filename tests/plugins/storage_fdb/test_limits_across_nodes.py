"""Limits on the FoundationDB engine hold between nodes racing at the worst moment, and cost no
conflicts with the ordinary work they do not depend on: the per-tenant running cap against another
node's claim, the live-instance limit of creates against status changes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tenantflow.kernel.errors import ResourceExhausted
from tenantflow.kernel.model import Change, HistoryEntry, InstanceRecord, Status
from tenantflow.plugins.storage_fdb.kv_storage import KVStorage
from tests.plugins.storage_fdb.checked import MeanwhileLayer

CODE = "artifact://t/c@sha256:" + "0" * 64


@pytest.fixture
def layer(tmp_path: Path) -> Iterator[MeanwhileLayer]:
    layer = MeanwhileLayer(tmp_path / "kv")
    yield layer
    layer.close()


def instance(id: str, run_at: float, status: Status = Status.QUEUED) -> InstanceRecord:
    return InstanceRecord(tenant="t", id=id, workflow="W", code=CODE, runtime="python", module="wf",
                          params_json="null", created_at=run_at, updated_at=run_at, run_at=run_at,
                          status=status)  # fmt: skip


def create(storage: KVStorage, records: list[InstanceRecord], max_live: int = 0) -> None:
    history = [HistoryEntry(kind="status", at=r.created_at, status=int(r.status)) for r in records]
    storage.create_instances(records, history, max_live)


def running(storage: KVStorage, now: float) -> list[str]:
    found, _ = storage.list_instances("t", None, None, 100)
    return sorted(r.id for r in found if r.lease_owner is not None and (r.lease_until or 0) >= now)


def test_the_per_tenant_cap_holds_against_a_claim_on_another_node(layer: MeanwhileLayer) -> None:
    node_a, node_b = KVStorage(layer), KVStorage(layer)
    now = time.time()
    create(node_a, [instance("late1", now - 1), instance("late2", now - 1)])

    def meanwhile() -> None:
        # after node a read the tenant (no lease yet), older work arrives and node b claims it
        create(node_b, [instance("early1", now - 10), instance("early2", now - 10)])
        assert sorted(r.id for r in node_b.claim("node-b", now, 30, 10, 2)) == ["early1", "early2"]

    layer.meanwhile = meanwhile
    claimed = node_a.claim("node-a", now, 30, 10, 2)
    # node a chose late1 and late2 from what it read; leasing them would make four running of a
    # cap of two (the leases were counted with a snapshot read): it retries and sees b's two
    assert claimed == [] and layer.counters.conflicts == 1
    assert running(node_a, now) == ["early1", "early2"]


def test_claims_do_not_conflict_with_renewals_of_the_tenants_leases(layer: MeanwhileLayer) -> None:
    storage = KVStorage(layer)
    now = time.time()
    create(storage, [instance(f"i{n}", now - 1) for n in range(4)])
    held = storage.claim("node-b", now, 30, 2, 3)
    layer.meanwhile = lambda: storage.renew_leases("node-b", [("t", r.id) for r in held], now + 60)
    assert len(storage.claim("node-a", now, 30, 10, 3)) == 1  # room for one under the cap of three
    assert layer.counters.conflicts == 0
    assert len(running(storage, now)) == 3


def test_status_changes_do_not_conflict_with_creates_under_a_live_limit(layer: MeanwhileLayer) -> None:
    storage = KVStorage(layer)
    now = time.time()
    create(storage, [instance(f"i{n}", now - 1, Status.RUNNING) for n in range(4)], max_live=10)
    # every instance of the tenant changes status, two of them end, while a create reads the count
    layer.meanwhile = lambda: storage.apply(
        [Change(tenant="t", id=f"i{n}", now=now, set={"status": Status.WAITING}) for n in range(2)]
        + [Change(tenant="t", id=f"i{n}", now=now, set={"status": Status.COMPLETE}) for n in range(2, 4)]
    )
    create(storage, [instance("new", now)], max_live=10)
    assert layer.counters.conflicts == 0  # the create read the live count for real: it conflicted
    assert storage.count_instances("t", None) == 5


def test_the_live_limit_holds_against_creates_and_runs_again_meanwhile(layer: MeanwhileLayer) -> None:
    storage = KVStorage(layer)
    now = time.time()
    create(storage, [instance("done", now - 1, Status.COMPLETE), instance("a", now - 1)], max_live=3)
    layer.meanwhile = lambda: create(storage, [instance("b", now)], max_live=3)
    with pytest.raises(ResourceExhausted, match="has 2 live instances and the limit is 3"):
        create(storage, [instance("c", now), instance("d", now)], max_live=3)
    # an ended instance queued again meanwhile takes the last place
    storage.apply([Change(tenant="t", id="b", now=now, set={"status": Status.COMPLETE})])
    layer.meanwhile = lambda: storage.apply(
        [Change(tenant="t", id="done", now=now, set={"status": Status.QUEUED, "run_at": now})]
    )
    conflicts = layer.counters.conflicts
    with pytest.raises(ResourceExhausted, match="has 2 live instances and the limit is 3"):
        create(storage, [instance("c", now), instance("d", now)], max_live=3)
    assert layer.counters.conflicts == conflicts + 1
    create(storage, [instance("c", now)], max_live=3)
    with pytest.raises(ResourceExhausted):
        create(storage, [instance("d", now)], max_live=3)
