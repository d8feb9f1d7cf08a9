"""Tenants.List: the operator's tenant listing over gRPC, HTTP and the CLI; off unless
--list-tenants, and a token sees only the tenants its patterns allow. The storage side is in the
conformance suite (clients/conformance/test_storage_tenants.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from tenantflow.client import Client, TenantflowRpcError
from tenantflow.kernel.auth import new_token
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.kernel.test_http_api import WAITS, files, http_url, post


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
