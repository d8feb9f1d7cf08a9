"""Collecting the suites without their plugin would only fail on missing fixtures: say what to add."""

from __future__ import annotations

import pytest

PLUGIN = "tenantflow.conformance.plugin"


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin(PLUGIN):
        raise pytest.UsageError(
            f"the tenantflow conformance suites need their plugin: pytest -p {PLUGIN} "
            "--pyargs tenantflow.conformance --tenantflow-storage NAME ..."
        )
