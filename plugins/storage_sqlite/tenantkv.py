"""A tenant's key-value store and secrets in SQLite: the statements the engine runs, on its
connections. Usage is a row per tenant that every write updates in the writing transaction, with
the tenant's clock: each writing commit advances it and stamps the keys it writes with it."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from tenantflow.kernel import tenantkv
from tenantflow.kernel.tenantkv import KVEntry, KVQuota, KVRange, KVUsage, KVWrite, quota_refusal, usage_after

COLUMNS = "key, value_json, updated_at, version"


def successor(prefix: str) -> str | None:
    """The least string greater than every string starting with ``prefix`` (None: no bound). SQLite
    compares TEXT as UTF-8 bytes, which orders as code points do."""
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            nxt = last + 1 if last + 1 != 0xD800 else 0xE000
            return "".join(chars) + chr(nxt)
    return None


def get(conn: sqlite3.Connection, tenant: str, key: str) -> KVEntry | None:
    row = conn.execute(f"SELECT {COLUMNS} FROM kv WHERE tenant = ? AND key = ?", (tenant, key)).fetchone()
    return KVEntry(*row) if row else None


def page(
    conn: sqlite3.Connection, tenant: str, prefix: str, after: str | None, limit: int
) -> tuple[list[KVEntry], str | None]:
    sql, args = f"SELECT {COLUMNS} FROM kv WHERE tenant = ? AND key >= ?", [tenant, prefix]
    if (upper := successor(prefix)) is not None:
        sql += " AND key < ?"
        args.append(upper)
    if after is not None:
        sql += " AND key > ?"
        args.append(after)
    rows = conn.execute(sql + " ORDER BY key LIMIT ?", (*args, limit + 1)).fetchall()
    entries = [KVEntry(*r) for r in rows[:limit]]
    return entries, (entries[-1].key if len(rows) > limit and entries else None)


def usage(conn: sqlite3.Connection, tenant: str) -> KVUsage:
    row = conn.execute("SELECT keys, bytes FROM kv_usage WHERE tenant = ?", (tenant,)).fetchone()
    return KVUsage(*row) if row else KVUsage()


def write(
    conn: sqlite3.Connection, tenant: str, writes: Sequence[KVWrite], now: float, quota: KVQuota
) -> tuple[list[bool], str]:
    """Apply ``writes`` in the open transaction; (whether each key existed, "") or, past the quota,
    ([], why) having written nothing."""
    if not writes:
        return [], ""
    old: dict[str, str | None] = dict.fromkeys(sorted({k for k, _ in writes}))
    for key, value in _rows(conn, tenant, list(old), "value_json"):
        old[key] = value
    before = usage(conn, tenant)
    after = usage_after(before, old, writes)
    if refused := quota_refusal(tenant, before, after, quota):
        return [], refused
    row = conn.execute("SELECT clock FROM kv_usage WHERE tenant = ?", (tenant,)).fetchone()
    stamp = (row[0] if row else 0) + 1
    existed: list[bool] = []
    current = dict(old)
    for key, value in writes:
        existed.append(current.get(key) is not None)
        current[key] = value
    for key, value in current.items():
        if value is None:
            conn.execute("DELETE FROM kv WHERE tenant = ? AND key = ?", (tenant, key))
        else:
            conn.execute(
                "INSERT OR REPLACE INTO kv (tenant, key, value_json, updated_at, version) VALUES (?, ?, ?, ?, ?)",
                (tenant, key, value, now, stamp),
            )
    conn.execute(
        "INSERT OR REPLACE INTO kv_usage (tenant, keys, bytes, clock) VALUES (?, ?, ?, ?)",
        (tenant, after.keys, after.bytes, stamp),
    )
    return existed, ""


def _rows(conn: sqlite3.Connection, tenant: str, keys: Sequence[str], column: str) -> list[tuple[str, Any]]:
    """(key, ``column``) of those of ``keys`` the tenant holds."""
    out: list[tuple[str, Any]] = []
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        marks = ", ".join("?" * len(chunk))
        out += conn.execute(
            f"SELECT key, {column} FROM kv WHERE tenant = ? AND key IN ({marks})", (tenant, *chunk)
        ).fetchall()
    return out


def conflict(
    conn: sqlite3.Connection, tenant: str, reads: Sequence[tuple[str, int]], ranges: Sequence[KVRange]
) -> str:
    """Why a step attempt's read set no longer holds ("" if it does), read in the open transaction
    (the writer's: nothing can change between this check and the writes)."""
    versions = {str(k): int(v) for k, v in _rows(conn, tenant, [k for k, _ in reads], "version")}
    return tenantkv.conflict(reads, ranges, versions, lambda p, a, n: page(conn, tenant, p, a, n))


def list_secrets(
    conn: sqlite3.Connection, tenant: str | None, after: tuple[str, str] | None, limit: int
) -> list[tuple[str, str, bytes, float]]:
    sql, args = "SELECT tenant, name, sealed, updated_at FROM secrets WHERE 1", []
    if tenant is not None:
        sql += " AND tenant = ?"
        args.append(tenant)
    if after is not None:
        sql += " AND (tenant, name) > (?, ?)"
        args += list(after)
    rows = conn.execute(sql + " ORDER BY tenant, name LIMIT ?", (*args, limit)).fetchall()
    return [(t, n, bytes(s), u) for t, n, s, u in rows]
