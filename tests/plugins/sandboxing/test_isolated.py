"""The limited child a check runs in: wall time, CPU and output are bounded; it sees no environment."""

from __future__ import annotations

import pytest

from tenantflow.kernel.errors import ResourceExhausted
from tenantflow.plugins.sandboxing import isolated


def test_child_wall_time_limit() -> None:
    limits = isolated.ChildLimits(wall_seconds=0.5, what="the check")
    with pytest.raises(ResourceExhausted, match=r"the check took more than 0\.5 s: split it"):
        isolated.call("time:sleep", [30], limits)


def test_child_cpu_limit() -> None:
    limits = isolated.ChildLimits(cpu_seconds=1, wall_seconds=60, what="the check")
    with pytest.raises(ResourceExhausted, match=r"the check used more than 1 s of CPU: split it"):
        isolated.call("math:factorial", [10**8], limits)


def test_child_output_limit() -> None:
    limits = isolated.ChildLimits(output_bytes=1000, what="the check")
    with pytest.raises(ResourceExhausted, match=r"gave a result over 1000 bytes"):
        isolated.call("operator:mul", ["x", 5000], limits)


def test_child_has_an_empty_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENANTFLOW_SECRET_FOR_TEST", "kernel-only")
    assert isolated.call("os:getenv", ["TENANTFLOW_SECRET_FOR_TEST"]) is None
    assert isolated.call("os:getcwd", []) == "/"
