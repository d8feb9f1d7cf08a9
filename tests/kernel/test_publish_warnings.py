"""Publish reports determinism hazards and ignored classes, and refuses hazards when strict."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from tenantflow.client import Client, TenantflowRpcError
from tests.conftest import KernelProcess
from tests.helpers import source
from tests.kernel.test_cli import tf

HAZARDOUS = """
import time
from tenantflow.workflow import WorkflowEntrypoint

class Stamp(WorkflowEntrypoint):
    async def run(self, event, step):
        started = time.time()
        return await step.do("work", lambda: started)

class Draft(WorkflowEntrypoint):
    pass
"""


@pytest.mark.parametrize("runtime", ["python", "python-wasm"])
def test_publish_warns_of_hazards_and_ignored_classes(client: Client, tenant: str, runtime: str) -> None:
    version = client.publish(tenant, "wf", {"wf.py": source(HAZARDOUS)}, runtime=runtime)
    assert list(version.workflows) == ["Stamp"]
    found = sorted((w.file, w.line, w.kind) for w in version.warnings)
    assert found == [("wf.py", 6, "clock"), ("wf.py", 9, "ignored_class")], version.warnings
    clock = next(w for w in version.warnings if w.kind == "clock")
    assert "time.time()" in clock.message and "step.do" in clock.message


def test_strict_publish_refuses_hazards_and_stores_nothing(client: Client, tenant: str) -> None:
    with pytest.raises(TenantflowRpcError) as err:
        client.publish(tenant, "wf", {"wf.py": source(HAZARDOUS)}, strict=True)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "1 determinism hazard(s)" in err.value.message and "wf.py, line 6" in err.value.message
    assert list(client.list_code(tenant).versions) == []
    # an ignored class alone is no hazard: strict accepts it, with the warning
    clean = source(HAZARDOUS).replace("started = time.time()", "started = 0")
    version = client.publish(tenant, "wf", {"wf.py": clean}, strict=True)
    assert [w.kind for w in version.warnings] == ["ignored_class"]


def test_the_cli_shows_the_warnings_and_strict_refuses(
    kernel: KernelProcess, tenant: str, tmp_path: Path
) -> None:
    (tmp_path / "wf.py").write_text(source(HAZARDOUS))
    published = tf(kernel, "publish", "--tenant", tenant, "--name", "wf", str(tmp_path / "wf.py"))
    assert "2 warning(s)" in published and "wf.py:6" in published and "clock" in published
    refused = tf(
        kernel, "publish", "--tenant", tenant, "--name", "wf", "--strict", str(tmp_path / "wf.py"), ok=False
    )
    assert "determinism hazard" in refused and "Traceback" not in refused
