"""The sandbox suite's harnesses for ``python-wasm`` (the suite's Python workflows) and ``wasm`` (their
C mirror, ``examples/wasm/c/workflows.c``, built with the ziglang command its README documents)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tenantflow.conformance.harness import HarnessUnavailable, SandboxHarness

C_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "wasm" / "c" / "workflows.c"

# A raw module that imports WASI's socket call: the wasm sandbox refuses it at publish.
NETWORK_WAT = """
(module
  (import "wasi_snapshot_preview1" "sock_open" (func (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "workflow_Connect")))
"""


@dataclass
class PythonWasmHarness(SandboxHarness):
    """python-wasm runs the Python workflows as they are; it lacks nothing the suite checks."""

    name: str = "python-wasm"


@dataclass
class RawWasmHarness(SandboxHarness):
    """wasm: the C mirror of the workflows, one step at a time, without a clock, files or sockets."""

    name: str = "wasm"
    crash_says: str = "unreachable"  # the C example's Crash traps
    lacks: Mapping[str, str] = field(
        default_factory=lambda: {
            "parallel steps": "raw modules run one step at a time (plugins/sandbox_wasm/ABI.md)",
            "cpu clock": "a raw module has no clock to burn a measured amount of CPU (same Budget as python-wasm)",
            "file io": "the C example does no file I/O; raw modules get the same WASI grant as python-wasm",
            "sockets": "raw modules have no socket API: a module importing one is refused",
        }
    )

    def files(self, tmp: Path) -> dict[str, str | bytes]:
        if not C_EXAMPLE.is_file():
            raise HarnessUnavailable(f"the C workflows are built from a checkout's {C_EXAMPLE}")
        if importlib.util.find_spec("ziglang") is None:
            raise HarnessUnavailable("building the C workflows needs ziglang: pip install ziglang")
        out = tmp / "workflows.wasm"
        cmd = [sys.executable, "-m", "ziglang", "cc", "-target", "wasm32-freestanding", "-O2", "-nostdlib",
               "-Wl,--no-entry", "-o", str(out), str(C_EXAMPLE)]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=C_EXAMPLE.parent, timeout=300)
        return {"workflows.wasm": out.read_bytes()}

    def socket_files(self) -> dict[str, str | bytes]:
        return {"net.wat": NETWORK_WAT}
