"""The SQLite implementation of :class:`tenantflow.kernel.storage.Storage`.

One write connection behind a lock (SQLite has one writer anyway) and one read connection per
thread; WAL lets reads proceed while a batch commits.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs

from tenantflow.kernel.errors import AlreadyExists, InvalidArgument, ResourceExhausted
from tenantflow.kernel.model import (
    SKIPPED,
    SPENT,
    TERMINAL,
    ApplyResult,
    Artifact,
    ArtifactVersion,
    Change,
    EventRecord,
    HistoryEntry,
    InstanceRecord,
    ScheduleRecord,
    Status,
    StepRecord,
    TenantSummary,
    inbox_refusal,
)
from tenantflow.kernel.tenantkv import NO_QUOTA, KVEntry, KVQuota, KVUsage, KVWrite
from tenantflow.plugins.storage_sqlite import claims, schedules, tenantkv
from tenantflow.plugins.storage_sqlite.tenants import list_page as list_tenant_page

_INSTANCE_COLUMNS = (
    "tenant, id, workflow, code, runtime, module, params_json, status, output_json, error_name, "
    "error_message, created_at, updated_at, run_at, generation, lease_owner, lease_until, parent, "
    "conc_key, conc_limit, error_traceback"
)
_SETTABLE = frozenset(
    {"status", "output_json", "error_name", "error_message", "error_traceback", "run_at", "lease_owner",
     "lease_until", "code"}  # code: Upgrade re-pins an instance
)  # fmt: skip
# Terminal statuses as SQL, "4, 5, 6": the same text as the partial index instances_ended, so
# SQLite uses it.
_ENDED = ", ".join(str(int(s)) for s in sorted(TERMINAL))
_STEP_COLUMNS = (
    "key, seq, name, kind, status, attempts, output_json, error_name, error_message, wake_at, event_type, "
    "updated_at, error_traceback"
)


def parse_url(url: str) -> tuple[Path, str]:
    """``sqlite:///abs/path.db?synchronous=NORMAL`` -> (path, synchronous)."""
    rest = url[len("sqlite:") :]
    rest, _, query = rest.partition("?")
    if rest.startswith("//"):
        rest = rest[2:]
    if not rest:
        raise InvalidArgument(f"storage URL {url!r} names no file: use sqlite:///path/to/tenantflow.sqlite3")
    synchronous = parse_qs(query).get("synchronous", ["FULL"])[0].upper()
    if synchronous not in ("FULL", "NORMAL", "EXTRA"):
        raise InvalidArgument(f"storage URL {url!r}: synchronous must be FULL, EXTRA or NORMAL")
    return Path(rest), synchronous


def _filters(
    tenant: str,
    status: Status | None,
    workflow: str,
    created_after: float | None,
    created_before: float | None,
) -> tuple[str, tuple[Any, ...]]:
    """The WHERE clause (and its arguments) of a tenant's instances narrowed by List's filters."""
    where, args = "tenant = ?", [cast(Any, tenant)]
    filters: list[tuple[str, Any]] = [
        ("status = ?", None if status is None else int(status)),
        ("workflow = ?", workflow or None),
        ("created_at >= ?", created_after),
        ("created_at < ?", created_before),
    ]
    for clause, value in filters:
        if value is not None:
            where += f" AND {clause}"
            args.append(value)
    return where, tuple(args)


def _instance(row: sqlite3.Row | tuple[Any, ...]) -> InstanceRecord:
    return InstanceRecord(
        tenant=row[0], id=row[1], workflow=row[2], code=row[3], runtime=row[4], module=row[5],
        params_json=row[6], status=Status(row[7]), output_json=row[8], error_name=row[9],
        error_message=row[10], created_at=row[11], updated_at=row[12], run_at=row[13],
        generation=row[14], lease_owner=row[15], lease_until=row[16], parent=row[17],
        concurrency_key=row[18], concurrency_limit=row[19], error_traceback=row[20],
    )  # fmt: skip


def _when_unlocked(action: Callable[[], object], seconds: float = 30.0) -> None:
    """Run ``action``, retrying while another connection holds the file: switching to WAL and
    changing the schema can answer "database is locked" at once, without SQLite's busy handler
    (seen with several kernel nodes starting together over one new file)."""
    deadline, delay = time.monotonic() + seconds, 0.005
    while True:
        try:
            action()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


class SQLiteStorage:
    """Embedded storage in one SQLite file."""

    def __init__(self, path: Path, *, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._synchronous = synchronous
        self._lock = threading.Lock()
        self._local = threading.local()
        self._writer = self._connect()
        schema = resources.files(__package__).joinpath("schema.sql").read_text()
        _when_unlocked(lambda: self._writer.executescript(schema))
        _when_unlocked(self._migrate)

    def _migrate(self) -> None:
        """Bring a database made by an older version up to the schema (CREATE IF NOT EXISTS leaves
        existing tables as they were). Under the write lock: nodes starting together over one file
        must not both add a column."""
        self._writer.execute("BEGIN IMMEDIATE")
        try:
            self._migrate_locked()
        except BaseException:
            self._writer.execute("ROLLBACK")
            raise
        self._writer.execute("COMMIT")

    def _migrate_locked(self) -> None:
        columns = {row[1] for row in self._writer.execute("PRAGMA table_info(instances)")}
        self._migrate_columns(columns)
        # The claim's per-tenant queues (claims.py), filled once for a database made before them.
        fresh = not self._writer.execute("SELECT 1 FROM sqlite_master WHERE name = 'due_queues'").fetchone()
        for statement in claims.DDL:
            self._writer.execute(statement)
        if fresh:
            for statement in claims.BACKFILL:
                self._writer.execute(statement)

    def _migrate_columns(self, columns: set[str]) -> None:
        if "parent" not in columns:
            self._writer.execute("ALTER TABLE instances ADD COLUMN parent TEXT NOT NULL DEFAULT ''")
        if "conc_key" not in columns:
            self._writer.execute("ALTER TABLE instances ADD COLUMN conc_key TEXT NOT NULL DEFAULT ''")
            self._writer.execute("ALTER TABLE instances ADD COLUMN conc_limit INTEGER NOT NULL DEFAULT 0")
        # Concurrency limits: the claim counts the leased instances of a group (due ones are found
        # through instances_due, as the others are).
        self._writer.execute(
            "CREATE INDEX IF NOT EXISTS instances_limited_leased ON instances (tenant, workflow, conc_key) "
            "WHERE conc_limit > 0 AND lease_owner IS NOT NULL"
        )
        # Tenant tracebacks (Error.traceback) on instances and steps.
        if "error_traceback" not in columns:
            self._writer.execute("ALTER TABLE instances ADD COLUMN error_traceback TEXT NOT NULL DEFAULT ''")
        steps = {row[1] for row in self._writer.execute("PRAGMA table_info(steps)")}
        if "error_traceback" not in steps:
            self._writer.execute("ALTER TABLE steps ADD COLUMN error_traceback TEXT NOT NULL DEFAULT ''")
        # Key versions (ctx.kv read sets): a key written before them is version 1, its tenant's clock 1.
        if "version" not in {row[1] for row in self._writer.execute("PRAGMA table_info(kv)")}:
            self._writer.execute("ALTER TABLE kv ADD COLUMN version INTEGER NOT NULL DEFAULT 1")
            self._writer.execute("ALTER TABLE kv_usage ADD COLUMN clock INTEGER NOT NULL DEFAULT 1")
        events = {row[1] for row in self._writer.execute("PRAGMA table_info(events)")}
        if "bytes" not in events:
            self._writer.execute("ALTER TABLE events ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0")
            self._writer.execute(
                "UPDATE events SET bytes = length(CAST(type AS BLOB)) + length(CAST(payload_json AS BLOB)) "
                "WHERE consumed_by = ''"  # consumed ones are counted again only if a restart releases them
            )
        # Unread events by type, oldest first, with their sizes: a wait reads only the event it
        # consumes, and an inbox cap counts the unread ones without reading a payload. The queries
        # name these indexes (the planner, without statistics, would scan every event's row), and
        # each holds the column of its WHERE so that it covers them (SQLite 3.40 reads the row else).
        self._writer.execute(
            "CREATE INDEX IF NOT EXISTS events_unread ON events (tenant, id, type, seq, bytes, consumed_by) "
            "WHERE consumed_by = ''"
        )
        self._writer.execute(
            "CREATE INDEX IF NOT EXISTS steps_waiting ON steps (tenant, id, event_type, status) "
            "WHERE status = 'waiting'"
        )

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        _when_unlocked(lambda: conn.execute("PRAGMA journal_mode = WAL"))
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute("PRAGMA busy_timeout = 30000")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # -- artifacts ------------------------------------------------------------------------------
    def put_artifact(self, artifact: Artifact) -> None:
        files = json.dumps({k: base64.b64encode(v).decode() for k, v in sorted(artifact.files.items())})
        with self._write() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO artifacts (tenant, name, digest, runtime, files, workflows, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (artifact.tenant, artifact.name, artifact.digest, artifact.runtime, files,
                 json.dumps(artifact.workflows), artifact.created_at),
            )  # fmt: skip
            # re-publishing old files makes them the latest again
            conn.execute(
                "UPDATE artifacts SET seq = (SELECT MAX(seq) + 1 FROM artifacts) "
                "WHERE tenant = ? AND name = ? AND digest = ? AND seq < (SELECT MAX(seq) FROM artifacts "
                "WHERE tenant = ? AND name = ?)",
                (artifact.tenant, artifact.name, artifact.digest, artifact.tenant, artifact.name),
            )

    def get_artifact(self, tenant: str, name: str, digest: str | None) -> Artifact | None:
        sql = "SELECT tenant, name, digest, runtime, files, workflows, created_at FROM artifacts WHERE tenant = ? AND name = ?"
        args: tuple[Any, ...] = (tenant, name)
        if digest is not None:
            sql += " AND digest = ?"
            args += (digest,)
        row = self._reader().execute(sql + " ORDER BY seq DESC LIMIT 1", args).fetchone()
        if row is None:
            return None
        files = {k: base64.b64decode(v) for k, v in json.loads(row[4]).items()}
        return Artifact(row[0], row[1], row[2], row[3], files, json.loads(row[5]), row[6])

    def list_artifacts(
        self, tenant: str, name: str | None, cursor: str | None, limit: int
    ) -> tuple[list[ArtifactVersion], str | None]:
        sql = "SELECT name, digest, runtime, workflows, created_at, seq FROM artifacts WHERE tenant = ?"
        args: tuple[Any, ...] = (tenant,)
        if name is not None:
            sql += " AND name = ?"
            args += (name,)
        if cursor:
            sql += " AND seq < ?"
            args += (int(cursor),)
        rows = self._reader().execute(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit + 1)).fetchall()
        found = [ArtifactVersion(tenant, r[0], r[1], r[2], json.loads(r[3]), r[4]) for r in rows[:limit]]
        return found, (str(rows[limit - 1][5]) if len(rows) > limit else None)

    # -- instances ------------------------------------------------------------------------------
    def create_instances(
        self, records: Sequence[InstanceRecord], history: Sequence[HistoryEntry], max_live: int = 0
    ) -> None:
        with self._write() as conn:
            if max_live:
                self._check_live(conn, records, max_live)
            for record in records:
                try:
                    conn.execute(
                        f"INSERT INTO instances ({_INSTANCE_COLUMNS}) VALUES ({', '.join('?' * 21)})",
                        (record.tenant, record.id, record.workflow, record.code, record.runtime, record.module,
                         record.params_json, int(record.status), record.output_json, record.error_name,
                         record.error_message, record.created_at, record.updated_at, record.run_at,
                         record.generation, record.lease_owner, record.lease_until, record.parent,
                         record.concurrency_key, record.concurrency_limit, record.error_traceback),
                    )  # fmt: skip
                except sqlite3.IntegrityError:
                    raise AlreadyExists(
                        f"instance {record.id!r} already exists in tenant {record.tenant!r}; "
                        "pick another id or leave it empty to get a generated one"
                    ) from None
            for record, entry in zip(records, history, strict=False):
                self._history(conn, record.tenant, record.id, [entry])

    @staticmethod
    def _check_live(conn: sqlite3.Connection, records: Sequence[InstanceRecord], max_live: int) -> None:
        for tenant, adding in Counter(r.tenant for r in records).items():
            (live,) = conn.execute(
                f"SELECT COUNT(*) FROM instances WHERE tenant = ? AND status NOT IN ({_ENDED})", (tenant,)
            ).fetchone()
            if live + adding > max_live:
                raise ResourceExhausted(
                    f"tenant {tenant!r} has {live} live instances and the limit is {max_live}: wait for "
                    "some to complete, or terminate them, then create again"
                )

    def get_instance(self, tenant: str, id: str) -> InstanceRecord | None:
        row = (
            self._reader()
            .execute(f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE tenant = ? AND id = ?", (tenant, id))
            .fetchone()
        )
        return _instance(row) if row else None

    def list_instances(
        self,
        tenant: str,
        status: Status | None,
        cursor: str | None,
        limit: int,
        *,
        workflow: str = "",
        created_after: float | None = None,
        created_before: float | None = None,
    ) -> tuple[list[InstanceRecord], str | None]:
        after = int(cursor) if cursor else 0
        where, args = _filters(tenant, status, workflow, created_after, created_before)
        sql = f"SELECT {_INSTANCE_COLUMNS}, rowid FROM instances WHERE {where} AND rowid > ?"
        rows = self._reader().execute(sql + " ORDER BY rowid LIMIT ?", (*args, after, limit + 1)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return [_instance(r) for r in rows], (str(rows[-1][21]) if more and rows else None)

    def count_instances(
        self,
        tenant: str,
        status: Status | None,
        *,
        workflow: str = "",
        created_after: float | None = None,
        created_before: float | None = None,
    ) -> int:
        where, args = _filters(tenant, status, workflow, created_after, created_before)
        return int(
            self._reader().execute(f"SELECT COUNT(*) FROM instances WHERE {where}", args).fetchone()[0]
        )

    def get_steps(self, tenant: str, id: str) -> list[StepRecord]:
        rows = (
            self._reader()
            .execute(
                f"SELECT {_STEP_COLUMNS} FROM steps WHERE tenant = ? AND id = ? ORDER BY seq", (tenant, id)
            )
            .fetchall()
        )
        return [StepRecord(*r) for r in rows]

    def steps_bytes(self, tenant: str, id: str) -> int:
        """Bytes of the journal's outputs and errors, counted by SQLite without loading them here: a
        Get of a large instance takes the kernel's response budget before it reads the journal."""
        row = (
            self._reader()
            .execute(
                "SELECT COALESCE(SUM(length(CAST(output_json AS BLOB)) + length(CAST(error_message AS BLOB)) "
                "+ length(CAST(error_traceback AS BLOB))), 0) FROM steps WHERE tenant = ? AND id = ?",
                (tenant, id),
            )
            .fetchone()
        )
        return int(row[0])

    def events_bytes(self, tenant: str, id: str) -> int:
        """Bytes of the instance's events, read and unread (types and payloads), without loading them."""
        sql = "SELECT COALESCE(SUM(bytes), 0) FROM events WHERE tenant = ? AND id = ?"
        return int(self._reader().execute(sql, (tenant, id)).fetchone()[0])

    def get_events(
        self, tenant: str, id: str, *, unconsumed_only: bool, type: str | None = None, limit: int = 0
    ) -> list[EventRecord]:
        unread = " INDEXED BY events_unread WHERE consumed_by = '' AND" if unconsumed_only else " WHERE"
        sql = f"SELECT seq, type, payload_json, created_at, consumed_by FROM events{unread} tenant = ? AND id = ?"
        args: tuple[Any, ...] = (tenant, id)
        if type is not None:
            sql += " AND type = ?"
            args += (type,)
        sql += " ORDER BY seq LIMIT ?"
        return [EventRecord(*r) for r in self._reader().execute(sql, (*args, limit or -1)).fetchall()]

    def get_history(self, tenant: str, id: str, after_seq: int, limit: int) -> list[HistoryEntry]:
        rows = (
            self._reader()
            .execute(
                "SELECT kind, at, status, step, attempt, message, data_json, seq FROM history "
                "WHERE tenant = ? AND id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (tenant, id, after_seq, limit),
            )
            .fetchall()
        )
        return [HistoryEntry(*r) for r in rows]

    # -- the write path of running instances ----------------------------------------------------
    def apply(self, changes: Sequence[Change]) -> list[ApplyResult]:
        results: list[ApplyResult] = []
        main_ok = True  # whether the main change the next rider rides on applied
        with self._write() as conn:
            for change in changes:
                if change.after_previous and not main_ok:
                    results.append(ApplyResult(False, SKIPPED))
                    continue
                # Only a change consuming events or writing (or checking reads of) the tenant's
                # key-value store can fail after it wrote something (its guards are checked before
                # any write): only such a change needs a savepoint to roll back to.
                if (
                    not change.consume_events
                    and not change.kv
                    and not change.kv_reads
                    and not change.kv_ranges
                ):
                    result = self._apply_plain(conn, change) or self._apply_one(conn, change)
                else:
                    conn.execute("SAVEPOINT change")
                    result = self._apply_one(conn, change)
                    if result.ok and (change.kv_reads or change.kv_ranges):  # under the writer lock
                        if why := tenantkv.conflict(conn, change.tenant, change.kv_reads, change.kv_ranges):
                            result = ApplyResult(False, why, kv_conflict=why)
                    if result.ok and change.kv:
                        _, refused = tenantkv.write(conn, change.tenant, change.kv, change.now,
                                                    KVQuota(*change.kv_quota))  # fmt: skip
                        if refused:
                            result = ApplyResult(False, refused, kv_refused=refused)
                    if not result.ok:
                        conn.execute("ROLLBACK TO change")
                    conn.execute("RELEASE change")
                results.append(result)
                if not change.after_previous:
                    main_ok = result.ok
        return results

    def _apply_plain(self, conn: sqlite3.Connection, ch: Change) -> ApplyResult | None:
        """The common change of a running instance (steps, history, columns; no status guard, no
        pause handling, no events): its guards and its instance update are one statement. None when
        it is not that kind of change, or a guard failed (nothing written: the full path says why)."""
        if ch.expect_status or ch.pause_aware or ch.bump_generation or ch.add_events or ch.wake_on_events:
            return None
        if ch.wake_waiting:
            return None
        if ch.delete_steps_from is not None or not _SETTABLE.issuperset(ch.set):
            return None
        values = {**ch.set, "updated_at": ch.now}
        sql = f"UPDATE instances SET {', '.join(f'{k} = ?' for k in values)} WHERE tenant = ? AND id = ?"
        args: list[Any] = [int(v) if isinstance(v, Status) else v for v in values.values()]
        args += [ch.tenant, ch.id]
        if ch.generation is not None:
            sql += " AND generation = ?"
            args.append(ch.generation)
        if ch.owner is not None:
            sql += " AND lease_owner = ?"
            args.append(ch.owner)
        row = conn.execute(sql + " RETURNING status", args).fetchone()
        if row is None:
            return None
        self._steps(conn, ch)
        self._history(conn, ch.tenant, ch.id, ch.history)
        return ApplyResult(True, status=Status(row[0]))

    def _steps(self, conn: sqlite3.Connection, ch: Change) -> None:
        if ch.steps:
            conn.executemany(
                f"INSERT OR REPLACE INTO steps (tenant, id, {_STEP_COLUMNS}) VALUES ({', '.join('?' * 15)})",
                [(ch.tenant, ch.id, s.key, s.seq, s.name, s.kind, s.status, s.attempts, s.output_json,
                  s.error_name, s.error_message, s.wake_at, s.event_type, s.updated_at, s.error_traceback)
                 for s in ch.steps],
            )  # fmt: skip

    def _apply_one(self, conn: sqlite3.Connection, ch: Change) -> ApplyResult:
        row = conn.execute(
            "SELECT status, generation, lease_owner FROM instances WHERE tenant = ? AND id = ?",
            (ch.tenant, ch.id),
        ).fetchone()
        if row is None:
            return ApplyResult(False, f"instance {ch.id!r} does not exist")
        status, generation, owner = Status(row[0]), row[1], row[2]
        if ch.generation is not None and generation != ch.generation:
            return ApplyResult(False, "the instance was restarted or terminated meanwhile")
        if ch.owner is not None and owner != ch.owner:
            return ApplyResult(False, "the lease on the instance was lost")
        if ch.expect_status and status not in ch.expect_status:
            return ApplyResult(False, f"the instance is {status.name.lower()}", status=status)
        values = dict(ch.set)
        unknown = set(values) - _SETTABLE
        if unknown:
            raise ValueError(f"cannot set instance columns {sorted(unknown)}")
        if ch.add_events and (full := _inbox_full(conn, ch)):
            return full
        history = list(ch.history)
        if (
            ch.pause_aware
            and status == Status.WAITING_FOR_PAUSE
            and values.get("status")
            not in (int(Status.COMPLETE), int(Status.ERRORED), Status.COMPLETE, Status.ERRORED)
        ):
            values.update(status=Status.PAUSED, run_at=None)
            history = [h for h in history if h.kind != "status"]
            history.append(HistoryEntry(kind="status", at=ch.now, status=int(Status.PAUSED)))
        if ch.bump_generation:
            conn.execute(
                "UPDATE instances SET generation = generation + 1 WHERE tenant = ? AND id = ?",
                (ch.tenant, ch.id),
            )
        values["updated_at"] = ch.now
        assignments = ", ".join(f"{k} = ?" for k in values)
        conn.execute(
            f"UPDATE instances SET {assignments} WHERE tenant = ? AND id = ?",
            (*(int(v) if isinstance(v, Status) else v for v in values.values()), ch.tenant, ch.id),
        )
        if ch.delete_steps_from is not None:
            keys = [r[0] for r in conn.execute(
                "SELECT key FROM steps WHERE tenant = ? AND id = ? AND seq >= ?",
                (ch.tenant, ch.id, ch.delete_steps_from)).fetchall()]  # fmt: skip
            conn.execute(
                "DELETE FROM steps WHERE tenant = ? AND id = ? AND seq >= ?",
                (ch.tenant, ch.id, ch.delete_steps_from),
            )
            conn.executemany(
                "UPDATE events SET consumed_by = ? WHERE tenant = ? AND id = ? AND consumed_by = ?",
                [("" if ch.release_events else k + SPENT, ch.tenant, ch.id, k) for k in keys],
            )
        self._steps(conn, ch)
        for seq, key in ch.consume_events:
            cur = conn.execute(
                "UPDATE events SET consumed_by = ? WHERE tenant = ? AND id = ? AND seq = ? AND consumed_by = ''",
                (key, ch.tenant, ch.id, seq),
            )
            if cur.rowcount != 1:
                return ApplyResult(False, f"event {seq} was already consumed")
        event_seqs: list[int] = []
        if ch.add_events:
            (last,) = conn.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM events WHERE tenant = ? AND id = ?", (ch.tenant, ch.id)
            ).fetchone()
            for event in ch.add_events:
                last += 1
                conn.execute(
                    "INSERT INTO events (tenant, id, seq, type, payload_json, created_at, bytes) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (ch.tenant, ch.id, last, event.type, event.payload_json, event.created_at, event.size),
                )
                event_seqs.append(last)
        final = Status(int(values.get("status", status)))
        wake = [*ch.wake_on_events, *(t for t in ch.wake_waiting if _waits_for(conn, ch, t))]
        if wake and final not in (Status.PAUSED, Status.WAITING_FOR_PAUSE, *TERMINAL):
            marks = ", ".join("?" * len(wake))
            found = conn.execute(
                f"SELECT 1 FROM events INDEXED BY events_unread WHERE tenant = ? AND id = ? AND consumed_by = '' "
                f"AND type IN ({marks}) LIMIT 1",
                (ch.tenant, ch.id, *wake),
            ).fetchone()
            if found:
                conn.execute(
                    "UPDATE instances SET run_at = ? WHERE tenant = ? AND id = ?", (ch.now, ch.tenant, ch.id)
                )
        self._history(conn, ch.tenant, ch.id, history)
        return ApplyResult(True, event_seqs=event_seqs, status=final)

    def _history(
        self, conn: sqlite3.Connection, tenant: str, id: str, entries: Sequence[HistoryEntry]
    ) -> None:
        if not entries:
            return
        (last,) = conn.execute(
            "SELECT COALESCE(MAX(seq), 0) FROM history WHERE tenant = ? AND id = ?", (tenant, id)
        ).fetchone()
        rows = []
        for entry in entries:
            last += 1
            entry.seq = last
            rows.append((tenant, id, last, entry.at, entry.kind, entry.status, entry.step, entry.attempt,
                         entry.message, entry.data_json))  # fmt: skip
        conn.executemany("INSERT INTO history VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    # -- dispatch -------------------------------------------------------------------------------
    def claim(
        self, owner: str, now: float, lease_seconds: float, limit: int, per_tenant: int = 0
    ) -> list[InstanceRecord]:
        if limit <= 0:
            return []
        cap = per_tenant if per_tenant > 0 else claims.NO_CAP
        # Chosen on a read connection (off the writer, which running instances need for their
        # commits); the lease is then taken only where nobody took it meanwhile. See claims.py.
        rows, served = claims.pick(self._reader(), now, limit, cap)
        ids = [r[0] for r in rows]
        if not ids:
            return []
        marks = ", ".join("?" * len(ids))
        until = now + lease_seconds
        plain = [r[0] for r in rows if not r[1]]
        with self._write() as conn:
            if plain:
                conn.execute(
                    f"UPDATE instances SET lease_owner = ?, lease_until = ? WHERE rowid IN ({', '.join('?' * len(plain))}) "
                    "AND run_at <= ? AND (lease_until IS NULL OR lease_until < ?)",
                    (owner, until, *plain, now, now),
                )
            # A limited one is counted again in this write transaction, one by one in order: another
            # node may have filled its group since the read.
            for rowid in (r[0] for r in rows if r[1]):
                conn.execute(
                    "UPDATE instances SET lease_owner = ?, lease_until = ? WHERE rowid = ? AND run_at <= ? "
                    "AND (lease_until IS NULL OR lease_until < ?) AND conc_limit > (SELECT COUNT(*) "
                    "FROM instances AS o WHERE o.conc_limit > 0 AND o.tenant = instances.tenant "
                    "AND o.workflow = instances.workflow AND o.conc_key = instances.conc_key "
                    "AND o.lease_owner IS NOT NULL AND o.lease_until >= ?)",
                    (owner, until, rowid, now, now, now),
                )
            # Served tenants go to the back of the round (a turn comes at max(next due, served)).
            conn.executemany(
                "UPDATE due_tenants SET served_at = max(served_at, ?) WHERE tenant = ?",
                [(now, t) for t in served],
            )
            claimed = conn.execute(
                f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE rowid IN ({marks}) "
                "AND lease_owner = ? AND lease_until = ? ORDER BY run_at",
                (*ids, owner, until),
            ).fetchall()
        return [_instance(r) for r in claimed]

    def renew_leases(
        self, owner: str, keys: Sequence[tuple[str, str]], until: float
    ) -> list[tuple[str, str]]:
        lost: list[tuple[str, str]] = []
        with self._write() as conn:
            for tenant, id in keys:
                cur = conn.execute(
                    "UPDATE instances SET lease_until = ? WHERE tenant = ? AND id = ? AND lease_owner = ?",
                    (until, tenant, id, owner),
                )
                if cur.rowcount != 1:
                    lost.append((tenant, id))
        return lost

    def release_leases(self, owner: str) -> int:
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE instances SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?", (owner,)
            )
            return cur.rowcount

    def delete_instance(self, tenant: str, id: str) -> bool:
        with self._write() as conn:
            return _delete(conn, [(tenant, id)]) == 1

    def purge_ended(self, before: float, limit: int) -> int:
        with self._write() as conn:
            keys = conn.execute(
                f"SELECT tenant, id FROM instances WHERE status IN ({_ENDED}) AND updated_at < ? LIMIT ?",
                (before, limit),
            ).fetchall()
            return _delete(conn, keys)

    def list_tenants(
        self, prefix: str, cursor: str | None, limit: int, keep: Callable[[str], bool] | None = None
    ) -> tuple[list[TenantSummary], str | None]:
        """Three index seeks per tenant looked at (at most 1,000 a call), then four index-only counts
        per tenant listed, which read its instances' index entries (no row): they grow with them."""
        return list_tenant_page(self._reader(), prefix, cursor, limit, keep)

    def next_run_at(self) -> float | None:
        row = (
            self._reader()
            .execute("SELECT MIN(run_at) FROM instances WHERE run_at IS NOT NULL AND lease_owner IS NULL")
            .fetchone()
        )
        return float(row[0]) if row and row[0] is not None else None

    def count_by_status(self) -> dict[Status, int]:
        rows = self._reader().execute("SELECT status, COUNT(*) FROM instances GROUP BY status").fetchall()
        return {Status(status): count for status, count in rows}

    # -- schedules --------------------------------------------------------------------------------
    def create_schedule(self, schedule: ScheduleRecord, max_per_tenant: int = 0) -> ScheduleRecord:
        with self._write() as conn:
            return schedules.create(conn, schedule, max_per_tenant)

    def get_schedule(self, tenant: str, name: str) -> ScheduleRecord | None:
        return schedules.get(self._reader(), tenant, name)

    def list_schedules(
        self, tenant: str, cursor: str | None, limit: int
    ) -> tuple[list[ScheduleRecord], str | None]:
        return schedules.list_page(self._reader(), tenant, cursor, limit)

    def update_schedule(self, schedule: ScheduleRecord) -> ScheduleRecord | None:
        with self._write() as conn:
            return schedules.update(conn, schedule)

    def delete_schedule(self, tenant: str, name: str) -> bool:
        with self._write() as conn:
            return schedules.delete(conn, tenant, name)

    def claim_schedules(
        self,
        owner: str,
        now: float,
        lease_seconds: float,
        limit: int,
        per_tenant: int = 0,
        skip: Collection[str] = (),
    ) -> list[ScheduleRecord]:
        with self._write() as conn:
            return schedules.claim(conn, owner, now, lease_seconds, limit, per_tenant, skip)

    # -- a tenant's key-value store and secrets (plugins/storage_sqlite/tenantkv.py) -------------
    def kv_get(self, tenant: str, key: str) -> KVEntry | None:
        return tenantkv.get(self._reader(), tenant, key)

    def kv_list(
        self, tenant: str, prefix: str, after: str | None, limit: int
    ) -> tuple[list[KVEntry], str | None]:
        return tenantkv.page(self._reader(), tenant, prefix, after, limit)

    def kv_usage(self, tenant: str) -> KVUsage:
        return tenantkv.usage(self._reader(), tenant)

    def kv_write(
        self, tenant: str, writes: Sequence[KVWrite], now: float, quota: KVQuota = NO_QUOTA
    ) -> list[bool]:
        with self._write() as conn:
            existed, refused = tenantkv.write(conn, tenant, writes, now, quota)
            if refused:
                raise ResourceExhausted(refused)
        return existed

    def put_secret(self, tenant: str, name: str, sealed: bytes, now: float) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO secrets (tenant, name, sealed, updated_at) VALUES (?, ?, ?, ?)",
                (tenant, name, sealed, now),
            )

    def get_secret(self, tenant: str, name: str) -> tuple[bytes, float] | None:
        row = (
            self._reader()
            .execute("SELECT sealed, updated_at FROM secrets WHERE tenant = ? AND name = ?", (tenant, name))
            .fetchone()
        )
        return (bytes(row[0]), row[1]) if row else None

    def delete_secret(self, tenant: str, name: str) -> bool:
        with self._write() as conn:
            cur = conn.execute("DELETE FROM secrets WHERE tenant = ? AND name = ?", (tenant, name))
            return cur.rowcount > 0

    def list_secrets(
        self, tenant: str | None, after: tuple[str, str] | None = None, limit: int = 1000
    ) -> list[tuple[str, str, bytes, float]]:
        return tenantkv.list_secrets(self._reader(), tenant, after, limit)

    def put_egress(self, tenant: str, rules_json: str, now: float) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO egress (tenant, rules_json, updated_at) VALUES (?, ?, ?)",
                (tenant, rules_json, now),
            )

    def get_egress(self, tenant: str) -> tuple[str, float] | None:
        row = (
            self._reader()
            .execute("SELECT rules_json, updated_at FROM egress WHERE tenant = ?", (tenant,))
            .fetchone()
        )
        return (str(row[0]), float(row[1])) if row else None

    def close(self) -> None:
        with self._lock:
            self._writer.close()


def _inbox_full(conn: sqlite3.Connection, ch: Change) -> ApplyResult | None:
    """The refusal of ``ch`` if its events would pass its inbox cap (None: they fit)."""
    max_events, max_bytes = ch.inbox_cap
    if not max_events and not max_bytes:
        return None
    count, size = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM (SELECT bytes FROM events INDEXED BY events_unread "
        "WHERE tenant = ? AND id = ? AND consumed_by = '' LIMIT ?)",  # at the cap is enough to know
        (ch.tenant, ch.id, max_events or -1),
    ).fetchone()
    return inbox_refusal(ch, count, size)


def _waits_for(conn: sqlite3.Connection, ch: Change, type: str) -> bool:
    """Whether a step of the instance is waiting for an event of ``type``."""
    row = conn.execute(
        "SELECT 1 FROM steps INDEXED BY steps_waiting WHERE tenant = ? AND id = ? AND status = 'waiting' AND event_type = ? LIMIT 1",
        (ch.tenant, ch.id, type),
    ).fetchone()
    return row is not None


def _delete(conn: sqlite3.Connection, keys: Sequence[tuple[str, str]]) -> int:
    """Delete instances and every row that belongs to them; return how many instances existed."""
    for table in ("steps", "events", "history"):
        conn.executemany(f"DELETE FROM {table} WHERE tenant = ? AND id = ?", keys)  # noqa: S608
    # rowcount, not total_changes: the claim's triggers change their own tables as rows go.
    return conn.executemany("DELETE FROM instances WHERE tenant = ? AND id = ?", keys).rowcount
