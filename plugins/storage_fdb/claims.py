"""The claim path: move due timers into tenants' runnable queues, then lease round-robin by tenant.

Candidates are chosen from snapshot reads (no conflicts); each chosen instance's head is then read
for real, so two claimers racing for one instance conflict and exactly one lease is taken.

Concurrency limits: a queue entry's value names the instance's group and limit; the group's leases
(``"g"``) are counted while choosing, and again for real before a lease is taken, so two claimers
filling one group conflict and the limit holds across nodes. Held-back entries are passed over, up
to ``SCAN`` entries per tenant and claim (a transaction stays small and short).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tenantflow.kernel.model import InstanceRecord
from tenantflow.plugins.storage_fdb.indexes import reindex
from tenantflow.plugins.storage_fdb.keys import Keys, pack, unpack
from tenantflow.plugins.storage_fdb.layer import Txn
from tenantflow.plugins.storage_fdb.records import Head

PROMOTE = 500  # due timers moved per claim transaction (the rest on the next claim, moments later)
SCAN = 2_000  # queue entries of one tenant looked at per claim, past instances held back by a limit

Loader = Callable[[Txn, str, str], InstanceRecord | None]


def promote_due(tr: Txn, k: Keys, now: float) -> None:
    begin, _ = k.glob_range("t")
    end = k.glob_range("t", now)[1]
    for key, tag in tr.get_range(begin, end, limit=PROMOTE, snapshot=True):
        _, run_at, tenant, id = k.strip(key)
        tr.add_read_conflict_key(key)  # a concurrent reschedule of this instance wins; we retry
        tr.clear(key)
        tr.set(k.tenant(tenant, "q", run_at, id), tag)
        tr.set(k.glob("r", tenant), b"")


def _leases(tr: Txn, k: Keys, tenant: str) -> dict[str, float | None]:
    rows = tr.get_range(*k.tenant_range(tenant, "k"), snapshot=True)
    return {k.strip(key)[-1]: unpack(value)[0] for key, value in rows}


def _group_running(tr: Txn, k: Keys, tenant: str, group: tuple[Any, ...], now: float, snapshot: bool) -> int:
    rows = tr.get_range(*k.tenant_range(tenant, "g", *group), snapshot=snapshot)
    return sum(1 for _, value in rows if unpack(value)[0] >= now)


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
    # (rank in tenant, running, run_at, tenant, id, (group, limit) or None)
    candidates: list[tuple[int, int, float, str, str, tuple[tuple[Any, ...], int] | None]] = []
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
        rank = scanned = 0
        slots: dict[tuple[Any, ...], int] = {}  # free slots left per concurrency group
        while rows and rank < room:
            for key, tag in rows:
                scanned += 1
                run_at, id = k.strip(key)[-2:]
                held_until = leases.get(id)
                if held_until is not None and held_until >= now:
                    continue
                conc = None
                if tag:
                    *group_items, group_limit = unpack(tag)
                    group = tuple(group_items)
                    if group not in slots:
                        slots[group] = group_limit - _group_running(tr, k, tenant, group, now, True)
                    if slots[group] <= 0:
                        continue  # held back by its group's limit; later ones may still run
                    slots[group] -= 1
                    conc = (group, group_limit)
                rank += 1
                candidates.append((rank, running, run_at, tenant, id, conc))
                if rank >= room:
                    break
            if rank >= room or len(rows) < room + len(leases) or scanned >= SCAN:
                break
            rows = tr.get_range(rows[-1][0] + b"\x00", end, limit=min(SCAN - scanned, 200), snapshot=True)
    candidates.sort(key=lambda c: c[:3])
    taken = 0
    for _, _, run_at, tenant, id, conc in candidates:
        if taken >= limit:
            break
        raw = tr.get(k.inst(tenant, id, "h"))
        head = Head.decode(raw) if raw is not None else None
        if head is None or head.run_at != run_at:
            tr.clear(k.tenant(tenant, "q", run_at, id))  # stale: the instance moved or is gone
            continue
        if head.lease_until is not None and head.lease_until >= now:
            continue
        # Read for real: a claimer on another node filling the same group makes one of us retry.
        if conc is not None and _group_running(tr, k, tenant, conc[0], now, False) >= conc[1]:
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
