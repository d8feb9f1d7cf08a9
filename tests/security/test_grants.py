"""Grants never reach the kernel's own state (issue 16): ``tenantflow serve`` refuses at start any
``--sandbox-writable-dir`` that contains, or lies inside, its data directory, storage, token file,
TLS files, wasm cache, git roots or installation; a disjoint grant starts and serves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import tenantflow.kernel
from tenantflow.kernel.grants import wasm_cache_dir
from tenantflow.plugins.sandbox_wasm import cache
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.security.bystander import bystander_completes


def _serve(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Start ``tenantflow serve`` and expect it to refuse before it listens."""
    cmd = [
        sys.executable,
        "-m",
        "tenantflow.kernel.cli",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        str(data_dir),
        *TEST_LIMITS,
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


def _refused(done: subprocess.CompletedProcess[str], grant: Path, state: Path, relation: str) -> None:
    assert done.returncode != 0, done.stdout
    assert "listening on" not in done.stdout
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("error: --sandbox-writable-dir"), done.stderr
    assert str(grant) in message and str(state) in message and relation in message, message


def test_a_grant_containing_the_data_dir_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "kernel"
    _refused(_serve(data_dir, "--sandbox-writable-dir", str(tmp_path)), tmp_path, data_dir, "contains")
    assert not data_dir.exists(), "the kernel created its data directory before refusing"


def test_a_grant_inside_the_data_dir_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "kernel"
    grant = data_dir / "files"
    _refused(_serve(data_dir, "--sandbox-writable-dir", str(grant)), grant, data_dir, "lies inside")


def test_a_grant_reaching_the_data_dir_through_a_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    data_dir = tmp_path / "alias" / "kernel"
    grant = tmp_path / "real"
    done = _serve(data_dir, "--sandbox-writable-dir", str(grant))
    _refused(done, grant, data_dir, "contains")
    assert f"(= {tmp_path / 'real' / 'kernel'})" in done.stderr


@pytest.mark.parametrize(
    "what",
    ["sqlite file", "lmdb dir", "token file", "tls key", "wasm cache", "git root", "installation"],
)
def test_a_grant_overlapping_other_kernel_state_is_refused(tmp_path: Path, what: str) -> None:
    data_dir = tmp_path / "kernel"
    shared = tmp_path / "shared"
    shared.mkdir()
    grant, args, env, state = shared, [], {}, shared / "state"
    if what == "sqlite file":
        args = ["--storage", f"sqlite:///{state}"]
    elif what == "lmdb dir":
        args = ["--storage", f"kv+lmdb://{state}?map_size_mb=64"]
    elif what == "token file":
        state.write_text('{"tokens": []}')
        args = ["--auth-tokens", str(state)]
    elif what == "tls key":
        state.write_text("not read: the grant is refused first")
        args = ["--tls-cert", str(state), "--tls-key", str(state)]
    elif what == "wasm cache":
        env = {"TENANTFLOW_WASM_CACHE": str(state)}
    elif what == "git root":
        state = shared / "repos"
        args = ["--git-root", f"{state}/{{tenant}}"]
        grant = state / "some-tenant"  # inside the root every tenant's repositories share
    else:
        state = Path(tenantflow.kernel.__file__).resolve().parent
        grant = state / "plugins-dropped-here"
    _refused(_serve(data_dir, *args, "--sandbox-writable-dir", str(grant), env=env), grant, state, "")


def test_the_kernel_checks_the_cache_directory_the_wasm_sandbox_uses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TENANTFLOW_WASM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir().is_relative_to(wasm_cache_dir())
    monkeypatch.setenv("TENANTFLOW_WASM_CACHE", str(tmp_path / "explicit"))
    assert cache.cache_dir().is_relative_to(wasm_cache_dir())


def test_a_disjoint_grant_starts_and_serves(tmp_path: Path, tenant: str) -> None:
    grant = tmp_path / "effects"
    grant.mkdir()
    grant.chmod(0o777)  # usable by the uid tenant code runs as, whichever it is
    kernel = KernelProcess(tmp_path / "kernel", [*TEST_LIMITS, "--sandbox-writable-dir", str(grant)])
    kernel.start()
    try:
        with kernel.client() as client:
            bystander_completes(client, tenant)
    finally:
        kernel.stop()
