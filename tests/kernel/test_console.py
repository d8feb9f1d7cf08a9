"""``tenantflow serve --ui``: the console's files, served from the package on the HTTP API's port
beside the API itself, and nowhere without the flag."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TEST_LIMITS, KernelProcess
from tests.kernel.test_http_api import connection, http_url, post

FILES = {
    "/": "text/html",
    "/ui/index.html": "text/html",
    "/ui/console.js": "text/javascript",
    "/ui/highlight.js": "text/javascript",  # imported by console.js
    "/ui/console.css": "text/css",
}


@pytest.fixture(scope="module")
def ui_kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProcess]:
    k = KernelProcess(tmp_path_factory.mktemp("ui"), [*TEST_LIMITS, "--http-listen", "127.0.0.1:0", "--ui"])
    k.start()
    yield k
    k.stop()


def get(url: str, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = connection(url)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_the_console_is_served_with_ui_beside_the_api(ui_kernel: KernelProcess) -> None:
    url = http_url(ui_kernel)
    for path, media in FILES.items():
        status, headers, body = get(url, path)
        assert status == 200 and headers["content-type"].startswith(media), (path, status, headers)
        assert int(headers["content-length"]) == len(body) > 0
        assert "script-src 'self'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"
    page = get(url, "/")[2].decode()
    for linked in re.findall(r'(?:href|src)="(/ui/[^"]+)"', page):  # everything the page loads is there
        assert get(url, linked)[0] == 200, linked
    status, headers, body = get(url, "/ui/console.js", "HEAD")
    assert (status, body) == (200, b"") and int(headers["content-length"]) > 0
    assert get(url, "/ui/missing.js")[0] == 404
    assert post(url, "Workflows/List", {"tenant": "console"})[0] == 200  # the API on the same port


def test_without_ui_nothing_but_the_api_is_served(tmp_path: Path) -> None:
    kernel = KernelProcess(tmp_path / "kernel", [*TEST_LIMITS, "--http-listen", "127.0.0.1:0"])
    kernel.start()
    try:
        url = http_url(kernel)
        for path in FILES:
            assert get(url, path)[0] == 404, path
    finally:
        kernel.stop()


def test_ui_without_an_http_port_is_refused(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tenantflow.kernel.cli", "serve", "--data-dir", str(tmp_path), "--ui"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "--ui" in result.stderr and "--http-listen" in result.stderr
