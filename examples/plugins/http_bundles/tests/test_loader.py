"""The loader against a real loopback HTTP server: pinning, the cache, digests, and hostile bundles.
(The shipped loader suite runs it inside a real kernel: see the README.)"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from tenantflow_http_bundles.conformance import bundle
from tenantflow_http_bundles.loader import MAX_ENTRIES, BundleLoader, prefixes_from_env

from tenantflow.kernel.errors import InvalidArgument, NotFound, ResourceExhausted

WF = "from tenantflow.workflow import WorkflowEntrypoint\n\nclass Flow(WorkflowEntrypoint):\n    pass\n"
LIMIT = 512 * 1024  # room for an archive of MAX_ENTRIES + 1 empty files


@dataclass
class Site:
    """What the server answers: ``bodies`` by path; ``lie`` sends a smaller Content-Length than the
    body's; ``stream`` sends the body without one; ``moved`` redirects; ``hits`` counts requests."""

    base: str = ""
    bodies: dict[str, bytes] = field(default_factory=dict)
    stream: set[str] = field(default_factory=set)
    moved: dict[str, str] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)

    def put(self, path: str, data: bytes) -> str:
        self.bodies[path] = data
        return f"{self.base}{path}"


@pytest.fixture
def site() -> Iterator[Site]:
    state = Site()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            state.hits[self.path] = state.hits.get(self.path, 0) + 1
            if self.path in state.moved:
                self.send_response(302)
                self.send_header("Location", state.moved[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = state.bodies.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            if self.path in state.stream:
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
            else:
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def loader(site: Site, tmp_path: Path) -> BundleLoader:
    return BundleLoader(tmp_path / "cache", [f"{site.base}/{{tenant}}/"], LIMIT)


def test_an_unpinned_ref_is_fetched_once_and_pinned_to_its_digest(site: Site, loader: BundleLoader) -> None:
    data = bundle({"wf.py": WF, "lib/helpers.py": "X = 1\n"})
    url = site.put("/acme/app.zip", data)
    pinned = loader.pin("acme", url)
    assert pinned == f"{url}#sha256={hashlib.sha256(data).hexdigest()}"
    assert loader.pin("acme", pinned) == pinned  # a pinned ref pins to itself
    loaded = loader.load("acme", pinned)
    assert loaded.files == {"wf.py": WF.encode(), "lib/helpers.py": b"X = 1\n"} and loaded.runtime == "python"
    assert site.hits["/acme/app.zip"] == 1 and loader.fetches == 1  # pinned, loaded: fetched once


def test_the_cache_outlives_the_server_copy_and_a_changed_copy_is_refused(
    site: Site, loader: BundleLoader, tmp_path: Path
) -> None:
    url = site.put("/acme/app.zip", bundle({"wf.py": WF}))
    pinned = loader.pin("acme", url)
    site.put("/acme/app.zip", bundle({"wf.py": WF + "# v2\n"}))  # replaced at the same URL
    assert loader.load("acme", pinned).files == {"wf.py": WF.encode()}  # the pinned bytes, from the cache
    fresh = BundleLoader(tmp_path / "other-cache", loader.prefixes, LIMIT)  # a node without the copy
    with pytest.raises(NotFound, match="changed after it was pinned"):
        fresh.load("acme", pinned)


def test_refs_are_checked_before_any_fetch(site: Site, loader: BundleLoader) -> None:
    url = site.put("/acme/app.zip", bundle({"wf.py": WF}))
    for ref, fragment in [
        (f"{site.base}/other/app.zip", "not under a bundle prefix allowed for tenant 'acme'"),
        (f"{site.base}/acme/../other/app.zip", "'.' or '..'"),
        ("http://example.com/acme/app.zip", "only for loopback"),
        ("ftp://example.com/app.zip", "expected https://"),
        (f"{url}#sha256=ABC", "64 lowercase hex"),
        (f"{url}#md5=1", "expected https://"),
    ]:
        with pytest.raises(InvalidArgument, match=fragment.replace(".", r"\.").replace("(", r"\(")):
            loader.pin("acme", ref)
    assert site.hits == {}
    with pytest.raises(InvalidArgument, match="TENANTFLOW_BUNDLE_PREFIXES"):
        BundleLoader(loader.cache, [], LIMIT).pin("acme", url)


def test_missing_bundles_and_redirects_are_refused(site: Site, loader: BundleLoader) -> None:
    with pytest.raises(NotFound, match="HTTP 404"):
        loader.pin("acme", f"{site.base}/acme/none.zip")
    site.put("/elsewhere/app.zip", bundle({"wf.py": WF}))
    site.moved["/acme/app.zip"] = f"{site.base}/elsewhere/app.zip"
    with pytest.raises(InvalidArgument, match="redirects"):
        loader.pin("acme", f"{site.base}/acme/app.zip")
    assert "/elsewhere/app.zip" not in site.hits


def test_size_is_bounded_before_reading(site: Site, loader: BundleLoader) -> None:
    big = site.put("/acme/big.zip", b"\0" * (LIMIT + 1))
    with pytest.raises(ResourceExhausted, match=f"{LIMIT + 1} bytes, over the {LIMIT}-byte limit"):
        loader.pin("acme", big)  # refused on its Content-Length
    site.stream.add("/acme/big.zip")
    with pytest.raises(ResourceExhausted, match=f"over the {LIMIT}-byte limit"):
        loader.pin("acme", big)  # no Content-Length: reading stops one byte past the limit


@pytest.mark.parametrize(
    ("files", "error", "fragment"),
    [
        ({"/etc/wf.py": WF}, InvalidArgument, "'/etc/wf.py' is not a plain relative path"),
        ({"../wf.py": WF}, InvalidArgument, "'../wf.py' is not a plain relative path"),
        ({"a/./wf.py": WF}, InvalidArgument, "is not a plain relative path"),
        ({"C:/wf.py": WF}, InvalidArgument, "is not a plain relative path"),
        (
            {f"m{i}.py": "" for i in range(MAX_ENTRIES + 1)},
            InvalidArgument,
            f"over the limit of {MAX_ENTRIES}",
        ),
        ({"wf.py": "x" * LIMIT, "b.py": "y"}, ResourceExhausted, "unpacks to more than"),
        ({}, InvalidArgument, "holds no files"),
    ],
    ids=["absolute", "dot-dot", "dot", "drive", "too-many", "too-large", "empty"],
)
def test_hostile_zips_are_refused(
    site: Site, loader: BundleLoader, files: dict[str, str], error: type[Exception], fragment: str
) -> None:
    url = site.put("/acme/bad.zip", bundle(files))
    with pytest.raises(error, match=fragment.replace(".", r"\.")):
        loader.pin("acme", url)
    assert not list(loader.cache.rglob("*.zip"))  # nothing refused is cached


def test_the_operator_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "TENANTFLOW_BUNDLE_PREFIXES", "https://code.example/{tenant}/, https://shared.example/"
    )
    assert prefixes_from_env() == ["https://code.example/{tenant}/", "https://shared.example/"]
    monkeypatch.setenv("TENANTFLOW_BUNDLE_PREFIXES", "https://code.example/t")
    with pytest.raises(ValueError, match="must be an http\\(s\\) URL ending in '/'"):
        prefixes_from_env()
