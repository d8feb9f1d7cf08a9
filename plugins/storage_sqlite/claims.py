"""Which due instances a claim takes, at a cost bounded by the claim, not by the due backlog.

Two small tables, kept by triggers on ``instances`` so that every write path keeps them (a step's
commit, a claim, a release, a delete, another node's writes to the same file):

- ``due_queues``: per tenant, one queue of its instances without a concurrency limit (``grp``
  '') and one per concurrency group (``grp`` "<workflow>\\x1f<key>"), each with the earliest
  ``run_at`` of its unleased instances;
- ``due_tenants``: per tenant, the earliest of its queues and ``served_at``, when a claim last
  gave it an instance.

A tenant's turn comes at ``max(next_run_at, served_at)``: a tenant just served goes behind every
tenant that was due before, so claims go round-robin across tenants, however many rows one of
them has due. A claim reads the tenants whose turn has come in turn order, and from each only the
oldest rows it may take (its queues in order of their first row; a full group is passed over), so
its reads grow with the rows it claims and with the instances running (full groups, tenants at
their cap), never with the rows waiting behind them. Instances whose lease lapsed (a node that
died) are found through their own index and go first.

With nodes whose clocks differ, a tenant served by a node ahead of the others waits at most that
difference for its next turn.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field

# The queue an instance belongs to, as SQL over a row alias; the index instances_ready uses the same
# expression text (with no alias) so that SQLite finds it. Workflow names are identifiers: no \x1f.
_GRP = "CASE WHEN {r}conc_limit > 0 THEN {r}workflow || char(31) || {r}conc_key ELSE '' END"
_READY = "run_at IS NOT NULL AND lease_owner IS NULL"


def _grp(alias: str) -> str:
    return _GRP.format(r=f"{alias}." if alias else "")


def _requeue(row: str) -> str:
    """Statements that recompute the queue of the instance ``row`` (NEW or OLD) in a trigger."""
    grp = _grp(row)
    return (
        f"DELETE FROM due_queues WHERE tenant = {row}.tenant AND grp = {grp}; "
        # ORDER BY .. LIMIT 1, not MIN(): SQLite reads one index entry for it, but every row of
        # the queue for an aggregate with a HAVING.
        f"INSERT INTO due_queues (tenant, grp, next_run_at) SELECT {row}.tenant, {grp}, first FROM "
        f"(SELECT (SELECT run_at FROM instances WHERE tenant = {row}.tenant AND {_grp('')} = {grp} "
        f"AND {_READY} ORDER BY run_at LIMIT 1) AS first) WHERE first IS NOT NULL;"
    )


_RETENANT = (
    "INSERT INTO due_tenants (tenant, next_run_at, served_at) VALUES ({t}, (SELECT MIN(next_run_at) "
    "FROM due_queues WHERE tenant = {t}), 0) ON CONFLICT (tenant) DO UPDATE SET next_run_at = "
    "excluded.next_run_at;"
)

DDL = [
    "CREATE TABLE IF NOT EXISTS due_queues (tenant TEXT NOT NULL, grp TEXT NOT NULL, "
    "next_run_at REAL NOT NULL, PRIMARY KEY (tenant, grp)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS due_queues_next ON due_queues (tenant, next_run_at)",
    "CREATE TABLE IF NOT EXISTS due_tenants (tenant TEXT PRIMARY KEY, next_run_at REAL, "
    "served_at REAL NOT NULL DEFAULT 0) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS due_tenants_turn ON due_tenants (max(next_run_at, served_at), tenant) "
    "WHERE next_run_at IS NOT NULL",
    f"CREATE INDEX IF NOT EXISTS instances_ready ON instances (tenant, ({_grp('')}), run_at) WHERE {_READY}",
    # Lapsed leases (a node that died), oldest first.
    "CREATE INDEX IF NOT EXISTS instances_lease_lapse ON instances (lease_until) WHERE lease_owner IS NOT NULL",
    "CREATE TRIGGER IF NOT EXISTS due_on_insert AFTER INSERT ON instances "
    f"WHEN NEW.run_at IS NOT NULL AND NEW.lease_owner IS NULL BEGIN {_requeue('NEW')} END",
    "CREATE TRIGGER IF NOT EXISTS due_on_update AFTER UPDATE OF run_at, lease_owner ON instances "
    "WHEN OLD.run_at IS NOT NEW.run_at OR OLD.lease_owner IS NOT NEW.lease_owner "
    f"BEGIN {_requeue('NEW')} END",
    f"CREATE TRIGGER IF NOT EXISTS due_on_delete AFTER DELETE ON instances BEGIN {_requeue('OLD')} END",
    "CREATE TRIGGER IF NOT EXISTS due_tenant_on_insert AFTER INSERT ON due_queues "
    f"BEGIN {_RETENANT.format(t='NEW.tenant')} END",
    "CREATE TRIGGER IF NOT EXISTS due_tenant_on_delete AFTER DELETE ON due_queues "
    f"BEGIN {_RETENANT.format(t='OLD.tenant')} END",
]

# Filling the tables for a database made before them (run once, when due_queues is created).
BACKFILL = [
    f"INSERT INTO due_queues (tenant, grp, next_run_at) SELECT tenant, {_grp('')}, MIN(run_at) "
    f"FROM instances WHERE {_READY} GROUP BY tenant, {_grp('')}",
]

# Tenants examined per claim, past which it stops even if it found fewer rows than asked: only
# tenants at their cap or with every due group full yield nothing, and those are bounded by the
# instances running.
_MAX_TENANTS = 4096
NO_CAP = 1 << 62  # a per-tenant cap that is none
_QUEUES_PER_TENANT = 64


@dataclass
class _Tenant:
    name: str
    room: int  # rows it may take: the claim's limit, or what its cap leaves
    lapsed: list[tuple[float, int, bool]] = field(default_factory=list)  # run_at, rowid, limited
    due: list[tuple[float, int, bool]] = field(default_factory=list)
    asked: int = 0  # rows asked of its queues; fewer came back: it has no more

    @property
    def rows(self) -> list[tuple[float, int, bool]]:
        return sorted(self.lapsed + self.due)[: max(self.room, len(self.lapsed))]


def pick(
    conn: sqlite3.Connection, now: float, limit: int, cap: int
) -> tuple[list[tuple[int, bool]], list[str]]:
    """The rows a claim of ``limit`` takes (rowid, whether concurrency-limited), round-robin across
    tenants with at most ``cap`` running per tenant; and the tenants served."""
    tenants: dict[str, _Tenant] = {}
    taken: set[int] = set()
    for rowid, tenant, run_at, limited in conn.execute(
        "SELECT rowid, tenant, run_at, conc_limit > 0 FROM instances INDEXED BY instances_lease_lapse "
        "WHERE lease_owner IS NOT NULL AND lease_until < ? AND run_at <= ? ORDER BY lease_until LIMIT ?",
        (now, now, limit),
    ):
        if tenant not in tenants:
            tenants[tenant] = _Tenant(tenant, _room(conn, tenant, now, limit, cap))
        tenants[tenant].lapsed.append((run_at, rowid, bool(limited)))
        taken.add(rowid)
    # First every tenant whose turn has come gives its oldest row, until `limit` tenants gave one.
    after: tuple[float, str] | None = None
    seen = 0
    giving = len(tenants)  # tenants with a row to give: so far, each with a lapsed lease
    while giving < limit and seen < _MAX_TENANTS:
        page = conn.execute(
            "SELECT tenant, max(next_run_at, served_at) AS turn FROM due_tenants INDEXED BY due_tenants_turn "
            "WHERE next_run_at IS NOT NULL AND max(next_run_at, served_at) <= ? "
            + ("AND (max(next_run_at, served_at), tenant) > (?, ?) " if after else "")
            + "ORDER BY max(next_run_at, served_at), tenant LIMIT ?",
            (now, *(after or ()), limit),
        ).fetchall()
        if not page:
            break
        for tenant, turn in page:
            seen += 1
            after = (turn, tenant)
            entry = tenants.get(tenant) or tenants.setdefault(
                tenant, _Tenant(tenant, _room(conn, tenant, now, limit, cap))
            )
            if entry.room > len(entry.lapsed):
                entry.asked, entry.due = 1, _oldest(conn, tenant, now, 1, taken)
                giving += bool(entry.due and not entry.lapsed)
    # Then, while fewer rows than asked for, more of each tenant that may have more: each tenant's
    # share first, then all it may take.
    givers = [t for t in tenants.values() if t.lapsed or t.due]
    share = -(-limit // max(1, len(givers)))
    for ask in (share, limit):
        if sum(len(t.rows) for t in givers) >= limit:
            break
        for entry in givers:
            want = min(ask, entry.room - len(entry.lapsed))
            if len(entry.due) == entry.asked and want > entry.asked:
                entry.asked, entry.due = want, _oldest(conn, entry.name, now, want, taken)
    # Round-robin: every tenant's first row, then every tenant's second, ...; tenants in turn order.
    order = [(rank, place, rowid, limited)
             for place, entry in enumerate(tenants.values())
             for rank, (_, rowid, limited) in enumerate(entry.rows)]  # fmt: skip
    order.sort()
    chosen = order[:limit]
    served = {rowid for _, _, rowid, _ in chosen}
    names = [name for name, entry in tenants.items() if any(r[1] in served for r in entry.rows)]
    return [(rowid, limited) for _, _, rowid, limited in chosen], names


def _room(conn: sqlite3.Connection, tenant: str, now: float, limit: int, cap: int) -> int:
    return limit if cap >= NO_CAP else min(limit, cap - _running(conn, tenant, now))


def _running(conn: sqlite3.Connection, tenant: str, now: float) -> int:
    row = conn.execute(
        "SELECT COUNT(*) FROM instances INDEXED BY instances_leased WHERE tenant = ? "
        "AND lease_owner IS NOT NULL AND lease_until >= ?",
        (tenant, now),
    ).fetchone()
    return int(row[0])


def _oldest(
    conn: sqlite3.Connection, tenant: str, now: float, room: int, taken: set[int]
) -> list[tuple[float, int, bool]]:
    """A tenant's ``room`` oldest due rows it may run now: from its queue without a limit and from
    each concurrency group as far as the group has slots free."""
    found: list[tuple[float, int, bool]] = []
    queues = conn.execute(
        "SELECT grp, next_run_at FROM due_queues INDEXED BY due_queues_next WHERE tenant = ? "
        "AND next_run_at <= ? ORDER BY next_run_at LIMIT ?",
        (tenant, now, _QUEUES_PER_TENANT),
    ).fetchall()
    for grp, first in queues:
        if len(found) >= room and sorted(found)[room - 1][0] <= first:
            break  # every row of this queue and the next is younger than the ones found
        want = room
        if grp:
            workflow, key = grp.split("\x1f", 1)
            slots = conn.execute(
                "SELECT (SELECT conc_limit FROM instances INDEXED BY instances_ready WHERE tenant = ?1 "
                f"AND {_grp('')} = ?2 AND {_READY} ORDER BY run_at LIMIT 1) - (SELECT COUNT(*) FROM "
                "instances INDEXED BY instances_limited_leased WHERE tenant = ?1 AND workflow = ?3 "
                "AND conc_key = ?4 AND conc_limit > 0 AND lease_owner IS NOT NULL AND lease_until >= ?5)",
                (tenant, grp, workflow, key, now),
            ).fetchone()[0]
            want = min(room, slots or 0)
            if want <= 0:
                continue  # a full group holds back only its own
        for rowid, run_at in conn.execute(
            f"SELECT rowid, run_at FROM instances INDEXED BY instances_ready WHERE tenant = ? AND {_grp('')} = ? "
            f"AND {_READY} AND run_at <= ? ORDER BY run_at, rowid LIMIT ?",
            (tenant, grp, now, want),
        ):
            if rowid not in taken:
                found.append((run_at, rowid, bool(grp)))
    found.sort()
    return found[:room]
