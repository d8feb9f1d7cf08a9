"""One suite for every sandbox: the same workflows and the same hostile tenants, run by a real kernel.

``python`` and ``python-wasm`` run the Python module below; ``wasm`` runs the C module in
``examples/wasm/c/workflows.c`` (built here with the documented ziglang command), which mirrors it
workflow for workflow where the raw-module ABI allows.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tenantflow.client import Client, TenantflowRpcError
from tenantflow.conformance.kernel import TEST_LIMITS, KernelProcess
from tenantflow.v1 import tenantflow_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
C_EXAMPLE = ROOT / "examples" / "wasm" / "c" / "workflows.c"

WORKFLOWS = textwrap.dedent("""
    import asyncio
    import json
    import os
    import socket
    import time

    from tenantflow.workflow import NonRetryableError, WorkflowEntrypoint

    NO_RETRY = {"limit": 0}


    class Steps(WorkflowEntrypoint):
        def run(self, event, step):
            doubled = step.do("double", lambda: event.payload["x"] * 2)
            return {"total": step.do("add", lambda: doubled + 1)}


    class Parallel(WorkflowEntrypoint):
        async def run(self, event, step):
            a, b = await asyncio.gather(step.do("a", lambda: 1), step.do("b", self.two))
            await step.sleep("nap", 0.1)
            return a + b

        async def two(self):
            await asyncio.sleep(0)
            return 2


    class Sleeper(WorkflowEntrypoint):
        def run(self, event, step):
            step.sleep("nap", 0.2)
            return "woke"


    class Retry(WorkflowEntrypoint):
        def run(self, event, step):
            def flaky(ctx):
                if ctx.attempt < 2:
                    raise RuntimeError("flaky")
                return ctx.attempt
            return step.do("flaky", flaky, retries={"limit": 2, "delay": 0})


    class Waiter(WorkflowEntrypoint):
        def run(self, event, step):
            return step.wait_for_event("approval", type="go", timeout=30)["payload"]


    class Fails(WorkflowEntrypoint):
        def run(self, event, step):
            def boom():
                raise NonRetryableError("boom")
            return step.do("boom", boom)


    def spin():
        while True:
            pass


    def bomb():
        hoard = []
        while True:
            hoard.append(bytearray(8 * 1024 * 1024))


    class Spin(WorkflowEntrypoint):
        def run(self, event, step):
            return step.do("spin", spin, retries=NO_RETRY)


    class Bomb(WorkflowEntrypoint):
        def run(self, event, step):
            return step.do("bomb", bomb, retries=NO_RETRY)


    class Crash(WorkflowEntrypoint):
        def run(self, event, step):
            return step.do("crash", lambda: os._exit(3), retries=NO_RETRY)


    def burn(seconds):
        start = time.process_time()
        while time.process_time() - start < seconds:
            pass
        return time.process_time() - start


    class Crunch(WorkflowEntrypoint):
        def run(self, event, step):
            seconds = event.payload["seconds"]
            return [step.do(f"crunch {i}", lambda: burn(seconds), retries=NO_RETRY) for i in range(2)]


    def attempt(action):
        try:
            return f"allowed: {action()!r}"[:200]
        except Exception as exc:
            return f"denied: {type(exc).__name__}: {exc}"


    class ReadFile(WorkflowEntrypoint):
        def run(self, event, step):
            def read():
                with open(event.payload["path"], "rb") as handle:
                    return handle.read(16)
            return step.do("read", lambda: attempt(read), retries=NO_RETRY)


    class WriteFile(WorkflowEntrypoint):
        def run(self, event, step):
            def write():
                with open(event.payload["path"], "w") as handle:
                    return handle.write(event.payload["text"])
            return step.do("write", lambda: attempt(write), retries=NO_RETRY)


    class Connect(WorkflowEntrypoint):
        def run(self, event, step):
            address = ("127.0.0.1", event.payload["port"])
            return step.do("connect", lambda: attempt(lambda: socket.create_connection(address, 2)),
                           retries=NO_RETRY)


    class Env(WorkflowEntrypoint):
        def run(self, event, step):
            return step.do("env", lambda: sorted(os.environ), retries=NO_RETRY)


    class SetGlobal(WorkflowEntrypoint):
        def run(self, event, step):
            json.tenantflow_secret = event.payload["x"]


    class ReadGlobal(WorkflowEntrypoint):
        def run(self, event, step):
            return getattr(json, "tenantflow_secret", None)
""").lstrip()

NETWORK_WAT = """
(module
  (import "wasi_snapshot_preview1" "sock_open" (func (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "workflow_Connect")))
"""


@pytest.fixture(scope="session")
def c_module(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The C example, built with the command its README documents."""
    out = tmp_path_factory.mktemp("wasm") / "workflows.wasm"
    cmd = [sys.executable, "-m", "ziglang", "cc", "-target", "wasm32-freestanding", "-O2", "-nostdlib",
           "-Wl,--no-entry", "-o", str(out), str(C_EXAMPLE)]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=C_EXAMPLE.parent, timeout=300)
    return out.read_bytes()


@pytest.fixture
def ref(client: Client, tenant: str, runtime: str, c_module: bytes) -> str:
    """The conformance workflows, published for ``runtime``."""
    return client.publish(tenant, "conformance", _files(runtime, c_module), runtime=runtime).ref


def _files(runtime: str, c_module: bytes) -> dict[str, str | bytes]:
    return {"workflows.wasm": c_module} if runtime == "wasm" else {"wf.py": WORKFLOWS}


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


def test_parallel_async_steps(client: Client, tenant: str, ref: str, runtime: str) -> None:
    if runtime == "wasm":
        pytest.skip("raw modules run one step at a time (plugins/sandbox_wasm/ABI.md)")
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
    client: Client, tenant: str, ref: str, runtime: str, workflow: str, step: str, says: str
) -> None:
    failed = failed_step(finish(client, tenant, ref, workflow, timeout=90), step)
    text = f"{failed.error.name}: {failed.error.message}".lower()
    expected = says or {"wasm": "unreachable"}.get(runtime, "exited")
    assert expected in text, text
    assert output(client, tenant, ref, "Steps", {"x": 1}) == {"total": 3}


def test_cpu_limit_is_per_step_not_per_run(
    client: Client, tenant: str, ref: str, runtime: str, kernel: KernelProcess
) -> None:
    if runtime == "wasm":
        pytest.skip("a raw module has no clock to burn a measured amount of CPU (same Budget as python-wasm)")
    limit = float(kernel.args[kernel.args.index("--cpu-seconds") + 1])
    # Two steps, each well under the limit, 1.5 times it together. The guest's clock may count
    # the whole kernel's CPU (python-wasm), so the margins are wide.
    used = output(client, tenant, ref, "Crunch", {"seconds": limit * 0.75})
    assert len(used) == 2 and sum(used) > limit, used


def _isolation_off(kernel: KernelProcess, runtime: str, what: str) -> None:
    if runtime == "python" and any(f"{what} isolation off" in line for line in kernel.lines):
        pytest.skip(f"the subprocess sandbox reports {what} isolation off on this machine")


def test_kernel_files_unreachable(
    client: Client, tenant: str, ref: str, runtime: str, kernel: KernelProcess
) -> None:
    _isolation_off(kernel, runtime, "file")
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
    granting_kernel: tuple[KernelProcess, Path], tenant: str, runtime: str
) -> None:
    if runtime == "wasm":
        pytest.skip("the C example does no file I/O; raw modules get the same WASI grant as python-wasm")
    kernel, granted = granting_kernel
    with kernel.client() as client:
        ref = client.publish(tenant, "conformance", {"wf.py": WORKFLOWS}, runtime=runtime).ref
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
    client: Client, tenant: str, runtime: str, kernel: KernelProcess, listener: int, c_module: bytes
) -> None:
    _isolation_off(kernel, runtime, "network")
    if runtime == "wasm":  # raw modules have no socket API: a module asking for one is refused
        with pytest.raises(TenantflowRpcError, match="sock_open"):
            client.publish(tenant, "net", {"net.wat": NETWORK_WAT}, runtime="wasm")
        return
    ref = client.publish(tenant, "conformance", {"wf.py": WORKFLOWS}, runtime=runtime).ref
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
    client: Client, tenant: str, ref: str, runtime: str, c_module: bytes
) -> None:
    output(client, tenant, ref, "SetGlobal", {"x": 42})
    assert output(client, tenant, ref, "ReadGlobal") is None
    other = f"{tenant}-b"
    other_ref = client.publish(other, "conformance", _files(runtime, c_module), runtime=runtime).ref
    assert output(client, other, other_ref, "ReadGlobal") is None
