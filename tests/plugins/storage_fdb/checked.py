"""The LMDB stand-in as the tests use it: FoundationDB's rules, counted (see lmdb_layer)."""

from __future__ import annotations

from pathlib import Path

from tenantflow.plugins.storage_fdb.lmdb_layer import LmdbLayer, Rules


class CheckedLayer(LmdbLayer):
    """The stand-in with a map large enough for the biggest tests."""

    def __init__(self, path: Path, rules: Rules | None = None) -> None:
        super().__init__(path, map_size=4 << 30, rules=rules)

    @property
    def commits(self) -> int:
        return self.counters.commits
