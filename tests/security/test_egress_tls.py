"""HTTPS through the egress allow-list in the python sandbox: TLS runs between the step and the
server (the kernel relays bytes and never sees plaintext), certificates are verified against the
system CAs the run may read or a CA the step names, and refused hosts stay refused for https."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tenantflow.client import Client
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.helpers import publish
from tests.security.bystander import bystander_completes
from tests.security.test_egress import RecordingHandler, RecordingServer, running

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the sandbox's filters need Linux"
)

STEPS = """
import asyncio, os, socket, ssl, urllib.error, urllib.request
from tenantflow.workflow import WorkflowEntrypoint

ONCE = {"retries": {"limit": 0}}


def failure(exc):
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        exc = exc.reason
    return {"type": type(exc).__name__, "errno": getattr(exc, "errno", None), "message": str(exc)}


def fetch(url, ca):
    context = ssl.create_default_context(cadata=ca) if ca else ssl.create_default_context()
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as r:
            return {"body": r.read().decode()}
    except Exception as exc:
        return failure(exc)


def sni(host, port, ca, name):
    # The name the step gives is the one the server sees (SNI) and the one checked in its certificate.
    context = ssl.create_default_context(cadata=ca)
    try:
        with socket.create_connection((host, port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname=name) as tls:
                version = tls.version()
                tls.sendall(b"GET /sni HTTP/1.0\\r\\nHost: " + name.encode() + b"\\r\\n\\r\\n")
                reply = b""
                while chunk := tls.recv(4096):
                    reply += chunk
                return {"reply": reply.split(b"\\r\\n\\r\\n", 1)[1].decode(), "version": version}
    except Exception as exc:
        return failure(exc)


def wrap_first(host, port, ca):
    # Wrapped before it connects (smtplib-style code, some clients): connect then shakes hands.
    context = ssl.create_default_context(cadata=ca)
    try:
        with context.wrap_socket(socket.socket(), server_hostname=host) as tls:
            tls.settimeout(5)
            tls.connect((host, port))
            return {"version": tls.version(), "peer": tls.getpeercert()["subject"][0][0][1]}
    except Exception as exc:
        return failure(exc)


def with_asyncio(host, port, ca):
    async def get():
        reader, writer = await asyncio.open_connection(host, port, ssl=ssl.create_default_context(cadata=ca))
        writer.write(b"GET /asyncio HTTP/1.0\\r\\n\\r\\n")
        reply = await reader.read()
        writer.close()
        return reply.split(b"\\r\\n\\r\\n", 1)[1].decode()

    try:
        return {"reply": asyncio.run(asyncio.wait_for(get(), 5))}
    except Exception as exc:
        return failure(exc)


def system_cas():
    paths = ssl.get_default_verify_paths()
    closed = {}
    for path in ("/etc/ssl/openssl.cnf", "/etc/ssl", "/etc/passwd", "/etc"):
        try:
            os.listdir(path) if os.path.isdir(path) else open(path).close()
            closed[path] = "read"
        except OSError as exc:
            closed[path] = exc.errno
    return {"x509_ca": ssl.create_default_context().cert_store_stats()["x509_ca"],
            "cafile": paths.cafile, "capath": paths.capath, "closed": closed}


class Tls(WorkflowEntrypoint):
    def run(self, event, step):
        kind, p = event.payload["kind"], event.payload
        if kind == "fetch":
            return step.do("fetch", lambda: fetch(p["url"], p.get("ca")), **ONCE)
        if kind == "sni":
            return step.do("sni", lambda: sni(p["host"], p["port"], p["ca"], p["name"]), **ONCE)
        if kind == "wrap_first":
            return step.do("wrap", lambda: wrap_first(p["host"], p["port"], p["ca"]), **ONCE)
        if kind == "asyncio":
            return step.do("asyncio", lambda: with_asyncio(p["host"], p["port"], p["ca"]), **ONCE)
        return step.do("system", system_cas, **ONCE)
"""


def _certificates(directory: Path) -> tuple[str, Path, Path]:
    """A test CA (its PEM) and a server certificate and key it signed for localhost and 127.0.0.1."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tenantflow test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    cert_file, key_file = directory / "server.pem", directory / "server.key"
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return ca.public_bytes(serialization.Encoding.PEM).decode(), cert_file, key_file


class _Server(RecordingServer):
    names: list[str | None]
    ca: str
    tag = " over TLS"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    """A loopback HTTPS server with a certificate from a test CA; it records the paths asked for
    and the server names (SNI) its clients sent."""
    ca, cert, key = _certificates(tmp_path)
    srv = _Server(("127.0.0.1", 0), RecordingHandler)
    srv.paths, srv.names, srv.ca = [], [], ca
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda _sock, name, _ctx: srv.names.append(name)  # type: ignore[func-returns-value]
    srv.socket = context.wrap_socket(srv.socket, server_side=True)
    yield from running(srv)


def _run(client: Client, tenant: str, **params: object) -> dict[str, object]:
    ref = publish(client, tenant, STEPS, name="egress-tls")
    inst = client.create(tenant, "Tls", ref, params=params)
    done = client.wait(tenant, inst.id, timeout=30)
    assert done.status == pb.STATUS_COMPLETE, done
    output = Client.output(done)
    assert isinstance(output, dict)
    return output


def test_https_reaches_the_allowed_host_verified_against_the_steps_ca(
    client: Client, tenant: str, server: _Server
) -> None:
    port = server.server_address[1]
    client.set_egress(tenant, [("127.0.0.1", [port])])
    url = f"https://127.0.0.1:{port}/verified"
    reached = _run(client, tenant, kind="fetch", url=url, ca=server.ca)
    assert reached.get("body") == "hello /verified over TLS", reached
    # Without the test CA the same server is not trusted: the step verifies, nothing in between does.
    untrusted = _run(client, tenant, kind="fetch", url=url)
    assert untrusted["type"] == "SSLCertVerificationError", untrusted
    assert "unable to get local issuer certificate" in str(untrusted["message"])
    assert server.paths == ["/verified"]
    bystander_completes(client, tenant)


def test_the_server_name_the_step_gives_is_sent_and_checked(
    client: Client, tenant: str, server: _Server
) -> None:
    port = server.server_address[1]
    client.set_egress(tenant, [("127.0.0.1", [port])])
    named = _run(client, tenant, kind="sni", host="127.0.0.1", port=port, ca=server.ca, name="localhost")
    assert named.get("reply") == "hello /sni over TLS", named
    assert str(named["version"]).startswith("TLSv1.")
    wrong = _run(client, tenant, kind="sni", host="127.0.0.1", port=port, ca=server.ca, name="example.com")
    assert wrong["type"] == "SSLCertVerificationError" and "Hostname mismatch" in str(wrong["message"]), wrong
    assert server.names == ["localhost", "example.com"]  # the relay passes the ClientHello as it is
    assert server.paths == ["/sni"]


def test_sockets_wrapped_before_connecting_and_asyncio_streams_speak_tls(
    client: Client, tenant: str, server: _Server
) -> None:
    port = server.server_address[1]
    client.set_egress(tenant, [("127.0.0.1", [port])])
    wrapped = _run(client, tenant, kind="wrap_first", host="127.0.0.1", port=port, ca=server.ca)
    assert wrapped.get("peer") == "localhost" and str(wrapped["version"]).startswith("TLSv1."), wrapped
    streamed = _run(client, tenant, kind="asyncio", host="127.0.0.1", port=port, ca=server.ca)
    assert streamed == {"reply": "hello /asyncio over TLS"}
    assert server.paths == ["/asyncio"]


def test_https_to_a_host_off_the_list_is_refused(client: Client, tenant: str, server: _Server) -> None:
    port = server.server_address[1]
    client.set_egress(tenant, [("127.0.0.1", [port + 1])])
    refused = _run(client, tenant, kind="fetch", url=f"https://127.0.0.1:{port}/no", ca=server.ca)
    assert refused == {
        "type": "PermissionError", "errno": 13,
        "message": f"[Errno 13] 127.0.0.1 port {port} is not on this tenant's egress allow-list",
    }  # fmt: skip
    assert server.paths == [] and server.names == []


def test_the_default_context_loads_the_system_cas(client: Client, tenant: str) -> None:
    host = ssl.create_default_context().cert_store_stats()["x509_ca"]
    if not host:
        pytest.skip("this machine has no system CA certificates to load")
    client.set_egress(tenant, [("127.0.0.1", [443])])
    found = _run(client, tenant, kind="system")
    assert found["x509_ca"] == host, found  # every CA the kernel's own Python loads, none missing
    defaults = ssl.get_default_verify_paths()
    # Runs start with an empty environment: OpenSSL's own names, not this process's SSL_CERT_FILE.
    assert (found["cafile"], found["capath"]) == (defaults.openssl_cafile, defaults.openssl_capath)
    # The trust store only: not OpenSSL's configuration, not the rest of /etc/ssl or /etc.
    closed = found["closed"]
    assert isinstance(closed, dict)
    assert {path: closed[path] for path in closed if Path(path).exists()} == {
        path: 13
        for path in ("/etc/ssl/openssl.cnf", "/etc/ssl", "/etc/passwd", "/etc")
        if Path(path).exists()
    }  # EACCES from Landlock


WASM_STEPS = """
import http.client, urllib.request
from tenantflow.workflow import WorkflowEntrypoint


def attempts(url, host, port):
    found = {}
    try:
        urllib.request.urlopen(url, timeout=5)
        found["urlopen"] = "reached"
    except Exception as exc:
        found["urlopen"] = [type(exc).__name__, str(exc)]
    try:
        http.client.HTTPSConnection(host, port, timeout=5).request("GET", "/")
        found["https_connection"] = "reached"
    except Exception as exc:
        found["https_connection"] = [type(exc).__name__, str(exc)]
    try:
        import ssl  # noqa: F401
        found["ssl"] = "imported"
    except ImportError as exc:
        found["ssl"] = [type(exc).__name__, str(exc)]
    return found


class Tls(WorkflowEntrypoint):
    def run(self, event, step):
        p = event.payload
        return step.do("https", lambda: attempts(p["url"], p["host"], p["port"]), retries={"limit": 0})
"""


def test_python_wasm_https_fails_naming_the_python_runtime(
    client: Client, tenant: str, server: _Server
) -> None:
    """componentize-py's CPython has no ssl module: https says so and names the runtime that
    speaks it, instead of "unknown url type"."""
    port = server.server_address[1]
    client.set_egress(tenant, [("127.0.0.1", [port])])
    ref = publish(client, tenant, WASM_STEPS, name="egress-tls-wasm", runtime="python-wasm")
    params = {"url": f"https://127.0.0.1:{port}/wasm", "host": "127.0.0.1", "port": port}
    inst = client.create(tenant, "Tls", ref, params=params)
    done = client.wait(tenant, inst.id, timeout=300)  # the first python-wasm run may build its runner
    assert done.status == pb.STATUS_COMPLETE, done
    found = Client.output(done)
    assert isinstance(found, dict)
    says = "HTTPS is not available in the python-wasm runtime"
    assert found["urlopen"][0] == "URLError" and says in found["urlopen"][1], found
    assert found["https_connection"][0] == "NotImplementedError" and says in found["https_connection"][1]
    assert found["ssl"][0] == "ModuleNotFoundError" and says in found["ssl"][1], found
    assert "runtime 'python'" in found["urlopen"][1]
    assert server.paths == [] and server.names == []
