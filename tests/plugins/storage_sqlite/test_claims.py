"""The SQLite claim's per-tenant queues (plugins/storage_sqlite/claims.py): its work does not grow
with the rows waiting, turns go round-robin however many rows a tenant has due, and a database made
before the queues gets them filled."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from tenantflow.kernel.model import Change, HistoryEntry, InstanceRecord, Status
from tenantflow.plugins.storage_sqlite.sqlite_storage import SQLiteStorage


def _seed(storage: SQLiteStorage, tenants: int, per_tenant: int, run_at: float, prefix: str = "t") -> None:
    now = time.time()
    records = [
        InstanceRecord(tenant=f"{prefix}{t}", id=f"{prefix}{t}-{n}", workflow="W", code="artifact://x/y@sha256:0",
                       runtime="python", module="wf", params_json="null", status=Status.QUEUED,
                       created_at=now, updated_at=now, run_at=run_at + n * 1e-3)
        for t in range(tenants) for n in range(per_tenant)
    ]  # fmt: skip
    for first in range(0, len(records), 2000):
        chunk = records[first : first + 2000]
        storage.create_instances(chunk, [HistoryEntry(kind="status", at=now, status=1) for _ in chunk])


def _vm_steps(storage: SQLiteStorage, claims: int) -> int:
    """SQLite virtual-machine steps (in hundreds) for ``claims`` claims of 32: a count, not a time."""
    steps = [0]

    def tick() -> int:
        steps[0] += 1
        return 0

    connections: list[sqlite3.Connection] = [storage._writer, storage._reader()]
    for conn in connections:
        conn.set_progress_handler(tick, 100)
    for n in range(claims):
        assert len(storage.claim(f"node-{n}", time.time(), 60, 32)) == 32
    for conn in connections:
        conn.set_progress_handler(None, 0)
    return steps[0]


def test_a_claim_costs_the_same_behind_10_or_400_rows_per_tenant(tmp_path: Path) -> None:
    small, large = SQLiteStorage(tmp_path / "small.sqlite3"), SQLiteStorage(tmp_path / "large.sqlite3")
    _seed(small, 50, 10, time.time() - 60)
    _seed(large, 50, 400, time.time() - 60)
    _vm_steps(small, 1), _vm_steps(large, 1)  # warm: the first claim of a file prepares statements
    cheap, dear = _vm_steps(small, 5), _vm_steps(large, 5)
    # The old claim ranked every due row: 40x the rows cost ~40x. B-tree depth may add a little.
    assert dear < cheap * 1.5, f"{dear} vs {cheap} hundred VM steps for 40x the backlog"


def test_turns_go_round_robin_whatever_a_tenant_has_due(tmp_path: Path) -> None:
    storage = SQLiteStorage(tmp_path / "s.sqlite3")
    now = time.time()
    _seed(storage, 1, 500, now - 100, prefix="noisy")
    first = storage.claim("n", now, 60, 1)
    assert [r.tenant for r in first] == ["noisy0"]
    _seed(storage, 3, 1, now - 1, prefix="quiet")  # due later than every noisy row
    got = [r.tenant for r in storage.claim("n", now + 1, 60, 3)]
    # noisy0 was served at `now`: every tenant due before that goes first, whatever noisy0 has left.
    assert sorted(got) == ["quiet0", "quiet1", "quiet2"]
    assert [r.tenant for r in storage.claim("n", now + 2, 60, 1)] == ["noisy0"]


def test_a_sleeping_instance_leaves_its_tenants_turn(tmp_path: Path) -> None:
    storage = SQLiteStorage(tmp_path / "s.sqlite3")
    now = time.time()
    _seed(storage, 1, 1, now - 1)
    (mine,) = storage.claim("n", now, 60, 5)
    sleep = Change(tenant=mine.tenant, id=mine.id, now=now,
                   set={"status": Status.WAITING, "run_at": now + 30, "lease_owner": None, "lease_until": None})  # fmt: skip
    assert storage.apply([sleep])[0].ok
    assert storage.claim("n", now + 1, 60, 5) == []
    assert [r.id for r in storage.claim("n", now + 31, 60, 5)] == [mine.id]
    assert storage.delete_instance(mine.tenant, mine.id)  # counted without the triggers' own rows
    assert not storage.delete_instance(mine.tenant, mine.id)
    queued = storage._reader().execute("SELECT COUNT(*) FROM due_queues").fetchone()[0]
    assert queued == 0


def test_a_database_made_before_the_queues_gets_them_filled(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    storage = SQLiteStorage(path)
    _seed(storage, 3, 2, time.time() - 5)
    storage.close()
    conn = sqlite3.connect(path)
    for kind, name in conn.execute(
        "SELECT type, name FROM sqlite_master WHERE name LIKE 'due_%' AND type IN ('trigger', 'table')"
    ).fetchall():
        conn.execute(f"DROP {kind.upper()} IF EXISTS {name}")
    conn.commit()
    conn.close()
    reopened = SQLiteStorage(path)
    assert len(reopened.claim("n", time.time(), 60, 10)) == 6


def test_the_cap_counts_what_a_tenant_runs_whatever_the_claims_size(tmp_path: Path) -> None:
    storage = SQLiteStorage(tmp_path / "s.sqlite3")
    _seed(storage, 1, 8, time.time() - 1)
    assert len(storage.claim("n", time.time(), 60, 2, per_tenant=2)) == 2
    assert storage.claim("n", time.time(), 60, 2, per_tenant=2) == []  # was 2 more: the cap = the limit
    assert storage.claim("n", time.time(), 60, 1, per_tenant=2) == []
    assert len(storage.claim("n", time.time(), 60, 8, per_tenant=3)) == 1
