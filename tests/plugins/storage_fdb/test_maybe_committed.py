"""A FoundationDB error that leaves open whether a write applied (transaction_timed_out, which since
API 610 covers every try; commit_unknown_result past the retry limit) never reaches a caller as a
failure of work that applied: creates, claims, renewals and schedules run again and find their own
commit."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tenantflow.kernel.errors import Unavailable
from tenantflow.kernel.model import HistoryEntry, InstanceRecord, ScheduleRecord, Status
from tenantflow.plugins.storage_fdb.kv_storage import MAYBE_AGAIN, KVStorage
from tenantflow.plugins.storage_fdb.layer import FdbError, Txn
from tests.plugins.storage_fdb.checked import CheckedLayer

T = TypeVar("T")
CODE = "artifact://t/c@sha256:" + "0" * 64


@pytest.fixture
def layer(tmp_path: Path) -> Iterator[CheckedLayer]:
    layer = CheckedLayer(tmp_path / "kv")
    yield layer
    layer.close()


def instance(id: str) -> InstanceRecord:
    now = time.time()
    return InstanceRecord(tenant="t", id=id, workflow="W", code=CODE, runtime="python", module="wf",
                          params_json="null", created_at=now, updated_at=now, run_at=now - 1)  # fmt: skip


def test_writes_that_timed_out_after_committing_report_what_they_did(layer: CheckedLayer) -> None:
    storage = KVStorage(layer)
    layer.inject("transaction_timed_out")
    storage.create_instances(
        [instance("a"), instance("b")], [HistoryEntry(kind="status", at=1.0, status=1)] * 2
    )
    assert storage.count_by_status() == {Status.QUEUED: 2}
    layer.inject("transaction_timed_out")
    claimed = storage.claim("node", time.time(), 30, 10)
    assert sorted(r.id for r in claimed) == ["a", "b"] and storage.claim("node", time.time(), 30, 10) == []
    layer.inject("transaction_timed_out")
    assert storage.renew_leases("node", [("t", "a")], time.time() + 60) == []
    schedule = ScheduleRecord(tenant="t", name="s", cron="* * * * *", time_zone="UTC", workflow="W", code=CODE,
                              next_fire=time.time() - 1)  # fmt: skip
    layer.inject("transaction_timed_out")
    created = storage.create_schedule(schedule)
    layer.inject("transaction_timed_out")
    (leased,) = storage.claim_schedules("node", time.time(), 30, 10)
    assert leased.name == "s" and leased.version == created.version + 1
    assert layer.counters.faults == {"transaction_timed_out": 5}


class AlwaysTimingOut(CheckedLayer):
    """Every transaction commits, then reports that it timed out."""

    def transact(self, fn: Callable[[Txn], T]) -> T:
        super().transact(fn)
        raise FdbError(1031, "after a commit that applied")


def test_an_outcome_that_stays_unknown_is_an_error_that_says_so(tmp_path: Path) -> None:
    layer = AlwaysTimingOut(tmp_path / "kv")
    storage = KVStorage(layer)
    try:
        with pytest.raises(
            Unavailable, match=f"did not confirm whether the write committed.*{MAYBE_AGAIN + 1} times"
        ):
            storage.create_instances([instance("a")], [HistoryEntry(kind="status", at=1.0, status=1)])
        assert storage.get_instance("t", "a") is not None and layer.counters.commits == 1  # applied, once
    finally:
        layer.close()
