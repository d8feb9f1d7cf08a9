"""The transaction layer over FoundationDB, on the official binding (PyPI ``foundationdb``, imported
as ``fdb``; PyPI's ``fdb`` is an unrelated Firebird driver).

The binding needs the FoundationDB client library (libfdb_c), which it loads when the API version is
chosen; it is imported here only when an ``fdb://`` URL is opened, so a kernel on SQLite or LMDB
starts without it. Transactions run in the kernel's threads through the binding's retry loop
(``fdb.transactional``: on_error decides what is retried, including commit_unknown_result).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from tenantflow.kernel.errors import Unavailable
from tenantflow.plugins.storage_fdb.layer import Txn, unanswered

T = TypeVar("T")
MIN_API_VERSION = 730
TIMEOUT_MS = 10_000  # all tries of one transaction together
RETRY_LIMIT = 100
_open_lock = threading.Lock()


def release_of(api_version: int) -> str:
    """The FoundationDB release of an API version: 730 -> "7.3"."""
    return f"{api_version // 100}.{api_version % 100 // 10}"


def choose_api_version(binding_latest: int, library_max: int, wanted: int | None) -> int:
    """The API version to select: ``wanted``, or the newest both the binding and the installed
    libfdb_c speak. The binding hands libfdb_c its own newest version as the header version, and a
    library older than that refuses every API version (``api_version_not_supported``), so a binding
    newer than the library is named with the binding that fits."""
    if binding_latest > library_max:
        release = release_of(library_max)
        raise Unavailable(
            f"fdb:// storage: the FoundationDB Python binding speaks API version {binding_latest} and the "
            f"installed client library libfdb_c at most {library_max} (FoundationDB {release}), which "
            f"refuses that binding: pip install 'foundationdb~={release}.0' (a binding as old as the "
            "library or older), or install the libfdb_c of a newer FoundationDB"
        )
    version = wanted if wanted is not None else binding_latest
    if not MIN_API_VERSION <= version <= binding_latest:
        raise Unavailable(
            f"fdb:// storage: api_version={version} is outside what works here: {MIN_API_VERSION} to "
            f"{binding_latest} (this binding's newest; the installed libfdb_c speaks up to {library_max})"
        )
    return version


def load_fdb(wanted: int | None) -> Any:
    """``fdb`` with its API version selected (``wanted``, or the newest that works with the
    installed libfdb_c), or an error that says what to install."""
    with _open_lock:
        try:
            import fdb
        except ImportError:
            raise Unavailable(
                "fdb:// storage needs the FoundationDB Python binding: pip install 'tenantflow[fdb]'"
            ) from None
        if fdb.is_api_version_selected():  # once per process: a second storage shares it
            selected: int = fdb.get_api_version()
            if wanted is not None and wanted != selected:
                raise Unavailable(
                    f"fdb:// storage: API version {selected} is already selected in this process; "
                    f"api_version={wanted} cannot be used next to it"
                )
            return fdb
        try:
            import fdb.impl  # loads libfdb_c
        except Exception as exc:  # the binding raises a bare Exception when libfdb_c is missing
            raise Unavailable(
                "fdb:// storage needs the FoundationDB client library libfdb_c, which was not found "
                f"({exc}). Install the foundationdb-clients package of your FoundationDB version "
                "(https://github.com/apple/foundationdb/releases), or use --storage sqlite:///... or "
                "kv+lmdb:///... on one machine"
            ) from None
        library_max = int(fdb.impl._capi.fdb_get_max_api_version())
        version = choose_api_version(int(fdb.LATEST_API_VERSION), library_max, wanted)
        try:
            fdb.api_version(version)
        except RuntimeError as exc:
            raise Unavailable(f"fdb:// storage: FoundationDB API version {version}: {exc}") from None
        return fdb


class FdbTxn:
    """A FoundationDB transaction (reads its own writes; snapshot reads add no conflicts)."""

    def __init__(self, fdb: Any, tr: Any) -> None:
        self._fdb = fdb
        self._tr = tr

    def get(self, key: bytes, *, snapshot: bool = False) -> bytes | None:
        value = (self._tr.snapshot if snapshot else self._tr).get(key)
        return bytes(value) if value.present() else None

    def get_many(self, keys: Sequence[bytes], *, snapshot: bool = False) -> list[bytes | None]:
        source = self._tr.snapshot if snapshot else self._tr
        futures = [source.get(key) for key in keys]  # all sent before the first is waited for
        return [bytes(value) if value.present() else None for value in futures]

    def _range(self, begin: bytes, end: bytes, limit: int, reverse: bool, snapshot: bool) -> Any:
        """A range read, sent at once (the binding fires its first request when the range is made).
        Whole ranges in ``want_all`` mode, limited ones in ``exact``: the default ``iterator`` mode
        starts small and grows, several round trips for a range read in full."""
        source = self._tr.snapshot if snapshot else self._tr
        mode = self._fdb.StreamingMode.exact if limit else self._fdb.StreamingMode.want_all
        return source.get_range(begin, end, limit=limit, reverse=reverse, streaming_mode=mode)

    def get_range(
        self, begin: bytes, end: bytes, *, limit: int = 0, reverse: bool = False, snapshot: bool = False
    ) -> list[tuple[bytes, bytes]]:
        return [(bytes(kv.key), bytes(kv.value)) for kv in self._range(begin, end, limit, reverse, snapshot)]

    def get_ranges(
        self, ranges: Sequence[tuple[bytes, bytes, int]], *, snapshot: bool = False
    ) -> list[list[tuple[bytes, bytes]]]:
        started = [self._range(begin, end, limit, False, snapshot) for begin, end, limit in ranges]
        return [[(bytes(kv.key), bytes(kv.value)) for kv in found] for found in started]

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

    def __init__(self, cluster_file: str | None, *, api_version: int | None = None) -> None:
        self._fdb = load_fdb(api_version)
        try:
            self._db = self._fdb.open(cluster_file)
        except self._fdb.FDBError as exc:
            raise Unavailable(
                f"cannot open the FoundationDB cluster file {cluster_file or '(default)'}: {exc}"
            ) from None
        # A transaction that cannot finish (cluster unreachable) fails instead of hanging a thread.
        # Since API 610 on_error does not reset the time-out: it bounds all tries together, and
        # transaction_timed_out (1031) may come after a commit that applied (see MAYBE_COMMITTED).
        self._db.options.set_transaction_timeout(TIMEOUT_MS)
        self._db.options.set_transaction_retry_limit(RETRY_LIMIT)
        fdb = self._fdb

        def run(tr: Any, fn: Callable[[Txn], Any]) -> Any:
            return fn(FdbTxn(fdb, tr))

        # the binding's retry loop: commit, and on an error let on_error decide whether to run again
        self._run: Callable[[Any, Callable[[Txn], Any]], Any] = self._fdb.transactional(run)

    def transact(self, fn: Callable[[Txn], T]) -> T:
        result: T = self._run(self._db, fn)
        return result

    def read(self, fn: Callable[[Txn], T]) -> T:
        try:
            return self.transact(fn)  # read-only transactions commit without a round trip
        except self._fdb.FDBError as exc:
            raise unanswered(exc) from None

    def close(self) -> None:
        """The binding's network thread lives as long as the process."""
