"""The loader suite's harness for ``artifact``: code released with ``Code.Publish``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import grpc

from tenantflow.client import Client
from tenantflow.conformance.harness import LoaderHarness, LoaderSource

NOT_FOUND, INVALID = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT


class ArtifactSource(LoaderSource):
    """A tenant's code named ``wf``, published through the kernel."""

    def release(self, client: Client, code: str) -> str:
        client.publish(self.tenant, "wf", {"wf.py": code})
        return f"artifact://{self.tenant}/wf"

    def pinned(self) -> re.Pattern[str]:
        return re.compile(rf"^artifact://{re.escape(self.tenant)}/wf@sha256:[0-9a-f]{{64}}$")


@dataclass
class ArtifactHarness(LoaderHarness):
    """The kernel's own artifact store: nothing to start."""

    name: str = "artifact"

    def source(self, tenant: str, root: Path) -> LoaderSource:
        return ArtifactSource(tenant, bad=[
            (f"artifact://{tenant}/nope", NOT_FOUND, "'nope' was never published"),
            (f"artifact://{tenant}/wf@sha256:{'0' * 64}", NOT_FOUND, f"sha256:{'0' * 64}"),
            ("artifact://someone-else/wf", NOT_FOUND, "not found in tenant"),
            (f"artifact://{tenant}", INVALID, "expected artifact://"),
        ])  # fmt: skip
