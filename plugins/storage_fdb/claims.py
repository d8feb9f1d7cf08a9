"""The claim path: move due timers into tenants' runnable queues, then lease round-robin by tenant.

Candidates are chosen from snapshot reads (no conflicts); each chosen instance's head is then read
for real, so two claimers racing for one instance conflict and exactly one lease is taken.
"""

from __future__ import annotations

from collections.abc import Callable

from tenantflow.kernel.model import InstanceRecord
from tenantflow.plugins.storage_fdb.indexes import reindex
from tenantflow.plugins.storage_fdb.keys import Keys, pack, unpack
from tenantflow.plugins.storage_fdb.layer import Txn
from tenantflow.plugins.storage_fdb.records import Head

PROMOTE = 500  # due timers moved per claim transaction (the rest on the next claim, moments later)

Loader = Callable[[Txn, str, str], InstanceRecord | None]


def promote_due(tr: Txn, k: Keys, now: float) -> None:
    begin, _ = k.glob_range("t")
    end = k.glob_range("t", now)[1]
    for key, _ in tr.get_range(begin, end, limit=PROMOTE, snapshot=True):
        _, run_at, tenant, id = k.strip(key)
        tr.add_read_conflict_key(key)  # a concurrent reschedule of this instance wins; we retry
        tr.clear(key)
        tr.set(k.tenant(tenant, "q", run_at, id), b"")
        tr.set(k.glob("r", tenant), b"")


def _leases(tr: Txn, k: Keys, tenant: str) -> dict[str, float | None]:
    rows = tr.get_range(*k.tenant_range(tenant, "k"), snapshot=True)
    return {k.strip(key)[-1]: unpack(value)[0] for key, value in rows}


def ready_tenants(tr: Txn, k: Keys) -> list[str]:
    return [k.strip(key)[-1] for key, _ in tr.get_range(*k.glob_range("r"), snapshot=True)]


def claim(
    tr: Txn,
    k: Keys,
    load: Loader,
    claim_id: str,
    owner: str,
    now: float,
    lease_seconds: float,
    limit: int,
    per_tenant: int,
) -> list[InstanceRecord]:
    """Lease up to ``limit`` due, unleased instances: each tenant's oldest first, then tenants with
    the fewest running (as the SQLite engine's window query), none above ``per_tenant``.
    ``claim_id``, chosen before the retry loop, marks the leases taken, so a retry after a commit
    that did apply returns them instead of losing them."""
    cap = per_tenant if per_tenant > 0 else 1 << 62
    until = now + lease_seconds
    claimed = _claimed_before(tr, k, load, owner, claim_id)
    limit -= len(claimed)
    promote_due(tr, k, now)
    candidates: list[tuple[int, int, float, str, str]] = []  # (rank in tenant, running, run_at, tenant, id)
    for tenant in ready_tenants(tr, k):
        leases = _leases(tr, k, tenant)
        running = sum(1 for until in leases.values() if until is not None and until >= now)
        room = min(cap - running, limit)
        begin, _ = k.tenant_range(tenant, "q")
        end = k.tenant_range(tenant, "q", now)[1]
        if room <= 0:
            continue
        rows = tr.get_range(begin, end, limit=room + len(leases), snapshot=True)
        if not rows and not tr.get_range(*k.tenant_range(tenant, "q"), limit=1):
            tr.clear(k.glob("r", tenant))  # read for real: an insert meanwhile makes us retry
            continue
        rank = 0
        for key, _ in rows:
            run_at, id = k.strip(key)[-2:]
            held_until = leases.get(id)
            if held_until is not None and held_until >= now:
                continue
            rank += 1
            if rank > room:
                break
            candidates.append((rank, running, run_at, tenant, id))
    candidates.sort(key=lambda c: c[:3])
    taken = 0
    for _, _, run_at, tenant, id in candidates:
        if taken >= limit:
            break
        raw = tr.get(k.inst(tenant, id, "h"))
        head = Head.decode(raw) if raw is not None else None
        if head is None or head.run_at != run_at:
            tr.clear(k.tenant(tenant, "q", run_at, id))  # stale: the instance moved or is gone
            continue
        if head.lease_until is not None and head.lease_until >= now:
            continue
        new = head.replace(lease_owner=owner, lease_until=until)
        tr.set(k.inst(tenant, id, "h"), new.encode())
        reindex(tr, k, tenant, id, head, new)
        tr.set(k.glob("o", owner, tenant, id), pack((until, claim_id)))
        taken += 1
        found = load(tr, tenant, id)
        if found is not None:
            claimed.append(found)
    claimed.sort(key=lambda r: r.run_at or 0.0)
    return claimed


def _claimed_before(tr: Txn, k: Keys, load: Loader, owner: str, claim_id: str) -> list[InstanceRecord]:
    """Leases this very claim took on an earlier try whose commit reported an unknown result."""
    found = []
    for key, value in tr.get_range(*k.glob_range("o", owner)):
        if unpack(value)[1:] == (claim_id,):
            tenant, id = k.strip(key)[-2:]
            record = load(tr, tenant, id)
            if record is not None:
                found.append(record)
    return found


def next_run_at(tr: Txn, k: Keys) -> float | None:
    """The earliest ``run_at`` of an instance nobody leases."""
    best: float | None = None
    for key, _ in tr.get_range(*k.glob_range("t"), limit=1000):
        _, run_at, tenant, id = k.strip(key)
        raw = tr.get(k.inst(tenant, id, "h"))
        if raw is not None and Head.decode(raw).lease_owner is None:
            best = run_at
            break
    for tenant in ready_tenants(tr, k):
        leased = _leases(tr, k, tenant)
        for key, _ in tr.get_range(*k.tenant_range(tenant, "q"), limit=len(leased) + 1):
            run_at, id = k.strip(key)[-2:]
            if id not in leased:
                best = run_at if best is None else min(best, run_at)
                break
    return best
