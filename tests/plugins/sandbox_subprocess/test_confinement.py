"""The subprocess sandbox contains hostile tenants: each fails its own step, the kernel stays up."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from tenantflow.client import Client
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import KERNEL_SECRET, TEST_LIMITS, KernelProcess
from tests.helpers import publish, wait_for

HOSTILE = """
import os, socket
from tenantflow.workflow import WorkflowEntrypoint

ONCE = {"retries": {"limit": 0}}

class Probe(WorkflowEntrypoint):
    async def run(self, event, step):
        kind, arg = event.payload["kind"], event.payload.get("arg")

        def attack():
            if kind == "loop":
                while True:
                    pass
            if kind == "memory":
                hoard = []
                while True:
                    hoard.append(bytearray(64 * 1024 * 1024))
            if kind == "exit":
                os._exit(3)
            if kind == "segfault":
                import ctypes
                ctypes.string_at(0)
            if kind == "env":
                return dict(os.environ)
            if kind == "read":
                with open(arg, "rb") as f:
                    return len(f.read())
            if kind == "write":
                with open(arg, "w") as f:
                    f.write("x" * 10)
                return "written"
            if kind == "connect":
                host, port = arg.rsplit(":", 1)
                socket.create_connection((host, int(port)), timeout=2).close()
                return "connected"
            if kind == "kill":
                import signal
                os.kill(os.getppid(), signal.SIGKILL)  # the template that forks every run
                return "killed"
            if kind == "fork":
                import subprocess, sys, threading
                denied = []
                for attempt in (os.fork, lambda: subprocess.run([sys.executable, "-c", "pass"])):
                    try:
                        attempt()
                    except OSError as exc:
                        denied.append(exc.errno)
                worker = threading.Thread(target=lambda: denied.append("thread"))
                worker.start()
                worker.join()
                return denied
            if kind == "unshare":
                import ctypes
                libc = ctypes.CDLL(None, use_errno=True)
                return [libc.unshare(0x10000000), ctypes.get_errno()]
        return await step.do("attack", attack, **ONCE)

class LoopOutsideSteps(WorkflowEntrypoint):
    def run(self, event, step):
        while True:
            pass
"""


@pytest.fixture
def ref(client: Client, tenant: str) -> str:
    return publish(client, tenant, HOSTILE)


def attack(client: Client, tenant: str, ref: str, kind: str, arg: str = "") -> pb.Instance:
    inst = client.create(tenant, "Probe", ref, params={"kind": kind, "arg": arg})
    return client.wait(tenant, inst.id, timeout=60)


def failure(done: pb.Instance) -> str:
    assert done.status == pb.STATUS_ERRORED, done
    step = done.steps[0]
    assert step.status == "failed" and step.attempts == 1
    return f"{step.error.name}: {step.error.message}"


def test_infinite_loop_hits_the_cpu_limit(client: Client, tenant: str, ref: str) -> None:
    assert "CPU limit exceeded (3 s of CPU per step)" in failure(attack(client, tenant, ref, "loop"))


def test_memory_bomb_fails_its_step(client: Client, tenant: str, ref: str) -> None:
    assert "MemoryError: out of memory" in failure(attack(client, tenant, ref, "memory"))


@pytest.mark.parametrize(("kind", "needle"), [("exit", "exited with status 3"), ("segfault", "SIGSEGV")])
def test_crashes_fail_their_step(client: Client, tenant: str, ref: str, kind: str, needle: str) -> None:
    assert needle in failure(attack(client, tenant, ref, kind))


def test_kernel_environment_is_invisible(client: Client, tenant: str, ref: str) -> None:
    done = attack(client, tenant, ref, "env")
    assert done.status == pb.STATUS_COMPLETE
    env = Client.output(done)
    assert KERNEL_SECRET not in str(env) and "TENANTFLOW_TEST_SECRET" not in env and "HOME" not in env


def test_kernel_files_are_unreadable(client: Client, tenant: str, ref: str, kernel: KernelProcess) -> None:
    database = kernel.data_dir / "tenantflow.sqlite3"
    assert database.exists()
    assert "PermissionError" in failure(attack(client, tenant, ref, "read", str(database)))
    assert "PermissionError" in failure(attack(client, tenant, ref, "read", "/etc/passwd"))


def test_files_cannot_be_written(client: Client, tenant: str, ref: str, kernel: KernelProcess) -> None:
    assert "Error" in failure(attack(client, tenant, ref, "write", str(kernel.data_dir / "planted.txt")))
    assert not (kernel.data_dir / "planted.txt").exists()


def test_network_is_unreachable(client: Client, tenant: str, ref: str, kernel: KernelProcess) -> None:
    message = failure(attack(client, tenant, ref, "connect", kernel.address))
    assert "OSError" in message or "Error" in message


def test_a_tenant_cannot_signal_the_template_or_other_runs(client: Client, tenant: str, ref: str) -> None:
    assert "PermissionError" in failure(attack(client, tenant, ref, "kill"))
    assert attack(client, tenant, ref, "env").status == pb.STATUS_COMPLETE  # the template still forks runs


def test_escaping_syscalls_are_filtered(client: Client, tenant: str, ref: str) -> None:
    done = attack(client, tenant, ref, "unshare")
    assert Client.output(done) == [-1, 1]  # EPERM: no new user namespace from inside the sandbox


def test_runs_start_threads_but_no_processes(client: Client, tenant: str, ref: str) -> None:
    done = attack(client, tenant, ref, "fork")
    assert Client.output(done) == [1, 1, "thread"], failure(done)  # EPERM twice, then a thread ran


def test_loop_outside_a_step_errors_the_instance(client: Client, tenant: str, ref: str) -> None:
    inst = client.create(tenant, "LoopOutsideSteps", ref)
    done = client.wait(tenant, inst.id, timeout=60)
    assert done.status == pb.STATUS_ERRORED
    assert done.error.name == "SandboxCrash" and "CPU limit exceeded" in done.error.message


def test_other_tenants_keep_running_during_an_attack(client: Client, tenant: str, ref: str) -> None:
    bomb = client.create(tenant, "Probe", ref, params={"kind": "loop"})
    calm_ref = publish(
        client,
        tenant + "-calm",
        """
        from tenantflow.workflow import WorkflowEntrypoint

        class Calm(WorkflowEntrypoint):
            async def run(self, event, step):
                return await step.do("ok", lambda: "fine")
        """,
    )
    calm = client.create(tenant + "-calm", "Calm", calm_ref)
    assert Client.output(client.wait(tenant + "-calm", calm.id, timeout=10)) == "fine"
    assert client.get(tenant, bomb.id).status in (pb.STATUS_RUNNING, pb.STATUS_ERRORED)
    assert client.wait(tenant, bomb.id, timeout=60).status == pb.STATUS_ERRORED


def _exited(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie, or reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def children_running(parent: int, needle: str) -> list[int]:
    """Pids whose parent is ``parent`` and whose command line contains ``needle`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and needle in cmdline:
            found.append(int(entry.name))
    return found


def test_a_dead_template_is_replaced(fresh_kernel: KernelProcess, tenant: str) -> None:
    with fresh_kernel.client() as client:
        ref = publish(client, tenant, HOSTILE)
        assert attack(client, tenant, ref, "env").status == pb.STATUS_COMPLETE
        assert fresh_kernel.proc is not None
        (template,) = children_running(fresh_kernel.proc.pid, "sandbox_subprocess.zygote")
        os.kill(template, signal.SIGKILL)
        # Dead, not dying: a run that starts while the kill is still being delivered (a loaded
        # machine) can take a spare of the template before anyone can tell it is going.
        wait_for(lambda: _exited(template), timeout=10)
        assert attack(client, tenant, ref, "env").status == pb.STATUS_COMPLETE
        assert children_running(fresh_kernel.proc.pid, "sandbox_subprocess.zygote") != [template]


def test_operator_can_grant_the_network(tmp_path: Path, tenant: str) -> None:
    kernel = KernelProcess(tmp_path / "kernel", [*TEST_LIMITS, "--sandbox-network"])
    kernel.start()
    try:
        with kernel.client() as client, socket.create_server(("127.0.0.1", 0)) as listener:
            ref = publish(client, tenant, HOSTILE)
            port = listener.getsockname()[1]
            done = attack(client, tenant, ref, "connect", f"localhost:{port}")  # /etc/hosts is readable
            assert Client.output(done) == "connected", failure(done)
            assert "PermissionError" in failure(attack(client, tenant, ref, "read", "/etc/passwd"))
        assert any("network access granted" in line for line in kernel.lines)
    finally:
        kernel.stop()
