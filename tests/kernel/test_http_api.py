"""``tenantflow serve --http-listen``: every tenantflow.v1 RPC over plain HTTP/1.1 and JSON (the
Connect protocol), with the gRPC API's tokens, limits, TLS, metrics and error codes."""

from __future__ import annotations

import base64
import http.client
import json
import re
import shutil
import ssl
import struct
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tenantflow.kernel.auth import new_token
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import source, wait_for
from tests.kernel.test_tls import self_signed

README = Path(__file__).parents[2] / "README.md"
WAITS = source(
    """
    from tenantflow.workflow import WorkflowEntrypoint

    class Waits(WorkflowEntrypoint):
        async def run(self, event, step):
            got = await step.wait_for_event("approval", type="approved", timeout="1 hour")
            return await step.do("ship", lambda: {"by": got["payload"]["by"]})
    """
)


def http_url(kernel: KernelProcess) -> str:
    line = next(line for line in kernel.lines if "tenantflow http api on " in line)
    return line.split("tenantflow http api on ")[1].split()[0]


def connection(url: str, timeout: float = 30) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def post(
    url: str, rpc: str, body: Any, token: str = "", content_type: str = "application/json"
) -> tuple[int, dict[str, Any]]:
    """One unary call: (HTTP status, JSON answer)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {token}"} if token else {})}
    conn = connection(url)
    try:
        conn.request("POST", f"/tenantflow.v1.{rpc}", data, headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def watch(url: str, body: dict[str, str], token: str = "") -> list[tuple[int, dict[str, Any]]]:
    """A Watch over Connect streaming: its (flags, JSON) envelopes, the end-stream one last."""
    data = json.dumps(body).encode()
    headers = {
        "Content-Type": "application/connect+json",
        **({"Authorization": f"Bearer {token}"} if token else {}),
    }
    conn = connection(url)
    try:
        conn.request(
            "POST", "/tenantflow.v1.Workflows/Watch", struct.pack(">BI", 0, len(data)) + data, headers
        )
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("content-type") == "application/connect+json"
        raw = response.read()
    finally:
        conn.close()
    return envelopes(raw)


def envelopes(raw: bytes) -> list[tuple[int, dict[str, Any]]]:
    """A Connect stream's (flags, JSON) envelopes, checked to end with one end-stream envelope."""
    frames, pos = [], 0
    while pos < len(raw):
        flags, size = struct.unpack(">BI", raw[pos : pos + 5])
        frames.append((flags, json.loads(raw[pos + 5 : pos + 5 + size])))
        pos += 5 + size
    assert frames and frames[-1][0] == 2 and all(flags == 0 for flags, _ in frames[:-1])
    return frames


def files(text: str) -> dict[str, str]:
    return {"wf.py": base64.b64encode(text.encode()).decode()}  # bytes fields are base64 in JSON


@pytest.fixture(scope="module")
def open_kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProcess]:
    args = [*TEST_LIMITS, "--http-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]
    k = KernelProcess(tmp_path_factory.mktemp("http"), args)
    k.start()
    yield k
    k.stop()


def test_every_rpc_of_the_proto_answers_over_http(open_kernel: KernelProcess) -> None:
    url, tenant, called = http_url(open_kernel), "http-every", set()

    def ok(rpc: str, body: dict[str, Any]) -> dict[str, Any]:
        status, answer = post(url, rpc, body)
        assert status == 200, (rpc, answer)
        called.add(rpc)
        return answer

    def status_of(id: str) -> str:
        return str(ok("Workflows/Get", {"tenant": tenant, "id": id}).get("status"))

    v1 = ok("Code/Publish", {"tenant": tenant, "name": "wf", "files": files(WAITS)})
    assert v1["workflows"] == ["Waits"] and v1["ref"].startswith(f"artifact://{tenant}/wf@sha256:")
    assert [v["ref"] for v in ok("Code/List", {"tenant": tenant})["versions"]] == [v1["ref"]]
    one = ok("Workflows/Create", {"tenant": tenant, "workflow": "Waits", "code": v1["ref"], "id": "one"})
    assert one["status"] == "STATUS_QUEUED" and one["code"] == v1["ref"]
    wait_for(lambda: status_of("one") == "STATUS_WAITING", timeout=60)
    assert ok("Workflows/Pause", {"tenant": tenant, "id": "one"})["status"] == "STATUS_PAUSED"
    assert ok("Workflows/Resume", {"tenant": tenant, "id": "one"})["status"] == "STATUS_QUEUED"
    sent = ok(
        "Workflows/SendEvent",
        {"tenant": tenant, "id": "one", "type": "approved", "payloadJson": '{"by": "ops"}'},
    )
    assert sent == {"sequence": "1"}  # int64 is a string in protobuf JSON
    frames = watch(url, {"tenant": tenant, "id": "one"})
    called.add("Workflows/Watch")
    events = [(body.get("kind"), body.get("step", "")) for _, body in frames[:-1]]
    assert ("event", "") in events and ("step_completed", "ship") in events and frames[-1][1] == {}
    assert json.loads(ok("Workflows/Get", {"tenant": tenant, "id": "one"})["outputJson"]) == {"by": "ops"}
    history = ok("Workflows/ExportHistory", {"tenant": tenant, "id": "one"})
    assert history["format"] == "tenantflow.history.v1" and history["events"][0]["type"] == "approved"
    assert ok("Workflows/Restart", {"tenant": tenant, "id": "one"})["status"] == "STATUS_QUEUED"
    assert ok("Workflows/Terminate", {"tenant": tenant, "id": "one"})["status"] == "STATUS_TERMINATED"

    batch = ok("Workflows/CreateBatch", {"requests": [
        {"tenant": tenant, "workflow": "Waits", "code": v1["ref"], "id": f"b{i}"} for i in range(2)]})  # fmt: skip
    assert [i["id"] for i in batch["instances"]] == ["b0", "b1"]
    listed = ok("Workflows/List", {"tenant": tenant, "pageSize": 10})
    assert {i["id"] for i in listed["instances"]} == {"one", "b0", "b1"}
    assert ok("Workflows/Delete", {"tenant": tenant, "id": "b0"}) == {}
    assert post(url, "Workflows/Get", {"tenant": tenant, "id": "b0"})[0] == 404
    wait_for(lambda: status_of("b1") == "STATUS_WAITING", timeout=60)
    v2 = ok("Code/Publish", {"tenant": tenant, "name": "wf", "files": files(WAITS + "\n# v2\n")})
    upgraded = ok("Workflows/Upgrade", {"tenant": tenant, "toCode": v2["ref"], "ids": ["b1"], "dryRun": True})
    assert [(o["id"], o["fromCode"], o["toCode"]) for o in upgraded["instances"]] == [
        ("b1", v1["ref"], v2["ref"])
    ]

    schedule = {
        "tenant": tenant,
        "name": "nightly",
        "cron": "0 3 * * *",
        "workflow": "Waits",
        "code": v1["ref"],
    }
    assert ok("Schedules/Create", schedule)["nextFire"]
    ref = {"tenant": tenant, "name": "nightly"}
    assert ok("Schedules/Get", ref)["cron"] == "0 3 * * *"
    assert [s["name"] for s in ok("Schedules/List", {"tenant": tenant})["schedules"]] == ["nightly"]
    assert ok("Schedules/Pause", ref)["paused"] is True
    assert "paused" not in ok("Schedules/Resume", ref)  # false is left out in protobuf JSON
    assert ok("Schedules/Delete", ref) == {}
    assert post(url, "Tenants/List", {})[1]["code"] == "failed_precondition"  # no --list-tenants
    called.add("Tenants/List")
    assert ok("KV/Put", {"tenant": tenant, "key": "k/1", "valueJson": '{"n": 1}'})["key"] == "k/1"
    assert ok("KV/Get", {"tenant": tenant, "key": "k/1"})["valueJson"] == '{"n": 1}'
    kv = ok("KV/List", {"tenant": tenant, "prefix": "k/"})
    assert [e["key"] for e in kv["entries"]] == ["k/1"] and kv["usage"]["keys"] == "1"
    assert ok("KV/Delete", {"tenant": tenant, "key": "k/1"}) == {}
    assert post(url, "KV/Get", {"tenant": tenant, "key": "k/1"})[0] == 404
    secret = {"tenant": tenant, "name": "API_TOKEN", "value": "v"}
    assert post(url, "Secrets/Put", secret)[1]["code"] == "failed_precondition"  # no --secrets-key
    assert ok("Secrets/List", {"tenant": tenant}) == {}
    assert post(url, "Secrets/Delete", {"tenant": tenant, "name": "API_TOKEN"})[0] == 404
    called.update(
        {"KV/Put", "KV/Get", "KV/List", "KV/Delete", "Secrets/Put", "Secrets/List", "Secrets/Delete"}
    )
    rule = {"host": "api.example.com", "ports": [443]}
    assert ok("Egress/Set", {"tenant": tenant, "rules": [rule]})["rules"] == [rule]
    assert ok("Egress/Get", {"tenant": tenant})["rules"] == [rule]
    assert post(url, "Egress/Set", {"tenant": tenant, "rules": [{"host": "a..b", "ports": [1]}]})[0] == 400
    called.update({"Egress/Set", "Egress/Get"})

    every = {f"{s.name}/{m.name}" for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods}
    assert called == every  # a new RPC in the proto must be driven here too


def test_errors_have_connect_codes_and_statuses(open_kernel: KernelProcess) -> None:
    url = http_url(open_kernel)
    assert post(url, "Workflows/Get", {"tenant": "acme", "id": "nobody"}) == (
        404, {"code": "not_found", "message": "instance 'nobody' not found in tenant 'acme'"})  # fmt: skip
    status, answer = post(url, "Workflows/Get", b'{"tenant": "acme", "id": ')
    assert (status, answer["code"]) == (400, "invalid_argument") and "InstanceRef in JSON" in answer[
        "message"
    ]
    status, answer = post(url, "Workflows/Get", {"tenant": "acme", "idd": "x"})
    assert (status, answer["code"]) == (400, "invalid_argument") and 'no field named "idd"' in answer[
        "message"
    ]
    status, answer = post(url, "Workflows/Get", b"[" * 50_000 + b"]" * 50_000)
    assert (status, answer["code"]) == (400, "invalid_argument")
    status, answer = post(url, "Workflows/Gett", {})
    assert (status, answer["code"]) == (404, "unimplemented") and "/tenantflow.v1.Workflows/Gett" in answer[
        "message"
    ]
    status, answer = post(url, "Workflows/Get", {"tenant": "acme", "id": "x"}, content_type="text/plain")
    assert (status, answer["code"]) == (415, "unimplemented") and "application/json" in answer["message"]
    status, answer = post(url, "Workflows/Resume", {"tenant": "acme", "id": "bad id!"})
    assert (status, answer["code"]) == (400, "invalid_argument")
    proto = pb.InstanceRef(tenant="acme", id="nobody").SerializeToString()  # the binary codec works too
    assert post(url, "Workflows/Get", proto, content_type="application/proto")[0] == 404
    conn = connection(url)
    conn.request("GET", "/tenantflow.v1.Workflows/Get")
    response = conn.getresponse()
    assert (response.status, response.getheader("allow")) == (405, "POST")
    conn.close()


def test_oversized_bodies_are_refused_from_their_length_unread(open_kernel: KernelProcess) -> None:
    url = http_url(open_kernel)
    for rpc, size, status, code in (("Workflows/Create", 64 * 1024 * 1024, 429, "resource_exhausted"),
                                    ("Workflows/Get", 1024 * 1024, 400, "invalid_argument")):  # fmt: skip
        conn = connection(url, timeout=10)  # a server that waited for the body would time out here
        conn.putrequest("POST", f"/tenantflow.v1.{rpc}")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
        response = conn.getresponse()
        answer = json.loads(response.read())
        assert (response.status, answer["code"]) == (status, code) and "MiB" in answer["message"]
        assert response.getheader("connection") == "close"
        conn.close()


def test_a_keep_alive_connection_carries_many_calls_and_metrics_count_them(
    open_kernel: KernelProcess,
) -> None:
    url = http_url(open_kernel)
    conn = connection(url)
    for _ in range(3):
        conn.request("POST", "/tenantflow.v1.Workflows/Get", b'{"tenant": "acme", "id": "none"}',
                     {"Content-Type": "application/json"})  # fmt: skip
        response = conn.getresponse()
        assert response.status == 404 and json.loads(response.read())["code"] == "not_found"
    conn.close()
    metrics_url = (
        next(line for line in open_kernel.lines if "metrics on " in line).split("metrics on ")[1].split()[0]
    )
    pattern = r'tenantflow_rpc_handled_total\{code="NOT_FOUND",method="Get",service="tenantflow.v1.Workflows"\} (\S+)'
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    found = re.search(pattern, text)
    assert found and float(found.group(1)) >= 3


def test_tokens_are_checked_before_the_body_is_read(tmp_path: Path) -> None:
    platform, platform_entry = new_token("platform", ["*"])
    acme, acme_entry = new_token("acme-ci", ["acme"])
    (tmp_path / "tokens.json").write_text(json.dumps({"tokens": [platform_entry, acme_entry]}))
    args = [*TEST_LIMITS, "--http-listen", "127.0.0.1:0", "--auth-tokens", str(tmp_path / "tokens.json")]
    kernel = KernelProcess(tmp_path / "kernel", args)
    kernel.start()
    try:
        url = http_url(kernel)
        conn = connection(url, timeout=10)  # headers only: a body of 1 MiB is announced, never sent
        conn.putrequest("POST", "/tenantflow.v1.Code/Publish")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(1024 * 1024))
        conn.endheaders()
        response = conn.getresponse()
        answer = json.loads(response.read())
        assert (response.status, answer["code"]) == (401, "unauthenticated") and "Bearer" in answer["message"]
        conn.close()
        ref = {"tenant": "globex", "id": "x"}
        assert post(url, "Workflows/Get", ref, token="tf_guess")[1]["code"] == "unauthenticated"
        status, answer = post(url, "Workflows/Get", ref, token=acme)
        assert (status, answer["code"]) == (403, "permission_denied") and "'globex'" in answer["message"]
        assert post(url, "Workflows/Get", ref, token=platform)[0] == 404  # authorized: then not found
        status, published = post(
            url, "Code/Publish", {"tenant": "acme", "name": "wf", "files": files(WAITS)}, acme
        )
        assert status == 200
        ok = post(
            url,
            "Workflows/Create",
            {"tenant": "acme", "workflow": "Waits", "code": published["ref"], "id": "w"},
            acme,
        )
        assert ok[0] == 200
        assert watch(url, {"tenant": "acme", "id": "w"})[-1][1]["error"]["code"] == "unauthenticated"
        denied = watch(url, {"tenant": "globex", "id": "w"}, token=acme)
        assert [body["error"]["code"] for _, body in denied] == ["permission_denied"]
        assert post(url, "Workflows/Terminate", {"tenant": "acme", "id": "w"}, acme)[0] == 200
        frames = watch(url, {"tenant": "acme", "id": "w"}, token=acme)
        assert frames[-1][1] == {} and frames[-2][1]["status"] == "STATUS_TERMINATED"
    finally:
        kernel.stop()


def test_https_with_the_grpc_certificate(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    args = [*TEST_LIMITS, "--http-listen", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key)]
    kernel = KernelProcess(tmp_path / "kernel", args)
    kernel.start()
    try:
        url = http_url(kernel)
        assert url.startswith("https://")
        request = urllib.request.Request(f"{url}/tenantflow.v1.Code/List", b'{"tenant": "acme"}',
                                         {"Content-Type": "application/json"})  # fmt: skip
        context = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            assert response.status == 200 and json.loads(response.read()) == {}
        plain = connection(url.replace("https://", "http://"), timeout=10)
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            plain.request("POST", "/tenantflow.v1.Code/List", b"{}", {"Content-Type": "application/json"})
            plain.getresponse().read()
        plain.close()
    finally:
        kernel.stop()


def readme_curl_block() -> str:
    text = README.read_text()
    section = text[text.index("### Over HTTP/JSON") :]
    return section[section.index("```sh\n") + 6 : section.index("\n```", section.index("```sh\n"))]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed on this machine")
def test_the_readme_curl_examples_run(open_kernel: KernelProcess, tmp_path: Path) -> None:
    block = readme_curl_block()
    script = re.sub(r"(?m)^TF=\S+", f"TF={http_url(open_kernel)}", block)
    assert script != block  # the example names its address in one TF= line
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    published, created, got, *events = lines
    assert published["workflows"] == ["Hello"] and created["status"] == "STATUS_QUEUED"
    assert got["id"] == created["id"] == "hello-1"
    assert events[-1]["status"] == "STATUS_COMPLETE" and any(e.get("step") == "greet" for e in events)


def test_a_watch_whose_client_goes_gives_its_budget_back(tmp_path: Path) -> None:
    args = [*TEST_LIMITS, "--http-listen", "127.0.0.1:0", "--max-rpcs-per-tenant", "1"]
    kernel = KernelProcess(tmp_path / "kernel", args)
    kernel.start()
    try:
        url, ref = http_url(kernel), {"tenant": "acme", "id": "w"}
        status, published = post(url, "Code/Publish", {"tenant": "acme", "name": "wf", "files": files(WAITS)})
        assert status == 200
        create = {**ref, "workflow": "Waits", "code": published["ref"]}
        assert post(url, "Workflows/Create", create)[0] == 200
        data = json.dumps(ref).encode()
        stream = connection(url)
        stream.request("POST", "/tenantflow.v1.Workflows/Watch", struct.pack(">BI", 0, len(data)) + data,
                       {"Content-Type": "application/connect+json"})  # fmt: skip
        response = stream.getresponse()
        assert response.status == 200 and response.read1(5)[:1] == b"\x00"  # the first event: it is live
        status, answer = post(url, "Workflows/Get", ref)  # the Watch holds the tenant's one call
        assert (status, answer["code"]) == (429, "resource_exhausted") and "'acme'" in answer["message"]
        response.close()  # the instance still waits: only the client's going can end this Watch
        stream.close()
        wait_for(lambda: post(url, "Workflows/Get", ref)[0] == 200, timeout=10)
    finally:
        kernel.stop()


def test_chunked_bodies_are_read_up_to_their_limit(open_kernel: KernelProcess) -> None:
    url = http_url(open_kernel)
    for parts, status, code in (([b'{"tenant": "acme",', b' "id": "nobody"}'], 404, "not_found"),
                                ([b" " * 60_000] * 2, 400, "invalid_argument")):  # fmt: skip
        conn = connection(url)
        conn.request("POST", "/tenantflow.v1.Workflows/Get", iter(parts), {"Content-Type": "application/json",
                     "Transfer-Encoding": "chunked"}, encode_chunked=True)  # fmt: skip
        response = conn.getresponse()
        answer = json.loads(response.read())
        assert (response.status, answer["code"]) == (status, code), answer
        conn.close()


def test_a_watch_open_at_shutdown_ends_with_unavailable(tmp_path: Path) -> None:
    kernel = KernelProcess(tmp_path / "kernel", [*TEST_LIMITS, "--http-listen", "127.0.0.1:0"])
    kernel.start()
    try:
        url, ref = http_url(kernel), {"tenant": "acme", "id": "w"}
        status, published = post(url, "Code/Publish", {"tenant": "acme", "name": "wf", "files": files(WAITS)})
        assert (
            status == 200
            and post(url, "Workflows/Create", {**ref, "workflow": "Waits", "code": published["ref"]})[0]
            == 200
        )
        data = json.dumps(ref).encode()
        stream = connection(url)
        stream.request("POST", "/tenantflow.v1.Workflows/Watch", struct.pack(">BI", 0, len(data)) + data,
                       {"Content-Type": "application/connect+json"})  # fmt: skip
        response = stream.getresponse()
        raw = response.read1(5)
        assert kernel.proc is not None
        kernel.proc.terminate()
        raw += response.read()
        stream.close()
        end = envelopes(raw)[-1][1]
        assert end["error"]["code"] == "unavailable" and "stopping" in end["error"]["message"]
        assert kernel.proc.wait(15) == 0
    finally:
        kernel.stop()
