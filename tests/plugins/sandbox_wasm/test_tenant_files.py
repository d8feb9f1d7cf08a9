"""Guest file access as the tenant uid (issue 16), down at wasmtime's level: its WASI does the I/O on
tokio threads, which inherit the credentials of the guest thread that first needed them. Each case
runs in a fresh interpreter, since those threads live as long as the process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="guests get other file credentials than the kernel only under a root kernel"
)

SCRIPT = """
import sys, threading
from wasmtime import Engine, Linker, Module, Store
from tenantflow.plugins.sandbox_wasm import tenant_files
from tenantflow.plugins.sandbox_wasm.wasmtime_engine import wasi_config

# path_open(preopen 3, path "secret", read) -> the WASI errno (0: opened; 2: EACCES)
WAT = '''(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "secret")
  (func (export "go") (result i32)
    (call $open (i32.const 3) (i32.const 0) (i32.const 16) (i32.const 6) (i32.const 0)
                (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 100))))'''
grant, confined = sys.argv[1], sys.argv[2] == "confined"
engine = Engine()
module = Module(engine, WAT)
results = []

def guest():
    store = Store(engine)
    store.set_wasi(wasi_config([grant]))
    linker = Linker(engine)
    linker.define_wasi()
    if confined:
        with tenant_files.as_tenant():
            results.append(linker.instantiate(store, module).exports(store)["go"](store))
    else:
        results.append(linker.instantiate(store, module).exports(store)["go"](store))

thread = threading.Thread(target=guest)
thread.start()
thread.join()
print(results[0])
print(tenant_files.io_threads_problem() or "confined")
"""


def _run(grant: Path, mode: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), str(grant), mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.splitlines()


@pytest.fixture
def grant(tmp_path: Path) -> Path:
    grant = tmp_path / "grant"
    grant.mkdir(mode=0o777)
    (grant / "secret").write_text("root only")
    (grant / "secret").chmod(0o600)
    return grant


def test_a_guest_under_as_tenant_cannot_open_a_root_only_file(grant: Path) -> None:
    errno, threads = _run(grant, "confined")
    assert errno == "2", "a 0600 root file opened by a guest (WASI errno 2 is EACCES)"
    assert threads == "confined"


def test_io_threads_with_the_kernels_credentials_are_detected(grant: Path) -> None:
    errno, threads = _run(grant, "unconfined")
    assert errno == "0"  # what wasmtime alone does in a root process: the hole this module closes
    assert "accesses files as uid 0" in threads, threads
