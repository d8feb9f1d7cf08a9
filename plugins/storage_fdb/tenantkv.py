"""A tenant's key-value store and secrets over the ordered key-value layer.

``R "T" tenant "kv" head [digest] n``  a key's record (JSON: key, value, time, version), chunked. ``head`` is
the key's first 256 bytes; a longer key adds the SHA-256 of the whole key, so every layer key stays
under LMDB's 511 bytes. Keys order as bytes, except that keys over 256 bytes sharing their head
order by digest (the same order on every read).
``R "T" tenant "kvn"``, ``"kvb"``       usage: keys and bytes, atomic counters (ADD) kept by every write;
                                      read (a conflict) only when a quota must be checked
``R "T" tenant "kvc"``                 the clock: ADDed by every write, read at snapshot for its stamp,
                                      the version of the keys it writes, plus 2 (records without one: 1)
``R "S" tenant name``                  a secret: sealed value and time (one range for re-encryption)

A key's versions grow: a write reads the key (a conflict), so it starts after the key's last write
committed and its snapshot of the clock already counts that write's ADD.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tenantflow.kernel import tenantkv
from tenantflow.kernel.tenantkv import KVEntry, KVQuota, KVRange, KVUsage, KVWrite, quota_refusal, usage_after
from tenantflow.plugins.storage_fdb.keys import Keys, pack, unpack
from tenantflow.plugins.storage_fdb.layer import Txn, decode_int
from tenantflow.plugins.storage_fdb.records import dumps, group_chunks, join_chunks, loads, put_blob

HEAD = 256  # bytes of a key kept as is in its layer key (with a 100-character tenant and a long root, < 511)
SCAN = 256  # rows a page reads at a time


def elements(key: str) -> tuple[bytes, ...]:
    raw = key.encode("utf-8")
    return (raw,) if len(raw) <= HEAD else (raw[:HEAD], hashlib.sha256(raw).digest())


def _record(k: Keys, tenant: str, key: str) -> bytes:
    return k.tenant(tenant, "kv", *elements(key))


def _read(tr: Txn, k: Keys, tenant: str, key: str) -> dict[str, Any] | None:
    base = _record(k, tenant, key)
    rows = tr.get_range(base + b"\x00", base + b"\xff")
    return loads(join_chunks(rows)) if rows else None


def _entry(rec: dict[str, Any]) -> KVEntry:
    return KVEntry(rec["k"], rec["v"], rec["t"], rec.get("n", 1))


def get(tr: Txn, k: Keys, tenant: str, key: str) -> KVEntry | None:
    rec = _read(tr, k, tenant, key)
    return _entry(rec) if rec is not None else None


def page(
    tr: Txn, k: Keys, tenant: str, prefix: str, after: str | None, limit: int
) -> tuple[list[KVEntry], str | None]:
    space = k.tenant(tenant, "kv")
    head = prefix.encode("utf-8")[:HEAD]
    # every tuple-packed bytes element starting with ``head`` (keys hold no NUL, so no escapes)
    begin, end = space + b"\x01" + head, space + b"\x01" + head + b"\xff"
    if after is not None:
        begin = max(begin, _record(k, tenant, after) + b"\xff")
    found: list[KVEntry] = []
    while len(found) <= limit:
        rows = tr.get_range(begin, end, limit=SCAN)
        groups = group_chunks(rows, 0)
        if len(rows) == SCAN and len(groups) > 1:
            groups = groups[:-1]  # the last record may go on past this read
        for _, value in groups:
            rec = loads(value)
            if rec["k"].startswith(prefix):
                found.append(_entry(rec))
        if len(rows) < SCAN:
            break
        begin = _record(k, tenant, loads(groups[-1][1])["k"]) + b"\xff"
    entries = found[:limit]
    return entries, (entries[-1].key if len(found) > limit and entries else None)


def usage(tr: Txn, k: Keys, tenant: str, *, snapshot: bool = False) -> KVUsage:
    keys, size = tr.get_many([k.tenant(tenant, "kvn"), k.tenant(tenant, "kvb")], snapshot=snapshot)
    return KVUsage(decode_int(keys), decode_int(size))


@dataclass
class Plan:
    """Writes checked against the quota, ready to apply."""

    tenant: str
    old: dict[str, str | None]
    writes: Sequence[KVWrite]
    now: float
    existed: list[bool]
    stamp: int  # the version of the keys written


def plan(tr: Txn, k: Keys, tenant: str, writes: Sequence[KVWrite], now: float, quota: KVQuota) -> Plan | str:
    """Read what ``writes`` replace and check ``quota``: a plan, or why the quota refuses them.
    Nothing is written."""
    old: dict[str, str | None] = {}
    for key in dict.fromkeys(key for key, _ in writes):
        rec = _read(tr, k, tenant, key)
        old[key] = rec["v"] if rec is not None else None
    if quota:
        before = usage(tr, k, tenant)
        if refused := quota_refusal(tenant, before, usage_after(before, old, writes), quota):
            return refused
    current, existed = dict(old), []
    for key, value in writes:
        existed.append(current[key] is not None)
        current[key] = value
    stamp = decode_int(tr.get(k.tenant(tenant, "kvc"), snapshot=True)) + 2  # > 1, a record's without one
    return Plan(tenant, old, writes, now, existed, stamp)


def apply(tr: Txn, k: Keys, p: Plan) -> None:
    """Write a plan's keys and add its change of usage to the counters (no read)."""
    delta = usage_after(KVUsage(), p.old, p.writes)
    final = dict(p.old)
    final.update(p.writes)
    for key, value in final.items():
        base = _record(k, p.tenant, key)
        if value is None:
            tr.clear_range(base + b"\x00", base + b"\xff")
        else:
            put_blob(tr, base, dumps({"k": key, "v": value, "t": p.now, "n": p.stamp}))
    tr.add(k.tenant(p.tenant, "kvc"), 1)
    if delta.keys:
        tr.add(k.tenant(p.tenant, "kvn"), delta.keys)
    if delta.bytes:
        tr.add(k.tenant(p.tenant, "kvb"), delta.bytes)


def conflict(
    tr: Txn, k: Keys, tenant: str, reads: Sequence[tuple[str, int]], ranges: Sequence[KVRange]
) -> str:
    """Why a step attempt's read set no longer holds ("" if it does), read in the committing
    transaction: its keys and pages become the transaction's read conflicts, so a write to them
    committed meanwhile makes the transaction retry and see it."""
    bases = [_record(k, tenant, key) for key, _ in reads]
    found = tr.get_ranges([(b + b"\x00", b + b"\xff", 0) for b in bases])
    versions = {
        key: _entry(loads(join_chunks(rows))).version
        for (key, _), rows in zip(reads, found, strict=True)
        if rows
    }
    return tenantkv.conflict(reads, ranges, versions, lambda p, a, n: page(tr, k, tenant, p, a, n))


def put_secret(tr: Txn, k: Keys, tenant: str, name: str, sealed: bytes, now: float) -> None:
    tr.set(k.glob("S", tenant, name), pack((sealed, now)))


def list_secrets(
    tr: Txn, k: Keys, tenant: str | None, after: tuple[str, str] | None, limit: int
) -> list[tuple[str, str, bytes, float]]:
    begin, end = k.glob_range("S", tenant) if tenant is not None else k.glob_range("S")
    if after is not None:
        begin = max(begin, k.glob("S", *after) + b"\x00")
    out = []
    for key, value in tr.get_range(begin, end, limit=limit):
        t, name = k.strip(key)[1:]
        sealed, at = loads_secret(value)
        out.append((t, name, sealed, at))
    return out


def loads_secret(value: bytes) -> tuple[bytes, float]:
    sealed, at = unpack(value)
    return bytes(sealed), float(at)
