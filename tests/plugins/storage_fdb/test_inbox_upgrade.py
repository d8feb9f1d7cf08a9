"""Instances stored before the kv engine indexed waiting steps and event sizes keep working: any
event wakes them (as before), and their unread events count against the cap by number."""

from __future__ import annotations

from pathlib import Path

from tenantflow.kernel.model import Change, EventRecord, HistoryEntry, InstanceRecord, Status
from tenantflow.plugins.storage_fdb.keys import part
from tenantflow.plugins.storage_fdb.kv_storage import KVStorage
from tenantflow.plugins.storage_fdb.layer import Txn
from tenantflow.plugins.storage_fdb.lmdb_layer import LmdbLayer
from tenantflow.plugins.storage_fdb.records import dumps


def test_an_instance_from_before_the_wait_index_is_woken_by_any_event(tmp_path: Path) -> None:
    storage = KVStorage(LmdbLayer(tmp_path / "kv.lmdb", map_size=64 * 1024 * 1024))
    try:
        record = InstanceRecord(tenant="t", id="old", workflow="W", code="c", runtime="python", module="wf",
                                params_json="null", status=Status.WAITING, run_at=99.0)  # fmt: skip
        storage.create_instances([record], [HistoryEntry(kind="status", at=1.0)])
        k = storage.k

        def as_before(tr: Txn) -> None:  # no "wi" mark; an unread event indexed without its size
            tr.clear(k.inst("t", "old", "wi"))
            tr.set(
                k.inst("t", "old", "v", 1, 0), dumps({"type": "x", "payload_json": "1", "created_at": 1.0})
            )
            tr.set(k.inst("t", "old", "w", part("x"), 1), b"")
            tr.set(k.inst("t", "old", "vn"), (1).to_bytes(8, "little", signed=True))

        storage.layer.transact(as_before)
        send = Change(tenant="t", id="old", now=5.0, add_events=[EventRecord(0, "y", "2", 5.0)],
                      wake_waiting=["y"], inbox_cap=(2, 1000))  # fmt: skip
        (result,) = storage.apply([send])
        assert result.ok and result.event_seqs == [2]
        assert storage.get_instance("t", "old").run_at == 5.0  # type: ignore[union-attr]  # woken, as before
        (full,) = storage.apply([Change(tenant="t", id="old", now=6.0, add_events=[EventRecord(0, "y", "3", 6.0)],
                                        inbox_cap=(2, 1000))])  # fmt: skip
        assert not full.ok and full.unread == (2, len("y2")), full  # the old event counts 0 bytes, 1 event
    finally:
        storage.close()
