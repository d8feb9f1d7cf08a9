"""One suite for every sandbox: the same workflows and the same hostile tenants, run by a real kernel.

The runtime's harness gives the workflows of :mod:`tenantflow.conformance.workflows` in its form
(the Python module itself, or e.g. the built-in ``wasm`` runtime's C mirror of it) and declares
what the runtime lacks (``parallel steps``, ``cpu clock``, ``file io``, ``sockets``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tenantflow.client import Client, TenantflowRpcError
from tenantflow.conformance.harness import HarnessUnavailable, SandboxHarness
from tenantflow.conformance.kernel import TEST_LIMITS, KernelProcess
from tenantflow.conformance.plugin import require
from tenantflow.v1 import tenantflow_pb2 as pb


@pytest.fixture(scope="session")
def files(
    sandbox_harness: SandboxHarness, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str | bytes]:
    """The conformance workflows in the runtime's form (built once per session)."""
    try:
        return sandbox_harness.files(tmp_path_factory.mktemp("conformance-files"))
    except HarnessUnavailable as exc:
        pytest.skip(f"{sandbox_harness.name}: {exc}")


@pytest.fixture
def ref(client: Client, tenant: str, runtime: str, files: dict[str, str | bytes]) -> str:
    """The conformance workflows, published for ``runtime``."""
    return client.publish(tenant, "conformance", files, runtime=runtime).ref


def finish(
    client: Client, tenant: str, ref: str, workflow: str, params: Any = None, timeout: float = 60
) -> Any:
    instance = client.create(tenant, workflow, ref, params)
    return client.wait(tenant, instance.id, timeout=timeout)


def output(client: Client, tenant: str, ref: str, workflow: str, params: Any = None) -> Any:
    done = finish(client, tenant, ref, workflow, params)
    assert done.status == pb.STATUS_COMPLETE, (done.error.name, done.error.message)
    return Client.output(done)


def failed_step(instance: pb.Instance, name: str) -> pb.Step:
    assert instance.status == pb.STATUS_ERRORED, Client.output(instance)
    step = next(s for s in instance.steps if s.name == name)
    assert step.status == "failed", step
    return step


# -- the step contract --------------------------------------------------------------------------
def test_steps_run_and_complete(client: Client, tenant: str, ref: str) -> None:
    assert output(client, tenant, ref, "Steps", {"x": 20}) == {"total": 41}


def test_parallel_async_steps(client: Client, tenant: str, ref: str, sandbox_harness: SandboxHarness) -> None:
    require(sandbox_harness, "parallel steps")
    assert output(client, tenant, ref, "Parallel") == 3


def test_sleep_hibernates_and_resumes(client: Client, tenant: str, ref: str) -> None:
    assert output(client, tenant, ref, "Sleeper") == "woke"


def test_failed_attempt_is_retried(client: Client, tenant: str, ref: str) -> None:
    assert output(client, tenant, ref, "Retry") == 2


def test_wait_for_event(client: Client, tenant: str, ref: str) -> None:
    instance = client.create(tenant, "Waiter", ref)
    client.wait(tenant, instance.id, frozenset({pb.STATUS_WAITING}), timeout=30)
    client.send_event(tenant, instance.id, "go", {"approved": True})
    done = client.wait(tenant, instance.id, timeout=30)
    assert Client.output(done) == {"approved": True}


def test_non_retryable_failure_fails_the_workflow(client: Client, tenant: str, ref: str) -> None:
    done = finish(client, tenant, ref, "Fails")
    step = failed_step(done, "boom")
    assert step.attempts == 1 and "boom" in step.error.message
    assert "boom" in done.error.message


# -- hostile tenants ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("workflow", "step", "says"),
    [("Spin", "spin", "cpu"), ("Bomb", "bomb", "memory"), ("Crash", "crash", "")],
)
def test_hostile_step_fails_and_kernel_carries_on(
    client: Client,
    tenant: str,
    ref: str,
    sandbox_harness: SandboxHarness,
    workflow: str,
    step: str,
    says: str,
) -> None:
    failed = failed_step(finish(client, tenant, ref, workflow, timeout=90), step)
    text = f"{failed.error.name}: {failed.error.message}".lower()
    expected = says or sandbox_harness.crash_says
    assert expected in text, text
    assert output(client, tenant, ref, "Steps", {"x": 1}) == {"total": 3}


def test_cpu_limit_is_per_step_not_per_run(
    client: Client, tenant: str, ref: str, sandbox_harness: SandboxHarness, kernel: KernelProcess
) -> None:
    require(sandbox_harness, "cpu clock")
    limit = float(kernel.args[kernel.args.index("--cpu-seconds") + 1])
    # Two steps, each well under the limit, 1.5 times it together. The guest's clock may count
    # the whole kernel's CPU (python-wasm), so the margins are wide.
    used = output(client, tenant, ref, "Crunch", {"seconds": limit * 0.75})
    assert len(used) == 2 and sum(used) > limit, used


def test_kernel_files_unreachable(
    client: Client, tenant: str, ref: str, sandbox_harness: SandboxHarness, kernel: KernelProcess
) -> None:
    database = next(kernel.data_dir.glob("*.sqlite3"))
    result = output(client, tenant, ref, "ReadFile", {"path": str(database)})
    assert result.startswith("denied"), result


@pytest.fixture(scope="module")
def granting_kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KernelProcess, Path]]:
    """A kernel whose operator grants the sandboxes one directory."""
    granted = tmp_path_factory.mktemp("granted")
    granted.chmod(0o777)  # tenant code runs as another uid than the test
    kernel = KernelProcess(
        tmp_path_factory.mktemp("kernel"), [*TEST_LIMITS, "--sandbox-writable-dir", str(granted)]
    )
    kernel.start()
    yield kernel, granted
    kernel.stop()


def test_operator_granted_directory_only(
    granting_kernel: tuple[KernelProcess, Path],
    tenant: str,
    runtime: str,
    sandbox_harness: SandboxHarness,
    files: dict[str, str | bytes],
) -> None:
    require(sandbox_harness, "file io")
    kernel, granted = granting_kernel
    with kernel.client() as client:
        ref = client.publish(tenant, "conformance", files, runtime=runtime).ref
        target = granted / f"{tenant}.txt"
        assert (
            output(client, tenant, ref, "WriteFile", {"path": str(target), "text": "hello"}) == "allowed: 5"
        )
        assert target.read_text() == "hello"
        assert output(client, tenant, ref, "ReadFile", {"path": str(target)}) == "allowed: b'hello'"
        outside = kernel.data_dir / f"{tenant}.txt"
        denied = output(client, tenant, ref, "WriteFile", {"path": str(outside), "text": "x"})
        assert denied.startswith("denied") and not outside.exists(), denied


@pytest.fixture
def listener() -> Iterator[int]:
    """A loopback port that accepts connections (so a refusal can only come from the sandbox)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


def test_network_unreachable(
    client: Client,
    tenant: str,
    runtime: str,
    kernel: KernelProcess,
    listener: int,
    sandbox_harness: SandboxHarness,
    files: dict[str, str | bytes],
) -> None:
    if "sockets" in sandbox_harness.lacks:  # no socket API at all: code asking for one is refused
        with pytest.raises(TenantflowRpcError):
            client.publish(tenant, "net", sandbox_harness.socket_files(), runtime=runtime)
        return
    ref = client.publish(tenant, "conformance", files, runtime=runtime).ref
    result = output(client, tenant, ref, "Connect", {"port": listener})
    assert result.startswith("denied"), result


def test_kernel_environment_unreachable(client: Client, tenant: str, ref: str) -> None:
    visible = set(output(client, tenant, ref, "Env"))
    sandbox_own = {
        "LANG",
        "MALLOC_ARENA_MAX",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONHASHSEED",
    }  # set by the sandbox
    assert not visible & ({"PATH", "HOME", "PYTHONUNBUFFERED", *os.environ} - sandbox_own), visible


def test_no_state_shared_between_runs_or_tenants(
    client: Client, tenant: str, ref: str, runtime: str, files: dict[str, str | bytes]
) -> None:
    output(client, tenant, ref, "SetGlobal", {"x": 42})
    assert output(client, tenant, ref, "ReadGlobal") is None
    other = f"{tenant}-b"
    other_ref = client.publish(other, "conformance", files, runtime=runtime).ref
    assert output(client, other, other_ref, "ReadGlobal") is None
