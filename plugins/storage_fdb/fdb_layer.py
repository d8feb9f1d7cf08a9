"""The transaction layer over FoundationDB, on the official binding (PyPI ``foundationdb``, imported
as ``fdb``; PyPI's ``fdb`` is an unrelated Firebird driver).

The binding needs the FoundationDB client library (libfdb_c), which it loads when the API version is
chosen; it is imported here only when an ``fdb://`` URL is opened, so a kernel on SQLite or LMDB
starts without it. Transactions run in the kernel's threads through the binding's retry loop
(``fdb.transactional``: on_error decides what is retried, including commit_unknown_result).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from tenantflow.kernel.errors import Unavailable
from tenantflow.plugins.storage_fdb.layer import Txn

T = TypeVar("T")
DEFAULT_API_VERSION = 730
_open_lock = threading.Lock()


def load_fdb(api_version: int) -> Any:
    """``fdb`` with its API version selected, or an error that says what to install."""
    with _open_lock:
        try:
            import fdb
        except ImportError:
            raise Unavailable(
                "fdb:// storage needs the FoundationDB Python binding: pip install foundationdb"
            ) from None
        try:
            fdb.api_version(api_version)
        except RuntimeError as exc:  # a different version selected earlier, or one the library lacks
            raise Unavailable(f"fdb:// storage: FoundationDB API version {api_version}: {exc}") from None
        except Exception as exc:  # the binding raises a bare Exception when libfdb_c is missing
            raise Unavailable(
                "fdb:// storage needs the FoundationDB client library libfdb_c, which was not found "
                f"({exc}). Install the foundationdb-clients package of your FoundationDB version "
                "(https://github.com/apple/foundationdb/releases), or use --storage sqlite:///... or "
                "kv+lmdb:///... on one machine"
            ) from None
        return fdb


class FdbTxn:
    """A FoundationDB transaction (reads its own writes; snapshot reads add no conflicts)."""

    def __init__(self, tr: Any) -> None:
        self._tr = tr

    def get(self, key: bytes, *, snapshot: bool = False) -> bytes | None:
        value = (self._tr.snapshot if snapshot else self._tr).get(key)
        return bytes(value) if value.present() else None

    def get_range(
        self, begin: bytes, end: bytes, *, limit: int = 0, reverse: bool = False, snapshot: bool = False
    ) -> list[tuple[bytes, bytes]]:
        source = self._tr.snapshot if snapshot else self._tr
        return [
            (bytes(kv.key), bytes(kv.value))
            for kv in source.get_range(begin, end, limit=limit, reverse=reverse)
        ]

    def set(self, key: bytes, value: bytes) -> None:
        self._tr.set(key, value)

    def clear(self, key: bytes) -> None:
        self._tr.clear(key)

    def clear_range(self, begin: bytes, end: bytes) -> None:
        self._tr.clear_range(begin, end)

    def add(self, key: bytes, delta: int) -> None:
        self._tr.add(key, delta.to_bytes(8, "little", signed=True))

    def add_read_conflict_key(self, key: bytes) -> None:
        self._tr.add_read_conflict_key(key)


class FdbLayer:
    """``fdb://[cluster file]?api_version=730``: the layer over a FoundationDB cluster."""

    def __init__(self, cluster_file: str | None, *, api_version: int = DEFAULT_API_VERSION) -> None:
        self._fdb = load_fdb(api_version)
        try:
            self._db = self._fdb.open(cluster_file)
        except self._fdb.FDBError as exc:
            raise Unavailable(
                f"cannot open the FoundationDB cluster file {cluster_file or '(default)'}: {exc}"
            ) from None
        # a transaction that cannot finish (cluster unreachable) fails instead of hanging a thread
        self._db.options.set_transaction_timeout(10_000)
        self._db.options.set_transaction_retry_limit(100)

        def run(tr: Any, fn: Callable[[Txn], Any]) -> Any:
            return fn(FdbTxn(tr))

        # the binding's retry loop: commit, and on an error let on_error decide whether to run again
        self._run: Callable[[Any, Callable[[Txn], Any]], Any] = self._fdb.transactional(run)

    def transact(self, fn: Callable[[Txn], T]) -> T:
        result: T = self._run(self._db, fn)
        return result

    def read(self, fn: Callable[[Txn], T]) -> T:
        return self.transact(fn)  # read-only transactions commit without a round trip

    def close(self) -> None:
        """The binding's network thread lives as long as the process."""
