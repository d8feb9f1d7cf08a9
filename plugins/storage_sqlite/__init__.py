"""SQLite storage plugin: one file, WAL, ``synchronous=FULL`` by default. URL ``sqlite:///path/to.db``
(``?synchronous=NORMAL`` trades the last commits on power loss for speed)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tenantflow.kernel import hookimpl
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.storage import Storage
from tenantflow.plugins.storage_sqlite.sqlite_storage import SQLiteStorage, parse_url

if TYPE_CHECKING:
    from tenantflow.conformance.harness import Harness


TENANTFLOW_CONTRACTS = {"hookspecs": [1], "storage": [2]}  # the versions this plugin supports


@hookimpl
def tenantflow_storage(url: str, config: KernelConfig) -> Storage | None:
    if not url.startswith("sqlite:"):
        return None
    path, synchronous = parse_url(url)
    return SQLiteStorage(path, synchronous=synchronous)


@hookimpl
def tenantflow_conformance(kind: str, name: str) -> Harness | None:
    if (kind, name) != ("storage", "sqlite"):
        return None
    from tenantflow.plugins.storage_sqlite.conformance import SQLiteHarness

    return SQLiteHarness()
