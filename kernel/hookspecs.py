"""Every hook a tenantflow plugin can implement. Built-in plugins use them exactly like third-party ones.

A plugin is a module registered under the ``tenantflow`` entry-point group that implements some of
these with ``@tenantflow.kernel.hookimpl``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from tenantflow.conformance.harness import Harness
    from tenantflow.kernel.config import KernelConfig
    from tenantflow.kernel.loader import Loader
    from tenantflow.kernel.sandbox import Sandbox
    from tenantflow.kernel.storage import Storage

PROJECT = "tenantflow"
CONTRACT_VERSION = 1  # of the hooks below; bumped when a change breaks plugins (kernel/contracts.py)
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec(firstresult=True)
def tenantflow_storage(url: str, config: KernelConfig) -> Storage | None:
    """Open the storage engine for ``url`` if its scheme is yours (``sqlite:///path``), else None."""


@hookspec
def tenantflow_sandboxes(config: KernelConfig) -> list[Sandbox]:  # type: ignore[empty-body]
    """The sandboxes this plugin provides, one per runtime name."""


@hookspec
def tenantflow_loaders(storage: Storage, config: KernelConfig) -> list[Loader]:  # type: ignore[empty-body]
    """The code loaders this plugin provides, each for its ref schemes."""


@hookspec(firstresult=True)
def tenantflow_conformance(kind: str, name: str) -> Harness | None:
    """The conformance suites' harness for what you provide of ``kind`` (``storage``, ``sandbox``,
    ``loader``) under ``name`` (URL scheme, runtime, ref scheme), else None. Import it lazily: only
    ``pytest -p tenantflow.conformance.plugin`` asks (see ``tenantflow.conformance.harness``)."""
