"""Who may act for a tenant: bearer tokens, each allowed a set of tenants.

The tenant a request names is routing data, not authority. With ``--auth-tokens FILE`` every call
must carry ``authorization: Bearer <token>`` metadata, and the token must be allowed the tenant the
request names. The file holds only SHA-256 digests of tokens, so reading it does not leak them::

    {"tokens": [{"name": "platform", "sha256": "<hex>", "tenants": ["*"]},
                {"name": "acme-ci", "sha256": "<hex>", "tenants": ["acme", "acme-*"]}]}

Tenant patterns are exact names or shell-style globs (``*`` for every tenant). ``tenantflow token``
prints a new token and its entry. Without the option the kernel trusts every caller (the default
listen address is loopback); it says so in its log when listening elsewhere.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import secrets
from collections.abc import Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from tenantflow.kernel.errors import PermissionDenied, Unauthenticated


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Grant:
    """One token's name and the tenant patterns it may act for."""

    name: str
    tenants: tuple[str, ...]

    def allows(self, tenant: str) -> bool:
        return any(fnmatch.fnmatchcase(tenant, pattern) for pattern in self.tenants)

    def authorize(self, tenants: Iterable[str]) -> None:
        """PermissionDenied unless this grant may act for every tenant in ``tenants``."""
        for tenant in tenants:
            if not self.allows(tenant):
                raise PermissionDenied(
                    f"token {self.name or '(unnamed)'!r} may not act for tenant {tenant!r}"
                )


# The grant of the call being served (None on a kernel without --auth-tokens), set by the server's
# Gate as it admits each call: what an RPC naming no tenant (Tenants.List) filters by.
CALLER: ContextVar[Grant | None] = ContextVar("tenantflow_caller", default=None)


class Tokens:
    """The token table, loaded once at start."""

    def __init__(self, grants: dict[str, Grant]) -> None:
        self._grants = grants  # sha256 hex -> grant

    @classmethod
    def load(cls, path: Path) -> Tokens:
        """Read the tokens file; raise ``ValueError`` saying what is wrong with it."""
        try:
            data = json.loads(path.read_text())
            entries = data["tokens"]
            grants = {
                str(e["sha256"]).lower(): Grant(str(e.get("name", "")), tuple(str(t) for t in e["tenants"]))
                for e in entries
            }
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f'{path}: expected {{"tokens": [{{"name", "sha256", "tenants": [...]}}]}} ({exc!r})'
            ) from None
        bad = [h for h in grants if len(h) != 64 or any(c not in "0123456789abcdef" for c in h)]
        if bad:
            raise ValueError(f"{path}: {bad[0]!r} is not a SHA-256 hex digest (use `tenantflow token`)")
        return cls(grants)

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> tuple[str, Grant]:
        """The digest and grant of the call's bearer token, read from metadata alone (so a call is
        refused before its body is read); Unauthenticated without a known one."""
        token = ""
        for key, value in metadata:
            if key.lower() == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                token = value.removeprefix("Bearer ").strip()
        hashed = digest(token) if token else ""
        grant = self._grants.get(hashed) if token else None
        if grant is None:
            raise Unauthenticated(
                "this kernel requires a token: send 'authorization: Bearer <token>' metadata "
                "(Client(token=...), or --token / $TENANTFLOW_TOKEN in the CLI)"
            )
        return hashed, grant

    def check(self, metadata: Iterable[tuple[str, str | bytes]], tenants: Sequence[str]) -> Grant:
        """The grant of the call's bearer token, if it may act for every tenant in ``tenants``."""
        grant = self.authenticate(metadata)[1]
        grant.authorize(tenants)
        return grant

    def __len__(self) -> int:
        return len(self._grants)


def new_token(name: str, tenants: Sequence[str]) -> tuple[str, dict[str, object]]:
    """A fresh random token and the entry that grants it ``tenants``. The ``tf_`` prefix keeps it
    from starting with ``-`` (which a command line would read as an option) and lets secret
    scanners recognise it."""
    token = "tf_" + secrets.token_urlsafe(32)
    return token, {"name": name, "sha256": digest(token), "tenants": list(tenants)}
