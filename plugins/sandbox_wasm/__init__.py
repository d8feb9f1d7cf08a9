"""WebAssembly sandbox plugin (wasmtime): ``python-wasm`` (tenant Python on CPython-in-wasm) and
``wasm`` (raw modules speaking the guest ABI in ``ABI.md``)."""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING

# The [wasm] extra: without it this plugin fails at load, and the kernel names the extra when asked
# for a wasm runtime (rather than failing at first use).
import wasmtime  # noqa: F401

from tenantflow.kernel import hookimpl
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.sandbox import Sandbox

if TYPE_CHECKING:
    from tenantflow.conformance.harness import Harness

# componentize-py builds the python-wasm runner (not imported until then); it comes with wasmtime.
if importlib.util.find_spec("componentize_py") is None:
    raise ModuleNotFoundError("No module named 'componentize_py'", name="componentize_py")


TENANTFLOW_CONTRACTS = {"hookspecs": [1], "sandbox": [1]}  # the versions this plugin supports


@hookimpl
def tenantflow_sandboxes(config: KernelConfig) -> list[Sandbox]:
    from tenantflow.plugins.sandbox_wasm.python_wasm import PythonWasmSandbox
    from tenantflow.plugins.sandbox_wasm.raw import RawWasmSandbox

    writable = config.sandbox_writable_dirs
    if config.sandbox_network:
        logging.getLogger("tenantflow.sandbox.wasm").info(
            "wasm sandboxes: --sandbox-network does not apply (guests have no socket API)"
        )
    return [
        PythonWasmSandbox(config.max_concurrent_runs, writable),
        RawWasmSandbox(config.max_concurrent_runs, writable=writable),
    ]


@hookimpl
def tenantflow_conformance(kind: str, name: str) -> Harness | None:
    if kind != "sandbox" or name not in ("python-wasm", "wasm"):
        return None
    from tenantflow.plugins.sandbox_wasm.conformance import PythonWasmHarness, RawWasmHarness

    return PythonWasmHarness() if name == "python-wasm" else RawWasmHarness()
