"""The transaction layer over LMDB, held to FoundationDB's rules so that CI catches what a real
cluster would refuse (FoundationDB's own test strategy: simulate the engine's rules, not calls).

- Optimistic concurrency: a transaction reads a snapshot (its read version) and buffers its writes;
  at commit (LMDB's one writer, across processes too) its read conflict ranges are checked against
  the write ranges of every commit since its read version, kept in a log under ``\\xff``, and a
  conflict fails it with ``not_committed`` (1020), which ``transact`` retries.
- A transaction older than ``max_age`` (5 s) fails with ``transaction_too_old`` (1007, retried);
  ``transact`` past ``timeout`` (10 s, all tries together, as FoundationDB since API 610) fails with
  ``transaction_timed_out`` (1031, not retried).
- Keys over 10,000 bytes (and over LMDB's 511), values over 100,000 bytes, transactions over
  10,000,000 bytes counted as FoundationDB counts them (:mod:`.lmdb_txn`): 2102, 2103, 2101.
- ``read_latency`` seconds per round trip; every read is counted (``counters``).
- Injected faults, one at a time (``inject``) or at random (``fault_rate``):
  ``commit_unknown_result`` and ``transaction_timed_out`` after the commit applied,
  ``not_committed`` and ``transaction_too_old`` instead of it.

LMDB allows one open environment per file per process, so layers over one directory share it.
"""

from __future__ import annotations

import os
import random
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from tenantflow.plugins.storage_fdb.layer import (
    FDB_MAX_TXN_BYTES,
    RETRYABLE,
    CommitUnknownResult,
    FdbError,
    Txn,
    decode_int,
    encode_int,
    unanswered,
)
from tenantflow.plugins.storage_fdb.lmdb_txn import Counters, Range, SimTxn, merge, overlaps

T = TypeVar("T")
RETRY_LIMIT = 100
FAULTS = ("commit_unknown_result", "transaction_timed_out", "not_committed", "transaction_too_old")
_FAULT_CODES = {"commit_unknown_result": 1021, "transaction_timed_out": 1031, "not_committed": 1020,
                "transaction_too_old": 1007}  # fmt: skip
_SYSTEM = b"\xff\x02sim/"  # the stand-in's own keys; the engine's all start with a tuple code < 0xff
_VERSION = _SYSTEM + b"v"
_LOG = _SYSTEM + b"log/"
_FAULTS = _SYSTEM + b"faults/"  # faults injected, by kind, by every process over the store
_KEEP_LOG = 30.0  # seconds of commits kept for conflict checks (past max_age, so none is missed)

_envs: dict[str, tuple[Any, threading.Lock, int]] = {}  # realpath -> (environment, write lock, users)
_envs_lock = threading.Lock()


@dataclass
class Rules:
    """What the stand-in enforces (the defaults: FoundationDB's)."""

    max_age: float = 5.0  # seconds a transaction may live (0: unbounded)
    timeout: float = 10.0  # seconds of one ``transact``, all its tries (0: unbounded)
    retry_limit: int = RETRY_LIMIT
    read_latency: float = 0.0  # seconds per round trip
    fault_rate: float = 0.0  # chance that a commit fails with an injected fault
    faults: tuple[str, ...] = FAULTS  # the kinds injected at random
    seed: int | None = None


def _encode_ranges(at: float, ranges: list[Range]) -> bytes:
    parts = [struct.pack(">d", at)]
    for begin, end in ranges:
        parts += [struct.pack(">II", len(begin), len(end)), begin, end]
    return b"".join(parts)


def _decode_ranges(raw: bytes) -> tuple[float, list[Range]]:
    (at,) = struct.unpack_from(">d", raw)
    pos, out = 8, []
    while pos < len(raw):
        nb, ne = struct.unpack_from(">II", raw, pos)
        pos += 8
        out.append((raw[pos : pos + nb], raw[pos + nb : pos + nb + ne]))
        pos += nb + ne
    return at, out


class LmdbLayer:
    """``kv+lmdb:///path/to/dir``: the layer over an LMDB environment directory."""

    def __init__(self, path: Path, *, map_size: int = 8 << 30, rules: Rules | None = None) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = os.path.realpath(path)
        self.rules = rules or Rules()
        self.counters = Counters()
        self._random = random.Random(self.rules.seed)
        self._injected: list[str] = []
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

    def inject(self, fault: str, count: int = 1) -> None:
        """Fail the next ``count`` commits with ``fault`` (one of ``FAULTS``)."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r} (known: {', '.join(FAULTS)})")
        self._injected += [fault] * count

    # -- transactions ----------------------------------------------------------------------------
    def transact(self, fn: Callable[[Txn], T]) -> T:
        return self._run(fn, commit=True)

    def read(self, fn: Callable[[Txn], T]) -> T:
        try:
            return self._run(fn, commit=False)
        except FdbError as exc:
            raise unanswered(exc) from None

    def _run(self, fn: Callable[[Txn], T], *, commit: bool) -> T:
        deadline = time.monotonic() + self.rules.timeout if self.rules.timeout else None
        for attempt in range(self.rules.retry_limit + 1):
            try:
                return self._attempt(fn, commit, deadline)
            except FdbError as exc:
                if exc.code not in RETRYABLE or attempt == self.rules.retry_limit:
                    raise
                if exc.code == 1020:
                    self.counters.conflicts += 1
                # on_error's back-off: short, growing, jittered (FoundationDB: 10 ms doubling to 1 s)
                time.sleep(self._random.uniform(0, min(0.001 * 2**attempt, 0.1)))
        raise AssertionError("unreachable")

    def _attempt(self, fn: Callable[[Txn], T], commit: bool, deadline: float | None) -> T:
        started = time.monotonic()
        max_age = self.rules.max_age

        def check() -> None:
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise FdbError(1031, f"past the transaction time-out of {self.rules.timeout:g} s")
            if max_age and now - started > max_age:
                raise FdbError(
                    1007, f"the transaction ran {now - started:.1f} s; FoundationDB allows {max_age:g}"
                )

        self.counters.attempts += 1
        txn: SimTxn | None = None
        try:
            with self._env.begin(write=False) as snapshot:  # ended before the commit's write txn
                version = decode_int(snapshot.get(_VERSION))
                txn = SimTxn(snapshot, self.counters, check=check, latency=self.rules.read_latency)
                result = fn(txn)
            if commit and (txn.writes or txn.cleared):
                check()
                self._commit(txn, version)
        finally:
            c = self.counters
            if txn is not None:
                c.max_reads = max(c.max_reads, txn.reads)
                c.max_round_trips = max(c.max_round_trips, txn.round_trips)
            c.max_seconds = max(c.max_seconds, time.monotonic() - started)
        return result

    def _fault(self) -> str | None:
        if self._injected:
            return self._injected.pop(0)
        if self.rules.fault_rate and self._random.random() < self.rules.fault_rate:
            return self._random.choice(self.rules.faults)
        return None

    def _commit(self, txn: SimTxn, read_version: int) -> None:
        size = txn.size()
        if size > FDB_MAX_TXN_BYTES:
            raise FdbError(2101, f"{size} bytes as FoundationDB counts them (mutations and conflict ranges)")
        fault = self._fault()
        if fault is not None:
            self.counters.faults[fault] = self.counters.faults.get(fault, 0) + 1
            self._tally(fault)
            if fault in ("not_committed", "transaction_too_old"):
                raise FdbError(_FAULT_CODES[fault], "injected")
        reads = merge(txn.read_ranges)
        begins = [b for b, _ in reads]
        with self._write_lock:
            w = self._env.begin(write=True)
            try:
                now = time.time()
                version = decode_int(w.get(_VERSION))
                if reads and version > read_version:
                    self._check_conflicts(w, read_version, reads, begins)
                self._apply(w, txn)
                w.put(_LOG + struct.pack(">Q", version + 1), _encode_ranges(now, merge(txn.write_ranges)))
                w.put(_VERSION, encode_int(version + 1))
                self._prune(w, now)
            except BaseException:
                w.abort()
                raise
            try:
                w.commit()
            except lmdb.MapFullError:
                raise lmdb.MapFullError(
                    f"the LMDB store at {self.path} is full: restart with a larger ?map_size_mb= in the storage URL"
                ) from None
        self.counters.commits += 1
        self.counters.max_size = max(self.counters.max_size, size)
        if fault == "commit_unknown_result":
            raise CommitUnknownResult("injected, after a commit that applied")
        if fault == "transaction_timed_out":
            raise FdbError(1031, "injected, after a commit that applied")

    def _tally(self, fault: str) -> None:
        with self._write_lock, self._env.begin(write=True) as w:
            key = _FAULTS + fault.encode()
            w.put(key, encode_int(decode_int(w.get(key)) + 1))

    def injected(self) -> dict[str, int]:
        """Faults injected so far into this store, by kind, by every process that opened it (the
        counters count this layer's only)."""
        with self._env.begin() as r, r.cursor() as cur:
            found, ok = {}, cur.set_range(_FAULTS)
            while ok and bytes(cur.key()).startswith(_FAULTS):
                found[bytes(cur.key())[len(_FAULTS) :].decode()] = decode_int(bytes(cur.value()))
                ok = cur.next()
        return found

    def _check_conflicts(self, w: Any, read_version: int, reads: list[Range], begins: list[bytes]) -> None:
        with w.cursor() as cur:
            if not cur.set_range(_LOG):
                return
            oldest = struct.unpack(">Q", bytes(cur.key())[len(_LOG) :])[0]
            if oldest > read_version + 1:
                raise FdbError(1007, "its read version is older than the commits kept for conflict checks")
            ok = cur.set_range(_LOG + struct.pack(">Q", read_version + 1))
            while ok and cur.key().startswith(_LOG):
                _, written = _decode_ranges(bytes(cur.value()))
                if any(overlaps(reads, begins, b, e) for b, e in written):
                    raise FdbError(1020, "another transaction wrote what this one read")
                ok = cur.next()

    @staticmethod
    def _apply(w: Any, txn: SimTxn) -> None:
        with w.cursor() as cur:
            for begin, end in txn.cleared:
                if not cur.set_range(begin):
                    continue
                # delete() moves to the next item; past the last one the key is b"" (no key is empty)
                while cur.key() and cur.key() < end:
                    if not cur.delete():
                        break
        for key, value in txn.writes.items():
            if value is None:
                w.delete(key)
            elif isinstance(value, bytes):
                w.put(key, value)
            else:  # an atomic add: on the value as of this commit, so it never conflicts
                w.put(key, encode_int(decode_int(w.get(key)) + value.delta))

    @staticmethod
    def _prune(w: Any, now: float) -> None:
        with w.cursor() as cur:
            ok = cur.set_range(_LOG)
            while ok and cur.key().startswith(_LOG):
                at, _ = _decode_ranges(bytes(cur.value())[:8])
                if now - at < _KEEP_LOG:
                    break
                ok = cur.delete()
                ok = ok and bool(cur.key())

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
