"""Start and stop a real kernel process for benchmarks."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
from pathlib import Path


class BenchKernel:
    """``tenantflow serve`` on a fresh data dir and a free loopback port; its log is ``log_path``."""

    def __init__(self, *args: str, synchronous: str = "FULL") -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix="tenantflow-bench-"))
        storage = f"sqlite:///{self.data_dir / 'tenantflow.sqlite3'}?synchronous={synchronous}"
        self.log_path = self.data_dir / "kernel.log"
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tenantflow.kernel.cli", "serve", "--listen", "127.0.0.1:0",
                 "--data-dir", str(self.data_dir), "--storage", storage, *args],
                stdout=subprocess.PIPE, stderr=log, text=True,
            )  # fmt: skip
        assert self.proc.stdout is not None
        self.address = ""
        for line in self.proc.stdout:
            if "listening on" in line:
                self.address = line.split("listening on ")[1].split()[0]
                break
        if not self.address:
            raise SystemExit("kernel did not start")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for _ in self.proc.stdout:
            pass

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)
