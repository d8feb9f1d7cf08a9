"""Subprocess sandbox plugin: tenant Python in a confined child forked from a warm template."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tenantflow.kernel import hookimpl
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.sandbox import Sandbox
from tenantflow.plugins.sandbox_subprocess.sandbox import SubprocessSandbox

if TYPE_CHECKING:
    from tenantflow.conformance.harness import Harness


TENANTFLOW_CONTRACTS = {"hookspecs": [1], "sandbox": [1]}  # the versions this plugin supports


@hookimpl
def tenantflow_sandboxes(config: KernelConfig) -> list[Sandbox]:
    return [
        SubprocessSandbox(
            network=config.sandbox_network,
            writable=config.sandbox_writable_dirs,
            workspaces=str(config.workspace_root) if config.workspace_root else None,
            unsafe_allow_weak=config.unsafe_allow_weak_sandbox,
            warm_runners=config.warm_runners,
            warm_idle_seconds=config.warm_runner_idle_seconds,
        )
    ]


@hookimpl
def tenantflow_conformance(kind: str, name: str) -> Harness | None:
    if (kind, name) != ("sandbox", "python"):
        return None
    from tenantflow.plugins.sandbox_subprocess.conformance import PythonHarness

    return PythonHarness()
