"""Schedules on the key-value layer. Under the root subspace ``R``:

``R "T" tenant "sc" name n``   the schedule as JSON (chunked: its params may be large)
``R "T" tenant "scn"``         how many schedules the tenant has (counted once if absent)
``R "T" tenant "sd" next_fire name`` the tenant's schedules due to fire, by time (none while paused)
``R "T" tenant "se"``          the earliest ``next_fire`` of the tenant's ``"sd"``, mirrored in
``R "sr" earliest tenant``     tenants with a schedule to fire, by their earliest fire

The claim walks tenants by their earliest fire and each tenant's own due list, so one tenant's
thousands of due schedules never hide another tenant's one. Every write reads the record for real,
so two nodes updating one schedule conflict and one retries; ``update`` is a compare-and-set on the
record's version. Stores made before the per-tenant layout had one ``R "sd" next_fire tenant name``
index; the claim moves its entries over.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

from tenantflow.kernel.errors import AlreadyExists, ResourceExhausted
from tenantflow.kernel.model import ScheduleRecord
from tenantflow.plugins.storage_fdb.keys import Keys, pack, unpack
from tenantflow.plugins.storage_fdb.layer import Txn, decode_int, encode_int
from tenantflow.plugins.storage_fdb.records import dumps, join_chunks, loads, put_blob

TENANT_SCAN = 1_000  # tenants with a due schedule looked at per claim (skipped ones included)
PAGE = 50  # due entries of one tenant read at a time


def get(tr: Txn, k: Keys, tenant: str, name: str, *, snapshot: bool = False) -> ScheduleRecord | None:
    rows = tr.get_range(*k.tenant_range(tenant, "sc", name), snapshot=snapshot)
    return ScheduleRecord(**loads(join_chunks(rows))) if rows else None


def _due(s: ScheduleRecord | None) -> float | None:
    return None if s is None or s.paused else s.next_fire


def _put(tr: Txn, k: Keys, old: ScheduleRecord | None, new: ScheduleRecord | None) -> None:
    before, after = _due(old), _due(new)
    if old is not None and before is not None:
        tr.clear(k.tenant(old.tenant, "sd", before, old.name))
    if new is None:
        if old is not None:
            tr.clear_range(*k.tenant_range(old.tenant, "sc", old.name))
    else:
        if after is not None:
            tr.set(k.tenant(new.tenant, "sd", after, new.name), b"")
        put_blob(tr, k.tenant(new.tenant, "sc", new.name), dumps(dataclasses.asdict(new)))
    if before != after:
        _reindex(tr, k, (new or old).tenant)  # type: ignore[union-attr]


def _reindex(tr: Txn, k: Keys, tenant: str) -> None:
    """Keep the tenant's ``"sr"`` entry at its earliest due schedule (or none)."""
    first = tr.get_range(*k.tenant_range(tenant, "sd"), limit=1)
    earliest = k.strip(first[0][0])[3] if first else None
    raw = tr.get(k.tenant(tenant, "se"))
    before = unpack(raw)[0] if raw else None
    if before == earliest:
        return
    if before is not None:
        tr.clear(k.glob("sr", before, tenant))
    if earliest is None:
        tr.clear(k.tenant(tenant, "se"))
    else:
        tr.set(k.glob("sr", earliest, tenant), b"")
        tr.set(k.tenant(tenant, "se"), pack((earliest,)))


def _count(tr: Txn, k: Keys, tenant: str) -> int:
    """The tenant's schedules, read for real (so concurrent creates conflict and the cap holds)."""
    raw = tr.get(k.tenant(tenant, "scn"))
    if raw is not None:
        return decode_int(raw)
    count = 0  # a store made before the counter: count the names once
    begin, end = k.tenant_range(tenant, "sc")
    while rows := tr.get_range(begin, end, limit=1):
        count += 1
        begin = k.tenant_range(tenant, "sc", k.strip(rows[0][0])[3])[1]
    tr.set(k.tenant(tenant, "scn"), encode_int(count))
    return count


def create(tr: Txn, k: Keys, schedule: ScheduleRecord, max_per_tenant: int = 0) -> ScheduleRecord:
    existing = get(tr, k, schedule.tenant, schedule.name)
    s = dataclasses.replace(schedule, version=1)
    if existing is not None:
        if existing == s:
            return s  # this very create committed on an earlier try
        raise AlreadyExists(
            f"schedule {s.name!r} already exists in tenant {s.tenant!r}: pick another name, or delete it first"
        )
    count = _count(tr, k, s.tenant)
    if max_per_tenant and count >= max_per_tenant:
        raise ResourceExhausted(
            f"tenant {s.tenant!r} has {count} schedules and the limit is {max_per_tenant}: delete "
            "schedules it no longer needs, then create again"
        )
    _put(tr, k, None, s)
    tr.set(k.tenant(s.tenant, "scn"), encode_int(count + 1))
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
    if old is None:
        return False
    count = _count(tr, k, tenant)
    _put(tr, k, old, None)
    tr.set(k.tenant(tenant, "scn"), encode_int(max(count - 1, 0)))
    return True


def claim(
    tr: Txn,
    k: Keys,
    owner: str,
    now: float,
    lease_seconds: float,
    limit: int,
    per_tenant: int = 0,
    skip: Collection[str] = (),
) -> list[ScheduleRecord]:
    _migrate(tr, k)
    cap = min(per_tenant or limit, limit)
    until = now + lease_seconds
    candidates: list[tuple[int, float, str, str]] = []  # (rank in tenant, next_fire, tenant, name)
    tenants = 0
    begin, end = k.glob_range("sr")[0], k.glob_range("sr", now)[1]
    for key, _ in tr.get_range(begin, end, limit=TENANT_SCAN, snapshot=True):
        if tenants >= limit:
            break
        tenant = k.strip(key)[2]
        if tenant in skip:
            continue
        rank = 0
        first, last = k.tenant_range(tenant, "sd")[0], k.tenant_range(tenant, "sd", now)[1]
        while rank < cap and (rows := tr.get_range(first, last, limit=PAGE, snapshot=True)):
            for row, _ in rows:
                next_fire, name = k.strip(row)[3:]
                s = get(tr, k, tenant, name, snapshot=True)
                if s is None or _due(s) != next_fire:
                    continue  # moved meanwhile; the real read below decides
                if s.lease_owner == owner and s.lease_until == until:
                    pass  # leased by this very claim on an earlier try: returned again
                elif s.lease_until is not None and s.lease_until >= now:
                    continue
                rank += 1
                candidates.append((rank, next_fire, tenant, name))
                if rank >= cap:
                    break
            first = rows[-1][0] + b"\x00"
        tenants += rank > 0
    candidates.sort()
    claimed: list[ScheduleRecord] = []
    for _, next_fire, tenant, name in candidates[:limit]:
        s = get(tr, k, tenant, name)
        if s is None or _due(s) != next_fire:
            continue
        if s.lease_owner == owner and s.lease_until == until:
            claimed.append(s)
            continue
        if s.lease_until is not None and s.lease_until >= now:
            continue
        leased = update(tr, k, dataclasses.replace(s, lease_owner=owner, lease_until=until))
        if leased is not None:
            claimed.append(leased)
    return claimed


def _migrate(tr: Txn, k: Keys) -> None:
    """Move entries of the old global due index (``R "sd" next_fire tenant name``) to the tenants'."""
    for key, _ in tr.get_range(*k.glob_range("sd"), limit=100):
        _, _, tenant, name = k.strip(key)
        tr.clear(key)
        s = get(tr, k, tenant, name)
        if s is not None and (due := _due(s)) is not None:
            tr.set(k.tenant(tenant, "sd", due, name), b"")
            _reindex(tr, k, tenant)
