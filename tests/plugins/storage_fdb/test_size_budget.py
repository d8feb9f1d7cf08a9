"""A batch of changes is split by what FoundationDB counts (mutations and conflict ranges), tried at
the longest tenant, id and names the validators allow."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tenantflow.kernel.model import Change, EventRecord, HistoryEntry, InstanceRecord, Status, StepRecord
from tenantflow.kernel.validate import ID, MAX_NAME, TENANT
from tenantflow.plugins.storage_fdb.kv_storage import KVStorage
from tests.plugins.storage_fdb.checked import CheckedLayer

CODE = "artifact://t/c@sha256:" + "0" * 64
TENANT_ID = "t" * 100
assert TENANT.fullmatch(TENANT_ID) and ID.fullmatch("i" * 100) and not ID.fullmatch("i" * 101)


@pytest.mark.parametrize("output", [0, 10_000])
def test_a_512_change_batch_at_the_longest_ids_stays_under_foundationdbs_limit(
    tmp_path: Path, output: int
) -> None:
    layer = CheckedLayer(tmp_path / "kv")
    storage = KVStorage(layer)
    try:
        now = time.time()
        ids = [f"{n:04}" + "i" * 96 for n in range(512)]
        for start in range(0, 512, 128):
            storage.create_instances(
                [InstanceRecord(tenant=TENANT_ID, id=id, workflow="W" * 200, code=CODE, runtime="python",
                                module="wf", params_json="null", created_at=now, updated_at=now, run_at=now - 1,
                                status=Status.RUNNING, lease_owner="node", lease_until=now + 60)
                 for id in ids[start : start + 128]],
                [HistoryEntry(kind="status", at=now, status=int(Status.RUNNING))] * 128,
            )  # fmt: skip
        name = "n" * MAX_NAME
        step = StepRecord(key=f"{name}#0", seq=1, name=name, kind="do", status="complete", attempts=1,
                          output_json='"' + "x" * output + '"')  # fmt: skip
        changes = [
            Change(tenant=TENANT_ID, id=id, owner="node", now=now, steps=[step],
                   add_events=[EventRecord(0, "e" * MAX_NAME, '"p"', now)],
                   history=[HistoryEntry(kind="step", at=now, message="m")], set={"status": Status.RUNNING})
            for id in ids
        ]  # fmt: skip
        layer.counters.reset()
        # with the conflict ranges left out of the budget: transaction_too_large (2101) at 11.4 MB
        assert all(r.ok for r in storage.apply(changes))
        assert layer.counters.max_size <= 8_000_000  # a fifth under FoundationDB's 10,000,000
    finally:
        layer.close()
