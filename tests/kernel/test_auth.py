"""Bearer tokens decide who may act for a tenant (``--auth-tokens``); the envelope does not."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from tenantflow.client import Client, TenantflowRpcError
from tenantflow.kernel.auth import Tokens, new_token
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish

HELLO = """
from tenantflow.workflow import WorkflowEntrypoint

class Hello(WorkflowEntrypoint):
    def run(self, event, step):
        return step.do("greet", lambda: "hi")
"""


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(TenantflowRpcError) as err:
        call()  # type: ignore[operator]
    return err.value.code


def test_tokens_allow_their_tenants_only(tmp_path: Path) -> None:
    platform, platform_entry = new_token("platform", ["*"])
    acme, acme_entry = new_token("acme-ci", ["acme", "acme-*"])
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(json.dumps({"tokens": [platform_entry, acme_entry]}))
    kernel = KernelProcess(tmp_path / "kernel", [*TEST_LIMITS, "--auth-tokens", str(tokens_file)])
    kernel.start()
    try:
        with Client(kernel.address, token=acme) as client:
            ref = publish(client, "acme-web", HELLO)  # a glob match
            inst = client.create("acme-web", "Hello", ref)
            assert client.wait("acme-web", inst.id).status == pb.STATUS_COMPLETE
            assert [e.kind for e in client.watch("acme-web", inst.id)][-1] == "status"  # streams too
            assert _code(lambda: client.get("bloom", inst.id)) == grpc.StatusCode.PERMISSION_DENIED
            batch = [pb.CreateRequest(tenant=t, workflow="Hello", code=ref) for t in ("acme", "bloom")]
            mixed = lambda: client._call(client.workflows.CreateBatch, pb.CreateBatchRequest(requests=batch))  # noqa: E731
            assert _code(mixed) == grpc.StatusCode.PERMISSION_DENIED
        with Client(kernel.address, token=platform) as client:
            assert client.get("acme-web", inst.id).status == pb.STATUS_COMPLETE
        for stranger in (Client(kernel.address), Client(kernel.address, token="guess")):
            with stranger:
                assert (
                    _code(functools.partial(stranger.get, "acme-web", inst.id))
                    == grpc.StatusCode.UNAUTHENTICATED
                )
        cli = [sys.executable, "-m", "tenantflow.kernel.cli", "status", "--address", kernel.address,
               "--tenant", "acme-web", inst.id]  # fmt: skip
        denied = subprocess.run(cli, capture_output=True, text=True, timeout=60)
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
        allowed = subprocess.run([*cli, "--token", acme], capture_output=True, text=True, timeout=60)
        assert allowed.returncode == 0 and "complete" in allowed.stdout, allowed.stderr
    finally:
        kernel.stop()


def test_token_command_prints_a_working_entry(tmp_path: Path) -> None:
    cli = [
        sys.executable,
        "-m",
        "tenantflow.kernel.cli",
        "token",
        "--name",
        "ci",
        "--tenants",
        "acme, acme-*",
    ]
    out = subprocess.run(cli, capture_output=True, text=True, timeout=60, check=True).stdout
    token = out.splitlines()[2].split()[-1]
    entry = json.loads(out.strip().splitlines()[-1])
    (tmp_path / "t.json").write_text(json.dumps({"tokens": [entry]}))
    grant = Tokens.load(tmp_path / "t.json").check([("authorization", f"Bearer {token}")], ["acme-x"])
    assert grant.name == "ci" and grant.tenants == ("acme", "acme-*") and token.startswith("tf_")


def test_a_bad_tokens_file_stops_the_kernel_with_a_reason(tmp_path: Path) -> None:
    (tmp_path / "t.json").write_text('{"tokens": [{"sha256": "not-a-digest", "tenants": ["*"]}]}')
    cli = [sys.executable, "-m", "tenantflow.kernel.cli", "serve", "--listen", "127.0.0.1:0",
           "--data-dir", str(tmp_path / "d"), "--auth-tokens", str(tmp_path / "t.json")]  # fmt: skip
    result = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "is not a SHA-256 hex digest" in result.stderr, result.stderr
