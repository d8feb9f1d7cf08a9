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
- Keys up to ``MAX_KEY_BYTES``, values up to ``MAX_VALUE_BYTES``, writes per transaction under
  ``MAX_TXN_BYTES`` (the engine pages and chunks to stay inside them).
- Wake-ups are found by polling (the kernel's dispatcher), not by watches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

T = TypeVar("T")

MAX_KEY_BYTES = 511  # LMDB's limit; FoundationDB allows 10,000
MAX_VALUE_BYTES = 100_000  # FoundationDB's limit
CHUNK_BYTES = 90_000  # a large value is split into chunks of this size
MAX_TXN_BYTES = 8_000_000  # the engine's budget per transaction; FoundationDB refuses 10,000,000


class CommitUnknownResult(Exception):
    """A commit that may or may not have applied (FoundationDB error 1021); ``transact`` retries it."""


class Txn(Protocol):
    """One transaction."""

    def get(self, key: bytes, *, snapshot: bool = False) -> bytes | None: ...

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
        """Run ``fn`` in a read-only transaction."""
        ...

    def close(self) -> None: ...


def encode_int(value: int) -> bytes:
    """The value format of ``Txn.add``."""
    return value.to_bytes(8, "little", signed=True)


def decode_int(value: bytes | None) -> int:
    return int.from_bytes(value, "little", signed=True) if value else 0
