"""The egress allow-list against the python sandbox: steps reach a loopback HTTP server the tenant's
rules name, and nothing else; raw sockets, names resolving to refused addresses and other tenants'
rules do not get through. Each attack also checks another tenant's workflow completes meanwhile."""

from __future__ import annotations

import http.server
import sys
import threading
from collections.abc import Iterator
from typing import TypeVar

import grpc
import pytest

from tenantflow.client import Client, TenantflowRpcError
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.helpers import publish
from tests.security.bystander import bystander_completes

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the sandbox's filters need Linux"
)

STEPS = """
import ctypes, errno, http.client, json, os, socket, urllib.request
import _socket
from tenantflow.workflow import WorkflowEntrypoint

ONCE = {"retries": {"limit": 0}}


def failure(exc):
    exc = getattr(exc, "reason", exc)
    return {"type": type(exc).__name__, "errno": getattr(exc, "errno", None), "message": str(exc)}


def fetch(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return {"body": r.read().decode()}
    except Exception as exc:
        return failure(exc)


def client(host, port):
    try:
        conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request("GET", "/http.client")
        return {"body": conn.getresponse().read().decode()}
    except Exception as exc:
        return failure(exc)


def raw(port):
    found = {}
    try:  # the C socket type, below the runtime's Python-level routing
        _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        found["c_socket"] = 0
    except OSError as exc:
        found["c_socket"] = exc.errno
    libc = ctypes.CDLL(None, use_errno=True)
    found["libc_socket"] = [libc.socket(2, 1, 0), ctypes.get_errno()]  # socket(AF_INET, SOCK_STREAM)
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        found["udp"] = "made"
    except OSError as exc:
        found["udp"] = str(exc)
    # The socket a Python-level AF_INET socket stands on, connected below the runtime's routing.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        _socket.socket.connect(sock, ("127.0.0.1", port))
        found["unrouted_connect"] = 0
    except OSError as exc:
        found["unrouted_connect"] = exc.errno
    return found


def channel(host, port):
    # The kernel's egress channel itself, asked directly: the kernel decides, whoever asks.
    chan = socket.socket(fileno=os.dup(4))
    chan.sendall(json.dumps({"host": host, "port": port}).encode())
    reply, _, _, _ = chan.recvmsg(4096, socket.CMSG_LEN(4))
    return json.loads(reply)


class Egress(WorkflowEntrypoint):
    def run(self, event, step):
        kind, host, port = event.payload["kind"], event.payload["host"], event.payload["port"]
        if kind == "fetch":
            return step.do("fetch", lambda: fetch(f"http://{host}:{port}/urllib"), **ONCE)
        if kind == "client":
            return step.do("client", lambda: client(host, port), **ONCE)
        if kind == "raw":
            return step.do("raw", lambda: raw(port), **ONCE)
        if kind == "channel":
            return step.do("channel", lambda: channel(host, port), **ONCE)
        if kind == "many":
            def many():
                held, refused = [], None
                for _ in range(80):
                    try:
                        held.append(socket.create_connection((host, port), timeout=5))
                    except OSError as exc:
                        refused = str(exc)
                        break
                    if len(held) >= 8:  # stay under the open-at-once bound: the total is what is tested
                        held.pop(0).close()
                return {"opened": len(held), "refused": refused}
            return step.do("many", many, **ONCE)
"""


S = TypeVar("S", bound="RecordingServer")


class RecordingServer(http.server.ThreadingHTTPServer):
    """Answers ``GET /x`` with ``hello /x`` (and its ``tag``), recording the paths asked for."""

    daemon_threads = True
    paths: list[str]
    tag = ""


class RecordingHandler(http.server.BaseHTTPRequestHandler):
    server: RecordingServer

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        body = f"hello {self.path}{self.server.tag}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def running(srv: S) -> Iterator[S]:
    """``srv`` serving in a thread until the generator is closed (a fixture's body)."""
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def server() -> Iterator[RecordingServer]:
    """A loopback HTTP server that records the paths it was asked for."""
    srv = RecordingServer(("127.0.0.1", 0), RecordingHandler)
    srv.paths = []
    yield from running(srv)


def _run(client: Client, tenant: str, kind: str, host: str, port: int) -> object:
    ref = publish(client, tenant, STEPS, name="egress")
    inst = client.create(tenant, "Egress", ref, params={"kind": kind, "host": host, "port": port})
    done = client.wait(tenant, inst.id, timeout=30)
    assert done.status == pb.STATUS_COMPLETE, done
    return Client.output(done)


def test_allowed_host_is_reached_and_others_are_refused(
    client: Client, tenant: str, server: RecordingServer
) -> None:
    port = server.server_address[1]
    client.set_egress(tenant, [("127.0.0.1", [port])])
    assert _run(client, tenant, "fetch", "127.0.0.1", port) == {"body": "hello /urllib"}
    assert _run(client, tenant, "client", "127.0.0.1", port) == {"body": "hello /http.client"}
    other = _run(client, tenant, "fetch", "127.0.0.1", port + 1)
    assert other == {
        "type": "PermissionError", "errno": 13,
        "message": f"[Errno 13] 127.0.0.1 port {port + 1} is not on this tenant's egress allow-list",
    }  # fmt: skip
    assert server.paths == ["/urllib", "/http.client"]
    bystander_completes(client, tenant)


def test_no_list_reaches_nothing_and_another_tenants_list_does_not_apply(
    client: Client, tenant: str, server: RecordingServer
) -> None:
    port = server.server_address[1]
    client.set_egress(f"{tenant}-other", [("127.0.0.1", [port])])
    refused = _run(client, tenant, "fetch", "127.0.0.1", port)
    assert isinstance(refused, dict) and refused["type"] == "PermissionError"
    assert f"tenant {tenant!r} has no egress allow-list" in refused["message"]
    assert server.paths == []
    bystander_completes(client, tenant)


def test_raw_sockets_are_refused(client: Client, tenant: str, server: RecordingServer) -> None:
    port = server.server_address[1]
    client.set_egress(tenant, [("127.0.0.1", [port])])
    found = _run(client, tenant, "raw", "127.0.0.1", port)
    assert isinstance(found, dict)
    assert found["c_socket"] == 1 and found["libc_socket"] == [-1, 1]  # EPERM from the seccomp filter
    assert "only TCP connections" in found["udp"] and "allow-list proxy" in found["udp"]
    assert found["unrouted_connect"] != 0  # an AF_UNIX socket pair end cannot connect to an IP address
    assert server.paths == []
    bystander_completes(client, tenant)


def test_a_name_resolving_to_a_refused_address_is_refused(
    client: Client, tenant: str, server: RecordingServer
) -> None:
    """The rule names "localhost", which resolves to loopback: the kernel resolves it itself and
    refuses, because no rule names 127.0.0.1 literally. A kernel that trusted the name (or an
    address the guest resolved) would let the request reach the server."""
    port = server.server_address[1]
    client.set_egress(tenant, [("localhost", [port])])
    refused = _run(client, tenant, "fetch", "localhost", port)
    assert isinstance(refused, dict) and refused["type"] == "PermissionError", refused
    assert "localhost resolves to 127.0.0.1" in refused["message"]
    assert "outside the public internet" in refused["message"]
    # The address the name resolves to, asked for directly: not on the list either.
    direct = _run(client, tenant, "fetch", "127.0.0.1", port)
    assert isinstance(direct, dict) and "not on this tenant's egress allow-list" in direct["message"]
    # Asking the kernel's channel directly, bypassing the runtime: the same answer.
    asked = _run(client, tenant, "channel", "localhost", port)
    assert (
        isinstance(asked, dict) and asked.get("refused") is True and "resolves to 127.0.0.1" in asked["error"]
    )
    assert server.paths == []
    bystander_completes(client, tenant)


def test_a_run_opens_a_bounded_number_of_connections(
    client: Client, tenant: str, server: RecordingServer
) -> None:
    port = server.server_address[1]
    client.set_egress(tenant, [("127.0.0.1", [port])])
    found = _run(client, tenant, "many", "127.0.0.1", port)
    assert isinstance(found, dict) and "at most 64 connections" in str(found["refused"]), found
    bystander_completes(client, tenant)


def test_bad_rules_are_invalid_arguments(client: Client, tenant: str) -> None:
    for rules, says in (
        ([("a..b", [80])], "rule 1: host 'a..b' is not a host name"),
        ([("example.com", [])], "no ports"),
        ([("example.com", [0])], "port 0 is not in 1-65535"),
        ([("10.0.0.0/33", [80])], "is not a host name, *.suffix, IP address or CIDR block"),
    ):
        with pytest.raises(TenantflowRpcError) as caught:
            client.set_egress(tenant, rules)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert says in caught.value.message
    policy = client.set_egress(tenant, [("API.Example.com.", [443, 80, 443]), ("10.1.2.3", [22])])
    assert [(r.host, list(r.ports)) for r in policy.rules] == [
        ("api.example.com", [80, 443]),
        ("10.1.2.3", [22]),
    ]
    assert [(r.host, list(r.ports)) for r in client.get_egress(tenant).rules] == [
        ("api.example.com", [80, 443]), ("10.1.2.3", [22])]  # fmt: skip


WASM_STEPS = """
import urllib.request
from tenantflow.workflow import WorkflowEntrypoint

ONCE = {"retries": {"limit": 0}}


def fetch(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return {"body": r.read().decode()}
    except Exception as exc:
        exc = getattr(exc, "reason", exc)
        return {"type": type(exc).__name__, "message": str(exc)}


class Egress(WorkflowEntrypoint):
    def run(self, event, step):
        return [step.do(f"fetch-{i}", lambda url=url: fetch(url), **ONCE) for i, url in enumerate(event.payload)]
"""


def test_python_wasm_steps_reach_the_allowed_host_only(
    client: Client, tenant: str, server: RecordingServer
) -> None:
    port = server.server_address[1]
    client.set_egress(tenant, [("127.0.0.1", [port]), ("localhost", [port])])
    ref = publish(client, tenant, WASM_STEPS, name="egress-wasm", runtime="python-wasm")
    urls = [
        f"http://127.0.0.1:{port}/wasm",
        f"http://127.0.0.1:{port + 1}/other",
        f"http://localhost:{port}/name",
    ]
    inst = client.create(tenant, "Egress", ref, params=urls)
    done = client.wait(tenant, inst.id, timeout=300)  # the first python-wasm run may build its runner
    assert done.status == pb.STATUS_COMPLETE, done
    allowed, other, name = Client.output(done)
    assert allowed == {"body": "hello /wasm"}
    assert other["type"] == "PermissionError"  # EACCES (its number is WASI's in the guest)
    assert other["message"].endswith(f"] 127.0.0.1 port {port + 1} is not on this tenant's egress allow-list")
    # "localhost" is on the list, and resolves (in the kernel) to 127.0.0.1, which the list names too.
    assert name == {"body": "hello /name"}
    assert server.paths == ["/wasm", "/name"]
    bystander_completes(client, tenant, runtime="python-wasm")
