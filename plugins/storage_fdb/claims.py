"""The claim path: move due timers into tenants' runnable queues, then lease round-robin by tenant.

Candidates are chosen from snapshot reads (no conflicts); each chosen instance's head is then read
for real, so two claimers racing for one instance conflict and exactly one lease is taken.

Bounded: a claim reads ready tenants a page at a time, starting where this node's previous claim
stopped (so every tenant's turn comes), each page's leases and queues sent at once, and stops once
it has as many candidates as it may lease (or after ``TENANT_SCAN`` tenants): its reads do not grow
with the number of ready tenants, and a transaction stays far inside FoundationDB's 5 seconds.

The per-tenant cap: a tenant's running leases are counted from a snapshot read of its lease keys,
which every renewal rewrites (reading them for real would make each claim conflict with each renewal
in the tenant, every few seconds per lease). Instead every lease taken adds to the tenant's ``"kn"``
counter (an atomic add: takers never conflict with each other through it), and a capped claim adds
a read conflict on it for each tenant it leases in: two claims leasing in one tenant at once
conflict, and the retry counts the other's leases, so the cap holds across nodes. They would mostly
conflict anyway (both take the tenant's oldest due instances); renewals, releases and step commits
never write it.

Concurrency limits: a queue entry's value names the instance's group and limit; the group's leases
(``"g"``) are counted while choosing, and again for real before a lease is taken, so two claimers
filling one group conflict and the limit holds across nodes. Held-back entries are passed over, up
to ``SCAN`` entries per tenant and claim (a transaction stays small and short).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tenantflow.kernel.model import InstanceRecord
from tenantflow.plugins.storage_fdb.indexes import reindex
from tenantflow.plugins.storage_fdb.keys import Keys, pack, unpack
from tenantflow.plugins.storage_fdb.layer import Txn
from tenantflow.plugins.storage_fdb.leases import until_of
from tenantflow.plugins.storage_fdb.records import Head

PROMOTE = 500  # due timers moved per claim transaction (the rest on the next claim, moments later)
SCAN = 2_000  # queue entries of one tenant looked at per claim, past instances held back by a limit
TENANT_SCAN = 1_000  # ready tenants looked at per claim, at most
MIN_PAGE = 16  # ready tenants read at once, at least (a page is as many as the claim may lease)
NEXT_SCAN = 64  # timers and ready tenants next_run_at looks at (the rest: a poke or the idle poll)

Loader = Callable[[Txn, Sequence[tuple[str, str]]], list[InstanceRecord | None]]
Candidate = tuple[int, int, float, str, str, tuple[tuple[Any, ...], int] | None]


@dataclass
class Cursor:
    """Where this node's next claim starts reading ready tenants (its previous claim's stop)."""

    after: bytes | None = None


def promote_due(tr: Txn, k: Keys, now: float) -> None:
    begin, _ = k.glob_range("t")
    end = k.glob_range("t", now)[1]
    for key, tag in tr.get_range(begin, end, limit=PROMOTE, snapshot=True):
        _, run_at, tenant, id = k.strip(key)
        tr.add_read_conflict_key(key)  # a concurrent reschedule of this instance wins; we retry
        tr.clear(key)
        tr.set(k.tenant(tenant, "q", run_at, id), tag)
        tr.set(k.glob("r", tenant), b"")


def _leases(k: Keys, rows: list[tuple[bytes, bytes]]) -> dict[str, float | None]:
    return {k.strip(key)[-1]: unpack(value)[0] for key, value in rows}


def _group_running(tr: Txn, k: Keys, tenant: str, group: tuple[Any, ...], now: float, snapshot: bool) -> int:
    rows = tr.get_range(*k.tenant_range(tenant, "g", *group), snapshot=snapshot)
    return sum(1 for _, value in rows if unpack(value)[0] >= now)


def _ready_pages(tr: Txn, k: Keys, cursor: Cursor, page: int) -> Any:
    """Pages of ready tenants from the cursor to the end, then from the start up to the cursor."""
    begin, end = k.glob_range("r")
    start = cursor.after + b"\x00" if cursor.after is not None else begin
    for first, last in ((start, end), (begin, start)):
        while first < last:
            rows = tr.get_range(first, last, limit=page, snapshot=True)
            if rows:
                yield [(key, k.strip(key)[-1]) for key, _ in rows]
            if len(rows) < page:
                break
            first = rows[-1][0] + b"\x00"
        if cursor.after is None:
            return


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
    cursor: Cursor,
) -> tuple[list[InstanceRecord], bytes | None]:
    """Lease up to ``limit`` due, unleased instances: each tenant's oldest first, then tenants with
    the fewest running (as the SQLite engine's window query), none above ``per_tenant``, among the
    ready tenants read from ``cursor`` on. Returns them and where the next claim starts.
    ``claim_id``, chosen before the retry loop, marks the leases taken, so a retry after a commit
    that did apply returns them instead of losing them."""
    cap = per_tenant if per_tenant > 0 else 1 << 62
    until = now + lease_seconds
    claimed = _claimed_before(tr, k, load, owner, claim_id)
    limit -= len(claimed)
    promote_due(tr, k, now)
    candidates: list[Candidate] = []
    page = min(max(limit, MIN_PAGE), TENANT_SCAN)
    order: dict[str, bytes] = {}  # the tenants looked at, in order, with their "r" keys
    firsts = 0
    for tenants in _ready_pages(tr, k, cursor, page) if limit > 0 else ():
        firsts += _candidates(tr, k, [t for _, t in tenants], now, cap, limit, candidates)
        order.update((t, key) for key, t in tenants)
        if firsts >= limit or len(order) >= TENANT_SCAN:
            break
    candidates.sort(key=lambda c: c[:3])
    chosen = candidates[: max(limit, 0)]
    # The next claim starts after the last tenant (in this claim's order) that got an instance:
    # the ones after it, passed over only because this claim was full, come first next time.
    served = {c[3] for c in chosen}
    stop = next((key for t, key in reversed(order.items()) if t in served), cursor.after)
    # Read for real, with the leases' current ends: a claimer or a renewal racing for one of them
    # makes one of us retry.
    found = tr.get_many(
        [k.inst(tenant, id, "h") for _, _, _, tenant, id, _ in chosen]
        + [k.tenant(tenant, "k", id) for _, _, _, tenant, id, _ in chosen]
    )
    taken: list[tuple[str, str]] = []
    for (_, _, run_at, tenant, id, conc), raw, lease in zip(
        chosen, found, found[len(chosen) :], strict=False
    ):
        head = Head.decode(raw) if raw is not None else None
        if head is None or head.run_at != run_at:
            tr.clear(k.tenant(tenant, "q", run_at, id))  # stale: the instance moved or is gone
            continue
        held_until = until_of(lease) if head.lease_owner is not None else None
        if held_until is not None and held_until >= now:
            continue
        # Read for real: a claimer on another node filling the same group makes one of us retry.
        if conc is not None and _group_running(tr, k, tenant, conc[0], now, False) >= conc[1]:
            continue
        new = head.replace(lease_owner=owner, lease_until=until)
        tr.set(k.inst(tenant, id, "h"), new.encode())
        reindex(tr, k, tenant, id, head, new)
        tr.set(k.glob("o", owner, tenant, id), pack((until, claim_id)))
        taken.append((tenant, id))
    if per_tenant > 0:  # the running counts were snapshot reads (see above)
        for tenant in dict.fromkeys(tenant for tenant, _ in taken):
            tr.add_read_conflict_key(k.tenant(tenant, "kn"))
    claimed += [r for r in load(tr, taken) if r is not None]
    claimed.sort(key=lambda r: r.run_at or 0.0)
    return claimed, stop


def _candidates(
    tr: Txn, k: Keys, tenants: list[str], now: float, cap: int, limit: int, out: list[Candidate]
) -> int:
    """Add the candidates of ``tenants`` to ``out``; how many tenants gave one. Their leases and
    due queues are read at once."""
    leases_and_queues = tr.get_ranges(
        [r for t in tenants for r in ((*k.tenant_range(t, "k"), 0),
                                      (k.tenant_range(t, "q")[0], k.tenant_range(t, "q", now)[1], limit))],
        snapshot=True,
    )  # fmt: skip
    empty: list[str] = []
    firsts = 0
    for n, tenant in enumerate(tenants):
        leases = _leases(k, leases_and_queues[2 * n])
        running = sum(1 for until in leases.values() if until is not None and until >= now)
        room = min(cap - running, limit)
        if room <= 0:
            continue
        rows = leases_and_queues[2 * n + 1]
        if not rows:
            empty.append(tenant)
            continue
        if len(rows) < room + len(leases) and len(rows) == limit:
            rows = tr.get_range(rows[0][0], k.tenant_range(tenant, "q", now)[1], limit=room + len(leases),
                                snapshot=True)  # fmt: skip
        firsts += _tenant_candidates(tr, k, tenant, rows, leases, running, room, now, out) > 0
    # Read for real: an insert meanwhile makes us retry rather than hide the tenant's new work.
    for tenant, rows in zip(empty, tr.get_ranges([(*k.tenant_range(t, "q"), 1) for t in empty]), strict=True):
        if not rows:
            tr.clear(k.glob("r", tenant))
    return firsts


def _tenant_candidates(
    tr: Txn,
    k: Keys,
    tenant: str,
    rows: list[tuple[bytes, bytes]],
    leases: dict[str, float | None],
    running: int,
    room: int,
    now: float,
    out: list[Candidate],
) -> int:
    """One tenant's candidates, oldest first, past leased ones and ones held back by a group."""
    end = k.tenant_range(tenant, "q", now)[1]
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
            out.append((rank, running, run_at, tenant, id, conc))
            if rank >= room:
                break
        if rank >= room or len(rows) < room + len(leases) or scanned >= SCAN:
            break
        rows = tr.get_range(rows[-1][0] + b"\x00", end, limit=min(SCAN - scanned, 200), snapshot=True)
    return rank


def _claimed_before(tr: Txn, k: Keys, load: Loader, owner: str, claim_id: str) -> list[InstanceRecord]:
    """Leases this very claim took on an earlier try whose commit reported an unknown result.
    A snapshot read: the owner's lease entries change with every renewal, and only this claim
    writes entries with its id."""
    mine = [
        tuple(k.strip(key)[-2:])
        for key, value in tr.get_range(*k.glob_range("o", owner), snapshot=True)
        if unpack(value)[1:] == (claim_id,)
    ]
    return [r for r in load(tr, mine) if r is not None]


def next_run_at(tr: Txn, k: Keys, cursor: Cursor) -> float | None:
    """The earliest ``run_at`` of an instance nobody leases, among the first ``NEXT_SCAN`` timers
    and the ``NEXT_SCAN`` ready tenants the next claim reads first (bounded: the dispatcher's idle
    poll finds the rest)."""
    best: float | None = None
    timers = [k.strip(key)[1:] for key, _ in tr.get_range(*k.glob_range("t"), limit=NEXT_SCAN)]
    heads = tr.get_many([k.inst(tenant, id, "h") for _, tenant, id in timers])
    for (run_at, _, _), raw in zip(timers, heads, strict=True):
        if raw is not None and Head.decode(raw).lease_owner is None:
            best = run_at
            break
    tenants = [t for _, t in next(_ready_pages(tr, k, cursor, NEXT_SCAN), [])]
    leases = tr.get_ranges([(*k.tenant_range(t, "k"), 0) for t in tenants])
    queues = tr.get_ranges(
        [(*k.tenant_range(t, "q"), len(held) + 1) for t, held in zip(tenants, leases, strict=True)]
    )
    for held, rows in zip(leases, queues, strict=True):
        leased = _leases(k, held)
        for key, _ in rows:
            run_at, id = k.strip(key)[-2:]
            if id not in leased:
                best = run_at if best is None else min(best, run_at)
                break
    return best
