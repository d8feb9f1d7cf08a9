"""A claim's reads stay bounded however many tenants are ready (FoundationDB's 5-second transactions),
and every ready tenant still gets its turn."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tenantflow.kernel.model import HistoryEntry, InstanceRecord, Status
from tenantflow.plugins.storage_fdb.kv_storage import KVStorage
from tests.plugins.storage_fdb.checked import CheckedLayer

CODE = "artifact://t/c@sha256:" + "0" * 64


@pytest.fixture
def layer(tmp_path: Path) -> Iterator[CheckedLayer]:
    layer = CheckedLayer(tmp_path / "kv")
    yield layer
    layer.close()


def ready(storage: KVStorage, tenants: int, per_tenant: int = 1) -> None:
    """``tenants`` tenants, each with ``per_tenant`` due instances."""
    now = time.time() - 1
    records = [
        InstanceRecord(
            tenant=f"t{n:05}",
            id=f"i{i}",
            workflow="W",
            code=CODE,
            runtime="python",
            module="wf",
            params_json="null",
            created_at=now,
            updated_at=now,
            run_at=now + i,
        )  # fmt: skip
        for n in range(tenants)
        for i in range(per_tenant)
    ]
    for start in range(0, len(records), 500):
        batch = records[start : start + 500]
        storage.create_instances(
            batch, [HistoryEntry(kind="status", at=now, status=int(Status.QUEUED))] * len(batch)
        )


def test_a_claim_reads_as_many_tenants_as_it_needs_not_every_ready_one(layer: CheckedLayer) -> None:
    storage = KVStorage(layer)
    ready(storage, 1_500)
    layer.counters.reset()
    claimed = storage.claim("node", time.time(), 30, 64, 32)
    assert len(claimed) == 64
    # each tenant's leases and queue, a page of 64 at a time, then 64 heads and leases, 64 loads: the
    # unbounded claim read both of all 1,500 tenants one after another (3,259 reads)
    assert layer.counters.reads < 600 and layer.counters.round_trips <= 8
    layer.counters.reset()
    assert storage.next_run_at() is not None
    assert layer.counters.reads < 200 and layer.counters.round_trips <= 5


def test_successive_claims_give_every_ready_tenant_its_turn(layer: CheckedLayer) -> None:
    storage = KVStorage(layer)
    ready(storage, 100, per_tenant=5)
    turns: Counter[str] = Counter()
    for _ in range(10):
        turns.update(r.tenant for r in storage.claim("node", time.time(), 30, 10, 0))
    # the first tenants still have work after their turn, and the last ones had theirs
    assert sorted(turns) == [f"t{n:05}" for n in range(100)] and set(turns.values()) == {1}
    turns.update(r.tenant for r in storage.claim("node", time.time(), 30, 100, 0))
    assert set(turns.values()) == {2}
