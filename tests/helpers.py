"""Helpers shared by tests: inline tenant source, publishing, polling."""

from __future__ import annotations

import textwrap
import time

from tenantflow.client import Client


def source(code: str) -> str:
    """Dedent tenant source written inline in a test."""
    return textwrap.dedent(code).lstrip()


def publish(client: Client, tenant: str, code: str, name: str = "wf", runtime: str = "python") -> str:
    """Publish one-module tenant code; return its pinned ref."""
    return client.publish(tenant, name, {"wf.py": source(code)}, runtime=runtime).ref


def wait_for(predicate: object, timeout: float = 20.0, interval: float = 0.02) -> None:
    """Poll ``predicate()`` until true, or fail naming the time-out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")
