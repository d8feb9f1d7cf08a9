"""Artifact loader plugin: content-addressed tenant code published through ``Code.Publish``.

Refs: ``artifact://<tenant>/<name>@sha256:<hex>`` (pinned) or ``artifact://<tenant>/<name>`` (the
latest published, pinned at create). The files live in the kernel's storage.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from tenantflow.kernel import hookimpl
from tenantflow.kernel.code import artifact_ref
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.errors import InvalidArgument, NotFound
from tenantflow.kernel.loader import CodeBundle, Loader
from tenantflow.kernel.storage import Storage

if TYPE_CHECKING:
    from tenantflow.conformance.harness import Harness

_REF = re.compile(r"^artifact://(?P<tenant>[^/@]+)/(?P<name>[^/@]+)(?:@sha256:(?P<digest>[0-9a-f]{64}))?$")


class ArtifactLoader:
    """Resolves ``artifact://`` refs against the storage's artifact table."""

    schemes: tuple[str, ...] = ("artifact",)

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    def _parse(self, tenant: str, ref: str) -> tuple[str, str | None]:
        match = _REF.match(ref)
        if not match:
            raise InvalidArgument(
                f"bad artifact ref {ref!r}: expected artifact://<tenant>/<name>[@sha256:<64 hex digits>]"
            )
        if match["tenant"] != tenant:
            raise NotFound(f"code {ref!r} not found in tenant {tenant!r}")
        return match["name"], match["digest"]

    def pin(self, tenant: str, ref: str) -> str:
        name, digest = self._parse(tenant, ref)
        artifact = self._storage.get_artifact(tenant, name, digest)
        if artifact is None:
            what = f"version sha256:{digest} of {name!r}" if digest else f"code named {name!r}"
            raise NotFound(
                f"{what} was never published in tenant {tenant!r}; publish it with Code.Publish first"
            )
        return artifact_ref(tenant, name, artifact.digest)

    def load(self, tenant: str, pinned: str) -> CodeBundle:
        name, digest = self._parse(tenant, pinned)
        if digest is None:
            raise InvalidArgument(f"{pinned!r} is not pinned")
        artifact = self._storage.get_artifact(tenant, name, digest)
        if artifact is None:
            raise NotFound(f"code {pinned!r} is gone from storage")
        return CodeBundle(ref=pinned, runtime=artifact.runtime, files=artifact.files)


TENANTFLOW_CONTRACTS = {"hookspecs": [1], "loader": [1]}  # the versions this plugin supports


@hookimpl
def tenantflow_loaders(storage: Storage, config: KernelConfig) -> list[Loader]:
    return [ArtifactLoader(storage)]


@hookimpl
def tenantflow_conformance(kind: str, name: str) -> Harness | None:
    if (kind, name) != ("loader", "artifact"):
        return None
    from tenantflow.plugins.loader_artifact.conformance import ArtifactHarness

    return ArtifactHarness()
