"""Start and stop a real kernel process for benchmarks."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
from pathlib import Path


class BenchKernel:
    """``tenantflow serve`` on a fresh data dir and a free loopback port; its log is ``log_path``."""

    def __init__(self, *args: str, synchronous: str = "FULL", metrics: bool = False) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix="tenantflow-bench-"))
        self.storage_path = self.data_dir / "tenantflow.sqlite3"
        storage = f"sqlite:///{self.storage_path}?synchronous={synchronous}"
        self.log_path = self.data_dir / "kernel.log"
        if metrics:
            args = (*args, "--metrics-listen", "127.0.0.1:0")
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tenantflow.kernel.cli", "serve", "--listen", "127.0.0.1:0",
                 "--data-dir", str(self.data_dir), "--storage", storage, *args],
                stdout=subprocess.PIPE, stderr=log, text=True,
            )  # fmt: skip
        assert self.proc.stdout is not None
        self.address = ""
        self.metrics_url = ""  # the Prometheus endpoint, when started with metrics=True
        for line in self.proc.stdout:
            if line.startswith("tenantflow metrics on "):
                self.metrics_url = line.split("tenantflow metrics on ")[1].strip()
            if "listening on" in line:
                self.address = line.split("listening on ")[1].split()[0]
                break
        if not self.address:
            raise SystemExit(f"kernel did not start; see its log: {self.log_path}")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for _ in self.proc.stdout:
            pass

    @property
    def pid(self) -> int:
        return self.proc.pid

    def storage_bytes(self) -> int:
        """The SQLite file with its WAL and shared-memory files."""
        return sum(p.stat().st_size for p in self.data_dir.glob("tenantflow.sqlite3*"))

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)
