"""The LMDB stand-in keeps FoundationDB's rules: conflicts, the 5-second life, size limits counted as
FoundationDB counts them, read-your-writes, injected faults; and the binding's API version choice."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tenantflow.kernel.errors import Unavailable
from tenantflow.plugins.storage_fdb.fdb_layer import choose_api_version
from tenantflow.plugins.storage_fdb.layer import FdbError, Txn, decode_int
from tenantflow.plugins.storage_fdb.lmdb_layer import LmdbLayer, Rules


@pytest.fixture
def layer(tmp_path: Path) -> Iterator[LmdbLayer]:
    layer = LmdbLayer(tmp_path / "kv", map_size=1 << 30)
    yield layer
    layer.close()


def meanwhile(layer: LmdbLayer, key: bytes, value: bytes) -> None:
    """Commit a write of ``key`` from another thread, while the caller's transaction is open."""
    thread = threading.Thread(target=layer.transact, args=(lambda tr: tr.set(key, value),))
    thread.start()
    thread.join()


def test_a_write_to_what_a_transaction_read_makes_it_retry_and_a_snapshot_read_does_not(
    layer: LmdbLayer,
) -> None:
    layer.transact(lambda tr: tr.set(b"k", b"a"))
    tries: list[bytes | None] = []

    def append(tr: Txn, snapshot: bool) -> None:
        value = tr.get(b"k", snapshot=snapshot) or b""
        tries.append(value)
        if len(tries) == 1:
            meanwhile(layer, b"k", b"other")
        tr.set(b"k", value + b"!")

    layer.transact(lambda tr: append(tr, False))
    assert tries == [b"a", b"other"] and layer.counters.conflicts == 1
    assert layer.read(lambda tr: tr.get(b"k")) == b"other!"
    tries.clear()
    layer.transact(lambda tr: append(tr, True))  # no read conflict: the write meanwhile is lost
    assert tries == [b"other!"] and layer.counters.conflicts == 1
    assert layer.read(lambda tr: tr.get(b"k")) == b"other!!"


def test_a_limited_range_read_conflicts_only_on_the_keys_it_saw(layer: LmdbLayer) -> None:
    layer.transact(lambda tr: [tr.set(b"r" + bytes([n]), b"") for n in range(10)])
    tries = 0

    def first_two(tr: Txn, key: bytes) -> None:
        nonlocal tries
        tries += 1
        rows = tr.get_range(b"r", b"s", limit=2)
        if tries == 1:
            meanwhile(layer, key, b"x")
        tr.set(b"seen", rows[-1][0])

    first_two_past = b"r\x05"
    layer.transact(lambda tr: first_two(tr, first_two_past))
    assert tries == 1
    tries = 0
    layer.transact(lambda tr: first_two(tr, b"r\x01"))
    assert tries == 2


def test_a_transaction_older_than_its_limit_is_retried_and_the_time_out_covers_all_tries(
    tmp_path: Path,
) -> None:
    layer = LmdbLayer(tmp_path / "kv", map_size=1 << 30, rules=Rules(max_age=0.2, timeout=1.0))
    try:
        tries = 0

        def slow_once(tr: Txn) -> None:
            nonlocal tries
            tries += 1
            if tries == 1:
                time.sleep(0.3)
            tr.set(b"k", b"v")

        layer.transact(slow_once)
        assert tries == 2
        with pytest.raises(FdbError, match="transaction_timed_out") as caught:
            layer.transact(lambda tr: (time.sleep(0.3), tr.get(b"k")))
        assert caught.value.code == 1031
        assert layer.counters.attempts > 3  # too old, retried, until the time-out
    finally:
        layer.close()


def test_sizes_are_held_to_foundationdbs_limits_counting_conflict_ranges(layer: LmdbLayer) -> None:
    with pytest.raises(FdbError, match="value_too_large"):
        layer.transact(lambda tr: tr.set(b"k", b"v" * 100_001))
    with pytest.raises(FdbError, match="key_too_large"):
        layer.transact(lambda tr: tr.set(b"k" * 512, b""))

    def many(tr: Txn, reads: bool) -> None:
        # 103 values of 95,000 bytes under 500-byte keys: 9,836,500 bytes of mutations
        for n in range(103):
            key = bytes([n]) * 500
            if reads:
                tr.get(key)  # a read conflict range: 1,001 bytes more each
            tr.set(key, b"v" * 95_000)

    layer.transact(lambda tr: many(tr, False))  # and 103,103 of write conflict ranges
    assert layer.counters.max_size == 9_939_603
    with pytest.raises(FdbError, match="transaction_too_large") as caught:
        layer.transact(lambda tr: many(tr, True))  # and as many of read conflicts
    assert caught.value.code == 2101


def test_a_transaction_reads_its_own_writes(layer: LmdbLayer) -> None:
    layer.transact(lambda tr: [tr.set(k, b"old") for k in (b"a", b"b", b"c", b"n")])
    layer.transact(lambda tr: tr.set(b"n", (5).to_bytes(8, "little")))

    def work(tr: Txn) -> list[tuple[bytes, bytes]]:
        tr.clear_range(b"a", b"c")
        tr.set(b"b", b"new")
        tr.add(b"n", 2)
        tr.add(b"z", 3)
        assert decode_int(tr.get(b"n")) == 7 and decode_int(tr.get(b"z")) == 3
        assert tr.get_many([b"a", b"b", b"c"]) == [None, b"new", b"old"]
        return tr.get_range(b"a", b"d", reverse=True)

    assert layer.transact(work) == [(b"c", b"old"), (b"b", b"new")]
    assert layer.read(lambda tr: tr.get_range(b"a", b"zz")) == [
        (b"b", b"new"),
        (b"c", b"old"),
        (b"n", (7).to_bytes(8, "little")),
        (b"z", (3).to_bytes(8, "little")),
    ]


def test_atomic_adds_never_conflict(layer: LmdbLayer) -> None:
    threads = [
        threading.Thread(target=lambda: [layer.transact(lambda tr: tr.add(b"n", 1)) for _ in range(50)])
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert decode_int(layer.read(lambda tr: tr.get(b"n"))) == 200 and layer.counters.conflicts == 0


def test_injected_faults_behave_as_foundationdbs(layer: LmdbLayer) -> None:
    layer.inject("commit_unknown_result")  # applied, reported unknown, run again
    layer.transact(lambda tr: tr.add(b"n", 1))
    assert decode_int(layer.read(lambda tr: tr.get(b"n"))) == 2  # so work must be idempotent
    layer.inject("not_committed")
    layer.inject("transaction_too_old")
    layer.transact(lambda tr: tr.add(b"n", 1))  # not applied twice, then applied
    assert decode_int(layer.read(lambda tr: tr.get(b"n"))) == 3
    layer.inject("transaction_timed_out")  # applied, and raised: not retried
    with pytest.raises(FdbError) as caught:
        layer.transact(lambda tr: tr.add(b"n", 1))
    assert caught.value.code == 1031 and decode_int(layer.read(lambda tr: tr.get(b"n"))) == 4


def test_reads_are_counted_and_a_batch_is_one_round_trip(tmp_path: Path) -> None:
    layer = LmdbLayer(tmp_path / "kv", map_size=1 << 30, rules=Rules(read_latency=0.01))
    try:
        started = time.monotonic()
        layer.read(lambda tr: tr.get_many([bytes([n]) for n in range(50)]))
        layer.read(lambda tr: tr.get_ranges([(b"a", b"b", 0)] * 20))
        assert time.monotonic() - started < 0.5  # two round trips, not seventy
        c = layer.counters
        assert (c.reads, c.round_trips, c.max_reads, c.max_round_trips) == (70, 2, 50, 1)
    finally:
        layer.close()


def test_the_api_version_follows_the_installed_client_library() -> None:
    assert choose_api_version(730, 800, None) == 730  # a 7.3 binding on any newer libfdb_c
    assert choose_api_version(800, 800, None) == 800
    assert choose_api_version(740, 800, 730) == 730
    # the 8.0 binding hands libfdb_c header version 800, which a 7.3 library refuses outright
    with pytest.raises(Unavailable, match=r"at most 730 \(FoundationDB 7\.3\).*foundationdb~=7\.3\.0"):
        choose_api_version(800, 730, None)
    with pytest.raises(Unavailable, match="api_version=740 is outside what works here: 730 to 730"):
        choose_api_version(730, 740, 740)


def test_ranges_cleared_in_any_order_hide_exactly_what_they_cover(layer: LmdbLayer) -> None:
    keys = [bytes([n]) for n in range(1, 100)]
    layer.transact(lambda tr: [tr.set(key, b"v") for key in keys])
    rng = random.Random(27)
    ranges = [(rng.randrange(1, 100), rng.randrange(0, 6)) for _ in range(40)]
    gone = {bytes([n]) for start, length in ranges for n in range(start, min(start + length, 100))}

    def clear_and_read(tr: Txn) -> list[bytes]:
        for start, length in ranges:  # overlapping, adjacent, nested and empty, in random order
            tr.clear_range(bytes([start]), bytes([min(start + length, 100)]))
        tr.set(bytes([50]), b"again")  # a write after the clears shows through them
        return [key for key, _ in tr.get_range(b"\x00", b"\xff")]

    expected = sorted((set(keys) - gone) | {bytes([50])})
    assert layer.transact(clear_and_read) == expected
    assert [key for key, _ in layer.read(lambda tr: tr.get_range(b"\x00", b"\xff"))] == expected
