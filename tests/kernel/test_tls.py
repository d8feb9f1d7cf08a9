"""``--tls-cert/--tls-key``: the kernel speaks TLS only, and clients verify it against a CA."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tenantflow.client import Client, TenantflowRpcError
from tenantflow.kernel.auth import new_token
from tests.conftest import TEST_LIMITS, KernelProcess


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 / localhost, signed by its own key (it is its own CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return cert_file, key_file


def test_tls_with_tokens(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    token, entry = new_token("platform", ["*"])
    (tmp_path / "tokens.json").write_text(json.dumps({"tokens": [entry]}))
    args = ["--tls-cert", str(cert), "--tls-key", str(key), "--auth-tokens", str(tmp_path / "tokens.json")]
    kernel = KernelProcess(tmp_path / "kernel", [*TEST_LIMITS, *args])
    kernel.start()
    try:
        assert any("(TLS)" in line for line in kernel.lines)
        with Client(kernel.address, token=token, tls_ca=cert.read_bytes()) as client:
            with pytest.raises(TenantflowRpcError) as err:
                client.get("acme", "nothing-here")
            assert err.value.code == grpc.StatusCode.NOT_FOUND  # through TLS, authorized
        with Client(kernel.address, token=token, timeout=3) as plain:
            with pytest.raises(TenantflowRpcError) as err:
                plain.get("acme", "nothing-here")
            assert err.value.code == grpc.StatusCode.UNAVAILABLE  # plaintext is not served
        cli = [sys.executable, "-m", "tenantflow.kernel.cli", "list", "--address", kernel.address,
               "--tenant", "acme", "--token", token, "--tls-ca", str(cert)]  # fmt: skip
        listed = subprocess.run(cli, capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
    finally:
        kernel.stop()


def test_tls_needs_both_files(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path)
    cli = [sys.executable, "-m", "tenantflow.kernel.cli", "serve", "--data-dir", str(tmp_path / "d"),
           "--tls-cert", str(cert)]  # fmt: skip
    result = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "--tls-cert and --tls-key go together" in result.stderr
