"""Deletes, purges and releases on the FoundationDB engine when the storage cannot confirm a commit
(commit_unknown_result, transaction_timed_out) or keeps refusing it: each answers what it did, or
fails with UNAVAILABLE saying to retry; never a raw FoundationDB error (INTERNAL to the caller)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from tenantflow.kernel.errors import Unavailable
from tenantflow.kernel.model import HistoryEntry, InstanceRecord, Status
from tenantflow.plugins.storage_fdb.kv_storage import KVStorage
from tenantflow.plugins.storage_fdb.layer import FdbError, Txn
from tenantflow.plugins.storage_fdb.lmdb_layer import Rules
from tests.plugins.storage_fdb.checked import CheckedLayer

T = TypeVar("T")
CODE = "artifact://t/c@sha256:" + "0" * 64
UNCONFIRMED = "did not confirm whether the write committed.*retry: the operation is idempotent"


class Scripted(CheckedLayer):
    """The stand-in whose next commits fail as ``script`` says (None: no fault), then as ``rules``."""

    script: list[str | None]

    def _fault(self) -> str | None:
        if getattr(self, "script", None):
            return self.script.pop(0)
        return super()._fault()


class AlwaysTimingOut(CheckedLayer):
    """Every transaction commits, then reports that it timed out."""

    def transact(self, fn: Callable[[Txn], T]) -> T:
        super().transact(fn)
        raise FdbError(1031, "after a commit that applied")


def populate(storage: KVStorage, count: int, ended: int = 0, owner: str | None = None) -> None:
    now = time.time()
    storage.create_instances(
        [InstanceRecord(tenant="t", id=f"i{n}", workflow="W", code=CODE, runtime="python", module="wf",
                        params_json="null", created_at=now, updated_at=now - 100,
                        run_at=None if n < ended else now - 1,
                        status=Status.COMPLETE if n < ended else Status.RUNNING,
                        lease_owner=None if n < ended else owner,
                        lease_until=None if n < ended or owner is None else now + 60) for n in range(count)],
        [HistoryEntry(kind="status", at=now, status=1)] * count,
    )  # fmt: skip


def test_an_unknown_outcome_on_clearing_the_answer_does_not_fail_the_delete(tmp_path: Path) -> None:
    layer = Scripted(tmp_path / "kv")
    storage = KVStorage(layer)
    try:
        populate(storage, 3, ended=1, owner="node")  # i0 ended, i1 and i2 running
        # the delete commits and is told it timed out; its retry finds the answer; clearing the
        # answer times out once too: the old code raised that raw FdbError (INTERNAL) after deleting
        layer.script = ["transaction_timed_out", "transaction_timed_out", None]
        assert storage.delete_instance("t", "i1") is True and layer.script == []
        assert storage.get_instance("t", "i1") is None and storage.delete_instance("t", "i1") is False
        layer.script = ["commit_unknown_result", "transaction_timed_out", None]
        assert storage.release_leases("node") == 1 and layer.script == []
        layer.script = ["transaction_timed_out", "transaction_timed_out", None]
        assert storage.purge_ended(time.time(), 10) == 1 and layer.script == []
        # an answer marker that cannot be cleared stays behind; the answer is still given
        layer.script = ["transaction_timed_out"] * 5
        assert storage.delete_instance("t", "i2") is True and layer.script == []
        assert storage.count_instances("t", None) == 0
    finally:
        layer.close()


@pytest.mark.parametrize("operation", ["delete", "purge", "release"])
def test_an_outcome_that_stays_unknown_is_unavailable_and_says_to_retry(
    tmp_path: Path, operation: str
) -> None:
    plain = CheckedLayer(tmp_path / "kv")
    populate(KVStorage(plain), 2, ended=1, owner="node")
    plain.close()
    layer = AlwaysTimingOut(tmp_path / "kv")
    storage = KVStorage(layer)
    try:
        run = {
            "delete": lambda: storage.delete_instance("t", "i0"),
            "purge": lambda: storage.purge_ended(time.time(), 10),
            "release": lambda: storage.release_leases("node"),
        }[operation]
        with pytest.raises(Unavailable, match=UNCONFIRMED):
            run()
        assert layer.counters.commits >= 1  # it did apply: the retry is what the caller learns of it
    finally:
        layer.close()


def test_a_write_refused_to_the_retry_limit_is_unavailable(tmp_path: Path) -> None:
    layer = CheckedLayer(tmp_path / "kv", Rules(retry_limit=3))
    storage = KVStorage(layer)
    try:
        populate(storage, 1)
        layer.inject("not_committed", 4)  # the old code raised FdbError 1020 (INTERNAL)
        with pytest.raises(Unavailable, match="did not commit the write.*retry: the operation is idempotent"):
            storage.delete_instance("t", "i0")
        assert storage.delete_instance("t", "i0") is True  # the retry the message asks for
    finally:
        layer.close()


def test_deletes_purges_and_releases_count_right_under_random_faults(tmp_path: Path) -> None:
    layer = CheckedLayer(tmp_path / "kv", Rules(fault_rate=0.3, seed=27))
    storage = KVStorage(layer)
    try:
        populate(storage, 150, ended=120, owner="node")
        assert storage.release_leases("node") == 30
        assert storage.purge_ended(time.time(), 1_000) == 120
        assert sum(storage.delete_instance("t", f"i{n}") for n in range(110, 150)) == 30
        assert storage.count_instances("t", None) == 0
        assert sum(layer.counters.faults.values()) >= 5
    finally:
        layer.close()


def test_key_value_writes_and_secrets_answer_right_after_a_time_out(tmp_path: Path) -> None:
    layer = Scripted(tmp_path / "kv")
    storage = KVStorage(layer)
    try:
        # each write commits, then times out: run again, it finds what it did (the old code raised
        # the raw FdbError, or answered from what the retry saw: every key existing)
        layer.script = ["transaction_timed_out"]
        assert storage.kv_write("t", [("a", "1"), ("b", None)], 1.0) == [False, False]
        layer.script = ["transaction_timed_out"]
        assert storage.kv_write("t", [("a", "2")], 2.0) == [True]
        assert storage.kv_get("t", "a") is not None and storage.kv_usage("t").keys == 1
        layer.script = ["transaction_timed_out"]
        storage.put_secret("t", "s", b"sealed", 1.0)
        layer.script = ["transaction_timed_out"]
        assert storage.delete_secret("t", "s") is True and storage.get_secret("t", "s") is None
        layer.script = ["transaction_timed_out"]
        storage.put_egress("t", "[]", 1.0)
        assert storage.get_egress("t") == ("[]", 1.0) and layer.counters.faults == {
            "transaction_timed_out": 5
        }
    finally:
        layer.close()


def test_a_read_the_storage_cannot_serve_in_time_is_unavailable(tmp_path: Path) -> None:
    layer = CheckedLayer(tmp_path / "kv", Rules(read_latency=0.05, timeout=0.03))
    storage = KVStorage(layer)
    try:
        # every round trip takes longer than the whole time-out: the old code raised FdbError 1031
        with pytest.raises(Unavailable, match=r"did not answer the read \(transaction_timed_out.*retry"):
            storage.get_instance("t", "i0")
    finally:
        layer.close()
