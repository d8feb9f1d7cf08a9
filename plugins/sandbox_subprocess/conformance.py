"""The sandbox suite's harness for ``python``: the suite's Python workflows as they are; it lacks nothing."""

from __future__ import annotations

from dataclasses import dataclass

from tenantflow.conformance.harness import SandboxHarness


@dataclass
class PythonHarness(SandboxHarness):
    """A guest that dies mid-step is reported as having exited."""

    name: str = "python"
