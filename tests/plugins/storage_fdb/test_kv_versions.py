"""Key versions on the key-value layer (real LMDB): records written before versions read as version
1, and a change refused by its read set is still reported as a KV conflict when its commit's result
was unknown and the retry found the batch's own marker."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tenantflow.kernel.model import Change, StepRecord
from tenantflow.plugins.storage_fdb import tenantkv
from tenantflow.plugins.storage_fdb.kv_storage import KVStorage
from tenantflow.plugins.storage_fdb.records import dumps, put_blob
from tests.plugins.storage_fdb.checked import CheckedLayer
from tests.plugins.storage_fdb.test_kv_storage import entry, instance


@pytest.fixture
def layer(tmp_path: Path) -> Iterator[CheckedLayer]:
    layer = CheckedLayer(tmp_path / "kv")
    yield layer
    layer.close()


def test_a_record_written_before_versions_is_version_1(layer: CheckedLayer) -> None:
    storage = KVStorage(layer)
    old = dumps({"k": "a", "v": "1", "t": 1.0})  # a record as written before versions
    layer.transact(lambda tr: put_blob(tr, tenantkv._record(storage.k, "t", "a"), old))
    got = storage.kv_get("t", "a")
    assert got is not None and (got.value_json, got.version) == ("1", 1)
    storage.kv_write("t", [("a", "2")], 2.0)
    assert storage.kv_get("t", "a").version > 1  # type: ignore[union-attr]


def test_a_kv_conflict_is_reported_again_after_an_unknown_commit(layer: CheckedLayer) -> None:
    storage = KVStorage(layer)
    storage.create_instances([instance("t", "a"), instance("t", "b")], [entry(), entry()])
    storage.kv_write("t", [("counter", "0")], 1.0)
    seen = storage.kv_get("t", "counter").version  # type: ignore[union-attr]
    step = StepRecord(key="s#0", seq=1, name="s", kind="do", status="complete", attempts=1, output_json="1")
    first = Change(
        tenant="t", id="a", now=time.time(), steps=[step], kv=[("counter", "1")], kv_reads=[("counter", seen)]
    )
    second = Change(
        tenant="t", id="b", now=time.time(), steps=[step], kv=[("counter", "1")], kv_reads=[("counter", seen)]
    )
    layer.inject("commit_unknown_result")
    results = storage.apply([first, second])
    assert [r.ok for r in results] == [True, False]
    assert "counter" in results[1].kv_conflict
    assert storage.kv_get("t", "counter").value_json == "1"  # type: ignore[union-attr]
