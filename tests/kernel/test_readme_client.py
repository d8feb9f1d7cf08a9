"""The README's Python client example runs to completion as written (its address and tenant aside)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import KernelProcess

ROOT = Path(__file__).parents[2]


def test_the_readme_client_example_runs_as_written(kernel: KernelProcess, tenant: str) -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("The Python client wraps all of it.")[1]
    code = re.search(r"```python\n(.*?)```", block, re.S)
    assert code is not None
    source = code.group(1).replace("127.0.0.1:7450", kernel.address).replace('"acme"', repr(tenant))
    run = subprocess.run(
        [sys.executable, "-c", source], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert "('approval', 'waiting')" in lines[0]
    assert any(line.startswith("complete {'image':") for line in lines)
    assert lines[-1].startswith("FAILED_PRECONDITION") and "nothing to resume" in lines[-1]
