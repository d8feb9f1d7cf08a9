"""Lease renewal on the FoundationDB engine conflicts with no ordinary change of the instances it
renews, and a renewed lease holds against claims though the head keeps the claimed end."""

from __future__ import annotations

import time
from pathlib import Path

from tenantflow.kernel.model import Change, HistoryEntry, InstanceRecord, Status, StepRecord
from tenantflow.plugins.storage_fdb.kv_storage import KVStorage
from tests.plugins.storage_fdb.checked import MeanwhileLayer

CODE = "artifact://t/c@sha256:" + "0" * 64


def leased(storage: KVStorage, ids: list[str], owner: str, until: float) -> None:
    now = time.time()
    storage.create_instances(
        [InstanceRecord(tenant="t", id=id, workflow="W", code=CODE, runtime="python", module="wf",
                        params_json="null", created_at=now, updated_at=now, run_at=now - 1,
                        status=Status.RUNNING, lease_owner=owner, lease_until=until) for id in ids],
        [HistoryEntry(kind="status", at=now, status=int(Status.RUNNING))] * len(ids),
    )  # fmt: skip


def test_renewal_does_not_conflict_with_the_steps_its_instances_commit(tmp_path: Path) -> None:
    layer = MeanwhileLayer(tmp_path / "kv")
    storage = KVStorage(layer)
    try:
        ids = [f"i{n}" for n in range(20)]
        leased(storage, ids, "node", time.time() + 30)
        step = StepRecord(key="s#0", seq=1, name="s", kind="do", status="complete", output_json="1")
        # every instance commits a step between the renewal's reads and its commit
        layer.meanwhile = lambda: storage.apply(
            [Change(tenant="t", id=id, owner="node", now=time.time(), steps=[step]) for id in ids]
        )
        until = time.time() + 60
        assert storage.renew_leases("node", [("t", id) for id in ids], until) == []
        assert layer.counters.conflicts == 0  # reading the heads, it conflicted with every step
        assert all(storage.get_instance("t", id).lease_until == until for id in ids)  # type: ignore[union-attr]
        assert all(len(storage.get_steps("t", id)) == 1 for id in ids)
        # a release meanwhile does conflict: the renewal learns it lost that lease
        layer.meanwhile = lambda: storage.apply(
            [
                Change(
                    tenant="t",
                    id="i0",
                    owner="node",
                    now=time.time(),
                    set={"lease_owner": None, "lease_until": None},
                )
            ]
        )
        assert storage.renew_leases("node", [("t", "i0"), ("t", "i1")], until + 1) == [("t", "i0")]
        assert layer.counters.conflicts == 1
    finally:
        layer.close()


def test_a_renewed_lease_holds_against_claims_and_an_expired_one_is_taken(tmp_path: Path) -> None:
    layer = MeanwhileLayer(tmp_path / "kv")
    storage = KVStorage(layer)
    try:
        now = time.time()
        leased(storage, ["a", "b"], "node-a", now + 1)
        assert storage.renew_leases("node-a", [("t", "a")], now + 60) == []
        claimed = storage.claim("node-b", now + 5, 30, 10)  # b's lease lapsed, a's was renewed
        assert [r.id for r in claimed] == ["b"] and claimed[0].lease_owner == "node-b"
        assert storage.renew_leases("node-a", [("t", "a"), ("t", "b")], now + 90) == [("t", "b")]
        record = storage.get_instance("t", "a")
        assert record is not None and (record.lease_owner, record.lease_until) == ("node-a", now + 90)
    finally:
        layer.close()
