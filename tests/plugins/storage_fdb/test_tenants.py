"""The key-value engine's tenant listing keeps a per-tenant instance counter; a tenant whose
instances predate it is counted once, then kept by the counter."""

from __future__ import annotations

import time
from pathlib import Path

from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.model import Artifact, HistoryEntry, InstanceRecord, Status, TenantSummary
from tenantflow.kernel.plugins import Plugins
from tenantflow.plugins.storage_fdb.kv_storage import KVStorage


def _instances(tenant: str, ids: list[str]) -> tuple[list[InstanceRecord], list[HistoryEntry]]:
    now = time.time()
    made = [InstanceRecord(tenant=tenant, id=id, workflow="W", code="c", runtime="python", module="wf",
                           params_json="null", status=Status.QUEUED, created_at=now, updated_at=now, run_at=None)
            for id in ids]  # fmt: skip
    return made, [HistoryEntry(at=now, kind="created", status=int(Status.QUEUED)) for _ in made]


def test_a_tenant_made_before_the_counter_is_counted_once(tmp_path: Path) -> None:
    engine = Plugins().storage(f"kv+lmdb://{tmp_path}/t.lmdb?map_size_mb=64", KernelConfig(data_dir=tmp_path))
    assert isinstance(engine, KVStorage)
    k = engine.k
    engine.create_instances(*_instances("old", [f"i{n}" for n in range(5)]))
    assert engine.layer.read(lambda tr: tr.get(k.tenant("old", "nc"))) is not None  # counted from its first
    engine.layer.transact(lambda tr: (tr.clear(k.tenant("old", "nc")), tr.clear(k.tenant("old", "ni"))))
    engine.create_instances(*_instances("old", ["after"]))  # the counter alone would say 1
    assert engine.list_tenants("", None, 10) == ([TenantSummary("old", instances=6, live=6)], None)
    assert engine.layer.read(lambda tr: tr.get(k.tenant("old", "nc"))) is not None  # counted once
    engine.delete_instance("old", "i0")
    assert engine.list_tenants("", None, 10)[0][0].instances == 5
    engine.close()


def _publish(engine: KVStorage, tenant: str, name: str, n: int) -> None:
    engine.put_artifact(
        Artifact(tenant, name, "sha256:" + f"{n:064x}", "python", {"a.py": b"x"}, {"W": "a"}, 1.0)
    )


def test_versions_are_counted_by_a_counter_kept_by_publishes(tmp_path: Path) -> None:
    engine = Plugins().storage(f"kv+lmdb://{tmp_path}/t.lmdb?map_size_mb=64", KernelConfig(data_dir=tmp_path))
    assert isinstance(engine, KVStorage)
    k = engine.k
    for n in (1, 2, 1, 3):  # publishing a version again does not count it again
        _publish(engine, "acme", "wf" if n < 3 else "other", n)
    assert engine.list_tenants("", None, 10)[0] == [TenantSummary("acme", code_versions=3)]
    # A store made before the counter: counted once from the version index, then kept
    engine.layer.transact(lambda tr: (tr.clear(k.tenant("acme", "avm")), tr.clear(k.tenant("acme", "avn"))))
    _publish(engine, "acme", "wf", 4)
    assert engine.list_tenants("", None, 10)[0] == [TenantSummary("acme", code_versions=4)]
    assert engine.layer.read(lambda tr: tr.get(k.tenant("acme", "avm"))) is not None
    _publish(engine, "acme", "wf", 5)
    assert engine.list_tenants("", None, 10)[0][0].code_versions == 5
    engine.close()
