"""Tenant secrets at rest: sealed with AES-256-GCM under a key file the operator gives
(``serve --secrets-key FILE``), so storage (and its backups) never holds a value in clear.

The key file holds one key a line, base64 of 32 random bytes (``#`` lines are comments): the
first seals, every one opens. Rotation: put a new key first and keep the old ones below it,
restart the kernels, run ``tenantflow secrets rotate`` (re-seals every secret under the first
key), then drop the old lines. A sealed value names its key (the first 8 bytes of the key's
SHA-256) and is bound to its tenant and name: moved to another tenant or name, it does not open.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
from pathlib import Path

MAGIC = b"tf1"
KID_BYTES, NONCE_BYTES = 8, 12


class SecretKeyError(ValueError):
    """The key file cannot be used, or a sealed value does not open with it; the text says why."""


def _aad(tenant: str, name: str) -> bytes:
    return b"tenantflow-secret\0" + tenant.encode() + b"\0" + name.encode()


class SecretBox:
    """Seals and opens secret values with the keys of one key file."""

    def __init__(self, keys: list[bytes], source: str = "") -> None:
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ImportError:  # pragma: no cover - the extra is missing
            raise SecretKeyError(
                "secrets need the cryptography package: pip install 'tenantflow[secrets]'"
            ) from None
        if not keys:
            raise SecretKeyError(f"the secrets key file {source} holds no key")
        self._keys = {hashlib.sha256(k).digest()[:KID_BYTES]: AESGCM(k) for k in keys}
        self._first = hashlib.sha256(keys[0]).digest()[:KID_BYTES]

    def seal(self, value: str, tenant: str, name: str) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._keys[self._first].encrypt(nonce, value.encode("utf-8"), _aad(tenant, name))
        return MAGIC + self._first + nonce + sealed

    def open(self, sealed: bytes, tenant: str, name: str) -> str:
        from cryptography.exceptions import InvalidTag

        head = len(MAGIC) + KID_BYTES
        kid, nonce = sealed[len(MAGIC) : head], sealed[head : head + NONCE_BYTES]
        aead = self._keys.get(kid)
        if not sealed.startswith(MAGIC) or aead is None:
            raise SecretKeyError(
                f"secret {name!r} of tenant {tenant!r} was sealed with a key the --secrets-key file no longer "
                "holds: put that key back (below the first), or set the secret again"
            )
        try:
            return aead.decrypt(nonce, sealed[head + NONCE_BYTES :], _aad(tenant, name)).decode("utf-8")
        except InvalidTag:
            raise SecretKeyError(
                f"secret {name!r} of tenant {tenant!r} does not open: it was altered"
            ) from None

    def current(self, sealed: bytes) -> bool:
        """Whether ``sealed`` is sealed with the first key (rotation skips it)."""
        return sealed[len(MAGIC) : len(MAGIC) + KID_BYTES] == self._first


def read_keys(path: str) -> list[bytes]:
    """The keys of a key file, in order; :class:`SecretKeyError` saying what is wrong."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SecretKeyError(f"cannot read the secrets key file {path}: {exc.strerror or exc}") from None
    keys = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = base64.b64decode(line, validate=True)
        except binascii.Error:
            key = b""
        if len(key) != 32:
            raise SecretKeyError(
                f"line {n} of the secrets key file {path} is not a key: each line is base64 of 32 random bytes "
                "(make one with `tenantflow secrets new-key`)"
            )
        keys.append(key)
    return keys


@functools.lru_cache(maxsize=8)
def load(path: str) -> SecretBox | None:
    """The box of key file ``path`` (None for ""), read once per process."""
    if not path:
        return None
    return SecretBox(read_keys(path), path)


def new_key() -> str:
    """A fresh key, as a key file line."""
    return base64.b64encode(os.urandom(32)).decode()
