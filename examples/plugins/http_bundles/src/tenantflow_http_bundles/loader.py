"""Fetch a bundle once, check it, keep it: every later load of the same pinned ref reads the copy.

Limits, all checked before the bytes are trusted: the download is at most ``max_bytes`` (the
kernel's ``max_code_bytes``; a larger ``Content-Length`` is refused before reading, and reading
stops one byte past the limit), the archive holds at most :data:`MAX_ENTRIES` files whose sizes add
up to at most ``max_bytes``, and every entry name is relative, with no ``.``/``..`` part. Redirects
are refused (a prefix names where code may come from, not where it may be sent on to).
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import re
import tempfile
import threading
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import parse_qs, quote, unquote, urlsplit, urlunsplit

from tenantflow.kernel.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from tenantflow.kernel.loader import CodeBundle

ENV = "TENANTFLOW_BUNDLE_PREFIXES"
MAX_ENTRIES = 2000
TIMEOUT_SECONDS = 30.0
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SHAPE = "expected https://host/path/bundle.zip[#sha256=<64 hex digits>[&runtime=<name>]]"


def prefixes_from_env() -> list[str]:
    """The URL prefixes the operator allows (``$TENANTFLOW_BUNDLE_PREFIXES``, comma-separated)."""
    prefixes = [p.strip() for p in os.environ.get(ENV, "").split(",") if p.strip()]
    for prefix in prefixes:
        if urlsplit(prefix).scheme not in ("https", "http") or not prefix.endswith("/"):
            raise ValueError(f"{ENV}: {prefix!r} must be an http(s) URL ending in '/'")
    return prefixes


@dataclass(frozen=True)
class BundleRef:
    """A parsed ref: the bundle's URL (no fragment), its pinned digest if any, and the runtime."""

    url: str
    digest: str | None
    runtime: str

    def pinned(self, digest: str) -> str:
        """The ref pinned to ``digest`` (the same string for the same bundle, every time)."""
        runtime = f"&runtime={self.runtime}" if self.runtime != "python" else ""
        return f"{self.url}#sha256={digest}{runtime}"


def parse(ref: str) -> BundleRef:
    """Check a ref's shape (``InvalidArgument`` says what is wrong); no network."""
    parts = urlsplit(ref)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise InvalidArgument(f"bad bundle ref {ref!r}: {_SHAPE}")
    if parts.scheme == "http" and parts.hostname not in LOOPBACK:
        raise InvalidArgument(f"bad bundle ref {ref!r}: http:// is only for loopback hosts; use https://")
    if parts.username or parts.password:
        raise InvalidArgument(f"bad bundle ref {ref!r}: credentials do not belong in a code ref")
    segments = unquote(parts.path).split("/")
    if "\\" in parts.path or any(s in (".", "..") for s in segments):
        raise InvalidArgument(f"bad bundle ref {ref!r}: the path may not hold '.' or '..' parts")
    options = parse_qs(parts.fragment, keep_blank_values=True) if parts.fragment else {}
    if set(options) - {"sha256", "runtime"} or any(len(v) > 1 for v in options.values()):
        raise InvalidArgument(f"bad bundle ref {ref!r}: {_SHAPE}")
    digest = options.get("sha256", [None])[0]
    if digest is not None and not _HEX64.match(digest):
        raise InvalidArgument(f"bad bundle ref {ref!r}: sha256 must be 64 lowercase hex digits")
    url = urlunsplit((parts.scheme, parts.netloc, parts.path, parts.query, ""))
    return BundleRef(url, digest, options.get("runtime", ["python"])[0] or "python")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        raise InvalidArgument(
            f"{req.full_url} redirects (HTTP {code}) to {newurl}: bundles are not fetched across redirects"
        )


def fetch(url: str, max_bytes: int) -> bytes:
    """The body at ``url``, at most ``max_bytes`` of it (else ``ResourceExhausted``)."""
    opener = urllib.request.build_opener(_NoRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": "tenantflow-http-bundles"})
    try:
        with opener.open(request, timeout=TIMEOUT_SECONDS) as response:
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise ResourceExhausted(
                    f"the bundle at {url} is {length} bytes, over the {max_bytes}-byte limit"
                )
            data: bytes = response.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 410):
            raise NotFound(f"no bundle at {url} (HTTP {exc.code})") from None
        raise Unavailable(f"fetching {url} failed: HTTP {exc.code} {exc.reason}; retry later") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unavailable(f"could not fetch {url} ({reason}); retry later") from None
    if len(data) > max_bytes:
        raise ResourceExhausted(f"the bundle at {url} is over the {max_bytes}-byte limit")
    return data


def _check_name(name: str, where: str) -> None:
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\0" in name
        or ":" in parts[0]
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise InvalidArgument(f"{where}: entry {name!r} is not a plain relative path")


def unpack(data: bytes, max_bytes: int, where: str) -> dict[str, bytes]:
    """The files of a zip bundle, each entry checked (``where`` names it in errors)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise InvalidArgument(f"{where} is not a zip archive") from None
    with archive:
        entries = [info for info in archive.infolist() if not info.is_dir()]
        if len(entries) > MAX_ENTRIES:
            raise InvalidArgument(f"{where} holds {len(entries)} files, over the limit of {MAX_ENTRIES}")
        if sum(info.file_size for info in entries) > max_bytes:
            raise ResourceExhausted(f"{where} unpacks to more than the {max_bytes}-byte limit")
        files: dict[str, bytes] = {}
        for info in entries:
            _check_name(info.filename, where)
            if info.filename in files:
                raise InvalidArgument(f"{where}: entry {info.filename!r} appears twice")
            try:
                files[info.filename] = archive.read(info)  # stops at the entry's declared size
            except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError) as exc:
                raise InvalidArgument(f"{where}: entry {info.filename!r} cannot be read ({exc})") from None
    if not files:
        raise InvalidArgument(f"{where} holds no files")
    return files


class BundleLoader:
    """Loads ``https://`` (and loopback ``http://``) zip bundles, cached under ``cache`` per tenant."""

    schemes: tuple[str, ...] = ("https", "http")

    def __init__(self, cache: Path, prefixes: Sequence[str], max_bytes: int) -> None:
        self.cache = cache
        self.prefixes = list(prefixes)
        self.max_bytes = max_bytes
        self.fetches = 0  # downloads made (the cache's witness)
        self._guard = threading.Lock()
        self._locks: dict[Path, threading.Lock] = {}

    def pin(self, tenant: str, ref: str) -> str:
        """Fetch an unpinned ref once and pin it to its digest; a pinned one is fetched and
        verified unless already cached."""
        bundle = self._allowed(tenant, ref)
        if bundle.digest is not None:
            self._bytes(tenant, bundle, bundle.digest)
            return bundle.pinned(bundle.digest)
        data = fetch(bundle.url, self.max_bytes)
        self.fetches += 1
        unpack(data, self.max_bytes, bundle.url)
        digest = hashlib.sha256(data).hexdigest()
        self._keep(self._path(tenant, digest), data)
        return bundle.pinned(digest)

    def load(self, tenant: str, pinned: str) -> CodeBundle:
        """The files of a pinned bundle: the cached copy, or fetched and verified against the digest."""
        bundle = self._allowed(tenant, pinned)
        if bundle.digest is None:
            raise InvalidArgument(f"{pinned!r} is not pinned (no #sha256=...)")
        data = self._bytes(tenant, bundle, bundle.digest)
        return CodeBundle(ref=pinned, runtime=bundle.runtime, files=unpack(data, self.max_bytes, bundle.url))

    def _allowed(self, tenant: str, ref: str) -> BundleRef:
        bundle = parse(ref)
        if not self.prefixes:
            raise InvalidArgument(f"this kernel allows no bundle URLs: its operator sets {ENV}")
        mine = [p.replace("{tenant}", quote(tenant, safe="")) for p in self.prefixes]
        if not any(bundle.url.startswith(p) for p in mine):
            raise InvalidArgument(f"{bundle.url} is not under a bundle prefix allowed for tenant {tenant!r}")
        return bundle

    def _path(self, tenant: str, digest: str) -> Path:
        return self.cache / hashlib.sha256(tenant.encode()).hexdigest()[:32] / f"{digest}.zip"

    def _bytes(self, tenant: str, bundle: BundleRef, digest: str) -> bytes:
        path = self._path(tenant, digest)
        with self._guard:
            lock = self._locks.setdefault(path, threading.Lock())
        with lock:  # one download per bundle, however many ask at once
            try:
                data = path.read_bytes()
                if hashlib.sha256(data).hexdigest() == digest:
                    return data
            except FileNotFoundError:
                pass
            data = fetch(bundle.url, self.max_bytes)
            self.fetches += 1
            got = hashlib.sha256(data).hexdigest()
            if got != digest:
                raise NotFound(
                    f"the bundle at {bundle.url} has sha256={got}, not the pinned sha256={digest}: it "
                    "changed after it was pinned (publish new code at a new URL, or pin the new digest)"
                )
            unpack(data, self.max_bytes, bundle.url)
            self._keep(path, data)
            return data

    @staticmethod
    def _keep(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
