"""The storage suite's harnesses for ``kv+lmdb`` (with FoundationDB's faults injected on request) and
``fdb`` (a real cluster named by ``TENANTFLOW_FDB_CLUSTER_FILE``)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tenantflow.conformance.harness import HarnessUnavailable, StorageHarness
from tenantflow.kernel.storage import Storage
from tenantflow.plugins.storage_fdb.kv_storage import KVStorage
from tenantflow.plugins.storage_fdb.lmdb_layer import LmdbLayer

# Every fault FoundationDB may return: the binding's retry loop runs a transaction again after the
# first three, the engine after a time-out; commit_unknown_result and transaction_timed_out come after
# the commit applied, so every write must find its own earlier commit.
RETRIED_FAULTS = "not_committed,transaction_too_old,commit_unknown_result,transaction_timed_out"


@dataclass
class LmdbHarness(StorageHarness):
    """kv+lmdb: a fresh LMDB directory; the faulty store fails a fifth of all commits."""

    name: str = "kv+lmdb"

    def url(self, tmp: Path) -> str:
        return f"kv+lmdb://{tmp / 'conformance.lmdb'}?map_size_mb=1024"

    def faulty_url(self, tmp: Path) -> str:
        faults = f"fault_rate=0.2&fault_seed=27&faults={RETRIED_FAULTS}"
        return f"kv+lmdb://{tmp / 'faulty.lmdb'}?map_size_mb=1024&{faults}"

    def prepare_faulty(self, storage: Storage) -> None:
        _layer(storage).inject("commit_unknown_result")  # the first commit for certain, then at random

    def faults_injected(self, storage: Storage) -> int:
        return sum(_layer(storage).counters.faults.values())


def _layer(storage: Storage) -> LmdbLayer:
    assert isinstance(storage, KVStorage) and isinstance(storage.layer, LmdbLayer), storage
    return storage.layer


@dataclass
class FdbHarness(StorageHarness):
    """fdb: a subspace of its own per test on the cluster ``TENANTFLOW_FDB_CLUSTER_FILE`` names,
    cleared when the test is done (so tests never see each other's keys on a shared cluster)."""

    name: str = "fdb"
    lacks: Mapping[str, str] = field(
        default_factory=lambda: {"faults": "a real cluster's faults are not injected; kv+lmdb runs them"}
    )

    def url(self, tmp: Path) -> str:
        cluster_file = os.environ.get("TENANTFLOW_FDB_CLUSTER_FILE", "")
        if not cluster_file:
            raise HarnessUnavailable(
                "no FoundationDB cluster: set TENANTFLOW_FDB_CLUSTER_FILE to a cluster file to run fdb"
            )
        return f"fdb://{cluster_file}?root=conformance-{uuid.uuid4().hex}"

    def discard(self, storage: Storage) -> None:
        assert isinstance(storage, KVStorage), storage
        storage.layer.transact(lambda tr: tr.clear_range(*storage.k.glob_range()))
        storage.close()
