"""The console in a real browser: headless Chromium (the system's), driven by Playwright from the
Node.js script in tests/console/, against a real kernel with --auth-tokens and --list-tenants."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tenantflow.kernel.auth import new_token
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import wait_for
from tests.kernel.test_http_api import WAITS, files, http_url, post

CONSOLE_DIR = Path(__file__).parents[1] / "console"
CHROMIUM = ("chromium", "chromium-browser")
WAITING = 12  # seeded instances that wait: more than one page of 10
BOOM = (
    WAITS
    + """

class Boom(WorkflowEntrypoint):
    async def run(self, event, step):
        raise ValueError("the report failed")
"""
)


def test_playground_run_event_and_instance_list_in_chromium(tmp_path: Path) -> None:
    node = shutil.which("node")
    chromium = next(filter(None, map(shutil.which, CHROMIUM)), None)
    if node is None or chromium is None:
        missing = "Node.js" if node is None else "Chromium"
        if os.environ.get("CI"):  # .ci/run installs Chromium: in CI this test never skips
            pytest.fail(f"{missing} is not installed, and CI must run the browser test")
        pytest.skip(f"{missing} is not installed (apt-get install chromium; .ci/run does)")
    if not (CONSOLE_DIR / "node_modules" / "playwright-core").is_dir():
        pytest.fail("tests/console has no node_modules: run `make node-deps` (make test does)")
    token, entry = new_token("console", ["acme", "acme-*"])
    admin, admin_entry = new_token("admin", ["*"])
    (tmp_path / "tokens.json").write_text(json.dumps({"tokens": [entry, admin_entry]}))
    args = [
        *TEST_LIMITS,
        "--http-listen",
        "127.0.0.1:0",
        "--ui",
        "--list-tenants",
        "--auth-tokens",
        str(tmp_path / "tokens.json"),
    ]
    kernel = KernelProcess(tmp_path / "kernel", args)
    kernel.start()
    try:
        url = http_url(kernel)
        status, code = post(
            url, "Code/Publish", {"tenant": "acme", "name": "waits", "files": files(BOOM)}, token
        )
        assert status == 200, code
        for other in ("acme-eu", "globex"):  # the picker offers acme-eu, never globex
            assert (
                post(url, "Code/Publish", {"tenant": other, "name": "w", "files": files(WAITS)}, admin)[0]
                == 200
            )
        seed_schedules(url, token, code["ref"])
        for n in range(WAITING):
            request = {"tenant": "acme", "workflow": "Waits", "code": code["ref"], "id": f"waits-{n:02}"}
            assert post(url, "Workflows/Create", request, token)[0] == 200
        shots = tmp_path / "screenshots"
        shots.mkdir()
        env = {
            **os.environ, "CONSOLE_URL": f"{url}/", "CHROMIUM": chromium, "TENANT": "acme", "TOKEN": token,
            "WAITING": str(WAITING), "SCREENSHOTS": str(shots),
        }  # fmt: skip
        result = subprocess.run(
            [node, "console.test.mjs"], cwd=CONSOLE_DIR, env=env, capture_output=True, text=True, timeout=240
        )
        assert result.returncode == 0, f"the browser test failed:\n{result.stdout}\n{result.stderr}"
        assert "console browser test: ok" in result.stdout
        taken = {p.name for p in shots.glob("*.png")}
        assert {"playground.png", "instance.png", "instances.png", "schedules.png"} <= taken, taken
    finally:
        kernel.stop()


def seed_schedules(url: str, token: str, ref: str) -> None:
    """An hourly schedule not fired yet, and one that fired (every second) and was paused: its last
    instance errored, so the counts the browser checks stay as seeded."""
    hourly = {"tenant": "acme", "name": "hourly-report", "cron": "0 * * * *", "timeZone": "Europe/Paris",
              "workflow": "Waits", "code": ref}  # fmt: skip
    assert post(url, "Schedules/Create", hourly, token)[0] == 200
    ticking = {
        "tenant": "acme",
        "name": "every-second",
        "cron": "* * * * * *",
        "workflow": "Boom",
        "code": ref,
    }
    assert post(url, "Schedules/Create", ticking, token)[0] == 200
    ref_of = {"tenant": "acme", "name": "every-second"}
    wait_for(
        lambda: post(url, "Schedules/Get", ref_of, token)[1].get("lastInstanceId"), timeout=30, interval=0.1
    )
    assert post(url, "Schedules/Pause", ref_of, token)[0] == 200
