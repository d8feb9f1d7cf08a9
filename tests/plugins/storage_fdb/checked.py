"""The LMDB stand-in as the tests use it: FoundationDB's rules, counted (see lmdb_layer)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from tenantflow.plugins.storage_fdb.lmdb_layer import LmdbLayer, Rules
from tenantflow.plugins.storage_fdb.lmdb_txn import SimTxn


class CheckedLayer(LmdbLayer):
    """The stand-in with a map large enough for the biggest tests."""

    def __init__(self, path: Path, rules: Rules | None = None) -> None:
        super().__init__(path, map_size=4 << 30, rules=rules)

    @property
    def commits(self) -> int:
        return self.counters.commits


class MeanwhileLayer(CheckedLayer):
    """The stand-in that runs ``meanwhile`` (once, in another thread, to its end) after the next
    transaction has read and before it commits: a concurrent commit, at the worst moment."""

    meanwhile: Callable[[], object] | None = None

    def _commit(self, txn: SimTxn, read_version: int) -> None:
        work, self.meanwhile = self.meanwhile, None
        if work is not None:
            thread = threading.Thread(target=work)
            thread.start()
            thread.join()
        super()._commit(txn, read_version)
