"""Subprocess sandbox plugin: tenant Python in a confined child forked from a warm template."""

from __future__ import annotations

from tenantflow.kernel import hookimpl
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.sandbox import Sandbox
from tenantflow.plugins.sandbox_subprocess.sandbox import SubprocessSandbox


@hookimpl
def tenantflow_sandboxes(config: KernelConfig) -> list[Sandbox]:
    return [
        SubprocessSandbox(
            network=config.sandbox_network,
            writable=config.sandbox_writable_dirs,
            unsafe_allow_weak=config.unsafe_allow_weak_sandbox,
        )
    ]
