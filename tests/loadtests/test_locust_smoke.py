"""CI smoke of the locust suite: a 20-second headless run of loadtests/locustfile.py (every
scenario at once) against a real kernel; any locust failure (an RPC error or a wrong answer a user
checked) fails the test, so the load suite cannot rot."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TEST_LIMITS, KernelProcess

ROOT = Path(__file__).resolve().parents[2]
# The noisy tenant's flood is capped low here: a smoke must not load the machine for later tests.
SMOKE_LIMITS = [*TEST_LIMITS, "--tenant-create-rate", "10", "--tenant-create-burst", "100"]


@pytest.fixture
def smoke_kernel(tmp_path: Path) -> Iterator[KernelProcess]:
    k = KernelProcess(tmp_path / "kernel", SMOKE_LIMITS)
    k.start()
    yield k
    k.stop()


def test_every_scenario_runs_20_s_without_a_failure(smoke_kernel: KernelProcess, tmp_path: Path) -> None:
    # Never import locust here: it monkey-patches the whole process for gevent.
    if importlib.util.find_spec("locust") is None:
        pytest.fail("locust is not installed: `make test` installs it (pip install -e '.[dev,load]')")
    out = tmp_path / "locust"
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
           "-u", "6", "-r", "6", "-t", "20s", "--stop-timeout", "10", "--host", smoke_kernel.address,
           "--csv", str(out), "--only-summary"]  # fmt: skip
    env = {**os.environ, "TENANTFLOW_SCENARIO": "all"}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
    report = run.stdout[-6000:] + run.stderr[-6000:]
    with open(f"{out}_failures.csv") as f:
        failures = list(csv.DictReader(f))
    assert not failures, f"locust reported failures: {failures}\n{report}"
    assert run.returncode == 0, report
    with open(f"{out}_stats.csv") as f:
        stats = {row["Name"]: row for row in csv.DictReader(f)}
    # Each scenario really ran: tenants published, created, were checked, were woken.
    for name in ("Publish", "Create", "Get", "SendEvent", "quiet Create", "quiet create→complete"):
        assert int(stats.get(name, {}).get("Request Count", 0)) > 0, f"no {name!r} requests\n{report}"
    noisy = [n for n in stats if n.startswith("noisy CreateBatch")]
    assert noisy, f"the noisy tenant never sent a batch\n{report}"
    assert int(stats["Aggregated"]["Failure Count"]) == 0, report


def test_make_loadtest_takes_locusts_run_time_flag_too() -> None:
    spec = importlib.util.spec_from_file_location("loadtest_cli", ROOT / "loadtests" / "loadtest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "loadtests"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "loadtests"))
    assert module.parse_args(["--run-time", "5s"]).duration == "5s"
    assert module.parse_args(["-t", "2m"]).duration == "2m"
