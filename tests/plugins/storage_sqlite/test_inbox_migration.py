"""A database made before inbox caps keeps working: its unread events get their sizes, and waits
find them through the new index."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from tenantflow.kernel.model import Change, EventRecord, HistoryEntry, InstanceRecord, Status
from tenantflow.plugins.storage_sqlite.sqlite_storage import SQLiteStorage


def test_unread_events_of_an_older_database_count_against_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    storage = SQLiteStorage(path)
    now = time.time()
    record = InstanceRecord(tenant="t", id="a", workflow="W", code="c", runtime="python", module="wf",
                            params_json="null", status=Status.WAITING, created_at=now, updated_at=now)  # fmt: skip
    storage.create_instances([record], [HistoryEntry(kind="status", at=now)])
    storage.close()
    # As the schema was before: no bytes column, none of the new indexes.
    conn = sqlite3.connect(path)
    conn.execute("DROP INDEX events_unread")
    conn.execute("DROP INDEX steps_waiting")
    conn.execute("ALTER TABLE events DROP COLUMN bytes")
    conn.executemany(
        "INSERT INTO events (tenant, id, seq, type, payload_json, created_at, consumed_by) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [("t", "a", 1, "go", '"x"', now, ""), ("t", "a", 2, "go", '"yy"', now, "w#0"), ("t", "a", 3, "go", '"z"', now, "")],
    )  # fmt: skip
    conn.commit()
    conn.close()

    storage = SQLiteStorage(path)
    try:
        unread = storage.get_events("t", "a", unconsumed_only=True, type="go", limit=1)
        assert [(e.seq, e.payload_json) for e in unread] == [(1, '"x"')]
        send = Change(
            tenant="t", id="a", now=now, add_events=[EventRecord(0, "go", "1", now)], inbox_cap=(0, 10)
        )
        (refused,) = storage.apply([send])
        assert not refused.ok and refused.unread == (2, 2 * len('go"x"')), refused  # sizes filled in
        (taken,) = storage.apply([Change(tenant="t", id="a", now=now, add_events=[EventRecord(0, "go", "1", now)],
                                         inbox_cap=(0, 13))])  # fmt: skip
        assert taken.ok and taken.event_seqs == [4]
    finally:
        storage.close()
