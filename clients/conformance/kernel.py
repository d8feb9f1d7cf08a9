"""A real kernel for the suites: ``tenantflow serve`` as a subprocess on a loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from tenantflow.client import Client

TEST_LIMITS = ["--cpu-seconds", "3", "--memory-mb", "256"]


@dataclass
class KernelProcess:
    """A ``tenantflow serve`` subprocess; ``address`` is where it listens once :meth:`start` returns."""

    data_dir: Path
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment
    proc: subprocess.Popen[str] | None = None
    address: str = ""
    lines: list[str] = field(default_factory=list)

    def start(self, timeout: float = 30.0) -> None:
        """Start the kernel and wait until it listens (its output is kept in :attr:`lines`)."""
        self.lines = []
        cmd = [sys.executable, "-m", "tenantflow.kernel.cli", "serve", "--listen", "127.0.0.1:0",
               "--data-dir", str(self.data_dir), *self.args]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
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
        """A client of this kernel (close it, or use it in a ``with``)."""
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
        """Terminate (SIGTERM, then SIGKILL after 15 s); a no-op when never started."""
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
