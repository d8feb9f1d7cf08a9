"""The loader suite's harness: a loopback HTTP server over a directory, one folder per tenant.

``pytest -p tenantflow.conformance.plugin --pyargs tenantflow.conformance --tenantflow-loader https``
"""

from __future__ import annotations

import functools
import io
import re
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc

from tenantflow.client import Client
from tenantflow.conformance.harness import LoaderHarness, LoaderSource
from tenantflow_http_bundles.loader import ENV

NOT_FOUND, INVALID = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT


def bundle(files: dict[str, str | bytes]) -> bytes:
    """A zip of ``files`` (names are written as given, so tests can make hostile ones)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return out.getvalue()


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class BundleSource(LoaderSource):
    """A tenant's folder on the server; a release replaces ``wf.zip`` at the same URL."""

    def __init__(self, tenant: str, folder: Path, base: str) -> None:
        self.folder = folder
        self.url = f"{base}/{tenant}/wf.zip"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "broken.zip").write_bytes(b"not a zip")
        (folder / "escape.zip").write_bytes(bundle({"../wf.py": "x = 1\n"}))
        super().__init__(tenant, bad=[
            (f"{base}/{tenant}/missing.zip", NOT_FOUND, "HTTP 404"),
            (f"{self.url}#sha256={'0' * 64}", NOT_FOUND, f"not the pinned sha256={'0' * 64}"),
            (f"{self.url}#sha256=abc", INVALID, "64 lowercase hex"),
            (f"http://example.com/{tenant}/wf.zip", INVALID, "only for loopback"),
            (f"{base}/someone-else/wf.zip", INVALID, "not under a bundle prefix"),
            (f"{base}/{tenant}/broken.zip", INVALID, "not a zip archive"),
            (f"{base}/{tenant}/escape.zip", INVALID, "'../wf.py' is not a plain relative path"),
        ])  # fmt: skip

    def release(self, client: Client, code: str) -> str:
        partial = self.folder / "wf.zip.part"
        partial.write_bytes(bundle({"wf.py": code}))
        partial.replace(self.folder / "wf.zip")  # the server never serves half a bundle
        return self.url

    def pinned(self) -> re.Pattern[str]:
        return re.compile(rf"^{re.escape(self.url)}#sha256=[0-9a-f]{{64}}$")


@dataclass
class BundleHarness(LoaderHarness):
    """Serves ``root`` on a loopback port for the suite's kernels, which allow ``<server>/{tenant}/``."""

    name: str = "https"
    _server: ThreadingHTTPServer | None = field(default=None, init=False, repr=False)

    def _base(self, root: Path) -> str:
        if self._server is None:
            handler = functools.partial(_Quiet, directory=str(root))
            self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def kernel_env(self, root: Path) -> dict[str, str]:
        return {ENV: f"{self._base(root)}/{{tenant}}/"}

    def source(self, tenant: str, root: Path) -> LoaderSource:
        return BundleSource(tenant, root / tenant, self._base(root))

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
