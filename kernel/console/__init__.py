"""The browser console's files (``tenantflow serve --ui``): one HTML page, one JS module, one
stylesheet, shipped in the package as they are (no build step). The console is a client of the
HTTP/JSON API like any other: these files are all the server adds for it."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# The page runs only its own script and style and talks only to its own origin; nothing may frame it.
HEADERS = (
    ("content-security-policy",
     "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
     "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-cache"),
)  # fmt: skip


@dataclass(frozen=True)
class Asset:
    content_type: str
    body: bytes


def load() -> dict[str, Asset]:
    """URL path -> file: ``/`` is the page, ``/ui/<name>`` each file of this package's ``static``."""
    found = {}
    for entry in resources.files(__name__).joinpath("static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in TYPES:
            found[f"/ui/{entry.name}"] = Asset(TYPES[suffix], entry.read_bytes())
    found["/"] = found["/ui/index.html"]
    return found
