"""Operator grants (``--sandbox-writable-dir``) checked against the kernel's own state at start.

A grant that contains the data directory lets tenant code read other tenants' step outputs and
rewrite their published code; one inside the kernel's installation lets it replace the kernel's
own modules. So a grant must neither contain nor lie inside any path the kernel keeps state in or
runs from, compared after resolving symlinks and, for bind mounts, by directory identity.
"""

from __future__ import annotations

import importlib.util
import os
import site
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

# Packages whose directories make up the kernel's installation (an editable install spreads them).
_PACKAGES = (
    "tenantflow",
    "tenantflow.v1",
    "tenantflow.kernel",
    "tenantflow.plugins",
    "tenantflow.client",
    "tenantflow.workflow",
)


@dataclass(frozen=True)
class StatePath:
    """A path the kernel keeps state in or runs from, and what it is (for the message)."""

    what: str
    path: str


def storage_path(url: str) -> str:
    """The local file or directory a storage URL names ("" for a URL that names a host).

    ``sqlite:///abs``, ``sqlite:rel`` and ``sqlite://rel`` (a path, as the sqlite plugin reads
    it), ``kv+lmdb:///dir``, ``fdb:///cluster-file``; ``scheme://host/...`` names no local path."""
    scheme, sep, rest = url.partition(":")
    if not sep:
        return ""
    rest = rest.partition("?")[0]
    if rest.startswith("//"):
        netloc = urlsplit(url).netloc
        if netloc and scheme != "sqlite":
            return ""
        rest = rest[2:]
    return rest


def git_root_dir(root: str) -> str:
    """The local directory a ``--git-root`` covers ("" for a URL prefix): for a root with
    ``{tenant}``, the directory above the first component naming it, which holds every tenant's."""
    if root.startswith(("https://", "http://", "ssh://", "git://")):
        return ""
    parts = Path(root).parts
    for i, part in enumerate(parts):
        if "{tenant}" in part:
            return str(Path(*parts[:i])) if i else "."
    return root


def wasm_cache_dir() -> str:
    """Where the wasm sandbox keeps compiled modules and its runner: ``$TENANTFLOW_WASM_CACHE``,
    else ``$XDG_CACHE_HOME/tenantflow`` (``~/.cache/tenantflow``). Mirrors the plugin's own
    ``cache_dir`` (the kernel imports no plugin; a test keeps the two in step)."""
    explicit = os.environ.get("TENANTFLOW_WASM_CACHE")
    if explicit:
        return explicit
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tenantflow")


def installation() -> list[StatePath]:
    """The kernel's own code and the interpreter it runs on."""
    found = []
    for name in _PACKAGES:
        try:
            spec = importlib.util.find_spec(name)
        except ImportError:
            continue
        for location in (spec.submodule_search_locations or []) if spec else []:
            found.append(StatePath(f"the tenantflow package {name}", location))
    prefixes = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    found += [StatePath("the Python installation the kernel runs on", p) for p in sorted(prefixes)]
    user_site = site.getusersitepackages() if site.ENABLE_USER_SITE else ""
    if user_site and user_site in sys.path:
        found.append(StatePath("the user site-packages the kernel imports from", user_site))
    return found


def kernel_state(
    *,
    data_dir: Path,
    storage_url: str,
    token_file: str | None,
    tls_files: Iterable[str | None],
    git_roots: Sequence[str],
) -> list[StatePath]:
    """Every path a grant must stay clear of, for this kernel's settings."""
    paths = [StatePath("the data directory (--data-dir)", str(data_dir))]
    if storage := storage_path(storage_url):
        paths.append(StatePath("the storage (--storage)", storage))
    if token_file:
        paths.append(StatePath("the token file (--auth-tokens)", token_file))
    paths += [StatePath("a TLS file (--tls-cert/--tls-key)", f) for f in tls_files if f]
    paths.append(StatePath("the wasm compile cache ($TENANTFLOW_WASM_CACHE)", wasm_cache_dir()))
    paths += [StatePath(f"the git root {r!r} (--git-root)", d) for r in git_roots if (d := git_root_dir(r))]
    return paths + installation()


def _identities(path: str) -> list[tuple[int, int]]:
    """(device, inode) of ``path`` and each existing ancestor: what a bind mount would alias."""
    found = []
    current = Path(path)
    for candidate in (current, *current.parents):
        try:
            info = candidate.stat()
        except OSError:
            continue
        found.append((info.st_dev, info.st_ino))
    return found


def _contains(outer: str, inner: str) -> bool:
    """Whether ``inner`` is ``outer`` or lies inside it (both resolved), including through a bind
    mount of ``outer`` or an alias of one of ``inner``'s ancestors."""
    if Path(inner).is_relative_to(outer):
        return True
    try:
        info = os.stat(outer)
    except OSError:
        return False
    return (info.st_dev, info.st_ino) in _identities(inner)


def _shown(given: str, resolved: str) -> str:
    return given if given == resolved else f"{given} (= {resolved})"


def grant_problem(grants: Sequence[str], state: Sequence[StatePath]) -> str:
    """Why these grants reach the kernel's state (naming both paths), or ""."""
    for grant in grants:
        real_grant = os.path.realpath(grant)
        for item in state:
            real = os.path.realpath(item.path)
            if _contains(real_grant, real):
                relation = "contains"
            elif _contains(real, real_grant):
                relation = "lies inside"
            else:
                continue
            return (
                f"--sandbox-writable-dir {_shown(grant, real_grant)} {relation} {item.what} "
                f"{_shown(item.path, real)}: tenant code could read or rewrite the kernel's own state or code. "
                "Grant a directory that neither contains nor lies inside it"
            )
    return ""
