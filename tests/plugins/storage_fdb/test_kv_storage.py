"""The FoundationDB plugin's engine over real LMDB, held to FoundationDB's limits: idempotent commits
when a commit's result is unknown, one transaction per batch, large values, a very large tenant."""

from __future__ import annotations

import asyncio
import ctypes.util
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tenantflow.kernel.committer import Committer
from tenantflow.kernel.errors import InvalidArgument, Unavailable
from tenantflow.kernel.model import (
    ApplyResult,
    Artifact,
    Change,
    EventRecord,
    HistoryEntry,
    InstanceRecord,
    Status,
    StepRecord,
)
from tenantflow.plugins.storage_fdb import kv_storage, open_url
from tenantflow.plugins.storage_fdb.kv_storage import KVStorage
from tenantflow.plugins.storage_fdb.layer import FdbError, Txn
from tenantflow.plugins.storage_fdb.records import step_json
from tests.plugins.storage_fdb.checked import CheckedLayer

MIB = 1024 * 1024
T = TypeVar("T")


@pytest.fixture
def layer(tmp_path: Path) -> Iterator[CheckedLayer]:
    layer = CheckedLayer(tmp_path / "kv")
    yield layer
    layer.close()


@pytest.fixture
def storage(layer: CheckedLayer) -> KVStorage:
    return KVStorage(layer)


def instance(
    tenant: str, id: str, run_at: float | None = None, params: str = "null", **kw: object
) -> InstanceRecord:
    now = time.time()
    return InstanceRecord(tenant=tenant, id=id, workflow="W", code="artifact://t/c@sha256:" + "0" * 64,
                          runtime="python", module="wf", params_json=params, created_at=now, updated_at=now,
                          run_at=run_at, **kw)  # type: ignore[arg-type]  # fmt: skip


def entry(message: str = "") -> HistoryEntry:
    return HistoryEntry(kind="status", at=time.time(), status=int(Status.QUEUED), message=message)


def test_a_commit_with_unknown_result_records_nothing_twice(storage: KVStorage, layer: CheckedLayer) -> None:
    layer.inject("commit_unknown_result")
    storage.create_instances([instance("t", "a"), instance("t", "b")], [entry("created")] * 2)
    # committed, reported unknown, retried: the retry found its own commit and wrote nothing more
    assert layer.commits == 1 and layer.counters.attempts == 2
    now = time.time()
    step = StepRecord(key="s#0", seq=1, name="s", kind="do", status="complete", attempts=1, output_json="1")
    batch = [
        Change(tenant="t", id="a", now=now, steps=[step], history=[entry("step")],
               add_events=[EventRecord(0, "go", "1", now)]),
        Change(tenant="t", id="a", now=now, add_events=[EventRecord(0, "go", "2", now)], history=[entry("event")]),
        Change(tenant="t", id="b", generation=0, bump_generation=True, now=now, set={"status": Status.RUNNING}),
        Change(tenant="t", id="ghost", now=now),
    ]  # fmt: skip
    layer.inject("commit_unknown_result")
    commits, attempts = layer.commits, layer.counters.attempts
    results = storage.apply(batch)
    # the batch ran twice; its first commit counts, once
    assert layer.commits == commits + 1 and layer.counters.attempts == attempts + 2
    assert [(r.ok, r.event_seqs) for r in results] == [(True, [1]), (True, [2]), (True, []), (False, [])]
    assert [s.key for s in storage.get_steps("t", "a")] == ["s#0"]
    assert [e.payload_json for e in storage.get_events("t", "a", unconsumed_only=False)] == ["1", "2"]
    assert [h.message for h in storage.get_history("t", "a", 0, 10)] == ["created", "step", "event"]
    assert storage.get_instance("t", "b").generation == 1  # type: ignore[union-attr]  # bumped once
    # a claim whose commit applied keeps its leases on the retry instead of stranding them
    storage.create_instances([instance("t", "due", run_at=now - 1)], [entry()])
    layer.inject("commit_unknown_result")
    (claimed,) = storage.claim("node", time.time(), 30, 10)
    assert claimed.id == "due" and claimed.lease_owner == "node"
    assert storage.claim("node", time.time(), 30, 10) == []
    # without the batch id a retry would have applied a second time: show the retry did run
    layer.inject("commit_unknown_result")
    (again,) = storage.apply([Change(tenant="t", id="b", generation=1, bump_generation=True, now=now)])
    assert again.ok and storage.get_instance("t", "b").generation == 2  # type: ignore[union-attr]


def test_group_commit_is_one_transaction_per_batch(storage: KVStorage, layer: CheckedLayer) -> None:
    storage.create_instances([instance("t", f"i{n}") for n in range(200)], [entry()] * 200)
    commits = layer.commits
    step = StepRecord(key="s#0", seq=1, name="s", kind="do", status="complete", output_json="1")
    results = storage.apply([Change(tenant="t", id=f"i{n}", now=1.0, steps=[step]) for n in range(200)])
    assert all(r.ok for r in results) and layer.commits == commits + 1
    # a batch past the transaction size limit is split between changes, each still atomic
    big = StepRecord(
        key="big#0", seq=2, name="big", kind="do", status="complete", output_json='"' + "x" * MIB + '"'
    )
    results = storage.apply([Change(tenant="t", id=f"i{n}", now=2.0, steps=[big]) for n in range(20)])
    assert all(r.ok for r in results) and layer.commits == commits + 1 + 3  # 7 MiB per transaction
    assert layer.counters.max_size <= 10_000_000


def test_large_values_are_chunked_under_the_value_limit(storage: KVStorage, layer: CheckedLayer) -> None:
    params = '"' + "p" * MIB + '"'
    storage.create_instances([instance("t", "big", params=params)], [entry()])
    name = "\U0001f600" * 256  # a step name of 1 KiB in UTF-8, and an event type like it
    output = '"' + "\u00e9" * MIB + '"'
    step = StepRecord(key=f"{name}#0", seq=1, name=name, kind="do", status="complete", output_json=output)
    event = EventRecord(0, name, '"' + "e" * MIB + '"', 1.0)
    assert storage.apply([Change(tenant="t", id="big", now=1.0, steps=[step], add_events=[event],
                                 set={"output_json": output}, wake_on_events=[name])])[0].ok  # fmt: skip
    record = storage.get_instance("t", "big")
    assert record is not None and record.params_json == params and record.output_json == output
    assert record.run_at == 1.0  # the event of that long type woke it
    assert storage.get_steps("t", "big") == [step]
    assert storage.get_events("t", "big", unconsumed_only=True)[0].payload_json == event.payload_json
    files = {f"m{n}.py": bytes([n]) * MIB for n in range(10)}  # 10 MiB of code: several transactions
    storage.put_artifact(Artifact("t", "code", "d" * 64, "python", files, {"W": "m0"}, 1.0))
    assert storage.get_artifact("t", "code", None).files == files  # type: ignore[union-attr]
    assert layer.counters.max_value <= 100_000 and layer.counters.max_size <= 10_000_000


def test_a_journal_written_before_sizes_were_kept_is_not_counted(
    storage: KVStorage, layer: CheckedLayer
) -> None:
    """A step whose seq index entry has no size (written by an older version) makes steps_bytes
    answer None, so a Get of it is budgeted once loaded rather than counted short."""
    storage.create_instances([instance("t", "old")], [entry()])
    step = StepRecord(key="s#0", seq=1, name="s", kind="do", status="complete", output_json='"x"')
    assert storage.apply([Change(tenant="t", id="old", now=1.0, steps=[step])])[0].ok
    assert storage.steps_bytes("t", "old") == len(step_json(step))
    layer.transact(lambda tr: tr.set(storage.k.inst("t", "old", "sq", 1, "s#0"), b""))
    assert storage.steps_bytes("t", "old") is None
    go = Change(tenant="t", id="old", now=2.0, add_events=[EventRecord(0, "go", "1", 2.0)])
    assert storage.apply([go])[0].ok and storage.events_bytes("t", "old") == 3
    layer.transact(lambda tr: tr.clear(storage.k.inst("t", "old", "vb")))  # an inbox begun before
    assert storage.apply([go])[0].ok and storage.events_bytes("t", "old") is None  # not counted short


@pytest.mark.timeout(600)  # ~15 s alone; several times that on a machine shared with other test runs
def test_a_tenant_with_100000_instances_pages_through(storage: KVStorage, layer: CheckedLayer) -> None:
    total, batch = 100_000, 1_000
    now = time.time()
    for start in range(0, total, batch):
        records = [instance("big", f"i{n:06}", run_at=now - 10, status=Status.COMPLETE if n % 2 else Status.QUEUED)
                   for n in range(start, start + batch)]  # fmt: skip
        storage.create_instances(records, [entry()] * batch)
    storage.create_instances([instance("small", "s", run_at=now - 1)], [entry()])
    page, cursor = storage.list_instances("big", Status.COMPLETE, None, 50)
    assert [r.id for r in page][:2] == ["i000001", "i000003"] and cursor
    claimed = storage.claim("node", now, 30, 5, per_tenant=3)
    assert sorted(r.tenant for r in claimed) == ["big", "big", "big", "small"]
    assert storage.count_by_status()[Status.COMPLETE] == total // 2
    assert storage.next_run_at() is not None
    assert storage.purge_ended(time.time() + 1, total) == total // 2
    assert storage.count_by_status()[Status.COMPLETE] == 0
    assert layer.counters.max_size <= 10_000_000 and layer.counters.max_value <= 100_000
    print(
        f"\nslowest transaction {layer.counters.max_seconds:.3f} s, largest {layer.counters.max_size} bytes"
    )


def test_storage_urls_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="unknown option 'mapsize'"):
        open_url(f"kv+lmdb://{tmp_path}/kv?mapsize=1")
    with pytest.raises(InvalidArgument, match="map_size_mb must be an integer"):
        open_url(f"kv+lmdb://{tmp_path}/kv?map_size_mb=lots")
    with pytest.raises(InvalidArgument, match="names no directory"):
        open_url("kv+lmdb://")
    with pytest.raises(InvalidArgument, match="api_version must be an integer of at least 730"):
        open_url("fdb://?api_version=620")


@pytest.mark.skipif(ctypes.util.find_library("fdb_c") is not None, reason="libfdb_c is installed here")
def test_fdb_without_its_client_library_names_what_to_install() -> None:
    with pytest.raises(Unavailable, match="libfdb_c.*foundationdb-clients"):
        open_url("fdb://")


def test_two_storage_objects_share_one_lmdb_environment(tmp_path: Path) -> None:
    url = f"kv+lmdb://{tmp_path}/kv"
    first, second = open_url(url), open_url(url)
    first.create_instances([instance("t", "a")], [entry()])
    first.close()  # the other one keeps working
    assert second.get_instance("t", "a") is not None
    second.close()
    third = open_url(url)
    assert third.get_instance("t", "a") is not None
    third.close()


class FailingLayer(CheckedLayer):
    """The checked layer, failing one later write transaction before it commits (nothing of it
    applies): ``fail_after`` = how many more transactions commit first (-1: none fails)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.fail_after = -1
        self.gate: threading.Event | None = None  # when set, transactions wait for it

    def transact(self, fn: Callable[[Txn], T]) -> T:
        if self.gate is not None:
            self.gate.wait(30)
        if self.fail_after == 0:
            self.fail_after = -1
            raise OSError("injected: the storage failed this transaction")
        if self.fail_after > 0:
            self.fail_after -= 1
        return super().transact(fn)


def big_step(id: str, n: int) -> Change:
    """A step result of ``n`` bytes and one event: what a duplicate apply would store twice."""
    step = StepRecord(key="s#0", seq=1, name="s", kind="do", status="complete", output_json=f'"{"x" * n}"')
    return Change(tenant="t", id=id, owner="A", now=1.0, steps=[step], history=[entry(f"{id} step")],
                  add_events=[EventRecord(0, "e", "1", 1.0)])  # fmt: skip


def end_and_notice() -> tuple[Change, Change]:
    end = Change(tenant="t", id="child", owner="A", now=1.0, history=[entry("child ended")],
                 set={"status": Status.COMPLETE, "run_at": None, "lease_owner": None, "lease_until": None})  # fmt: skip
    notice = Change(tenant="t", id="parent", now=1.0, after_previous=True, wake_on_events=["ended"],
                    add_events=[EventRecord(0, "ended", "1", 1.0)], history=[entry("notice")])  # fmt: skip
    return end, notice


def split_batch(storage: KVStorage, monkeypatch: pytest.MonkeyPatch) -> list[Change]:
    """Instances, and a batch in three transactions whose middle one holds a child's end and its
    parent's notice: they would have been split with the size limit counted per change."""
    ids = ["a", "b", "child", "parent", "c"]
    storage.create_instances([instance("t", i, lease_owner="A", lease_until=time.time() + 60) for i in ids],
                             [entry()] * len(ids))  # fmt: skip
    end, notice = end_and_notice()
    a, b, c = big_step("a", 100_000), big_step("b", 100_000), big_step("c", 100_000)
    size = kv_storage._change_bytes
    # a and b fill a transaction; the end would still fit in it, its notice would not
    monkeypatch.setattr(kv_storage, "MAX_TXN_BYTES", size(a) + size(b) + size(end) + size(notice) - 1)
    return [a, b, end, notice, c]


def stored_once(storage: KVStorage) -> dict[str, tuple[int, int]]:
    """Per instance, how many events and step histories it holds."""
    counts = {}
    for id in ("a", "b", "child", "parent", "c"):
        events = len(storage.get_events("t", id, unconsumed_only=False))
        counts[id] = (events, len([h for h in storage.get_history("t", id, 0, 100) if h.message]))
    return counts


def test_a_batch_is_split_only_between_units_and_a_later_failure_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = FailingLayer(tmp_path / "kv")
    storage = KVStorage(layer)
    try:
        batch = split_batch(storage, monkeypatch)
        commits = layer.commits
        layer.fail_after = 1  # the first transaction commits, the second (the end and notice) fails
        results = storage.apply(batch)
        assert layer.commits == commits + 1  # the third was not tried: it is reported not applied
        assert [r.ok for r in results] == [True, True, False, False, False]
        assert all("injected" in r.reason and "not applied" in r.reason for r in results[2:])
        assert storage.get_instance("t", "child").status == Status.QUEUED  # type: ignore[union-attr]
        assert stored_once(storage) == {
            "a": (1, 1),
            "b": (1, 1),
            "child": (0, 0),
            "parent": (0, 0),
            "c": (0, 0),
        }
        commits = layer.commits
        assert all(r.ok for r in storage.apply(batch[2:])) and layer.commits == commits + 1
        assert stored_once(storage) == {
            "a": (1, 1),
            "b": (1, 1),
            "child": (0, 1),
            "parent": (1, 1),
            "c": (1, 1),
        }
        assert storage.get_instance("t", "child").status == Status.COMPLETE  # type: ignore[union-attr]
    finally:
        layer.close()


def test_a_commit_that_may_have_applied_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = FailingLayer(tmp_path / "kv")
    storage = KVStorage(layer)
    try:
        batch = split_batch(storage, monkeypatch)
        transact = layer.transact

        def timing_out(fn: Callable[[Txn], T]) -> T:
            transact(fn)
            raise FdbError(1031, "after a commit that applied")

        monkeypatch.setattr(layer, "transact", timing_out)  # every try commits, then times out
        results = storage.apply(batch)
        assert [r.ok for r in results] == [False] * 5
        assert all("could not tell whether the change committed" in r.reason for r in results)
        assert stored_once(storage)["a"] == (1, 1)  # it did apply, once
    finally:
        layer.close()


def test_a_commit_that_timed_out_is_run_again_to_a_confirmed_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = FailingLayer(tmp_path / "kv")
    storage = KVStorage(layer)
    try:
        batch = split_batch(storage, monkeypatch)
        layer.inject("transaction_timed_out")  # the retry finds the commit and confirms it
        results = storage.apply(batch)
        assert all(r.ok for r in results) and results[0].event_seqs == [1]  # as recorded at the commit
        once = {"a": (1, 1), "b": (1, 1), "child": (0, 1), "parent": (1, 1), "c": (1, 1)}
        assert stored_once(storage) == once  # applied once: the retry found it
    finally:
        layer.close()


def test_the_committer_applies_nothing_twice_when_a_later_transaction_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = FailingLayer(tmp_path / "kv")
    storage = KVStorage(layer)
    try:
        batch = split_batch(storage, monkeypatch)
        storage.create_instances([instance("t", "first")], [entry()])

        async def main() -> list[ApplyResult | BaseException]:
            committer = Committer(storage, lambda changes: None)
            committer.start()
            layer.gate = threading.Event()
            # the writer takes this one alone and waits at the gate: the batch queues up behind it
            first = committer.submit(Change(tenant="t", id="first", now=1.0, history=[entry("first")]))
            await asyncio.sleep(0.2)
            futures = [committer.submit(c) for c in batch[:2]]
            futures.append(committer.submit(batch[2], [batch[3]]))
            futures.append(committer.submit(batch[4]))
            layer.fail_after = 2  # the gated change and the batch's first transaction commit
            layer.gate.set()
            results = await asyncio.gather(first, *futures, return_exceptions=True)
            assert await committer.stop()
            return results

        results = asyncio.run(main())
        assert [getattr(r, "ok", r) for r in results[:3]] == [True, True, True]
        assert all(isinstance(r, ApplyResult) and not r.ok for r in results[3:])  # not raised: not retried
        assert stored_once(storage) == {
            "a": (1, 1),
            "b": (1, 1),
            "child": (0, 0),
            "parent": (0, 0),
            "c": (0, 0),
        }
    finally:
        layer.close()
