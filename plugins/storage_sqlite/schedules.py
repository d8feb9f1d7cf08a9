"""Schedules in SQLite: one row each, the record as JSON beside the columns the fire loop queries."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Collection

from tenantflow.kernel.errors import AlreadyExists, ResourceExhausted
from tenantflow.kernel.model import ScheduleRecord


def _row(s: ScheduleRecord) -> tuple[str, str, str, float | None, float | None, int]:
    body = json.dumps(dataclasses.asdict(s))
    return s.tenant, s.name, body, None if s.paused else s.next_fire, s.lease_until, s.version


def _record(body: str) -> ScheduleRecord:
    return ScheduleRecord(**json.loads(body))


def create(conn: sqlite3.Connection, schedule: ScheduleRecord, max_per_tenant: int) -> ScheduleRecord:
    s = dataclasses.replace(schedule, version=1)
    if max_per_tenant:  # the caller's write transaction: concurrent creates cannot pass it together
        (count,) = conn.execute("SELECT COUNT(*) FROM schedules WHERE tenant = ?", (s.tenant,)).fetchone()
        if count >= max_per_tenant:
            raise ResourceExhausted(
                f"tenant {s.tenant!r} has {count} schedules and the limit is {max_per_tenant}: delete "
                "schedules it no longer needs, then create again"
            )
    try:
        conn.execute("INSERT INTO schedules VALUES (?, ?, ?, ?, ?, ?)", _row(s))
    except sqlite3.IntegrityError:
        raise AlreadyExists(
            f"schedule {s.name!r} already exists in tenant {s.tenant!r}: pick another name, or delete it first"
        ) from None
    return s


def get(conn: sqlite3.Connection, tenant: str, name: str) -> ScheduleRecord | None:
    row = conn.execute("SELECT body FROM schedules WHERE tenant = ? AND name = ?", (tenant, name)).fetchone()
    return _record(row[0]) if row else None


def list_page(
    conn: sqlite3.Connection, tenant: str, cursor: str | None, limit: int
) -> tuple[list[ScheduleRecord], str | None]:
    rows = conn.execute(
        "SELECT body, name FROM schedules WHERE tenant = ? AND name > ? ORDER BY name LIMIT ?",
        (tenant, cursor or "", limit + 1),
    ).fetchall()
    page = rows[:limit]
    return [_record(r[0]) for r in page], (page[-1][1] if len(rows) > limit and page else None)


def update(conn: sqlite3.Connection, schedule: ScheduleRecord) -> ScheduleRecord | None:
    s = dataclasses.replace(schedule, version=schedule.version + 1)
    tenant, name, body, next_fire, lease_until, version = _row(s)
    cur = conn.execute(
        "UPDATE schedules SET body = ?, next_fire = ?, lease_until = ?, version = ? "
        "WHERE tenant = ? AND name = ? AND version = ?",
        (body, next_fire, lease_until, version, tenant, name, schedule.version),
    )
    return s if cur.rowcount == 1 else None


def delete(conn: sqlite3.Connection, tenant: str, name: str) -> bool:
    return conn.execute("DELETE FROM schedules WHERE tenant = ? AND name = ?", (tenant, name)).rowcount == 1


def claim(
    conn: sqlite3.Connection,
    owner: str,
    now: float,
    lease_seconds: float,
    limit: int,
    per_tenant: int,
    skip: Collection[str],
) -> list[ScheduleRecord]:
    # Every due row takes part in the round-robin (ranked within its tenant), so one tenant's
    # thousands of due schedules cannot push another tenant's one out of the first rounds.
    rows = conn.execute(
        "SELECT tenant, name FROM (SELECT tenant, name, next_fire, ROW_NUMBER() OVER "
        "(PARTITION BY tenant ORDER BY next_fire, name) AS rn FROM schedules "
        "WHERE next_fire <= :now AND (lease_until IS NULL OR lease_until < :now) "
        "AND tenant NOT IN (SELECT value FROM json_each(:skip))) "
        "WHERE rn <= :cap ORDER BY rn, next_fire, tenant LIMIT :limit",
        {"now": now, "skip": json.dumps(sorted(skip)), "cap": per_tenant or 1 << 62, "limit": limit},
    ).fetchall()
    claimed = []
    for tenant, name in rows:
        s = get(conn, tenant, name)
        if s is None:
            continue
        leased = update(conn, dataclasses.replace(s, lease_owner=owner, lease_until=now + lease_seconds))
        if leased is not None:
            claimed.append(leased)
    return claimed
