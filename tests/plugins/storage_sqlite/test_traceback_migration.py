"""A database made before tenant tracebacks keeps working: its instances and steps get the columns."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from tenantflow.kernel.model import Change, HistoryEntry, InstanceRecord, Status, StepRecord
from tenantflow.plugins.storage_sqlite.sqlite_storage import SQLiteStorage


def test_an_older_database_gets_traceback_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    storage = SQLiteStorage(path)
    now = time.time()
    record = InstanceRecord(tenant="t", id="a", workflow="W", code="c", runtime="python", module="wf",
                            params_json="null", status=Status.RUNNING, created_at=now, updated_at=now)  # fmt: skip
    storage.create_instances([record], [HistoryEntry(kind="status", at=now)])
    step = StepRecord(key="s#0", seq=1, name="s", kind="do", status="complete", output_json="1")
    assert storage.apply([Change(tenant="t", id="a", now=now, steps=[step])])[0].ok
    storage.close()
    conn = sqlite3.connect(path)  # as the schema was before
    conn.execute("ALTER TABLE instances DROP COLUMN error_traceback")
    conn.execute("ALTER TABLE steps DROP COLUMN error_traceback")
    conn.commit()
    conn.close()

    storage = SQLiteStorage(path)
    try:
        assert storage.get_instance("t", "a").error_traceback == ""  # type: ignore[union-attr]
        assert [(s.key, s.error_traceback) for s in storage.get_steps("t", "a")] == [("s#0", "")]
        ended = Change(tenant="t", id="a", now=now, set={"status": Status.ERRORED, "error_name": "E",
                                                         "error_traceback": "tb"})  # fmt: skip
        assert storage.apply([ended])[0].ok
        assert storage.get_instance("t", "a").error_traceback == "tb"  # type: ignore[union-attr]
    finally:
        storage.close()
