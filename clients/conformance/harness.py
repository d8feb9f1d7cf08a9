"""What a plugin tells the conformance suites about an engine, runtime or loader it provides.

A plugin implements the ``tenantflow_conformance(kind, name)`` hook and returns one of these for
what it provides; the suites ask for it by the name given on the command line. A harness makes
what the suite needs (a fresh store, the test workflows in the runtime's form, a place to release
code) and declares, in :attr:`Harness.lacks`, the capabilities it does not have, each with the
reason: the tests that need one are skipped with that reason.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from tenantflow.conformance.workflows import PYTHON_WORKFLOWS

if TYPE_CHECKING:
    import grpc

    from tenantflow.client import Client
    from tenantflow.kernel.storage import Storage

__all__ = [
    "CAPABILITIES",
    "Harness",
    "HarnessUnavailable",
    "LoaderHarness",
    "LoaderSource",
    "SandboxHarness",
    "StorageHarness",
]

CAPABILITIES: dict[str, dict[str, str]] = {
    "storage": {
        "faults": "commits that fail for retry can be injected (faulty_url); the contract must hold",
    },
    "sandbox": {
        "parallel steps": "a workflow's async steps run concurrently",
        "cpu clock": "guest code can burn a measured amount of CPU",
        "file io": "guest code can open files (only where the operator grants)",
        "sockets": "guest code has a socket API (refused by the sandbox)",
    },
    "loader": {},
}


class HarnessUnavailable(Exception):
    """This harness cannot run here (say why: "no FoundationDB cluster: set ..."); the tests skip."""


@dataclass
class Harness:
    """The common part: ``name`` (what the option named) and ``lacks`` ({capability: why})."""

    kind: ClassVar[str] = ""
    name: str
    lacks: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.lacks) - set(CAPABILITIES[self.kind])
        if unknown:
            raise ValueError(
                f"{self.kind} harness {self.name!r} lacks unknown capabilities {sorted(unknown)} "
                f"(known: {sorted(CAPABILITIES[self.kind])})"
            )


@dataclass
class StorageHarness(Harness):
    """Fresh, empty stores of one engine, for the storage suite."""

    kind: ClassVar[str] = "storage"

    def url(self, tmp: Path) -> str:
        """The URL of a fresh, empty store (``tmp`` is this test's own directory)."""
        raise NotImplementedError

    def discard(self, storage: Storage) -> None:
        """Close a store the suite is done with (and remove its data from a shared server)."""
        storage.close()

    def faulty_url(self, tmp: Path) -> str:
        """A fresh store whose commits fail now and then the way the engine's retries must survive."""
        raise HarnessUnavailable(f"{self.name} injects no faults")

    def prepare_faulty(self, storage: Storage) -> None:
        """Called on a store of :meth:`faulty_url` before the checks (e.g. fail the first commit)."""

    def faults_injected(self, storage: Storage) -> int:
        """How many faults a store of :meth:`faulty_url` injected (must be some)."""
        return 0


@dataclass
class SandboxHarness(Harness):
    """The conformance workflows in one runtime's form, and what its failures look like."""

    kind: ClassVar[str] = "sandbox"
    crash_says: str = "exited"  # in the error of a step whose guest died mid-step

    def files(self, tmp: Path) -> dict[str, str | bytes]:
        """The files to publish: the workflows of :mod:`tenantflow.conformance.workflows`."""
        return {"wf.py": PYTHON_WORKFLOWS}

    def socket_files(self) -> dict[str, str | bytes]:
        """Without ``sockets``: code asking for a socket API, which publishing must refuse."""
        raise HarnessUnavailable(f"{self.name} gives no code that asks for sockets")


class LoaderSource:
    """Where one tenant's code comes from, for the loader suite. ``bad``: refs create must refuse,
    as (ref, status code, text the message contains)."""

    def __init__(self, tenant: str, bad: list[tuple[str, grpc.StatusCode, str]] | None = None) -> None:
        self.tenant = tenant
        self.bad = bad or []

    def release(self, client: Client, code: str) -> str:
        """Make ``code`` (module ``wf.py``) the newest version; return the *unpinned* ref to it."""
        raise NotImplementedError

    def pinned(self) -> re.Pattern[str]:
        """What a ref pinned from :meth:`release`'s ref looks like."""
        raise NotImplementedError


@dataclass
class LoaderHarness(Harness):
    """Code for one ref scheme: a kernel configured for it, and a source per tenant."""

    kind: ClassVar[str] = "loader"

    def kernel_args(self, root: Path) -> list[str]:
        """Extra ``tenantflow serve`` arguments; ``root`` is a directory the harness may use (the
        same for every kernel of a session; start what it needs once)."""
        return []

    def kernel_env(self, root: Path) -> dict[str, str]:
        """Extra environment of ``tenantflow serve`` (a plugin's own settings)."""
        return {}

    def source(self, tenant: str, root: Path) -> LoaderSource:
        """A source of ``tenant``'s code under ``root``."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop what :meth:`kernel_args` started."""
