"""Two kernels can never share a lease owner by accident: one kernel per data directory, and the
default node id differs between data directories (it used to be "local" for every kernel)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import TEST_LIMITS, KernelProcess


def test_a_second_kernel_on_one_data_dir_is_refused(tmp_path: Path) -> None:
    first = KernelProcess(tmp_path / "data", TEST_LIMITS)
    first.start()
    try:
        second = subprocess.run(
            [sys.executable, "-m", "tenantflow.kernel.cli", "serve", "--listen", "127.0.0.1:0",
             "--data-dir", str(tmp_path / "data"), *TEST_LIMITS],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode != 0
        assert "another kernel is running with --data-dir" in second.stderr, second.stderr
    finally:
        first.stop()
    first.start()  # the lock dies with its holder: the same directory serves again
    first.stop()


def _node_of(kernel: KernelProcess) -> str:
    for line in kernel.lines:
        if line.startswith("{"):
            node = json.loads(line).get("node")
            if node:
                return str(node)
    raise AssertionError("no JSON log line names the node:\n" + "\n".join(kernel.lines))


def test_default_node_ids_differ_by_data_dir_and_survive_restarts(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    args = [*TEST_LIMITS, "--storage", storage, "--log-format", "json"]
    a, b = KernelProcess(tmp_path / "a", args), KernelProcess(tmp_path / "b", args)
    a.start()
    b.start()
    try:
        node_a, node_b = _node_of(a), _node_of(b)
        assert node_a != node_b
    finally:
        a.stop()
        b.stop()
    a.start()
    try:
        assert _node_of(a) == node_a
    finally:
        a.stop()
