"""The transaction layer the FoundationDB storage engine runs on: the few operations it uses.

Two implementations: ``fdb_layer`` (FoundationDB through its official binding) and ``lmdb_layer``
(LMDB, an embedded ordered transactional key-value store), so the engine's logic runs in CI where
no FoundationDB server can be installed.

Semantics every layer keeps, as FoundationDB defines them:
- ``transact(fn)`` runs ``fn`` in a serializable transaction and commits; on a retryable error
  (a conflict, or a commit whose outcome is unknown) it runs ``fn`` again from the start, so ``fn``
  must be idempotent: ids are chosen before calling ``transact``, never inside ``fn``.
- A transaction reads its own writes. ``snapshot=True`` reads add no read conflict;
  ``add_read_conflict_key`` adds one for a key read that way.
- Keys up to ``MAX_KEY_BYTES``, values up to ``MAX_VALUE_BYTES``; a transaction's size, counted
  as FoundationDB counts it (mutations plus read and write conflict ranges), under ``MAX_TXN_BYTES``
  (the engine pages and chunks to stay inside them).
- A transaction lives at most 5 seconds (``transaction_too_old``), so every transaction's reads
  are bounded; ``get_many`` and ``get_ranges`` issue their reads at once (one round trip).
- Errors carry FoundationDB's codes (:class:`FdbError`); after one in ``MAYBE_COMMITTED`` the
  transaction may have applied, so only idempotent work is run again.
- Wake-ups are found by polling (the kernel's dispatcher), not by watches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from tenantflow.kernel.errors import Unavailable

T = TypeVar("T")

MAX_KEY_BYTES = 511  # LMDB's limit; FoundationDB allows 10,000
MAX_VALUE_BYTES = 100_000  # FoundationDB's limit
CHUNK_BYTES = 90_000  # a large value is split into chunks of this size
FDB_MAX_KEY_BYTES = 10_000
FDB_MAX_TXN_BYTES = 10_000_000  # FoundationDB refuses a larger transaction (transaction_too_large)
MAX_TXN_BYTES = 8_000_000  # the engine's budget per transaction; FoundationDB refuses 10,000,000

ERRORS = {
    1007: "transaction_too_old",
    1009: "future_version",
    1020: "not_committed",
    1021: "commit_unknown_result",
    1031: "transaction_timed_out",
    1037: "process_behind",
    1039: "cluster_version_changed",
    2101: "transaction_too_large",
    2102: "key_too_large",
    2103: "value_too_large",
}
RETRYABLE = frozenset({1007, 1009, 1020, 1021, 1037})  # what FoundationDB's on_error retries
MAYBE_COMMITTED = frozenset({1021, 1031, 1039})  # the commit may have applied


class FdbError(Exception):
    """An error with FoundationDB's code (the stand-in raises these; ``fdb.FDBError`` has ``code`` too)."""

    def __init__(self, code: int, detail: str = "") -> None:
        self.code = code
        name = ERRORS.get(code, "error")
        super().__init__(f"{name} ({code})" + (f": {detail}" if detail else ""))


class CommitUnknownResult(FdbError):
    """A commit that may or may not have applied (FoundationDB error 1021); ``transact`` retries it."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(1021, detail)


def maybe_committed(exc: BaseException) -> bool:
    """Whether ``exc`` leaves it open if the transaction applied."""
    return getattr(exc, "code", None) in MAYBE_COMMITTED


def unanswered(exc: BaseException) -> BaseException:
    """What a read-only transaction that failed with ``exc`` raises: UNAVAILABLE when the storage
    could not serve it in time (timed out, or too old or busy to the retry limit; nothing was
    written, so a retry is safe), ``exc`` itself otherwise."""
    code = getattr(exc, "code", None)
    if code in RETRYABLE or code == 1031:
        return Unavailable(
            f"the storage did not answer the read ({exc}): the cluster is slow or unreachable; retry"
        )
    return exc


class Txn(Protocol):
    """One transaction."""

    def get(self, key: bytes, *, snapshot: bool = False) -> bytes | None: ...

    def get_many(self, keys: Sequence[bytes], *, snapshot: bool = False) -> list[bytes | None]:
        """The values of ``keys``, all read at once (one round trip)."""
        ...

    def get_ranges(
        self, ranges: Sequence[tuple[bytes, bytes, int]], *, snapshot: bool = False
    ) -> list[list[tuple[bytes, bytes]]]:
        """``get_range(begin, end, limit=limit)`` of each ``(begin, end, limit)``, all at once."""
        ...

    def get_range(
        self, begin: bytes, end: bytes, *, limit: int = 0, reverse: bool = False, snapshot: bool = False
    ) -> list[tuple[bytes, bytes]]:
        """Pairs with ``begin <= key < end`` in key order (reversed if asked); ``limit`` 0: all."""
        ...

    def set(self, key: bytes, value: bytes) -> None: ...

    def clear(self, key: bytes) -> None: ...

    def clear_range(self, begin: bytes, end: bytes) -> None: ...

    def add(self, key: bytes, delta: int) -> None:
        """Atomically add ``delta`` to the little-endian signed 64-bit integer at ``key`` (absent: 0)."""
        ...

    def add_read_conflict_key(self, key: bytes) -> None: ...


class Layer(Protocol):
    """A transactional ordered key-value store."""

    def transact(self, fn: Callable[[Txn], T]) -> T:
        """Run ``fn`` and commit, retrying retryable errors (``fn`` may run more than once)."""
        ...

    def read(self, fn: Callable[[Txn], T]) -> T:
        """Run ``fn`` in a read-only transaction; UNAVAILABLE if the storage cannot serve it in
        time (:func:`unanswered`)."""
        ...

    def close(self) -> None: ...


def encode_int(value: int) -> bytes:
    """The value format of ``Txn.add``."""
    return value.to_bytes(8, "little", signed=True)


def decode_int(value: bytes | None) -> int:
    return int.from_bytes(value, "little", signed=True) if value else 0
