"""The KV and Secrets services on a real kernel (gRPC and the CLI), and ``ctx.secrets`` in a step:
values never come back out, at rest they are sealed, and a step that prints one logs ``***``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tenantflow.client import Client, TenantflowRpcError
from tenantflow.kernel.secretbox import new_key
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish

VALUE = "s3cr3t-Value-9f8e7d"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProcess]:
    """A kernel with a secrets key file and a small key-value quota."""
    home = tmp_path_factory.mktemp("keyed")
    (home / "secrets.key").write_text(f"# tenantflow secrets\n{new_key()}\n")
    k = KernelProcess(
        home / "data", [*TEST_LIMITS, "--secrets-key", str(home / "secrets.key"), "--kv-max-keys", "3"]
    )
    k.start()
    yield k
    k.stop()


def code(exc: pytest.ExceptionInfo[TenantflowRpcError]) -> grpc.StatusCode:
    return exc.value.code


def cli(kernel: KernelProcess, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tenantflow.kernel.cli", *args, "--address", kernel.address],
        input=stdin, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_kv_service_get_put_delete_list_and_quota(keyed: KernelProcess) -> None:
    with keyed.client() as client:
        assert client.kv_put("kvsvc", "a", {"n": 1}).updated_at.endswith("Z")
        client.kv_put("kvsvc", "b/1", [1])
        assert json.loads(client.kv_get("kvsvc", "a").value_json) == {"n": 1}
        page = client.kv_list("kvsvc", "b/")
        assert [e.key for e in page.entries] == ["b/1"] and page.next_page_token == ""
        assert (page.usage.keys, page.usage.max_keys) == (2, 3)
        client.kv_put("kvsvc", "c", None)
        with pytest.raises(TenantflowRpcError) as full:
            client.kv_put("kvsvc", "d", 1)
        assert code(full) == grpc.StatusCode.RESOURCE_EXHAUSTED and "--kv-max-keys" in full.value.message
        client.kv_put("kvsvc", "a", 2)  # overwriting keeps the count
        with pytest.raises(TenantflowRpcError) as other:
            client.kv_get("someone-else", "a")
        assert code(other) == grpc.StatusCode.NOT_FOUND
        client.kv_delete("kvsvc", "a")
        with pytest.raises(TenantflowRpcError) as gone:
            client.kv_delete("kvsvc", "a")
        assert code(gone) == grpc.StatusCode.NOT_FOUND
        for bad in [("kvsvc", ""), ("kvsvc", "x" * 513), ("kvsvc", "a\nb"), ("bad tenant", "a")]:
            with pytest.raises(TenantflowRpcError) as wrong:
                client.kv_get(*bad)
            assert code(wrong) == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(TenantflowRpcError) as not_json:
            client._call(client.kv.Put, pb.KVPutRequest(tenant="kvsvc", key="j", value_json="{nope"))
        assert code(not_json) == grpc.StatusCode.INVALID_ARGUMENT
    listed = cli(keyed, "kv", "list", "--tenant", "kvsvc")
    assert listed.returncode == 0 and "b/1" in listed.stdout and "2 keys of 3" in listed.stdout
    put = cli(keyed, "kv", "put", "--tenant", "kvsvc", "e", "not json")
    assert put.returncode == 1 and "not JSON" in put.stderr


def test_secrets_without_a_key_file_are_refused_naming_the_flag(client: Client) -> None:
    with pytest.raises(TenantflowRpcError) as refused:
        client.put_secret("nokey", "API_TOKEN", VALUE)
    assert code(refused) == grpc.StatusCode.FAILED_PRECONDITION and "--secrets-key" in refused.value.message
    assert VALUE not in refused.value.message


SECRET_FLOW = """
from tenantflow.workflow import WorkflowEntrypoint

def use(ctx):
    token = ctx.secrets["API_TOKEN"]
    print("calling with", token)
    return {"length": len(token), "echo": token}

def missing(ctx):
    return ctx.secrets["NOPE"]

def leak(ctx):
    raise RuntimeError("failed with " + ctx.secrets["API_TOKEN"])

class Flow(WorkflowEntrypoint):
    def run(self, event, step):
        out = step.do("use", use)
        try:
            step.do("missing", missing, retries={"limit": 0})
        except Exception as exc:
            out["missing"] = str(exc)
        try:
            step.do("leak", leak, retries={"limit": 0})
        except Exception as exc:
            out["leak"] = str(exc)
        return out
"""


def test_secrets_are_write_only_sealed_and_redacted(keyed: KernelProcess) -> None:
    with keyed.client() as client:
        put = client.put_secret("sec", "API_TOKEN", VALUE)
        assert put.value == "" and put.updated_at.endswith("Z")
        assert [(s.name, s.value) for s in client.list_secrets("sec")] == [("API_TOKEN", "")]
        assert client.list_secrets("other") == []
        for bad in ["lower", "9LIVES", "A" * 65]:
            with pytest.raises(TenantflowRpcError) as wrong:
                client.put_secret("sec", bad, "x")
            assert code(wrong) == grpc.StatusCode.INVALID_ARGUMENT
        ref = publish(client, "sec", SECRET_FLOW)
        client.create("sec", "Flow", ref, id="s1")
        done = client.wait("sec", "s1")
        out = Client.output(done)
        assert out["length"] == len(VALUE) and out["echo"] == "***"
        assert "NOPE" in out["missing"] and "secrets put" in out["missing"]
        assert out["leak"].endswith("failed with ***")
        history = client.export_history("sec", "s1")
        assert VALUE not in str(history) and VALUE not in str(done)
        assert any("calling with ***" in e.message for e in history.timeline)
        client.delete_secret("sec", "API_TOKEN")
        with pytest.raises(TenantflowRpcError) as gone:
            client.delete_secret("sec", "API_TOKEN")
        assert code(gone) == grpc.StatusCode.NOT_FOUND
    stored = b"".join(p.read_bytes() for p in (keyed.data_dir).rglob("*.sqlite3*"))
    assert stored and VALUE.encode() not in stored  # sealed at rest


def test_cli_secrets_reads_the_value_from_stdin_and_never_prints_it(keyed: KernelProcess) -> None:
    put = cli(keyed, "secrets", "put", "--tenant", "clisec", "DEPLOY_KEY", stdin=VALUE + "\n")
    assert put.returncode == 0 and "DEPLOY_KEY" in put.stdout and VALUE not in put.stdout
    listed = cli(keyed, "secrets", "list", "--tenant", "clisec")
    assert "DEPLOY_KEY" in listed.stdout and VALUE not in listed.stdout


def test_rotate_reseals_under_the_new_key(tmp_path: Path) -> None:
    from tenantflow.kernel.config import KernelConfig
    from tenantflow.kernel.plugins import Plugins
    from tenantflow.kernel.secretbox import SecretBox, read_keys

    old, new = tmp_path / "old.key", tmp_path / "new.key"
    old.write_text(new_key() + "\n")
    new.write_text(new_key() + "\n" + old.read_text())
    url = f"sqlite:///{tmp_path / 'tf.sqlite3'}"
    storage = Plugins().storage(url, KernelConfig(data_dir=tmp_path))
    storage.put_secret("t", "A", SecretBox(read_keys(str(old))).seal("v", "t", "A"), 1.0)
    storage.close()
    rotated = subprocess.run(
        [sys.executable, "-m", "tenantflow.kernel.cli", "secrets", "rotate", "--storage", url, "--secrets-key",
         str(new), "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert rotated.returncode == 0, rotated.stderr
    assert "re-sealed 1" in rotated.stdout
    storage = Plugins().storage(url, KernelConfig(data_dir=tmp_path))
    sealed, at = storage.get_secret("t", "A")  # type: ignore[misc]
    storage.close()
    only_new = SecretBox(read_keys(str(new))[:1])
    assert only_new.open(sealed, "t", "A") == "v" and at == 1.0
    with pytest.raises(ValueError, match="does not open"):
        only_new.open(sealed, "u", "A")  # bound to its tenant


def test_kv_and_secrets_take_the_same_tokens_as_every_rpc(tmp_path: Path) -> None:
    from tenantflow.kernel.auth import new_token

    acme, acme_entry = new_token("acme", ["acme"])
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": [acme_entry]}))
    (tmp_path / "secrets.key").write_text(new_key() + "\n")
    kernel = KernelProcess(tmp_path / "kernel", [*TEST_LIMITS, "--auth-tokens", str(tokens),
                                                  "--secrets-key", str(tmp_path / "secrets.key")])  # fmt: skip
    kernel.start()
    try:
        with Client(kernel.address, token=acme) as client:
            client.kv_put("acme", "k", 1)
            client.put_secret("acme", "TOKEN", VALUE)
            for call in (lambda: client.kv_get("bloom", "k"), lambda: client.kv_list("bloom"),
                         lambda: client.kv_put("bloom", "k", 1), lambda: client.list_secrets("bloom"),
                         lambda: client.put_secret("bloom", "TOKEN", VALUE)):  # fmt: skip
                with pytest.raises(TenantflowRpcError) as denied:
                    call()
                assert code(denied) == grpc.StatusCode.PERMISSION_DENIED
        with Client(kernel.address) as stranger, pytest.raises(TenantflowRpcError) as unknown:
            stranger.kv_get("acme", "k")
        assert code(unknown) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        kernel.stop()
