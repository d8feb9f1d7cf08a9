"""The storage contract's key versions and read sets, on every engine the suite is given.

Every write stamps the keys it writes with a version that only grows (absent: 0). A change carrying
a step attempt's read set (``Change.kv_reads``, ``Change.kv_ranges``) commits only if, in its own
transaction, every key read still has the version seen and every listed page would list the same
keys; else it is refused with ``ApplyResult.kv_conflict`` and writes nothing (not its step either).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

from tenantflow.conformance.test_storage import entry, instance, pair, storage, storage_url
from tenantflow.kernel.model import Change, StepRecord
from tenantflow.kernel.storage import Storage
from tenantflow.kernel.tenantkv import KVEntry, KVRange

__all__ = ["pair", "storage", "storage_url"]  # the fixtures this suite shares with the storage suite


def _version(storage: Storage, key: str, tenant: str = "t") -> int:
    got = storage.kv_get(tenant, key)
    return got.version if got is not None else 0


def _step_done(value: str, kv: list[tuple[str, str | None]], id: str = "a", **kw: Any) -> Change:
    step = StepRecord(key="s#0", seq=1, name="s", kind="do", status="complete", attempts=1, output_json=value)
    return Change(tenant="t", id=id, now=time.time(), steps=[step], kv=kv, **kw)


def _page(storage: Storage, prefix: str, after: str | None, limit: int) -> KVRange:
    entries, nxt = storage.kv_list("t", prefix, after, limit)
    return KVRange(prefix, after, limit, tuple((e.key, e.version) for e in entries), nxt is None)


def test_every_write_gives_a_key_a_greater_version_deletes_too(storage: Storage) -> None:
    assert _version(storage, "k") == 0
    storage.kv_write("t", [("k", "1")], 1.0)
    first = _version(storage, "k")
    assert first > 0
    storage.kv_write("t", [("other", "1")], 2.0)
    assert _version(storage, "k") == first  # a write of another key leaves it alone
    storage.kv_write("t", [("k", "2")], 3.0)
    second = _version(storage, "k")
    assert second > first
    storage.kv_write("t", [("k", None)], 4.0)
    assert _version(storage, "k") == 0
    storage.kv_write("t", [("k", "2")], 5.0)  # the same value again, after a delete
    assert _version(storage, "k") > second
    listed, _ = storage.kv_list("t", "k", None, 10)
    assert [(e.key, e.version) for e in listed] == [("k", _version(storage, "k"))]


def test_a_stale_read_refuses_the_change_and_writes_nothing(storage: Storage) -> None:
    storage.create_instances([instance("t", "a")], [entry()])
    storage.kv_write("t", [("counter", "1")], 1.0)
    seen = _version(storage, "counter")
    storage.kv_write("t", [("counter", "2")], 2.0)  # another step committed meanwhile
    stale = _step_done("2", [("counter", "2"), ("note", '"x"')], kv_reads=[("counter", seen)])
    (result,) = storage.apply([stale])
    assert not result.ok and result.kv_conflict and "counter" in result.kv_conflict
    assert not result.kv_refused
    assert storage.kv_get("t", "counter").value_json == "2"  # type: ignore[union-attr]
    assert storage.kv_get("t", "note") is None
    assert storage.get_steps("t", "a") == []  # the step is not recorded either
    # read again, the same change commits
    fresh = _step_done("3", [("counter", "3")], kv_reads=[("counter", _version(storage, "counter"))])
    (result,) = storage.apply([fresh])
    assert result.ok and not result.kv_conflict
    assert storage.kv_get("t", "counter").value_json == "3"  # type: ignore[union-attr]
    assert storage.get_steps("t", "a")[0].output_json == "3"


def test_absent_keys_read_conflict_with_their_creation_and_deletes_with_reads(storage: Storage) -> None:
    storage.create_instances([instance("t", "a")], [entry()])
    storage.kv_write("t", [("lock", "1")], 1.0)
    held = _version(storage, "lock")
    storage.kv_write("t", [("fresh", "1"), ("lock", None)], 2.0)
    (created,) = storage.apply([_step_done("1", [("x", "1")], kv_reads=[("fresh", 0)])])
    (deleted,) = storage.apply([_step_done("1", [("x", "1")], kv_reads=[("lock", held)])])
    assert created.kv_conflict and deleted.kv_conflict
    (ok,) = storage.apply(
        [_step_done("1", [("x", "1")], kv_reads=[("lock", 0), ("fresh", _version(storage, "fresh"))])]
    )
    assert ok.ok


def test_a_batch_sees_its_own_earlier_changes(storage: Storage) -> None:
    """Two steps that read the same version, committed in one batch: the second is refused."""
    storage.create_instances([instance("t", "a"), instance("t", "b")], [entry(), entry()])
    storage.kv_write("t", [("counter", "0")], 1.0)
    seen = _version(storage, "counter")
    first = _step_done("1", [("counter", "1")], kv_reads=[("counter", seen)])
    second = dataclasses.replace(first, id="b")
    assert [bool(r.kv_conflict) for r in storage.apply([first, second])] == [False, True]
    assert storage.kv_get("t", "counter").value_json == "1"  # type: ignore[union-attr]


def test_listed_pages_detect_phantoms_deletes_and_rewrites(storage: Storage) -> None:
    storage.create_instances([instance("t", "a")], [entry()])
    storage.kv_write("t", [(f"job/{n}", "1") for n in range(5)] + [("jobs", "1"), ("k", "1")], 1.0)
    first, last = _page(storage, "job/", None, 3), _page(storage, "job/", "job/2", 3)
    assert not first.last and last.last and len(last.seen) == 2

    def commits(*ranges: KVRange) -> bool:
        (result,) = storage.apply([_step_done("1", [("sum", "5")], kv_ranges=list(ranges))])
        assert result.ok or result.kv_conflict, result.reason
        return result.ok

    assert commits(first, last)  # nothing changed
    storage.kv_write("t", [("jobs", "2"), ("k", "2"), ("job", "1")], 2.0)  # outside the prefix
    assert commits(first, last)
    storage.kv_write("t", [("job/9", "1")], 3.0)  # a phantom past the last page's end
    assert not commits(last) and commits(first)
    last = _page(storage, "job/", "job/2", 3)
    storage.kv_write("t", [("job/0a", "1")], 4.0)  # a phantom inside the first page
    assert not commits(first) and commits(last)
    first = _page(storage, "job/", None, 3)
    storage.kv_write("t", [("job/1", None)], 5.0)  # a key listed is deleted
    assert not commits(first)
    first = _page(storage, "job/", None, 3)
    storage.kv_write("t", [("job/0", "7")], 6.0)  # a key listed is written
    assert not commits(first)
    assert storage.kv_get("t", "sum").value_json == "5"  # type: ignore[union-attr]


def test_an_empty_listing_conflicts_with_a_first_key(storage: Storage) -> None:
    storage.create_instances([instance("t", "a")], [entry()])
    empty = _page(storage, "queue/", None, 10)
    assert empty.seen == () and empty.last
    storage.kv_write("u", [("queue/1", "1")], 1.0)  # another tenant's key is not a phantom
    (ok,) = storage.apply([_step_done("1", [("x", "1")], kv_ranges=[empty])])
    assert ok.ok
    storage.kv_write("t", [("queue/1", "1")], 2.0)
    (refused,) = storage.apply([_step_done("2", [("x", "2")], kv_ranges=[empty])])
    assert refused.kv_conflict and storage.kv_get("t", "x").value_json == "1"  # type: ignore[union-attr]


def test_racing_read_modify_writes_lose_no_update(pair: tuple[Storage, Storage]) -> None:
    """Writers on two connections each read the counter and commit it plus one with their read set,
    reading again when refused: the counter ends at the number of increments."""
    first, second = pair
    for s, id in ((first, "a"), (first, "b")):
        s.create_instances([instance("t", id)], [entry()])
    increments, errors = 15, []

    def worker(storage: Storage, id: str) -> None:
        try:
            done = 0
            while done < increments:
                got: KVEntry | None = storage.kv_get("t", "counter")
                n = int(got.value_json) if got is not None else 0
                change = _step_done(str(n + 1), [("counter", str(n + 1))],
                                    kv_reads=[("counter", got.version if got is not None else 0)], id=id)  # fmt: skip
                (result,) = storage.apply([change])
                assert result.ok or result.kv_conflict, result.reason
                done += result.ok
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s, id)) for s, id in ((first, "a"), (second, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert first.kv_get("t", "counter").value_json == str(2 * increments)  # type: ignore[union-attr]
