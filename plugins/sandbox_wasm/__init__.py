"""WebAssembly sandbox plugin (wasmtime): ``python-wasm`` (tenant Python on CPython-in-wasm) and
``wasm`` (raw modules speaking the guest ABI in ``ABI.md``)."""

from __future__ import annotations

import logging

from tenantflow.kernel import hookimpl
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.sandbox import Sandbox


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
