"""A database made before key versions keeps working: its keys are version 1, and the first write
after the upgrade gives a key a greater one, so a read set taken before it still conflicts."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tenantflow.plugins.storage_sqlite.sqlite_storage import SQLiteStorage


def test_an_older_database_gets_key_versions(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    storage = SQLiteStorage(path)
    storage.kv_write("t", [("a", "1"), ("b", "2")], 1.0)
    storage.close()
    conn = sqlite3.connect(path)  # as the schema was before
    conn.execute("ALTER TABLE kv DROP COLUMN version")
    conn.execute("ALTER TABLE kv_usage DROP COLUMN clock")
    conn.commit()
    conn.close()

    storage = SQLiteStorage(path)
    try:
        before = storage.kv_get("t", "a")
        assert before is not None and before.version == 1 and before.value_json == "1"
        storage.kv_write("t", [("a", "3")], 2.0)
        after = storage.kv_get("t", "a")
        assert after is not None and after.version > 1
        assert [(e.key, e.version) for e in storage.kv_list("t", "", None, 10)[0]] == [
            ("a", after.version),
            ("b", 1),
        ]
    finally:
        storage.close()
