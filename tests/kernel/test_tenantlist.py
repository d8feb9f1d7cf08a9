"""Tenants.List: the operator's tenant listing, in every storage engine, over gRPC, HTTP and the
CLI; off unless --list-tenants, and a token sees only the tenants its patterns allow."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from tenantflow.client import Client, TenantflowRpcError
from tenantflow.kernel.auth import new_token
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.model import (
    Artifact,
    HistoryEntry,
    InstanceRecord,
    ScheduleRecord,
    Status,
    TenantSummary,
)
from tenantflow.kernel.plugins import Plugins
from tenantflow.kernel.storage import Storage
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.kernel.test_http_api import WAITS, files, http_url, post

ENGINES = {"sqlite": "sqlite:///{dir}/t.sqlite3", "kv+lmdb": "kv+lmdb://{dir}/t.lmdb?map_size_mb=256"}


def _instance(tenant: str, id: str, status: Status = Status.QUEUED) -> InstanceRecord:
    now = time.time()
    return InstanceRecord(
        tenant=tenant, id=id, workflow="W", code="c", runtime="python", module="wf", params_json="null",
        status=status, created_at=now, updated_at=now, run_at=None,
    )  # fmt: skip


def _create(storage: Storage, records: list[InstanceRecord]) -> None:
    storage.create_instances(
        records, [HistoryEntry(at=r.created_at, kind="created", status=int(r.status)) for r in records]
    )


@pytest.fixture(params=sorted(ENGINES))
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    engine = Plugins().storage(ENGINES[request.param].format(dir=tmp_path), KernelConfig(data_dir=tmp_path))
    _create(
        engine, [_instance("acme", f"i{n}") for n in range(3)] + [_instance("acme", "done", Status.COMPLETE)]
    )
    _create(engine, [_instance("acme-eu", "x", Status.ERRORED), _instance("beta", "y")])
    engine.create_schedule(ScheduleRecord(tenant="zeta", name="nightly", cron="0 3 * * *", time_zone="UTC",
                                          workflow="W", code="c", params_json="null"))  # fmt: skip
    engine.put_artifact(
        Artifact("gamma", "wf", "sha256:" + "1" * 64, "python", {"a.py": b"x"}, {"W": "a"}, 1.0)
    )
    yield engine
    engine.close()


def _all(
    storage: Storage, prefix: str = "", limit: int = 50, keep: Callable[[str], bool] | None = None
) -> tuple[list[TenantSummary], int]:
    """Every tenant, paging until the cursor is None; and how many pages that took."""
    found: list[TenantSummary] = []
    cursor, pages = None, 0
    while True:
        page, cursor = storage.list_tenants(prefix, cursor, limit, keep)
        found, pages = found + page, pages + 1
        if cursor is None:
            return found, pages


def test_every_engine_lists_tenants_by_name_with_their_counts(storage: Storage) -> None:
    found, _ = _all(storage)
    assert found == [
        TenantSummary("acme", instances=4, live=3),
        TenantSummary("acme-eu", instances=1, live=0),
        TenantSummary("beta", instances=1, live=1),
        TenantSummary("gamma", code_versions=1),
        TenantSummary("zeta", schedules=1),
    ]
    storage.delete_instance("acme", "i0")
    storage.delete_instance("beta", "y")  # beta holds nothing now: not listed
    assert [(t.tenant, t.instances, t.live) for t in _all(storage, "a")[0]] == [
        ("acme", 3, 2),
        ("acme-eu", 1, 0),
    ]
    assert "beta" not in [t.tenant for t in _all(storage)[0]]


def test_pages_prefixes_and_the_callers_filter(storage: Storage) -> None:
    names = [t.tenant for t in _all(storage)[0]]
    paged, pages = _all(storage, limit=2)
    assert [t.tenant for t in paged] == names and pages >= 3
    assert [t.tenant for t in _all(storage, "acme")[0]] == ["acme", "acme-eu"]
    assert [t.tenant for t in _all(storage, "acme-")[0]] == ["acme-eu"]
    assert _all(storage, "nobody")[0] == []
    asked: list[str] = []

    def keep(tenant: str) -> bool:
        asked.append(tenant)
        return tenant.startswith(("acme-", "z"))

    assert [t.tenant for t in _all(storage, keep=keep)[0]] == ["acme-eu", "zeta"]
    assert sorted(set(asked)) == names  # asked by name only: refused tenants' counts are never read


def test_lmdb_counts_a_tenant_made_before_its_counter_once(tmp_path: Path) -> None:
    from tenantflow.plugins.storage_fdb.kv_storage import KVStorage

    engine = Plugins().storage(ENGINES["kv+lmdb"].format(dir=tmp_path), KernelConfig(data_dir=tmp_path))
    assert isinstance(engine, KVStorage)
    _create(engine, [_instance("old", f"i{n}") for n in range(5)])
    k = engine.k
    engine.layer.transact(lambda tr: (tr.clear(k.tenant("old", "nc")), tr.clear(k.tenant("old", "ni"))))
    _create(engine, [_instance("old", "after")])  # counted by the counter, which starts from nothing
    assert engine.list_tenants("", None, 10) == ([TenantSummary("old", instances=6, live=6)], None)
    assert engine.layer.read(lambda tr: tr.get(k.tenant("old", "nc"))) is not None  # once
    engine.delete_instance("old", "i0")
    assert engine.list_tenants("", None, 10)[0][0].instances == 5
    engine.close()


# -- the RPC ---------------------------------------------------------------------------------------
def test_listing_is_off_unless_the_kernel_runs_with_list_tenants(client: Client) -> None:
    with pytest.raises(TenantflowRpcError) as caught:
        client.list_tenants()
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "start the kernel with --list-tenants" in caught.value.message


def test_a_token_sees_only_the_tenants_its_patterns_allow(tmp_path: Path) -> None:
    tokens = {name: new_token(name, patterns) for name, patterns in
              {"all": ["*"], "acme": ["acme", "acme-*"], "beta": ["beta"]}.items()}  # fmt: skip
    (tmp_path / "tokens.json").write_text(json.dumps({"tokens": [entry for _, entry in tokens.values()]}))
    args = [*TEST_LIMITS, "--list-tenants", "--auth-tokens", str(tmp_path / "tokens.json"), "--http-listen",
            "127.0.0.1:0"]  # fmt: skip
    kernel = KernelProcess(tmp_path / "kernel", args)
    kernel.start()
    try:
        url, admin = http_url(kernel), tokens["all"][0]
        for tenant in ("acme", "acme-eu", "beta", "zed"):
            status, code = post(
                url, "Code/Publish", {"tenant": tenant, "name": "w", "files": files(WAITS)}, admin
            )
            assert status == 200, code
        request = {"tenant": "acme", "workflow": "Waits", "code": code["ref"].replace("zed", "acme")}
        assert post(url, "Workflows/Create", request, admin)[0] == 200
        seen = {}
        for name, (token, _) in tokens.items():  # over HTTP
            status, body = post(url, "Tenants/List", {}, token)
            assert status == 200, body
            seen[name] = [t["tenant"] for t in body["tenants"]]
        assert seen == {
            "all": ["acme", "acme-eu", "beta", "zed"],
            "acme": ["acme", "acme-eu"],
            "beta": ["beta"],
        }
        with Client(kernel.address, token=tokens["acme"][0]) as client:  # over gRPC, a page at a time
            first = client.list_tenants(page_size=1)
            assert [(t.tenant, t.instances, t.live, t.code_versions) for t in first.tenants] == [
                ("acme", 1, 1, 1)
            ]
            rest = client.list_tenants(page_size=1, page_token=first.next_page_token)
            assert [t.tenant for t in rest.tenants] == ["acme-eu"]
            assert client.list_tenants(prefix="acme-").tenants[0].tenant == "acme-eu"
            for bad in ({"page_size": 5000}, {"prefix": "a b"}, {"page_token": "-x"}):
                with pytest.raises(TenantflowRpcError) as caught:
                    client.list_tenants(**bad)  # type: ignore[arg-type]
                assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT, bad
        cli = subprocess.run(
            [sys.executable, "-m", "tenantflow.kernel.cli", "tenants", "--address", kernel.address, "--token",
             tokens["beta"][0]], capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        assert cli.stdout.split("\n")[0].split() == [
            "tenant",
            "instances",
            "live",
            "schedules",
            "code",
            "versions",
        ]
        assert "beta" in cli.stdout and "acme" not in cli.stdout
    finally:
        kernel.stop()
