"""One transaction of the LMDB stand-in, kept as FoundationDB keeps one: reads from a snapshot (the
read version), writes buffered until commit and read back (read-your-writes), read and write
conflict ranges recorded, sizes counted as FoundationDB counts them, and every read counted.

Size (FoundationDB's ``Transaction::getSize``): mutations (a set: key + value; a clear: the range's
two ends; an atomic add: key + operand) plus the read and the write conflict ranges (two ends each,
a point being ``[key, key + b"\\x00")``), coalesced as the read-your-writes layer coalesces them.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tenantflow.plugins.storage_fdb.layer import (
    FDB_MAX_KEY_BYTES,
    MAX_KEY_BYTES,
    MAX_VALUE_BYTES,
    FdbError,
    decode_int,
    encode_int,
)

Range = tuple[bytes, bytes]


@dataclass
class Add:
    """A pending atomic add to a key whose value this transaction has not read."""

    delta: int


@dataclass
class Counters:
    """What the stand-in counted, as FoundationDB would (all transactions of one layer)."""

    attempts: int = 0  # transaction attempts, retries included
    commits: int = 0  # commits that applied
    conflicts: int = 0  # not_committed
    reads: int = 0  # read requests (a get, or a range read)
    round_trips: int = 0  # reads waited for one after another (a batch started at once counts one)
    max_reads: int = 0  # of one attempt
    max_round_trips: int = 0
    max_size: int = 0  # bytes, as FoundationDB counts them, of one committed transaction
    max_value: int = 0
    max_seconds: float = 0.0  # age of the oldest attempt when it committed or ended
    faults: dict[str, int] = field(default_factory=dict)  # injected errors by name

    def reset(self) -> None:
        fresh = Counters()
        self.__dict__.update(fresh.__dict__)


def merge(ranges: list[Range]) -> list[Range]:
    """Sorted, disjoint, adjacent ones joined (what FoundationDB sends of a transaction's ranges)."""
    out: list[Range] = []
    for begin, end in sorted(ranges):
        if out and begin <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((begin, end))
    return out


def overlaps(merged: list[Range], begins: list[bytes], begin: bytes, end: bytes) -> bool:
    """Whether ``[begin, end)`` meets a range of ``merged`` (``begins``: their begin keys)."""
    at = bisect.bisect_right(begins, begin) - 1
    if at >= 0 and merged[at][1] > begin:
        return True
    return at + 1 < len(merged) and merged[at + 1][0] < end


def point(key: bytes) -> Range:
    return key, key + b"\x00"


class SimTxn:
    """A FoundationDB-like transaction over an LMDB read-only transaction (its snapshot)."""

    def __init__(
        self,
        snapshot: Any,
        counters: Counters,
        *,
        check: Callable[[], None],
        latency: float,
    ) -> None:
        self._db = snapshot
        self._counters = counters
        self._check = check  # raises transaction_too_old / transaction_timed_out
        self._latency = latency
        self.writes: dict[bytes, bytes | None | Add] = {}
        self._keys: list[bytes] = []  # sorted keys of ``writes``
        self.cleared: list[Range] = []  # sorted, disjoint: ranges cleared (before later writes)
        self._cleared_begins: list[bytes] = []
        self.read_ranges: list[Range] = []
        self.write_ranges: list[Range] = []
        self.reads = 0
        self.round_trips = 0

    # -- reads -----------------------------------------------------------------------------------
    def _trip(self, requests: int) -> None:
        self._check()
        self.reads += requests
        self.round_trips += 1
        self._counters.reads += requests
        self._counters.round_trips += 1
        if self._latency:
            time.sleep(self._latency)

    def _is_cleared(self, key: bytes) -> bool:
        at = bisect.bisect_right(self._cleared_begins, key) - 1
        return at >= 0 and self.cleared[at][1] > key

    def _stored(self, key: bytes) -> bytes | None:
        if self._is_cleared(key):
            return None
        value = self._db.get(key)
        return bytes(value) if value is not None else None

    def _value(self, key: bytes, stored: Callable[[], bytes | None]) -> tuple[bytes | None, bool]:
        """The value this transaction sees at ``key``, and whether it came (in part) from storage."""
        if key in self.writes:
            pending = self.writes[key]
            if isinstance(pending, Add):
                return encode_int(decode_int(stored()) + pending.delta), True
            return pending, False
        return stored(), True

    def _get(self, key: bytes, snapshot: bool) -> bytes | None:
        value, from_db = self._value(key, lambda: self._stored(key))
        if from_db and not snapshot:
            self.read_ranges.append(point(key))
        return value

    def get(self, key: bytes, *, snapshot: bool = False) -> bytes | None:
        self._trip(1)
        return self._get(key, snapshot)

    def get_many(self, keys: Sequence[bytes], *, snapshot: bool = False) -> list[bytes | None]:
        if not keys:
            return []
        self._trip(len(keys))
        return [self._get(key, snapshot) for key in keys]

    def get_range(
        self, begin: bytes, end: bytes, *, limit: int = 0, reverse: bool = False, snapshot: bool = False
    ) -> list[tuple[bytes, bytes]]:
        self._trip(1)
        return self._range(begin, end, limit, reverse, snapshot)

    def get_ranges(
        self, ranges: Sequence[tuple[bytes, bytes, int]], *, snapshot: bool = False
    ) -> list[list[tuple[bytes, bytes]]]:
        if not ranges:
            return []
        self._trip(len(ranges))
        return [self._range(begin, end, limit, False, snapshot) for begin, end, limit in ranges]

    def _range(
        self, begin: bytes, end: bytes, limit: int, reverse: bool, snapshot: bool
    ) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        if begin >= end:
            return out
        for pair in self._merged(begin, end, reverse):
            out.append(pair)
            if limit and len(out) >= limit:
                break
        if not snapshot:
            # FoundationDB conflicts on what the read saw: up to its last key when the limit cut it
            if limit and len(out) >= limit:
                self.read_ranges.append((out[-1][0], end) if reverse else (begin, out[-1][0] + b"\x00"))
            else:
                self.read_ranges.append((begin, end))
        return out

    def _stored_range(self, begin: bytes, end: bytes, reverse: bool) -> Iterator[tuple[bytes, bytes]]:
        with self._db.cursor() as cur:
            if not reverse:
                ok = cur.set_range(begin)
                while ok and cur.key() < end:
                    yield bytes(cur.key()), bytes(cur.value())
                    ok = cur.next()
            else:
                ok = cur.set_range(end)
                ok = cur.prev() if ok else cur.last()
                while ok and cur.key() >= begin:
                    yield bytes(cur.key()), bytes(cur.value())
                    ok = cur.prev()

    def _merged(self, begin: bytes, end: bytes, reverse: bool) -> Iterator[tuple[bytes, bytes]]:
        """Stored pairs under this transaction's writes, in key order (reversed if asked)."""
        lo, hi = bisect.bisect_left(self._keys, begin), bisect.bisect_left(self._keys, end)
        mine = self._keys[lo:hi]
        if reverse:
            mine.reverse()
        at = 0
        for key, value in self._stored_range(begin, end, reverse):
            while at < len(mine) and (mine[at] > key if reverse else mine[at] < key):
                yield from self._pending(mine[at])
                at += 1
            if at < len(mine) and mine[at] == key:
                at += 1
                yield from self._pending(key, value)
            elif not self._is_cleared(key):
                yield key, value
        for key in mine[at:]:
            yield from self._pending(key)

    def _pending(self, key: bytes, stored: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        value, _ = self._value(key, lambda: None if self._is_cleared(key) else stored)
        if value is not None:
            yield key, value

    # -- writes ----------------------------------------------------------------------------------
    def _write(self, key: bytes, value: bytes | None | Add) -> None:
        self._check()
        if len(key) > FDB_MAX_KEY_BYTES:
            raise FdbError(2102, f"a key of {len(key)} bytes")
        if len(key) > MAX_KEY_BYTES:
            raise FdbError(2102, f"a key of {len(key)} bytes, past LMDB's {MAX_KEY_BYTES}: {key[:60]!r}")
        if isinstance(value, bytes) and len(value) > MAX_VALUE_BYTES:
            raise FdbError(2103, f"a value of {len(value)} bytes under {key[:60]!r}")
        if key not in self.writes:
            bisect.insort(self._keys, key)
        self.writes[key] = value
        self.write_ranges.append(point(key))
        if isinstance(value, bytes):
            self._counters.max_value = max(self._counters.max_value, len(value))

    def set(self, key: bytes, value: bytes) -> None:
        self._write(key, value)

    def clear(self, key: bytes) -> None:
        self._write(key, None)

    def add(self, key: bytes, delta: int) -> None:
        pending = self.writes.get(key, Add(0) if not self._is_cleared(key) else None)
        if isinstance(pending, Add):
            self._write(key, Add(pending.delta + delta))
        else:  # its value is known here: the sum is too
            self._write(key, encode_int(decode_int(pending) + delta))

    def clear_range(self, begin: bytes, end: bytes) -> None:
        self._check()
        if begin >= end:
            return
        lo, hi = bisect.bisect_left(self._keys, begin), bisect.bisect_left(self._keys, end)
        for key in self._keys[lo:hi]:
            del self.writes[key]
        del self._keys[lo:hi]
        # into the sorted, disjoint cleared ranges, joining those it meets (in place: a transaction
        # clears thousands of ranges, one per chunked value it writes)
        at = bisect.bisect_right(self._cleared_begins, begin) - 1
        if at >= 0 and self.cleared[at][1] >= begin:
            begin = self.cleared[at][0]
        else:
            at += 1
        last = at
        while last < len(self.cleared) and self.cleared[last][0] <= end:
            end = max(end, self.cleared[last][1])
            last += 1
        self.cleared[at:last] = [(begin, end)]
        self._cleared_begins[at:last] = [begin]
        self.write_ranges.append((begin, end))

    def add_read_conflict_key(self, key: bytes) -> None:
        self.read_ranges.append(point(key))

    # -- what the commit sends ---------------------------------------------------------------------
    def size(self) -> int:
        """Bytes as FoundationDB counts them against its 10,000,000 limit."""
        mutations = sum(len(b) + len(e) for b, e in self.cleared)
        for key, value in self.writes.items():
            if value is None:
                mutations += 2 * len(key) + 1
            elif isinstance(value, Add):
                mutations += len(key) + 8
            else:
                mutations += len(key) + len(value)
        conflicts = sum(len(b) + len(e) for b, e in merge(self.read_ranges))
        conflicts += sum(len(b) + len(e) for b, e in merge(self.write_ranges))
        return mutations + conflicts
