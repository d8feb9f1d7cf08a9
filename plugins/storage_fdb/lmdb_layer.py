"""The transaction layer over LMDB: an embedded, ordered, transactional key-value store.

One write transaction at a time (LMDB's own rule, across processes too: its lock file holds a
shared mutex), so every write transaction is serializable and never conflicts; read-only
transactions see a consistent snapshot and never block. LMDB allows one open environment per file
per process, so storage objects over one file share it (counted, closed with the last).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from tenantflow.plugins.storage_fdb.layer import CommitUnknownResult, Txn, decode_int, encode_int

T = TypeVar("T")
RETRY_LIMIT = 100

_envs: dict[str, tuple[Any, threading.Lock, int]] = {}  # realpath -> (environment, write lock, users)
_envs_lock = threading.Lock()


class LmdbTxn:
    """A transaction over one LMDB transaction (which reads its own writes)."""

    def __init__(self, txn: Any) -> None:
        self._txn = txn

    def get(self, key: bytes, *, snapshot: bool = False) -> bytes | None:
        value = self._txn.get(key)
        return bytes(value) if value is not None else None

    def get_range(
        self, begin: bytes, end: bytes, *, limit: int = 0, reverse: bool = False, snapshot: bool = False
    ) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        if begin >= end:
            return out
        with self._txn.cursor() as cur:
            if not reverse:
                ok = cur.set_range(begin)
                while ok:
                    key = cur.key()
                    if key >= end:
                        break
                    out.append((bytes(key), bytes(cur.value())))
                    if limit and len(out) >= limit:
                        break
                    ok = cur.next()
            else:
                ok = cur.set_range(end)
                ok = cur.prev() if ok else cur.last()
                while ok:
                    key = cur.key()
                    if key < begin:
                        break
                    out.append((bytes(key), bytes(cur.value())))
                    if limit and len(out) >= limit:
                        break
                    ok = cur.prev()
        return out

    def set(self, key: bytes, value: bytes) -> None:
        self._txn.put(key, value)

    def clear(self, key: bytes) -> None:
        self._txn.delete(key)

    def clear_range(self, begin: bytes, end: bytes) -> None:
        with self._txn.cursor() as cur:
            if not cur.set_range(begin):
                return
            # delete() moves to the next item; past the last one the key is b"" (no real key is empty)
            while cur.key() and cur.key() < end:
                if not cur.delete():
                    break

    def add(self, key: bytes, delta: int) -> None:
        self._txn.put(key, encode_int(decode_int(self.get(key)) + delta))

    def add_read_conflict_key(self, key: bytes) -> None:
        """Writers are serialized: there are no conflicts to declare."""


class LmdbLayer:
    """``kv+lmdb:///path/to/dir?map_size_mb=N``: the layer over an LMDB environment directory."""

    def __init__(self, path: Path, *, map_size: int = 8 << 30) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = os.path.realpath(path)
        with _envs_lock:
            found = _envs.get(self.path)
            if found is None:
                # max_dbs 0: one keyspace; writemap off keeps a crashed writer from corrupting pages
                env = lmdb.open(self.path, map_size=map_size, max_readers=1024, max_dbs=0, sync=True)
                env.reader_check()  # free reader slots of processes that died (a SIGKILLed kernel)
                found = (env, threading.Lock(), 0)
            _envs[self.path] = (found[0], found[1], found[2] + 1)
        self._env, self._write_lock = found[0], found[1]
        self._closed = False

    def transact(self, fn: Callable[[Txn], T]) -> T:
        for attempt in range(RETRY_LIMIT + 1):
            try:
                with self._write_lock:
                    txn = self._env.begin(write=True)
                    try:
                        result = fn(LmdbTxn(txn))
                    except BaseException:
                        txn.abort()
                        raise
                    self._commit(txn)
                return result
            except CommitUnknownResult:
                if attempt == RETRY_LIMIT:
                    raise
        raise AssertionError("unreachable")

    def _commit(self, txn: Any) -> None:
        try:
            txn.commit()
        except lmdb.MapFullError:
            raise lmdb.MapFullError(
                f"the LMDB store at {self.path} is full: restart with a larger ?map_size_mb= in the storage URL"
            ) from None

    def read(self, fn: Callable[[Txn], T]) -> T:
        with self._env.begin(write=False) as txn:
            return fn(LmdbTxn(txn))

    def close(self) -> None:
        with _envs_lock:
            if self._closed:
                return
            self._closed = True
            env, lock, users = _envs[self.path]
            if users == 1:
                del _envs[self.path]
                env.close()
            else:
                _envs[self.path] = (env, lock, users - 1)
