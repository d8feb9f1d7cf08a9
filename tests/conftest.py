"""Shared fixtures: a real kernel process on a loopback port, a client, a fresh tenant per test."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tenantflow.conformance.kernel import TEST_LIMITS
from tenantflow.conformance.kernel import KernelProcess as ShippedKernelProcess
from tenantflow.conformance.plugin import client, tenant  # noqa: F401 - the suites' fixtures, shared

__all__ = ["KERNEL_SECRET", "TEST_LIMITS", "KernelProcess"]  # what tests import from here

KERNEL_SECRET = "kernel-env-secret-4242"  # in the kernel's environment; tenants must never see it


@dataclass
class KernelProcess(ShippedKernelProcess):
    """The suites' ``tenantflow serve`` subprocess, with :data:`KERNEL_SECRET` in its environment."""

    env: dict[str, str] = field(default_factory=lambda: {"TENANTFLOW_TEST_SECRET": KERNEL_SECRET})


@pytest.fixture(scope="session")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProcess]:
    """One kernel shared by the session; tests isolate themselves with their own tenant."""
    k = KernelProcess(tmp_path_factory.mktemp("kernel"), TEST_LIMITS)
    k.start()
    yield k
    k.stop()


@pytest.fixture
def fresh_kernel(tmp_path: Path) -> Iterator[KernelProcess]:
    """A kernel of this test's own (for restarts and SIGKILL)."""
    k = KernelProcess(tmp_path / "kernel", TEST_LIMITS)
    k.start()
    yield k
    k.stop()
