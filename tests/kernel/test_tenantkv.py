"""kernel/tenantkv.py: an attempt's read set, its bounds, and the comparison every engine's check
runs (fed here by plain dictionaries standing for what a transaction reads)."""

from __future__ import annotations

from collections.abc import Callable

from tenantflow.kernel.tenantkv import MAX_READ_SET_KEYS, KVEntry, KVReads, conflict

Page = tuple[list[KVEntry], str | None]


def test_a_read_set_keeps_the_first_version_seen_and_each_page() -> None:
    reads = KVReads()
    reads.got("a", 3)
    reads.got("a", 5)  # read again after it changed: the first read is what the attempt saw
    reads.got("gone", 0)
    reads.listed("p/", None, 2, [KVEntry("p/1", "1", 0.0, 7), KVEntry("p/2", "1", 0.0, 8)], False)
    assert reads.keys == {"a": 3, "gone": 0}
    (page,) = reads.ranges
    assert (page.prefix, page.after, page.limit, page.seen, page.last) == (
        "p/",
        None,
        2,
        (("p/1", 7), ("p/2", 8)),
        False,
    )
    assert not reads.overflow


def test_past_its_bound_a_read_set_is_dropped_and_says_why() -> None:
    reads = KVReads()
    entries = [KVEntry(f"k{n}", "1", 0.0, 1) for n in range(999)]  # with its prefix, 1,000 keys a page
    for page in range(MAX_READ_SET_KEYS // 1000):
        reads.listed("k", f"{page}", 1000, entries, False)
    assert not reads.overflow and len(reads.ranges) == MAX_READ_SET_KEYS // 1000
    reads.got("one more", 1)
    assert f"at most {MAX_READ_SET_KEYS} keys" in reads.overflow and "split the work" in reads.overflow
    assert reads.keys == {} and reads.ranges == []  # nothing more is kept for an attempt that may not write
    reads.got("later", 1)
    assert reads.keys == {}


def test_conflict_names_the_key_or_prefix_that_changed() -> None:
    def page(stored: list[KVEntry], more: bool = False) -> Callable[[str, str | None, int], Page]:
        return lambda prefix, after, limit: (stored, "x" if more else None)

    reads = KVReads()
    reads.got("a", 3)
    reads.got("new", 0)
    reads.listed("p/", None, 5, [KVEntry("p/1", "1", 0.0, 7)], True)
    keys = list(reads.keys.items())
    same = [KVEntry("p/1", "1", 0.0, 7)]
    assert conflict(keys, reads.ranges, {"a": 3}, page(same)) == ""
    assert "key 'a' was written" in conflict(keys, reads.ranges, {"a": 4}, page(same))
    assert "key 'a' was deleted" in conflict(keys, reads.ranges, {}, page(same))
    assert "key 'new' was created" in conflict(keys, reads.ranges, {"a": 3, "new": 9}, page(same))
    assert "prefix 'p/'" in conflict(keys, reads.ranges, {"a": 3}, page([KVEntry("p/1", "1", 0.0, 8)]))
    assert "prefix 'p/'" in conflict(keys, reads.ranges, {"a": 3}, page([*same, KVEntry("p/2", "1", 0.0, 9)]))
    assert "prefix 'p/'" in conflict(keys, reads.ranges, {"a": 3}, page(same, more=True))  # was the last page
