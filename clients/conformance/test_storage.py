"""The storage contract (kernel/storage.py), checked directly against each engine named by
``--tenantflow-storage``.

Engines are opened through the plugins, exactly as the kernel opens them, at URLs their plugin's
harness makes (:class:`tenantflow.conformance.harness.StorageHarness`). Of the built-in ones, SQLite
and kv+lmdb (the FoundationDB plugin's logic over LMDB) run everywhere; fdb runs against a real
FoundationDB cluster when ``TENANTFLOW_FDB_CLUSTER_FILE`` names one, and is skipped with that reason
otherwise.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tenantflow.conformance.harness import HarnessUnavailable, StorageHarness
from tenantflow.conformance.plugin import require
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.errors import AlreadyExists, ResourceExhausted
from tenantflow.kernel.model import (
    SKIPPED,
    SPENT,
    ApplyResult,
    Artifact,
    Change,
    EventRecord,
    HistoryEntry,
    InstanceRecord,
    ScheduleRecord,
    Status,
    StepRecord,
)
from tenantflow.kernel.plugins import Plugins
from tenantflow.kernel.storage import Storage


def open_storage(url: str, tmp_path: Path) -> Storage:
    return Plugins().storage(url, KernelConfig(data_dir=tmp_path))


@pytest.fixture
def storage_url(storage_harness: StorageHarness, tmp_path: Path) -> str:
    """The URL of a fresh, empty store of the engine under test."""
    try:
        return storage_harness.url(tmp_path)
    except HarnessUnavailable as exc:
        pytest.skip(f"{storage_harness.name}: {exc}")


@pytest.fixture
def storage(storage_url: str, storage_harness: StorageHarness, tmp_path: Path) -> Iterator[Storage]:
    engine = open_storage(storage_url, tmp_path)
    yield engine
    storage_harness.discard(engine)


def instance(
    tenant: str, id: str, run_at: float | None = None, status: Status = Status.QUEUED
) -> InstanceRecord:
    now = time.time()
    return InstanceRecord(
        tenant=tenant, id=id, workflow="W", code="artifact://t/c@sha256:" + "0" * 64, runtime="python",
        module="wf", params_json="null", status=status, created_at=now, updated_at=now, run_at=run_at,
    )  # fmt: skip


def entry(message: str = "") -> HistoryEntry:
    return HistoryEntry(kind="status", at=time.time(), status=int(Status.QUEUED), message=message)


def test_artifacts_are_immutable_and_latest_is_the_last_published(storage: Storage) -> None:
    v1 = Artifact("t", "code", "a" * 64, "python", {"wf.py": b"one"}, {"W": "wf"}, 1.0)
    v2 = Artifact("t", "code", "b" * 64, "python", {"wf.py": b"two"}, {"W": "wf"}, 2.0)
    storage.put_artifact(v1)
    storage.put_artifact(v2)
    storage.put_artifact(v1)  # re-publishing old files makes them the latest again
    assert storage.get_artifact("t", "code", "b" * 64).files == {"wf.py": b"two"}  # type: ignore[union-attr]
    assert storage.get_artifact("t", "code", None).digest == "a" * 64  # type: ignore[union-attr]
    assert storage.get_artifact("other", "code", None) is None


def test_tracebacks_of_instances_and_steps_round_trip_and_clear(storage: Storage) -> None:
    storage.create_instances([instance("t", "a")], [entry()])
    tb = "Traceback (most recent call last):\n  File \"wf.py\", line 3, in run\nKeyError: 'by'\n" * 40
    step = StepRecord(key="s#0", seq=1, name="s", kind="do", status="failed", attempts=1,
                      error_name="KeyError", error_message="'by'", error_traceback=tb)  # fmt: skip
    failed = Change(tenant="t", id="a", now=time.time(), steps=[step],
                    set={"status": Status.ERRORED, "error_name": "KeyError", "error_message": "'by'",
                         "error_traceback": tb})  # fmt: skip
    assert [r.ok for r in storage.apply([failed])] == [True]
    assert storage.get_instance("t", "a").error_traceback == tb  # type: ignore[union-attr]
    assert [s.error_traceback for s in storage.get_steps("t", "a")] == [tb]
    listed, _ = storage.list_instances("t", None, None, 10)
    assert [r.error_traceback for r in listed] == [tb]
    cleared = Change(
        tenant="t", id="a", now=time.time(), set={"status": Status.QUEUED, "error_traceback": ""}
    )
    assert [r.ok for r in storage.apply([cleared])] == [True]
    assert storage.get_instance("t", "a").error_traceback == ""  # type: ignore[union-attr]


def test_artifacts_list_newest_first_in_pages_and_by_name(storage: Storage) -> None:
    def put(name: str, digest: str, at: float) -> None:
        storage.put_artifact(Artifact("t", name, digest * 64, "python", {"wf.py": b"x"}, {"W": "wf"}, at))

    put("a", "1", 1.0)
    put("b", "2", 2.0)
    put("a", "3", 3.0)
    put("c", "4", 4.0)
    put("a", "1", 5.0)  # published again: the newest, still first published at 1.0
    storage.put_artifact(Artifact("u", "a", "9" * 64, "python", {"wf.py": b"y"}, {"W": "wf"}, 6.0))
    seen, cursor, pages = [], None, 0
    while True:
        page, cursor = storage.list_artifacts("t", None, cursor, 2)
        seen += [(v.name, v.digest[0], v.created_at) for v in page]
        pages += 1
        if cursor is None:
            break
    assert seen == [("a", "1", 1.0), ("c", "4", 4.0), ("a", "3", 3.0), ("b", "2", 2.0)] and pages == 2
    (first, *_), _ = storage.list_artifacts("t", None, None, 1)
    assert (first.tenant, first.runtime, first.workflows) == ("t", "python", {"W": "wf"})
    only_a, cursor = storage.list_artifacts("t", "a", None, 1)
    rest, end = storage.list_artifacts("t", "a", cursor, 10)
    assert [v.digest[0] for v in only_a + rest] == ["1", "3"] and end is None
    assert storage.list_artifacts("t", "zzz", None, 10) == ([], None)
    assert [v.digest[0] for v in storage.list_artifacts("u", None, None, 10)[0]] == ["9"]


def test_create_is_all_or_nothing_per_tenant(storage: Storage) -> None:
    storage.create_instances([instance("t", "a"), instance("t", "b")], [entry(), entry()])
    with pytest.raises(AlreadyExists, match="'b' already exists"):
        storage.create_instances([instance("t", "c"), instance("t", "b")], [entry(), entry()])
    assert storage.get_instance("t", "c") is None
    storage.create_instances([instance("u", "a")], [entry()])  # same id, other tenant
    assert storage.get_instance("u", "a") is not None and storage.get_instance("v", "a") is None


def test_the_parent_link_is_kept_by_get_list_and_claim(storage: Storage) -> None:
    child = instance("t", "child", run_at=time.time() - 1)
    child.parent = "parent-1"
    storage.create_instances([instance("t", "parent-1"), child], [entry(), entry()])
    assert storage.get_instance("t", "child").parent == "parent-1"  # type: ignore[union-attr]
    assert storage.get_instance("t", "parent-1").parent == ""  # type: ignore[union-attr]
    listed, _ = storage.list_instances("t", None, None, 10)
    assert {r.id: r.parent for r in listed} == {"parent-1": "", "child": "parent-1"}
    claimed = storage.claim("node", time.time(), 30, 10)
    assert [r.parent for r in claimed if r.id == "child"] == ["parent-1"]


def test_list_pages_in_creation_order_and_filters(storage: Storage) -> None:
    storage.create_instances([instance("t", f"i{n}") for n in range(5)], [entry() for _ in range(5)])
    storage.create_instances([instance("t", "w", status=Status.WAITING)], [entry()])
    page, cursor = storage.list_instances("t", None, None, 2)
    assert [r.id for r in page] == ["i0", "i1"] and cursor
    rest: list[str] = []
    while cursor:
        more, cursor = storage.list_instances("t", None, cursor, 2)
        rest += [r.id for r in more]
    assert rest == ["i2", "i3", "i4", "w"]
    waiting, cursor = storage.list_instances("t", Status.WAITING, None, 10)
    assert [r.id for r in waiting] == ["w"] and cursor is None


def test_apply_guards_roll_back_only_the_failing_change(storage: Storage) -> None:
    storage.create_instances([instance("t", "a"), instance("t", "b")], [entry(), entry()])
    step = StepRecord(key="s#0", seq=1, name="s", kind="do", status="complete", attempts=1, output_json="1")
    ok = Change(tenant="t", id="a", generation=0, now=1.0, set={"status": Status.RUNNING}, steps=[step])
    stale = Change(tenant="t", id="b", generation=7, now=1.0, set={"status": Status.COMPLETE}, steps=[step])
    wrong_owner = Change(tenant="t", id="b", owner="node-x", now=1.0, set={"status": Status.COMPLETE})
    wrong_status = Change(tenant="t", id="b", expect_status=frozenset({Status.PAUSED}), now=1.0)
    missing = Change(tenant="t", id="ghost", now=1.0)
    results = storage.apply([ok, stale, wrong_owner, wrong_status, missing])
    assert [r.ok for r in results] == [True, False, False, False, False]
    assert "restarted or terminated" in results[1].reason and "lease" in results[2].reason
    assert storage.get_instance("t", "a").status == Status.RUNNING  # type: ignore[union-attr]
    assert [s.key for s in storage.get_steps("t", "a")] == ["s#0"]
    assert storage.get_instance("t", "b").status == Status.QUEUED  # type: ignore[union-attr]
    assert storage.get_steps("t", "b") == []


def test_a_unit_whose_main_change_is_refused_applies_none_of_its_riders(storage: Storage) -> None:
    storage.create_instances([instance("t", "child"), instance("t", "parent")], [entry(), entry()])

    def notice(n: int) -> Change:  # a parent's notice riding on its child's end
        return Change(tenant="t", id="parent", now=1.0, after_previous=True, wake_on_events=["ended"],
                      add_events=[EventRecord(0, "ended", str(n), 1.0)], history=[entry(f"notice {n}")])  # fmt: skip

    lost = Change(tenant="t", id="child", owner="node-b", now=1.0, set={"status": Status.COMPLETE})
    stale = Change(tenant="t", id="child", generation=3, now=1.0, set={"status": Status.COMPLETE})
    consumes = Change(tenant="t", id="child", now=1.0, consume_events=[(9, "w#0")])  # no event 9
    refused_rider = dataclasses.replace(notice(9), expect_status=frozenset({Status.PAUSED}))
    ends = Change(tenant="t", id="child", generation=0, now=1.0, set={"status": Status.COMPLETE})
    batch = [
        lost,
        notice(1),
        notice(2),
        stale,
        notice(3),
        consumes,
        notice(4),
        ends,
        refused_rider,
        notice(5),
    ]
    results = storage.apply(batch)
    assert [r.ok for r in results] == [False, False, False, False, False, False, False, True, False, True]
    assert all(r.reason == SKIPPED for r in results[1:3] + results[4:5] + results[6:7])
    assert "lease" in results[0].reason and results[8].reason != SKIPPED  # a rider's own guard
    events = storage.get_events("t", "parent", unconsumed_only=False)
    assert [e.payload_json for e in events] == ["5"]  # only the rider of the applied end
    assert [h.message for h in storage.get_history("t", "parent", 0, 10)] == ["", "notice 5"]
    assert storage.get_instance("t", "parent").run_at == 1.0  # type: ignore[union-attr]


def test_events_history_and_restart_deletion(storage: Storage) -> None:
    storage.create_instances([instance("t", "a")], [entry("created")])
    add = Change(tenant="t", id="a", now=5.0, add_events=[EventRecord(0, "go", '{"n": 1}', 5.0)] * 2,
                 history=[entry("e1"), entry("e2")])  # fmt: skip
    (result,) = storage.apply([add])
    assert result.event_seqs == [1, 2]
    wait = StepRecord(key="w#0", seq=1, name="w", kind="wait", status="complete", event_type="go")
    assert storage.apply([Change(tenant="t", id="a", now=6.0, steps=[wait], consume_events=[(1, "w#0")])])[
        0
    ].ok
    again = storage.apply([Change(tenant="t", id="a", now=6.0, consume_events=[(1, "w#1")])])[0]
    assert not again.ok and "already consumed" in again.reason
    assert [e.seq for e in storage.get_events("t", "a", unconsumed_only=True)] == [2]
    restart = Change(
        tenant="t", id="a", now=7.0, delete_steps_from=1, bump_generation=True, release_events=True
    )
    assert storage.apply([restart])[0].ok
    assert storage.get_steps("t", "a") == []
    assert [e.seq for e in storage.get_events("t", "a", unconsumed_only=True)] == [1, 2]  # released
    assert storage.get_instance("t", "a").generation == 1  # type: ignore[union-attr]
    history = storage.get_history("t", "a", 0, 100)
    assert [h.message for h in history] == ["created", "e1", "e2"] and [h.seq for h in history] == [1, 2, 3]
    assert [h.seq for h in storage.get_history("t", "a", 2, 100)] == [3]


def test_steps_bytes_counts_the_journal_without_loading_it(storage: Storage) -> None:
    """Optional: None means the engine cannot tell cheaply. Otherwise at least the outputs, errors
    and tracebacks, at most that plus a record's framing; rewrites, restarts and deletes count."""
    counted = getattr(storage, "steps_bytes", None)
    if counted is None or counted("t", "none") is None:
        pytest.skip("this engine does not count a journal's bytes (optional)")

    def within(content: int, steps: int) -> None:
        got = counted("t", "a")
        assert content <= got <= content + 1024 * steps, (got, content, steps)

    storage.create_instances([instance("t", "a"), instance("t", "b")], [entry(), entry()])
    assert counted("t", "a") == 0
    out = '"' + "x" * 200_000 + '"'  # chunked by a KV engine
    done = StepRecord(key="s#0", seq=1, name="s", kind="do", status="complete", output_json=out)
    failed = StepRecord(key="f#0", seq=2, name="f", kind="do", status="failed", error_name="E",
                        error_message="m" * 100, error_traceback="t" * 5_000)  # fmt: skip
    assert storage.apply([Change(tenant="t", id="a", now=1.0, steps=[done, failed])])[0].ok
    within(len(out) + 5_100, 2)
    retried = dataclasses.replace(failed, status="complete", error_message="", error_traceback="",
                                  output_json="1", attempts=2)  # fmt: skip
    assert storage.apply([Change(tenant="t", id="a", now=2.0, steps=[retried])])[0].ok
    within(len(out) + 1, 2)  # a rewritten step counts once, at its new size
    assert counted("t", "b") == 0  # per instance
    assert storage.apply([Change(tenant="t", id="a", now=3.0, delete_steps_from=2, bump_generation=True)])[
        0
    ].ok
    within(len(out), 1)
    assert storage.delete_instance("t", "a")
    assert counted("t", "a") == 0


def test_events_bytes_counts_read_and_unread_events_without_loading_them(storage: Storage) -> None:
    """Optional, like steps_bytes: exactly the events' sizes (type and payload), per instance."""
    counted = getattr(storage, "events_bytes", None)
    if counted is None or counted("t", "none") is None:
        pytest.skip("this engine does not count an inbox's bytes (optional)")
    storage.create_instances([instance("t", "a"), instance("t", "b")], [entry(), entry()])
    assert counted("t", "a") == 0
    events = [EventRecord(0, "go", '"' + "p" * 150_000 + '"', 1.0), EventRecord(0, "ping", "1", 1.0)]
    assert storage.apply([Change(tenant="t", id="a", now=1.0, add_events=events)])[0].ok
    wait = StepRecord(key="w#0", seq=1, name="w", kind="wait", status="complete", event_type="go")
    more = Change(tenant="t", id="a", now=2.0, steps=[wait], consume_events=[(1, "w#0")],
                  add_events=[EventRecord(0, "go", "[]", 2.0)])  # fmt: skip
    assert storage.apply([more])[0].ok
    assert counted("t", "a") == sum(e.size for e in events) + 4  # a consumed one still counts
    assert counted("t", "b") == 0
    assert storage.delete_instance("t", "a") and counted("t", "a") == 0


def test_a_restart_leaves_consumed_events_spent_unless_it_releases_them(storage: Storage) -> None:
    storage.create_instances([instance("t", "a")], [entry()])
    add = Change(tenant="t", id="a", now=1.0, add_events=[EventRecord(0, "go", "1", 1.0)] * 2)
    assert storage.apply([add])[0].ok
    wait = StepRecord(key="w#0", seq=1, name="w", kind="wait", status="complete", event_type="go")
    assert storage.apply([Change(tenant="t", id="a", now=2.0, steps=[wait], consume_events=[(1, "w#0")])])[
        0
    ].ok
    assert storage.apply([Change(tenant="t", id="a", now=3.0, delete_steps_from=1, bump_generation=True)])[
        0
    ].ok
    assert [e.seq for e in storage.get_events("t", "a", unconsumed_only=True, type="go", limit=1)] == [2]
    every = {e.seq: e.consumed_by for e in storage.get_events("t", "a", unconsumed_only=False)}
    assert every == {1: "w#0" + SPENT, 2: ""}
    # The new run's w#0 takes event 2; a restart that keeps consumed events gives back only that one.
    assert storage.apply([Change(tenant="t", id="a", now=4.0, steps=[wait], consume_events=[(2, "w#0")])])[
        0
    ].ok
    keep = Change(tenant="t", id="a", now=5.0, delete_steps_from=1, bump_generation=True, release_events=True)
    assert storage.apply([keep])[0].ok
    assert [e.seq for e in storage.get_events("t", "a", unconsumed_only=True)] == [2]


def test_wake_on_events_and_pause_awareness(storage: Storage) -> None:
    storage.create_instances(
        [instance("t", "a"), instance("t", "p", status=Status.WAITING_FOR_PAUSE)], [entry()] * 2
    )
    storage.apply([Change(tenant="t", id="a", now=1.0, add_events=[EventRecord(0, "go", "null", 1.0)])])
    suspend = Change(
        tenant="t", id="a", now=2.0, set={"status": Status.WAITING, "run_at": 99.0}, wake_on_events=["go"]
    )
    storage.apply([suspend])
    assert storage.get_instance("t", "a").run_at == 2.0  # type: ignore[union-attr]  # the event wakes it now
    paused = Change(tenant="t", id="p", now=2.0, set={"status": Status.WAITING, "run_at": 50.0}, pause_aware=True,
                    history=[HistoryEntry(kind="status", at=2.0, status=int(Status.WAITING))])  # fmt: skip
    (result,) = storage.apply([paused])
    record = storage.get_instance("t", "p")
    assert result.status == Status.PAUSED and record.status == Status.PAUSED and record.run_at is None  # type: ignore[union-attr]
    assert storage.get_history("t", "p", 0, 10)[-1].status == int(Status.PAUSED)


def event(type: str, payload: str = "null") -> EventRecord:
    return EventRecord(0, type, payload, 1.0)


def test_a_wait_reads_only_the_oldest_unread_event_of_its_type(storage: Storage) -> None:
    storage.create_instances([instance("t", "a")], [entry()])
    long = "L" * 300  # past the length a key element keeps as is
    sent = [
        event("a", "1"),
        event("b", "2"),
        event("a", "3"),
        event(long, "4"),
        event("a", "5"),
        event("b", "6"),
    ]
    assert storage.apply([Change(tenant="t", id="a", now=1.0, add_events=sent)])[0].event_seqs == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]
    step = StepRecord(key="w#0", seq=1, name="w", kind="wait", status="complete", event_type="a")
    assert storage.apply([Change(tenant="t", id="a", now=2.0, steps=[step], consume_events=[(1, "w#0")])])[
        0
    ].ok

    def unread(type: str, limit: int = 0) -> list[tuple[int, str]]:
        events = storage.get_events("t", "a", unconsumed_only=True, type=type, limit=limit)
        return [(e.seq, e.payload_json) for e in events]

    assert unread("a", limit=1) == [(3, "3")]  # the oldest unread one of its type
    assert unread("a") == [(3, "3"), (5, "5")]
    assert unread("b", limit=1) == [(2, "2")]
    assert unread(long) == [(4, "4")] and unread("L" * 299) == [] and unread("c") == []
    every_a = storage.get_events("t", "a", unconsumed_only=False, type="a")
    assert [(e.seq, e.consumed_by) for e in every_a] == [(1, "w#0"), (3, ""), (5, "")]
    assert [e.seq for e in storage.get_events("t", "a", unconsumed_only=True, limit=2)] == [2, 3]


def test_the_inbox_cap_counts_unread_events_and_their_bytes(storage: Storage) -> None:
    storage.create_instances([instance("t", "a"), instance("t", "b")], [entry(), entry()])

    def send(id: str, *events: EventRecord, cap: tuple[int, int] = (3, 0)) -> ApplyResult:
        return storage.apply([Change(tenant="t", id=id, now=1.0, add_events=list(events), inbox_cap=cap,
                                     history=[entry("sent")])])[0]  # fmt: skip

    for n in range(3):
        assert send("a", event("go", str(n))).ok
    refused = send("a", event("go", "3"))
    assert not refused.ok and refused.unread == (3, 3 * len("go0")), refused
    assert send("a", event("go"), cap=(0, 0)).ok  # no cap: the kernel's own notices
    assert len(storage.get_events("t", "a", unconsumed_only=True)) == 4
    assert len(storage.get_history("t", "a", 0, 100)) == 1 + 4  # the refused change wrote nothing
    step = StepRecord(key="w#0", seq=1, name="w", kind="wait", status="complete", event_type="go")
    storage.apply([Change(tenant="t", id="a", now=2.0, steps=[step], consume_events=[(1, "w#0")])])
    assert not send("a", event("go")).ok  # 3 unread: still at the cap
    assert send("a", event("go"), cap=(5, 0)).ok  # unread: 3 + 3 + 6 + 6 bytes
    by_bytes = send("a", event("go", "x" * 10), cap=(0, 18 + 12 - 1))
    assert not by_bytes.ok and by_bytes.unread == (4, 18), by_bytes
    assert send("a", event("go", "x" * 10), cap=(0, 18 + 12)).ok
    # A restart gives back the events its deleted steps consumed: they count again.
    restart = Change(
        tenant="t", id="a", now=3.0, delete_steps_from=1, bump_generation=True, release_events=True
    )
    assert storage.apply([restart])[0].ok
    released = send("a", event("go"), cap=(6, 0))
    assert not released.ok and released.unread == (6, 18 + 12 + 3), released
    # By bytes; a refused change in a batch refuses itself only.
    big = event("go", "x" * 1000)
    batch = [Change(tenant="t", id="b", now=1.0, add_events=[big], inbox_cap=(0, 2100)) for _ in range(3)]
    assert [(r.ok, r.unread) for r in storage.apply(batch)] == [
        (True, None),
        (True, None),
        (False, (2, 2004)),
    ]
    assert send("b", event("go"), cap=(3, 0)).ok  # the count cap alone: 3 events


def test_concurrent_senders_cannot_pass_the_inbox_cap(pair: tuple[Storage, Storage]) -> None:
    a, b = pair
    a.create_instances([instance("t", "x")], [entry()])

    def send(storage: Storage, n: int) -> int:
        taken = 0
        for k in range(10):
            change = Change(tenant="t", id="x", now=1.0, add_events=[event("go", str(n * 100 + k))],
                            inbox_cap=(25, 0))  # fmt: skip
            taken += storage.apply([change])[0].ok
        return taken

    taken = race(*[lambda s=s, n=n: send(s, n) for n, s in enumerate([a, b, a, b])])
    assert sum(taken) == 25 and len(b.get_events("t", "x", unconsumed_only=True)) == 25


def test_an_event_wakes_an_instance_only_while_a_step_waits_for_its_type(storage: Storage) -> None:
    storage.create_instances([instance("t", "a")], [entry()])
    waiting = StepRecord(
        key="w#0", seq=1, name="w", kind="wait", status="waiting", event_type="go", wake_at=99.0
    )
    sleeping = StepRecord(key="s#0", seq=2, name="s", kind="sleep", status="sleeping", wake_at=99.0)
    hibernate = {"status": Status.WAITING, "run_at": 99.0}
    storage.apply([Change(tenant="t", id="a", now=1.0, steps=[waiting, sleeping], set=hibernate)])

    def send(type: str, now: float) -> float | None:
        storage.apply([Change(tenant="t", id="a", now=now, add_events=[event(type)], wake_waiting=[type])])
        return storage.get_instance("t", "a").run_at  # type: ignore[union-attr]

    assert send("other", 2.0) == 99.0  # kept, but nobody waits for it
    assert send("go", 3.0) == 3.0  # the wait is woken
    assert [e.type for e in storage.get_events("t", "a", unconsumed_only=True)] == ["other", "go"]
    done = dataclasses.replace(waiting, status="complete")
    storage.apply(
        [Change(tenant="t", id="a", now=4.0, steps=[done], set=hibernate, consume_events=[(2, "w#0")])]
    )
    assert send("go", 5.0) == 99.0  # that wait is over
    # A later wait for a type already in the inbox is woken by the suspend that records it.
    later = StepRecord(
        key="o#0", seq=3, name="o", kind="wait", status="waiting", event_type="other", wake_at=99.0
    )
    storage.apply(
        [Change(tenant="t", id="a", now=6.0, steps=[later], set=hibernate, wake_on_events=["other"])]
    )
    assert storage.get_instance("t", "a").run_at == 6.0  # type: ignore[union-attr]
    # A restart deletes the waiting step: nothing waits any more.
    storage.apply(
        [Change(tenant="t", id="a", now=7.0, delete_steps_from=3, bump_generation=True, set=hibernate)]
    )
    assert send("other", 8.0) == 99.0
    # A paused instance is never woken.
    storage.apply([Change(tenant="t", id="a", now=9.0, steps=[later],
                          set={"status": Status.PAUSED, "run_at": None})])  # fmt: skip
    assert send("other", 10.0) is None


def test_claim_leases_due_instances_round_robin_across_tenants(storage: Storage) -> None:
    now = time.time()
    storage.create_instances(
        [instance("noisy", f"n{i}", run_at=now - 10 + i) for i in range(6)], [entry()] * 6
    )
    storage.create_instances([instance("quiet", "q", run_at=now - 1)], [entry()])
    storage.create_instances([instance("later", "l", run_at=now + 60)], [entry()])
    first = storage.claim("node-a", now, 30, 2)
    assert sorted(r.tenant for r in first) == ["noisy", "quiet"]  # one per tenant before a second of any
    assert all(r.lease_owner == "node-a" for r in first)
    second = storage.claim("node-b", now, 30, 10)
    assert {r.id for r in second} == {f"n{i}" for i in range(6)} - {r.id for r in first}
    assert storage.claim("node-b", now, 30, 10) == []  # leased ones are not claimed twice; "later" not due
    assert storage.next_run_at() == pytest.approx(now + 60)
    assert storage.renew_leases(
        "node-a", [(r.tenant, r.id) for r in first] + [("noisy", "n5")], now + 60
    ) == [("noisy", "n5")]
    assert storage.release_leases("node-b") == 5
    assert len(storage.claim("node-c", now + 31, 30, 10)) == 5  # node-a's leases still live
    assert {r.id for r in storage.claim("node-d", now + 61, 30, 10)} == {r.id for r in first} | {"l"}


def test_claim_caps_each_tenant_and_sees_past_a_burst(storage: Storage) -> None:
    now = time.time()
    burst = [instance("noisy", f"n{i}", run_at=now - 100 + i * 0.001) for i in range(2000)]
    storage.create_instances(burst, [entry()] * len(burst))
    storage.create_instances([instance("quiet", "q", run_at=now - 1)], [entry()])
    first = storage.claim("node", now, 30, 3, per_tenant=2)
    assert sorted(r.id for r in first) == ["n0", "n1", "q"]  # the quiet tenant is seen behind 2,000 rows
    assert storage.claim("node", now, 30, 10, per_tenant=2) == []  # noisy is at its cap, quiet has no more
    storage.apply(
        [
            Change(
                tenant="noisy",
                id="n0",
                now=now,
                set={"lease_owner": None, "lease_until": None, "run_at": None},
            )
        ]
    )
    assert [r.id for r in storage.claim("node", now, 30, 10, per_tenant=2)] == ["n2"]


def limited(id: str, key: str, n: int, run_at: float, workflow: str = "W") -> InstanceRecord:
    record = instance("t", id, run_at=run_at)
    record.workflow, record.concurrency_key, record.concurrency_limit = workflow, key, n
    return record


def suspend(storage: Storage, id: str, now: float, run_at: float | None = None) -> None:
    """What a wake-up that sleeps or waits commits: its lease goes."""
    change = Change(tenant="t", id=id, now=now, set={"status": Status.WAITING, "run_at": run_at,
                                                     "lease_owner": None, "lease_until": None})  # fmt: skip
    assert storage.apply([change])[0].ok


def test_a_concurrency_limit_holds_claims_keeps_order_and_frees_slots(storage: Storage) -> None:
    now = time.time()
    queued = [limited(f"a{i}", "cust-a", 2, now - 10 + i) for i in range(5)]
    others = [limited("b0", "cust-b", 2, now - 10), limited("other-wf", "cust-a", 2, now - 10, "V"),
              instance("t", "free", run_at=now - 5)]  # fmt: skip
    storage.create_instances(queued + others, [entry()] * 8)
    got = storage.get_instance("t", "a0")
    assert got is not None and (got.concurrency_key, got.concurrency_limit) == ("cust-a", 2)
    first = storage.claim("node", now, 30, 10)
    # two of cust-a, the oldest; held-back ones hold nothing else back
    assert sorted(r.id for r in first) == ["a0", "a1", "b0", "free", "other-wf"]
    assert {(r.id, r.concurrency_key) for r in first} >= {("a0", "cust-a"), ("b0", "cust-b")}
    assert storage.claim("node", now, 30, 10) == []
    suspend(storage, "a1", now, run_at=now + 0.5)  # sleeping: its slot is free
    assert [r.id for r in storage.claim("node-2", now, 30, 10)] == ["a2"]
    assert storage.claim("node-2", now + 1, 30, 10) == []  # a1 woke up, but its group is full
    suspend(storage, "a0", now)
    assert [r.id for r in storage.claim("node-2", now + 1, 30, 10)] == ["a3"]  # in order of run_at
    suspend(storage, "a2", now)  # a4 was due before a1 woke up: it goes first
    assert [r.id for r in storage.claim("node-2", now + 1, 30, 10)] == ["a4"]
    suspend(storage, "a3", now)
    assert [r.id for r in storage.claim("node-2", now + 1, 30, 10)] == ["a1"]
    # an expired lease (a dead node) no longer counts
    again = sorted(r.id for r in storage.claim("node-3", now + 40, 30, 10))
    assert again == ["a1", "a4", "b0", "free", "other-wf"]


def test_a_concurrency_limit_holds_across_nodes(pair: tuple[Storage, Storage]) -> None:
    a, b = pair
    now = time.time()
    records = [limited(f"i{n}", "k", 2, now - 10 + n * 0.001) for n in range(20)]
    a.create_instances(records, [entry()] * 20)
    for _ in range(3):
        got = race(*[lambda s=s, n=n: s.claim(f"node-{n}", now, 30, 3)
                     for n, s in enumerate([a, b, a, b])])  # fmt: skip
        assert sum(len(g) for g in got) <= 2
    leased = [r for r in a.list_instances("t", None, None, 100)[0] if r.lease_owner]
    assert sorted(r.id for r in leased) == ["i0", "i1"]


def schedule(name: str, next_fire: float | None, tenant: str = "t") -> ScheduleRecord:
    return ScheduleRecord(tenant=tenant, name=name, cron="* * * * * *", time_zone="UTC", workflow="W",
                          code="artifact://t/c", params_json='{"x": 1}', next_fire=next_fire,
                          created_at=1.0, updated_at=1.0)  # fmt: skip


def test_schedules_create_get_list_update_delete(storage: Storage) -> None:
    made = storage.create_schedule(schedule("nightly", 100.0))
    assert made.version == 1 and storage.get_schedule("t", "nightly") == made
    with pytest.raises(AlreadyExists, match="'nightly' already exists"):
        storage.create_schedule(schedule("nightly", 5.0))
    for name in ("b", "a", "c"):
        storage.create_schedule(schedule(name, None))
    storage.create_schedule(schedule("a", None, tenant="u"))
    page, cursor = storage.list_schedules("t", None, 2)
    assert [s.name for s in page] == ["a", "b"] and cursor
    rest, end = storage.list_schedules("t", cursor, 10)
    assert [s.name for s in rest] == ["c", "nightly"] and end is None
    paused = storage.update_schedule(dataclasses.replace(made, paused=True, next_fire=None))
    assert paused is not None and paused.version == 2 and paused.paused
    assert storage.update_schedule(dataclasses.replace(made, fires=9)) is None  # stale version
    assert storage.get_schedule("t", "nightly") == paused
    assert storage.delete_schedule("t", "nightly") and not storage.delete_schedule("t", "nightly")
    assert storage.get_schedule("t", "nightly") is None and storage.get_schedule("u", "a") is not None


def test_claim_schedules_leases_due_ones_once(pair: tuple[Storage, Storage]) -> None:
    a, b = pair
    now = time.time()
    for n in range(10):
        a.create_schedule(schedule(f"s{n}", now - 10 + n))
    a.create_schedule(schedule("later", now + 60))
    paused = a.create_schedule(dataclasses.replace(schedule("paused", now - 20), paused=True))
    got = race(*[lambda s=s, n=n: s.claim_schedules(f"node-{n}", now, 30, 4)
                 for n, s in enumerate([a, b, a, b])])  # fmt: skip
    names = sorted(s.name for g in got for s in g)
    assert names == sorted(f"s{n}" for n in range(10))  # each once; not the paused or later one
    assert all(s.lease_owner and s.lease_until == now + 30 for g in got for s in g)
    assert b.claim_schedules("node-x", now + 10, 30, 100) == []  # leases live
    # the fire loop moves next_fire on and drops its lease, compare-and-set on the version
    leased = next(s for g in got for s in g)
    moved = a.update_schedule(dataclasses.replace(leased, next_fire=now + 100, lease_owner=None,
                                                  lease_until=None, fires=1))  # fmt: skip
    assert moved is not None and moved.version == leased.version + 1
    again = sorted(s.name for s in b.claim_schedules("node-y", now + 31, 30, 100))
    assert again == sorted({f"s{n}" for n in range(10)} - {leased.name})
    assert a.get_schedule("t", "paused") == paused


def test_purge_deletes_only_long_ended_instances_and_all_their_rows(storage: Storage) -> None:
    statuses = [Status.COMPLETE, Status.ERRORED, Status.TERMINATED, Status.WAITING, Status.PAUSED]
    storage.create_instances([instance("t", s.name.lower(), status=s) for s in statuses], [entry()] * 5)
    storage.create_instances([instance("t", "recent", status=Status.COMPLETE)], [entry()])
    step = StepRecord(key="s#0", seq=1, name="s", kind="do", status="complete", output_json="1")
    for id in [*(s.name.lower() for s in statuses), "recent"]:
        then = 100.0 if id != "recent" else time.time()  # everything but "recent" last changed long ago
        event = EventRecord(0, "go", "null", then)
        assert storage.apply([Change(tenant="t", id=id, now=then, steps=[step], add_events=[event],
                                     history=[entry()])])[0].ok  # fmt: skip
    assert storage.purge_ended(1000.0, 2) == 2  # batched
    assert storage.purge_ended(1000.0, 100) == 1
    assert storage.purge_ended(1000.0, 100) == 0
    for gone in ("complete", "errored", "terminated"):
        assert storage.get_instance("t", gone) is None
        assert storage.get_steps("t", gone) == [] and storage.get_history("t", gone, 0, 10) == []
        assert storage.get_events("t", gone, unconsumed_only=False) == []
    for kept in ("waiting", "paused", "recent"):
        assert storage.get_instance("t", kept) is not None and len(storage.get_steps("t", kept)) == 1


def test_create_respects_the_live_instance_cap(storage: Storage) -> None:
    storage.create_instances([instance("t", "a"), instance("t", "b", status=Status.COMPLETE)], [entry()] * 2)
    storage.create_instances([instance("t", "c", status=Status.WAITING)], [entry()], max_live=2)
    with pytest.raises(ResourceExhausted, match="'t' has 2 live instances and the limit is 2"):
        storage.create_instances([instance("t", "d")], [entry()], max_live=2)
    assert storage.get_instance("t", "d") is None
    storage.create_instances([instance("u", "d")], [entry()], max_live=2)  # another tenant's own cap
    storage.create_instances([instance("t", "e")], [entry()])  # 0: no cap


def test_delete_removes_an_instance_and_all_its_rows(storage: Storage) -> None:
    storage.create_instances([instance("t", "a"), instance("t", "b")], [entry(), entry()])
    step = StepRecord(key="s#0", seq=1, name="s", kind="do", status="running")
    storage.apply(
        [Change(tenant="t", id="a", now=1.0, steps=[step], add_events=[EventRecord(0, "go", "null", 1.0)])]
    )
    assert storage.delete_instance("t", "a") and not storage.delete_instance("t", "a")
    assert storage.get_instance("t", "a") is None and storage.get_steps("t", "a") == []
    assert (
        storage.get_events("t", "a", unconsumed_only=False) == []
        and storage.get_history("t", "a", 0, 9) == []
    )
    assert storage.get_instance("t", "b") is not None
    storage.create_instances([instance("t", "a")], [entry()])  # the id can be used again


def test_count_by_status_counts_every_tenant(storage: Storage) -> None:
    assert all(count == 0 for count in storage.count_by_status().values())
    storage.create_instances([instance("t", "a"), instance("t", "b", status=Status.WAITING)], [entry()] * 2)
    storage.create_instances([instance("u", "a", status=Status.WAITING)], [entry()])
    storage.create_instances([instance("u", "b", status=Status.COMPLETE)], [entry()])
    counts = {status: count for status, count in storage.count_by_status().items() if count}
    assert counts == {Status.QUEUED: 1, Status.WAITING: 2, Status.COMPLETE: 1}
    storage.delete_instance("u", "a")
    assert storage.count_by_status()[Status.WAITING] == 1


# -- concurrency: threads on one storage object, and on two objects over one store ------------------
@pytest.fixture(params=["one object", "two objects"])
def pair(
    request: pytest.FixtureRequest, storage_url: str, storage_harness: StorageHarness, tmp_path: Path
) -> Iterator[tuple[Storage, Storage]]:
    """Two handles on one store: the same object twice, or two objects (as two kernel nodes have)."""
    first = open_storage(storage_url, tmp_path)
    second = first if request.param == "one object" else open_storage(storage_url, tmp_path)
    yield first, second
    if second is not first:
        second.close()
    storage_harness.discard(first)


def race(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls on threads released together; their results in order."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], Any]) -> Any:
        barrier.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def test_two_writers_racing_on_one_instance_one_wins(pair: tuple[Storage, Storage]) -> None:
    a, b = pair
    a.create_instances([instance("t", f"i{n}") for n in range(20)], [entry() for _ in range(20)])
    for n in range(20):

        def write(storage: Storage, who: str, n: int = n) -> bool:
            step = StepRecord(
                key="s#0", seq=1, name="s", kind="do", status="complete", output_json=f'"{who}"'
            )
            change = Change(tenant="t", id=f"i{n}", generation=0, bump_generation=True, now=1.0, steps=[step],
                            set={"status": Status.RUNNING})  # fmt: skip
            return storage.apply([change])[0].ok

        won = race(lambda n=n: write(a, "a", n), lambda n=n: write(b, "b", n))  # type: ignore[misc]
        assert sorted(won) == [False, True]
        (step,) = a.get_steps("t", f"i{n}")
        assert step.output_json == ('"a"' if won[0] else '"b"')
        assert b.get_instance("t", f"i{n}").generation == 1  # type: ignore[union-attr]


def test_lease_expiry_takeover_and_a_fenced_late_writer(pair: tuple[Storage, Storage]) -> None:
    a, b = pair
    now = time.time()
    a.create_instances([instance("t", "x", run_at=now - 1)], [entry()])
    (mine,) = a.claim("node-a", now, 5, 10)
    assert b.claim("node-b", now + 4, 5, 10) == []  # the lease is live
    (taken,) = b.claim("node-b", now + 6, 5, 10)  # expired: node-b takes over
    assert taken.id == "x" and taken.lease_owner == "node-b"
    assert a.renew_leases("node-a", [("t", "x")], now + 30) == [("t", "x")]  # node-a learns it lost
    step = StepRecord(key="s#0", seq=1, name="s", kind="do", status="complete", output_json="1")
    late = Change(tenant="t", id="x", owner="node-a", generation=mine.generation, now=now + 7, steps=[step],
                  set={"status": Status.COMPLETE})  # fmt: skip
    (result,) = a.apply([late])
    assert not result.ok and "lease" in result.reason
    assert b.get_steps("t", "x") == [] and b.get_instance("t", "x").status == Status.QUEUED  # type: ignore[union-attr]
    assert b.apply([Change(tenant="t", id="x", owner="node-b", now=now + 7, steps=[step])])[0].ok


def test_a_timer_is_due_exactly_once_under_concurrent_pollers(pair: tuple[Storage, Storage]) -> None:
    a, b = pair
    now = time.time()
    count = 60
    # half due already, half due during the polling; two tenants
    records = [instance(f"t{n % 2}", f"i{n}", run_at=now - 1 if n % 2 else now + 0.5) for n in range(count)]
    a.create_instances(records, [entry() for _ in records])
    claimed: list[tuple[str, str]] = []
    lock = threading.Lock()

    def poll(storage: Storage, owner: str) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = storage.claim(owner, time.time(), 300, 3)
            with lock:
                claimed.extend((r.tenant, r.id) for r in got)
                if len(claimed) >= count:
                    return
            time.sleep(0.001)

    race(*[lambda s=s, n=n: poll(s, f"node-{n}") for n, s in enumerate([a, b, a, b])])
    assert sorted(claimed) == sorted((r.tenant, r.id) for r in records)  # each once, none missed


def test_an_event_is_delivered_once(pair: tuple[Storage, Storage]) -> None:
    a, b = pair
    a.create_instances([instance("t", "x")], [entry()])
    (sent,) = a.apply([Change(tenant="t", id="x", now=1.0, add_events=[EventRecord(0, "go", "1", 1.0)])])
    seq = sent.event_seqs[0]

    def consume(storage: Storage, n: int) -> bool:
        wait = StepRecord(key=f"w#{n}", seq=n + 1, name="w", kind="wait", status="complete", event_type="go")
        return storage.apply(
            [Change(tenant="t", id="x", now=2.0, steps=[wait], consume_events=[(seq, f"w#{n}")])]
        )[0].ok

    outcomes = race(*[lambda s=s, n=n: consume(s, n) for n, s in enumerate([a, b, a, b])])
    assert outcomes.count(True) == 1
    (event,) = b.get_events("t", "x", unconsumed_only=False)
    assert event.consumed_by == f"w#{outcomes.index(True)}"
    assert [s.key for s in b.get_steps("t", "x")] == [f"w#{outcomes.index(True)}"]  # losers rolled back


def test_paging_under_writes_sees_every_instance_once_in_order(pair: tuple[Storage, Storage]) -> None:
    a, b = pair
    a.create_instances([instance("t", f"a{n:03}") for n in range(150)], [entry() for _ in range(150)])
    stop = threading.Event()

    def write() -> int:
        n = 0
        while not stop.is_set():
            b.create_instances([instance("t", f"b{n:04}")], [entry()])
            if n % 3 == 0 and n >= 3:
                b.delete_instance("t", f"b{n - 3:04}")
            n += 1
        return n

    with ThreadPoolExecutor(1) as pool:
        writer = pool.submit(write)
        seen: list[str] = []
        page, cursor = a.list_instances("t", None, None, 7)
        seen += [r.id for r in page]
        while cursor:
            page, cursor = a.list_instances("t", None, cursor, 7)
            seen += [r.id for r in page]
            time.sleep(0.001)
            if len(seen) > 10_000:
                break
        stop.set()
        written = writer.result()
    assert written > 0
    assert seen[:150] == [f"a{n:03}" for n in range(150)]  # the ones there before: all, once, in order
    later = seen[150:]
    assert len(later) == len(set(later)) and later == sorted(later)  # no repeats, creation order


# -- schedules: the per-tenant cap and the fair claim (issue 16) ----------------------------------


def test_the_schedule_cap_counts_each_tenant_in_the_creating_transaction(
    pair: tuple[Storage, Storage],
) -> None:
    a, b = pair
    got = race(*[lambda s=s, n=n: _try_create(s, schedule(f"s{n}", None), 5)
                 for n, s in enumerate([a, b] * 4)])  # fmt: skip
    assert got.count("ok") == 5 and got.count("full") == 3  # racing creates never pass the cap together
    with pytest.raises(ResourceExhausted, match="'t' has 5 schedules and the limit is 5"):
        a.create_schedule(schedule("more", None), max_per_tenant=5)
    a.create_schedule(schedule("more", None, tenant="u"), max_per_tenant=5)  # another tenant's own count
    made = sorted(s.name for s in a.list_schedules("t", None, 100)[0])
    assert a.delete_schedule("t", made[0]) and not a.delete_schedule("t", made[0])
    b.create_schedule(schedule("more", None), max_per_tenant=5)  # a delete frees a place, once
    with pytest.raises(ResourceExhausted):
        b.create_schedule(schedule("again", None), max_per_tenant=5)
    a.create_schedule(schedule("uncapped", None))  # 0: no cap


def _try_create(storage: Storage, s: ScheduleRecord, cap: int) -> str:
    try:
        storage.create_schedule(s, max_per_tenant=cap)
    except ResourceExhausted:
        return "full"
    return "ok"


def test_claim_schedules_is_round_robin_across_tenants(storage: Storage) -> None:
    now = time.time()
    for n in range(30):  # the flood: due earlier than anyone else
        storage.create_schedule(schedule(f"f{n:02}", now - 100 + n, tenant="flood"))
    storage.create_schedule(schedule("one", now - 1, tenant="quiet"))
    storage.create_schedule(schedule("two", now - 2, tenant="other"))
    storage.create_schedule(dataclasses.replace(schedule("paused", now - 500, tenant="idle"), paused=True))
    got = storage.claim_schedules("n", now, 30, 5, per_tenant=3)
    assert [(s.tenant, s.name) for s in got] == [
        ("flood", "f00"), ("other", "two"), ("quiet", "one"), ("flood", "f01"), ("flood", "f02"),
    ]  # fmt: skip
    # the flooding tenant's next ones (its earliest are leased) still go after the others' first
    storage.create_schedule(schedule("late", now, tenant="quiet"))
    again = storage.claim_schedules("m", now, 30, 3, per_tenant=2)  # another node
    assert [(s.tenant, s.name) for s in again] == [("flood", "f03"), ("quiet", "late"), ("flood", "f04")]
    # a tenant out of fire budget is passed over entirely; no cap takes all of a tenant's due ones
    storage.create_schedule(schedule("three", now - 3, tenant="other"))
    skipped = storage.claim_schedules("o", now, 30, 100, skip={"flood"})
    assert [(s.tenant, s.name) for s in skipped] == [("other", "three")]
    rest = storage.claim_schedules("p", now, 30, 100)
    assert [s.name for s in rest] == [f"f{n:02}" for n in range(5, 30)]


def test_a_deferred_schedule_is_due_again_once_its_lease_is_given_back(storage: Storage) -> None:
    now = time.time()
    made = storage.create_schedule(schedule("s", now - 1))
    (leased,) = storage.claim_schedules("n", now, 30, 10)
    assert storage.claim_schedules("m", now, 30, 10) == []
    back = storage.update_schedule(dataclasses.replace(leased, lease_owner=None, lease_until=None))
    assert back is not None and back.next_fire == made.next_fire
    assert [s.name for s in storage.claim_schedules("o", now, 30, 10)] == ["s"]
    storage.update_schedule(dataclasses.replace(back, paused=True, next_fire=None))
    assert storage.delete_schedule("t", "s")
    assert storage.claim_schedules("m", now + 60, 30, 10) == []  # paused, then deleted: gone from the index


def test_upgrade_re_pins_an_instance_under_its_lease(storage: Storage) -> None:
    """Upgrade sets the code ref of a live instance (guarded by the lease it holds and the generation);
    the envelope's other fields stay as they were."""
    storage.create_instances([instance("t", "i")], [entry()])
    now = time.time()
    take = Change(
        tenant="t", id="i", now=now, generation=0, set={"lease_owner": "n/upgrade", "lease_until": now + 60}
    )
    assert storage.apply([take])[0].ok
    stolen = Change(
        tenant="t", id="i", now=now, owner="other", set={"code": "artifact://t/c@sha256:" + "2" * 64}
    )
    assert not storage.apply([stolen])[0].ok  # only the lease holder re-pins
    new = "artifact://t/c@sha256:" + "1" * 64
    pin = Change(tenant="t", id="i", now=now, generation=0, owner="n/upgrade",
                 set={"code": new, "lease_owner": None, "lease_until": None})  # fmt: skip
    assert storage.apply([pin])[0].ok
    after = storage.get_instance("t", "i")
    assert after is not None and after.code == new and after.lease_owner is None
    assert (after.workflow, after.params_json) == (
        instance("t", "i").workflow,
        instance("t", "i").params_json,
    )


# -- under injected faults (issue 27) ---------------------------------------------------------------
# An engine whose harness injects faults (kv+lmdb: a fifth of all commits fail with not_committed,
# transaction_too_old or commit_unknown_result after the commit applied) runs these checks on such a
# store: its retry loop runs the transaction again, so every write must find its own earlier commit,
# and the contract must hold unchanged.
UNDER_FAULTS = [
    test_create_is_all_or_nothing_per_tenant,
    test_apply_guards_roll_back_only_the_failing_change,
    test_events_history_and_restart_deletion,
    test_claim_leases_due_instances_round_robin_across_tenants,
    test_claim_caps_each_tenant_and_sees_past_a_burst,
    test_a_concurrency_limit_holds_claims_keeps_order_and_frees_slots,
    test_schedules_create_get_list_update_delete,
    test_purge_deletes_only_long_ended_instances_and_all_their_rows,
    test_delete_removes_an_instance_and_all_its_rows,
    test_count_by_status_counts_every_tenant,
]


@pytest.mark.parametrize("check", UNDER_FAULTS, ids=lambda check: check.__name__.removeprefix("test_"))
def test_the_contract_holds_under_injected_faults(
    check: Callable[[Storage], None], storage_harness: StorageHarness, tmp_path: Path
) -> None:
    require(storage_harness, "faults")
    storage = open_storage(storage_harness.faulty_url(tmp_path), tmp_path)
    try:
        storage_harness.prepare_faulty(storage)
        check(storage)
        assert storage_harness.faults_injected(storage) > 0  # faults were injected, and survived
    finally:
        storage_harness.discard(storage)


def test_list_narrows_by_workflow_and_creation_time_and_counts_exactly(storage: Storage) -> None:
    """List's filters beyond status; a filtered page may come back short with a cursor, so the
    instances are gathered by paging to the end, as a client does."""
    base = 1_800_000_000.0
    made = [
        dataclasses.replace(instance("t", f"i{n:02}"), workflow="A" if n % 3 else "B", created_at=base + n)
        for n in range(30)
    ]
    storage.create_instances(made, [entry() for _ in made])
    storage.create_instances([instance("other", "x")], [entry()])

    def gather(**filters: Any) -> list[str]:
        ids: list[str] = []
        cursor: str | None = None
        while True:
            page, cursor = storage.list_instances("t", None, cursor, 4, **filters)
            assert len(page) <= 4
            ids += [r.id for r in page]
            if cursor is None:
                return ids

    b = [f"i{n:02}" for n in range(0, 30, 3)]
    assert gather(workflow="B") == b
    window = {"created_after": base + 10, "created_before": base + 20}
    assert gather(**window) == [f"i{n}" for n in range(10, 20)]
    assert gather(workflow="B", **window) == ["i12", "i15", "i18"]
    assert gather(workflow="nope") == []
    assert storage.count_instances("t", None) == 30
    assert storage.count_instances("t", None, workflow="B") == 10
    assert storage.count_instances("t", None, workflow="A", **window) == 7
    assert storage.count_instances("t", Status.WAITING) == 0
