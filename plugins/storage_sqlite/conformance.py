"""The storage suite's harness for ``sqlite``: a fresh database file in the test's directory."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tenantflow.conformance.harness import StorageHarness


@dataclass
class SQLiteHarness(StorageHarness):
    """SQLite commits do not fail for retry: there are no faults to inject."""

    name: str = "sqlite"
    lacks: Mapping[str, str] = field(
        default_factory=lambda: {"faults": "SQLite's commits do not fail in ways a retry must survive"}
    )

    def url(self, tmp: Path) -> str:
        return f"sqlite:///{tmp / 'conformance.sqlite3'}"
