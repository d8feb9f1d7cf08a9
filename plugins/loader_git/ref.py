"""Parsing git code refs: ``git+<file|https>://<repo>@<rev>[?runtime=<name>]#<path/to/module.py>``."""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, replace

from tenantflow.kernel.errors import InvalidArgument

SCHEMES = ("git+file", "git+https")
SHA = re.compile(r"^[0-9a-f]{40}$")
_REV = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./+-]{0,254}$")
_HOST_PATH = re.compile(r"^[A-Za-z0-9.-]+(?::[0-9]{1,5})?/[^\s@?#]+$")
_RUNTIME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,49}$")
FORM = "git+file:///path/to/repo.git@<branch|tag|commit>#<path/to/module.py>"


@dataclass(frozen=True)
class GitRef:
    """A parsed git ref. ``location`` is a filesystem path (git+file) or ``host/path`` (git+https)."""

    scheme: str
    location: str
    rev: str
    path: str
    runtime: str = "python"

    @property
    def url(self) -> str:
        """The repository without rev and path: ``/srv/git/x.git`` or ``https://host/x.git``."""
        return self.location if self.scheme == "git+file" else f"https://{self.location}"

    @property
    def module_dir(self) -> str:
        """The module's directory in the commit ('' for the top level): the bundle's root."""
        return posixpath.dirname(self.path)

    @property
    def entry(self) -> str:
        """The module name the sandbox imports: the file name without ``.py``."""
        return posixpath.basename(self.path)[:-3]

    @property
    def pinned(self) -> bool:
        return bool(SHA.match(self.rev))

    def at(self, sha: str) -> GitRef:
        return replace(self, rev=sha)

    def __str__(self) -> str:
        query = "" if self.runtime == "python" else f"?runtime={self.runtime}"
        return f"{self.scheme}://{self.location}@{self.rev}{query}#{self.path}"


def parse(ref: str) -> GitRef:
    """Split and check a git ref; raise ``InvalidArgument`` saying what is wrong and the expected form."""

    def bad(why: str) -> InvalidArgument:
        return InvalidArgument(f"bad git ref {ref!r}: {why}; expected {FORM}")

    scheme, sep, rest = ref.partition("://")
    if not sep or scheme not in SCHEMES:
        raise bad(f"the scheme must be one of {', '.join(SCHEMES)}")
    rest, sep, path = rest.partition("#")
    if not sep or not path:
        raise bad("no module path after '#'")
    rest, _, query = rest.partition("?")
    runtime = "python"
    if query:
        key, _, value = query.partition("=")
        if key != "runtime" or not _RUNTIME.match(value):
            raise bad(f"unknown query {query!r} (only runtime=<name> is understood)")
        runtime = value
    location, sep, rev = rest.rpartition("@")
    if not sep or not location:
        raise bad("no '@<branch|tag|commit>' after the repository")
    if not _REV.match(rev) or ".." in rev or rev.endswith((".lock", "/", ".")):
        raise bad(f"{rev!r} is not a branch, tag or commit name")
    if scheme == "git+file" and (not location.startswith("/") or "\0" in location):
        raise bad("a git+file repository is an absolute path: git+file:///path/to/repo.git")
    if scheme == "git+https" and (not _HOST_PATH.match(location) or "/../" in f"{location}/"):
        raise bad("a git+https repository is https://host/path, without credentials")
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") for p in parts) or not path.endswith(".py"):
        raise bad(f"{path!r} is not a relative path to a .py module")
    stem = parts[-1][:-3]
    if not stem.isidentifier() or stem == "__init__":
        raise bad(f"{parts[-1]!r} is not an importable module name (letters, digits, '_'; not __init__)")
    return GitRef(scheme, location, rev, path, runtime)
