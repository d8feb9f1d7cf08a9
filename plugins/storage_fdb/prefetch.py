"""A transaction whose point reads were sent at once, ahead of the logic that asks for them.

Logic that reads a key, decides, then reads the next (``apply`` reads each change's marker, head,
step index and history counter) waits one round trip per read. :class:`Prefetched` sends every key
such logic will ask for in one ``get_many`` first, then answers ``get`` from those values, kept up
to date by this transaction's own writes (read-your-writes, as FoundationDB's client does locally).
The prefetched reads are real reads (they add the read conflicts the logic's reads would have).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tenantflow.plugins.storage_fdb.layer import Txn


class Prefetched:
    """``tr`` with the values of ``keys`` read at once; every other call goes to ``tr``."""

    def __init__(self, tr: Txn, keys: Iterable[bytes]) -> None:
        self._tr = tr
        unique = list(dict.fromkeys(keys))
        self._known: dict[bytes, bytes | None] = dict(zip(unique, tr.get_many(unique), strict=True))

    def get(self, key: bytes, *, snapshot: bool = False) -> bytes | None:
        if key in self._known:  # read for real already, or written here: nothing to add
            return self._known[key]
        return self._tr.get(key, snapshot=snapshot)

    def get_many(self, keys: Sequence[bytes], *, snapshot: bool = False) -> list[bytes | None]:
        missing = [key for key in keys if key not in self._known]
        fetched = dict(zip(missing, self._tr.get_many(missing, snapshot=snapshot), strict=True))
        return [self._known[key] if key in self._known else fetched[key] for key in keys]

    def get_range(
        self, begin: bytes, end: bytes, *, limit: int = 0, reverse: bool = False, snapshot: bool = False
    ) -> list[tuple[bytes, bytes]]:
        return self._tr.get_range(begin, end, limit=limit, reverse=reverse, snapshot=snapshot)

    def get_ranges(
        self, ranges: Sequence[tuple[bytes, bytes, int]], *, snapshot: bool = False
    ) -> list[list[tuple[bytes, bytes]]]:
        return self._tr.get_ranges(ranges, snapshot=snapshot)

    def set(self, key: bytes, value: bytes) -> None:
        self._tr.set(key, value)
        self._known[key] = value

    def clear(self, key: bytes) -> None:
        self._tr.clear(key)
        self._known[key] = None

    def clear_range(self, begin: bytes, end: bytes) -> None:
        self._tr.clear_range(begin, end)
        for key in [key for key in self._known if begin <= key < end]:
            self._known[key] = None

    def add(self, key: bytes, delta: int) -> None:
        self._tr.add(key, delta)
        self._known.pop(key, None)  # the sum is the transaction's to tell

    def add_read_conflict_key(self, key: bytes) -> None:
        self._tr.add_read_conflict_key(key)
