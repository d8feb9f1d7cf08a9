"""Several kernel nodes starting together over one new SQLite file all open it (WAL switch and schema
migration race; before the fix 6 of 30 rounds failed with "database is locked" or a missing column)."""

from __future__ import annotations

import threading
from pathlib import Path

from tenantflow.plugins.storage_sqlite.sqlite_storage import SQLiteStorage


def _open(path: Path, start: threading.Barrier, errors: list[BaseException]) -> None:
    start.wait()
    try:
        storage = SQLiteStorage(path)
        storage.count_by_status()
        storage.close()
    except BaseException as exc:  # noqa: BLE001 - collected for the assertion
        errors.append(exc)


def test_four_storages_open_one_new_file_at_once(tmp_path: Path) -> None:
    for round in range(15):
        path = tmp_path / f"shared-{round}.sqlite3"
        errors: list[BaseException] = []
        start = threading.Barrier(4)
        threads = [threading.Thread(target=_open, args=(path, start, errors)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == [], f"round {round}: {errors}"
