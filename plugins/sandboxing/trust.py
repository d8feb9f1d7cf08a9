"""The CA certificates tenant code may read, so that TLS it speaks verifies servers.

Only the trust store: OpenSSL's default CA file and directory (as ``ssl.get_default_verify_paths``
names them, e.g. ``/usr/lib/ssl/certs``, a link to ``/etc/ssl/certs`` on Debian), certifi's bundle where it is installed, and the directories
the store's links lead to (Debian's ``/etc/ssl/certs/*.pem`` point into
``/usr/share/ca-certificates``): Landlock checks the file a link resolves to. Never the rest of
``/etc`` or ``/etc/ssl`` (private keys live there). Certificates are public; a path other users
cannot read is left out, so it can never make a root kernel's tenant uid check fail.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import ssl
import stat
from pathlib import Path


def _readable_by_others(path: str) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return bool(mode & stat.S_IROTH) and (not stat.S_ISDIR(mode) or bool(mode & stat.S_IXOTH))


def _certifi_bundle() -> str | None:
    """certifi's cacert.pem, found without importing certifi (the kernel does not need it)."""
    try:
        spec = importlib.util.find_spec("certifi")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    return str(Path(spec.origin).parent / "cacert.pem")


def _link_targets(directory: str) -> set[str]:
    """The directories the links in ``directory`` resolve into (one listing, no file reads)."""
    found: set[str] = set()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return found
    for entry in entries:
        if entry.is_symlink():
            target = os.path.realpath(entry.path)
            if os.path.isfile(target):
                found.add(os.path.dirname(target))
    return found


@functools.cache
def ca_paths() -> tuple[str, ...]:
    """The CA files and directories to grant read-only, links resolved (found once: a run's
    child, confined already, asks again)."""
    defaults = ssl.get_default_verify_paths()
    # OpenSSL's built-in names, not SSL_CERT_FILE/SSL_CERT_DIR: runs start with an empty environment.
    named = [defaults.openssl_cafile, defaults.openssl_capath, _certifi_bundle()]
    paths: set[str] = set()
    for path in named:
        if not path or not os.path.exists(path):
            continue
        real = os.path.realpath(path)  # a Landlock rule holds the resolved file or directory
        paths.add(real)
        if os.path.isdir(real):
            paths.update(_link_targets(real))
    return tuple(sorted(p for p in paths if _readable_by_others(p)))
