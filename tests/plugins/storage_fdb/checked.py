"""Real layers with instruments for tests: LMDB underneath, every transaction really committed."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tenantflow.plugins.storage_fdb.layer import CommitUnknownResult, Txn
from tenantflow.plugins.storage_fdb.lmdb_layer import LmdbLayer

T = TypeVar("T")
FDB_MAX_KEY = 10_000
FDB_MAX_VALUE = 100_000
FDB_MAX_TXN = 10_000_000


class LimitError(AssertionError):
    """A transaction broke one of FoundationDB's limits."""


class CheckedTxn:
    """Passes every operation to a real transaction and measures it against FoundationDB's limits."""

    def __init__(self, inner: Txn, stats: dict[str, float]) -> None:
        self._inner = inner
        self._stats = stats
        self.written = 0

    def _count(self, key: bytes, value: bytes = b"") -> None:
        if len(key) > min(FDB_MAX_KEY, 511):
            raise LimitError(f"key of {len(key)} bytes: {key[:80]!r}")
        if len(value) > FDB_MAX_VALUE:
            raise LimitError(f"value of {len(value)} bytes under {key[:80]!r}")
        self.written += len(key) + len(value)
        if self.written > FDB_MAX_TXN:
            raise LimitError(f"transaction writes more than {FDB_MAX_TXN} bytes")
        self._stats["max_value"] = max(self._stats["max_value"], len(value))

    def get(self, key: bytes, *, snapshot: bool = False) -> bytes | None:
        return self._inner.get(key, snapshot=snapshot)

    def get_range(
        self, begin: bytes, end: bytes, *, limit: int = 0, reverse: bool = False, snapshot: bool = False
    ) -> list[tuple[bytes, bytes]]:
        return self._inner.get_range(begin, end, limit=limit, reverse=reverse, snapshot=snapshot)

    def set(self, key: bytes, value: bytes) -> None:
        self._count(key, value)
        self._inner.set(key, value)

    def clear(self, key: bytes) -> None:
        self._count(key)
        self._inner.clear(key)

    def clear_range(self, begin: bytes, end: bytes) -> None:
        self._count(begin + end)
        self._inner.clear_range(begin, end)

    def add(self, key: bytes, delta: int) -> None:
        self._count(key, b"\0" * 8)
        self._inner.add(key, delta)

    def add_read_conflict_key(self, key: bytes) -> None:
        self._inner.add_read_conflict_key(key)


class CheckedLayer(LmdbLayer):
    """LMDB, with each write transaction held to FoundationDB's limits, counted and timed; and, when
    ``unknown_results`` is above 0, that many commits reported as unknown after really committing."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, map_size=4 << 30)
        self.commits = 0
        self.attempts = 0
        self.unknown_results = 0
        self.stats: dict[str, float] = {"max_value": 0, "max_written": 0, "max_seconds": 0.0}

    def transact(self, fn: Callable[[Txn], T]) -> T:
        def checked(tr: Txn) -> T:
            self.attempts += 1
            started = time.perf_counter()
            txn = CheckedTxn(tr, self.stats)
            result = fn(txn)
            self.stats["max_written"] = max(self.stats["max_written"], txn.written)
            self.stats["max_seconds"] = max(self.stats["max_seconds"], time.perf_counter() - started)
            return result

        return super().transact(checked)

    def _commit(self, txn: Any) -> None:
        super()._commit(txn)
        self.commits += 1
        if self.unknown_results > 0:
            self.unknown_results -= 1
            raise CommitUnknownResult("commit_unknown_result (1021), after a commit that applied")
