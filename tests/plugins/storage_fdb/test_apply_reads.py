"""An apply batch sends its reads at once: the round trips of a 512-change batch do not grow with the
changes (each was its own round trip: 1,536 for a step each, past FoundationDB's 5 seconds at a few
milliseconds a read), and changes to one instance in one batch still see each other."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tenantflow.kernel.model import Change, EventRecord, HistoryEntry, InstanceRecord, Status, StepRecord
from tenantflow.plugins.storage_fdb.kv_storage import KVStorage
from tests.plugins.storage_fdb.checked import CheckedLayer

CODE = "artifact://t/c@sha256:" + "0" * 64


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[KVStorage]:
    layer = CheckedLayer(tmp_path / "kv")
    yield KVStorage(layer)
    layer.close()


def create(storage: KVStorage, keys: list[tuple[str, str]]) -> None:
    now = time.time()
    storage.create_instances(
        [InstanceRecord(tenant=t, id=i, workflow="W", code=CODE, runtime="python", module="wf",
                        params_json="null", created_at=now, updated_at=now, run_at=now - 1,
                        status=Status.RUNNING, lease_owner="node", lease_until=now + 60) for t, i in keys],
        [HistoryEntry(kind="status", at=now, status=int(Status.RUNNING))] * len(keys),
    )  # fmt: skip


def test_a_512_change_batch_reads_in_one_round_trip(storage: KVStorage) -> None:
    keys = [(f"t{n % 64}", f"i{n}") for n in range(512)]
    create(storage, keys)
    now = time.time()
    step = StepRecord(key="s#0", seq=1, name="s", kind="do", status="complete", attempts=1, output_json="1")
    changes = [
        Change(tenant=t, id=i, owner="node", now=now, steps=[step], set={"status": Status.WAITING},
               history=[HistoryEntry(kind="step", at=now, step="s")])
        for t, i in keys
    ]  # fmt: skip
    c = storage.layer.counters  # type: ignore[attr-defined]
    c.reset()
    assert all(r.ok for r in storage.apply(changes))
    # marker, head, step index and history counter of each change: 2,048 reads, one round trip
    # (they were 2,048 round trips, one read after another)
    assert c.reads == 4 * 512 and c.round_trips == 1 and c.commits == 1
    assert storage.count_by_status()[Status.WAITING] == 512
    assert [h.seq for h in storage.get_history("t0", "i0", 0, 10)] == [1, 2]


def test_changes_to_one_instance_in_one_batch_see_each_other(storage: KVStorage) -> None:
    create(storage, [("t", "a")])
    now = time.time()
    changes = [
        Change(tenant="t", id="a", owner="node", now=now, add_events=[EventRecord(0, "go", "1", now)],
               history=[HistoryEntry(kind="event", at=now, message="one")]),
        Change(tenant="t", id="a", owner="node", now=now, add_events=[EventRecord(0, "go", "2", now)],
               history=[HistoryEntry(kind="event", at=now, message="two")],
               steps=[StepRecord(key="w#0", seq=1, name="w", kind="wait", status="complete", event_type="go")],
               consume_events=[(1, "w#0")], set={"status": Status.COMPLETE}),
        Change(tenant="t", id="a", owner="node", now=now, expect_status=frozenset({Status.RUNNING}),
               set={"status": Status.ERRORED}),
    ]  # fmt: skip
    results = storage.apply(changes)
    assert [r.ok for r in results] == [True, True, False]
    assert results[0].event_seqs == [1] and results[1].event_seqs == [2]
    assert results[2].status == Status.COMPLETE  # the second change's status, read back in the batch
    assert [h.seq for h in storage.get_history("t", "a", 0, 10)] == [1, 2, 3]
    assert [e.seq for e in storage.get_events("t", "a", unconsumed_only=True)] == [2]
