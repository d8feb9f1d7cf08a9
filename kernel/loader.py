"""The code-loader contract: turn a code ref into a pinned ref, and a pinned ref into files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

CONTRACT_VERSION = 1  # bumped when a change breaks loaders written against it (kernel/contracts.py)


@dataclass(frozen=True)
class CodeBundle:
    """Tenant code as the sandbox receives it. ``entry`` names the module to import (None: the one
    that defines the workflow class)."""

    ref: str
    runtime: str
    files: dict[str, bytes]
    entry: str | None = None


class Loader(Protocol):
    """A loader for one ref scheme (``artifact``, ``git+file`` ...)."""

    schemes: tuple[str, ...]

    def pin(self, tenant: str, ref: str) -> str:
        """Resolve ``ref`` to an immutable ref (digest, commit). Raise ``NotFound`` or
        ``InvalidArgument`` naming what is missing; refuse refs that belong to another tenant."""
        ...

    def load(self, tenant: str, pinned: str) -> CodeBundle:
        """The exact files behind a pinned ref: the same bytes every time."""
        ...
