"""A client in a second language: the Node.js test suite beside this file, against a real kernel."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import KernelProcess

NODE_DIR = Path(__file__).parent / "node"


def test_node_client(kernel: KernelProcess, tenant: str) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed (the Node.js client test needs node and npm)")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("tests/clients/node has no node_modules: run `make node-deps` (make test does)")
    env = {**os.environ, "TENANTFLOW_ADDRESS": kernel.address, "TENANTFLOW_TENANT": tenant}
    result = subprocess.run(
        [node, "--test", "--test-reporter=spec", "client.test.mjs"],
        cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, f"node --test failed:\n{result.stdout}\n{result.stderr}"
    assert "# fail 0" in result.stdout or "fail 0" in result.stdout, result.stdout
