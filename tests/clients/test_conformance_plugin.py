"""The conformance suites' pytest plugin, run the way a plugin author runs it (a pytest subprocess
outside this checkout): what it asks for, what it says when a name or the plugin is missing, and
that a declared capability gap is a skip with its reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tenantflow.conformance.harness import StorageHarness

PLUGIN = ["-p", "tenantflow.conformance.plugin", "--pyargs", "tenantflow.conformance"]


def pytest_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_the_suites_say_what_they_need(tmp_path: Path) -> None:
    bare = pytest_run(tmp_path, "--pyargs", "tenantflow.conformance")
    assert bare.returncode != 0
    assert "need their plugin: pytest -p tenantflow.conformance.plugin" in bare.stdout + bare.stderr
    unnamed = pytest_run(tmp_path, *PLUGIN)
    assert unnamed.returncode == 4, unnamed.stdout
    assert "name what to test: --tenantflow-storage NAME, --tenantflow-runtime NAME" in unnamed.stderr


def test_a_name_no_plugin_handles_fails_naming_the_installed_ones(tmp_path: Path) -> None:
    done = pytest_run(tmp_path, *PLUGIN, "--tenantflow-storage", "nope", "-k", "immutable", "-x")
    assert done.returncode == 1, done.stdout
    assert "no installed plugin gives a conformance harness for storage 'nope' (installed: " in done.stdout
    assert "sqlite" in done.stdout


def test_a_capability_the_harness_lacks_is_skipped_with_its_reason(tmp_path: Path) -> None:
    done = pytest_run(tmp_path, *PLUGIN, "--tenantflow-storage", "sqlite", "-k", "injected_faults")
    assert done.returncode == 0, done.stdout
    assert "10 skipped" in done.stdout and "passed" not in done.stdout
    assert "sqlite lacks faults: SQLite's commits do not fail in ways a retry must survive" in done.stdout


def test_a_harness_may_not_lack_what_the_suites_do_not_know() -> None:
    with pytest.raises(ValueError, match=r"lacks unknown capabilities \['fautls'\]"):
        StorageHarness("mine", {"fautls": "typo"})
