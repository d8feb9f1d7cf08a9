"""The `tenantflow` CLI against a real kernel: tables for people, errors with exit code 1."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import KernelProcess
from tests.helpers import wait_for

ROOT = Path(__file__).parents[2]


def tf(kernel: KernelProcess, *args: str, ok: bool = True) -> str:
    command = [sys.executable, "-m", "tenantflow.kernel.cli", args[0], "--address", kernel.address, *args[1:]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert (result.returncode == 0) == ok, result.stdout + result.stderr
    return result.stdout if ok else result.stderr


def test_publish_create_watch_event_status_list(kernel: KernelProcess, tenant: str) -> None:
    published = tf(
        kernel,
        "publish",
        "--tenant",
        tenant,
        "--name",
        "pipeline",
        str(ROOT / "examples/ci_pipeline/pipeline.py"),
    )
    assert published.splitlines()[0].split() == ["ref", "runtime", "workflows"]
    assert f"artifact://{tenant}/pipeline@sha256:" in published and "Pipeline" in published
    created = tf(kernel, "create", "--tenant", tenant, "--workflow", "Pipeline", "--code", f"artifact://{tenant}/pipeline",
                 "--params", '{"repo": "acme/web"}', "--id", "b1")  # fmt: skip
    assert "b1" in created and "queued" in created
    sent = tf(
        kernel,
        "send-event",
        "--tenant",
        tenant,
        "b1",
        "deploy-approval",
        "--payload",
        '{"approved": true, "by": "cli"}',
    )
    assert "inbox position 1" in sent
    watched = tf(kernel, "watch", "--tenant", tenant, "b1")
    for needle in (
        "▶ checkout",
        "✘ test  attempt 1",
        "↻ test",
        "✔ deploy",
        "status → complete",
    ):
        assert needle in watched, needle
    # the closing steps table: step, kind, status, attempts (column widths follow the longest kind)
    assert re.search(r"^test +do +complete +2 ", watched, re.M), watched
    assert re.search(r"^approval +wait_for_event +complete +0 ", watched, re.M), watched
    status = tf(kernel, "status", "--tenant", tenant, "b1")
    assert "complete" in status and "https://app.example" in status
    listed = tf(kernel, "list", "--tenant", tenant, "--status", "complete")
    assert listed.splitlines()[2].split()[:3] == ["b1", "Pipeline", "complete"]


def test_control_commands_and_errors(kernel: KernelProcess, tenant: str) -> None:
    tf(
        kernel,
        "publish",
        "--tenant",
        tenant,
        "--name",
        "onboarding",
        str(ROOT / "examples/onboarding/onboarding.py"),
    )
    tf(kernel, "create", "--tenant", tenant, "--workflow", "Onboarding", "--code", f"artifact://{tenant}/onboarding",
       "--params", '{"email": "a@b.c", "grace": "1 hour"}', "--id", "o1")  # fmt: skip
    assert "paused" in tf(kernel, "pause", "--tenant", tenant, "o1")  # paused, or waiting_for_pause
    wait_for(lambda: "paused" in tf(kernel, "status", "--tenant", tenant, "o1").split())
    assert "terminated" in tf(kernel, "terminate", "--tenant", tenant, "o1")
    assert "queued" in tf(kernel, "restart", "--tenant", tenant, "o1")
    assert tf(kernel, "delete", "--tenant", tenant, "o1").splitlines()[-1].split() == ["o1", "deleted"]
    assert "NOT_FOUND" in tf(kernel, "status", "--tenant", tenant, "o1", ok=False)
    error = tf(kernel, "status", "--tenant", tenant, "ghost", ok=False)
    assert error.startswith("error: NOT_FOUND: instance 'ghost' not found")


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--max-concurrent", "0", "0 is too small: use 1 or more"),
        ("--cpu-seconds", "-1", "-1 is too small: use a positive number"),
        ("--retention-days", "-1", "-1 is too small: use 0 or more"),
        ("--memory-mb", "lots", "'lots' is not a number"),
    ],
)
def test_serve_refuses_bad_settings(tmp_path: Path, flag: str, value: str, says: str) -> None:
    command = [
        sys.executable,
        "-m",
        "tenantflow.kernel.cli",
        "serve",
        "--data-dir",
        str(tmp_path),
        flag,
        value,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and f"argument {flag}: {says}" in result.stderr, result.stderr
