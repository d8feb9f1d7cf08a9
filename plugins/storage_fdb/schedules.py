"""Schedules on the key-value layer. Under the root subspace ``R``:

``R "T" tenant "sc" name n``   the schedule as JSON (chunked: its params may be large)
``R "sd" next_fire tenant name`` schedules due to fire, by time (none while paused)

Every write reads the record for real, so two nodes updating one schedule conflict and one retries;
``update`` is a compare-and-set on the record's version.
"""

from __future__ import annotations

import dataclasses

from tenantflow.kernel.errors import AlreadyExists
from tenantflow.kernel.model import ScheduleRecord
from tenantflow.plugins.storage_fdb.keys import Keys
from tenantflow.plugins.storage_fdb.layer import Txn
from tenantflow.plugins.storage_fdb.records import dumps, join_chunks, loads, put_blob


def get(tr: Txn, k: Keys, tenant: str, name: str) -> ScheduleRecord | None:
    rows = tr.get_range(*k.tenant_range(tenant, "sc", name))
    return ScheduleRecord(**loads(join_chunks(rows))) if rows else None


def _put(tr: Txn, k: Keys, old: ScheduleRecord | None, new: ScheduleRecord | None) -> None:
    def due(s: ScheduleRecord | None) -> float | None:
        return None if s is None or s.paused else s.next_fire

    if (before := due(old)) is not None:
        tr.clear(k.glob("sd", before, old.tenant, old.name))  # type: ignore[union-attr]
    if new is None:
        if old is not None:
            tr.clear_range(*k.tenant_range(old.tenant, "sc", old.name))
        return
    if (after := due(new)) is not None:
        tr.set(k.glob("sd", after, new.tenant, new.name), b"")
    put_blob(tr, k.tenant(new.tenant, "sc", new.name), dumps(dataclasses.asdict(new)))


def create(tr: Txn, k: Keys, schedule: ScheduleRecord) -> ScheduleRecord:
    existing = get(tr, k, schedule.tenant, schedule.name)
    s = dataclasses.replace(schedule, version=1)
    if existing is not None:
        if existing == s:
            return s  # this very create committed on an earlier try
        raise AlreadyExists(
            f"schedule {s.name!r} already exists in tenant {s.tenant!r}: pick another name, or delete it first"
        )
    _put(tr, k, None, s)
    return s


def list_page(
    tr: Txn, k: Keys, tenant: str, cursor: str | None, limit: int
) -> tuple[list[ScheduleRecord], str | None]:
    begin, end = k.tenant_range(tenant, "sc")
    if cursor:
        begin = k.tenant_range(tenant, "sc", cursor)[1]
    found: list[ScheduleRecord] = []
    while len(found) <= limit:
        rows = tr.get_range(begin, end, limit=1)
        if not rows:
            break
        name = k.strip(rows[0][0])[3]
        schedule = get(tr, k, tenant, name)
        if schedule is not None:
            found.append(schedule)
        begin = k.tenant_range(tenant, "sc", name)[1]
    page = found[:limit]
    return page, (page[-1].name if len(found) > limit and page else None)


def update(tr: Txn, k: Keys, schedule: ScheduleRecord) -> ScheduleRecord | None:
    old = get(tr, k, schedule.tenant, schedule.name)
    new = dataclasses.replace(schedule, version=schedule.version + 1)
    if old is not None and old == new:
        return new  # this very update committed on an earlier try
    if old is None or old.version != schedule.version:
        return None
    _put(tr, k, old, new)
    return new


def delete(tr: Txn, k: Keys, tenant: str, name: str) -> bool:
    old = get(tr, k, tenant, name)
    _put(tr, k, old, None)
    return old is not None


def claim(tr: Txn, k: Keys, owner: str, now: float, lease_seconds: float, limit: int) -> list[ScheduleRecord]:
    begin = k.glob_range("sd")[0]
    end = k.glob_range("sd", now)[1]
    claimed: list[ScheduleRecord] = []
    for key, _ in tr.get_range(begin, end, limit=limit * 4, snapshot=True):
        if len(claimed) >= limit:
            break
        _, _, tenant, name = k.strip(key)
        s = get(tr, k, tenant, name)
        if s is None or s.paused or s.next_fire is None or s.next_fire > now:
            tr.clear(key)  # stale
            continue
        if s.lease_owner == owner and s.lease_until == now + lease_seconds:
            claimed.append(s)  # leased by this very claim on an earlier try
            continue
        if s.lease_until is not None and s.lease_until >= now:
            continue
        leased = update(tr, k, dataclasses.replace(s, lease_owner=owner, lease_until=now + lease_seconds))
        if leased is not None:
            claimed.append(leased)
    return claimed
