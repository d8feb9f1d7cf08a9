"""Shared fixtures: a real kernel process on a loopback port, a client, a fresh tenant per test."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tenantflow.client import Client

_counter = itertools.count()


@dataclass
class KernelProcess:
    """A ``tenantflow serve`` subprocess; ``address`` is where it listens."""

    data_dir: Path
    args: list[str]
    proc: subprocess.Popen[str] | None = None
    address: str = ""
    lines: list[str] = field(default_factory=list)

    def start(self, timeout: float = 30.0) -> None:
        self.lines = []
        cmd = [sys.executable, "-m", "tenantflow.kernel.cli", "serve", "--listen", "127.0.0.1:0",
               "--data-dir", str(self.data_dir), *self.args]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TENANTFLOW_TEST_SECRET": KERNEL_SECRET}
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        ready = threading.Event()

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line.rstrip())
                if "listening on" in line:
                    self.address = line.split("listening on ")[1].split()[0]
                    ready.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        if not ready.wait(timeout):
            self.stop()
            raise RuntimeError("kernel did not start:\n" + "\n".join(self.lines))

    def client(self) -> Client:
        return Client(self.address)

    def kill(self) -> None:
        """SIGKILL: no chance to flush or clean up."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._close_output()

    def _close_output(self) -> None:
        assert self.proc is not None
        self._pump.join(10)
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self.proc.stdout.close()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_output()  # also when it had crashed: an open pipe would be reported later


TEST_LIMITS = ["--cpu-seconds", "3", "--memory-mb", "256"]
KERNEL_SECRET = "kernel-env-secret-4242"  # in the kernel's environment; tenants must never see it


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


@pytest.fixture
def client(kernel: KernelProcess) -> Iterator[Client]:
    with kernel.client() as c:
        yield c


@pytest.fixture
def tenant(request: pytest.FixtureRequest) -> str:
    """A tenant name unique to this test."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)
    return f"t{next(_counter)}-{name}"[:60].rstrip("-.")
