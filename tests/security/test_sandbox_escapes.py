"""Red-team findings F1, F4 and F7 against the python sandbox (host UNIX sockets, thread bombs,
file leases, dnotify and flock) and F6 against the Publish checker. Each sandbox attack runs as a
tenant step; the test asserts it failed *and* that another tenant's workflow completed meanwhile.
The checker's cases call its fork server directly, as the kernel's Publish does."""

from __future__ import annotations

import errno
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import wasmtime

from tenantflow.client import Client
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.sandbox import CodeError
from tenantflow.plugins.sandbox_subprocess.cgroups import MAX_TASKS
from tenantflow.plugins.sandbox_subprocess.spares import SPARES
from tenantflow.plugins.sandboxing import isolated
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import KernelProcess
from tests.helpers import publish, wait_for
from tests.security.bystander import bystander_completes

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the sandbox's filters need Linux"
)

ESCAPES = """
import ctypes, errno, fcntl, os, socket, threading, time
from tenantflow.workflow import WorkflowEntrypoint

ONCE = {"retries": {"limit": 0}}


def os_errno(fn, *args):
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno
    return 0


def connect_unix(path):
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        return ["socket", exc.errno]
    try:
        sock.connect(path)
    except OSError as exc:
        return ["connect", exc.errno]
    return ["connected", 0]


def other_sockets():
    found = {}
    for name in ("AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET"):
        found[name] = os_errno(socket.socket, getattr(socket, name), socket.SOCK_DGRAM)
    a, b = socket.socketpair()  # what asyncio and the runtime use: still allowed
    a.sendall(b"x")
    found["socketpair"] = b.recv(1).decode()
    return found


def locks(path, directory):
    fd = os.open(path, os.O_RDONLY)
    dfd = os.open(directory, os.O_RDONLY)
    try:
        return {
            "lease": os_errno(fcntl.fcntl, fd, fcntl.F_SETLEASE, fcntl.F_RDLCK),
            "notify": os_errno(fcntl.fcntl, dfd, fcntl.F_NOTIFY, fcntl.DN_CREATE),
            "flock": os_errno(fcntl.flock, fd, fcntl.LOCK_EX | fcntl.LOCK_NB),
            "getfl": os_errno(fcntl.fcntl, fd, fcntl.F_GETFL),  # ordinary fcntl still works
        }
    finally:
        os.close(fd)
        os.close(dfd)


def thread_bomb(count):
    threading.stack_size(32768)
    release = threading.Event()
    started, refused = [], ""
    try:
        for _ in range(count):
            thread = threading.Thread(target=release.wait, daemon=True)
            thread.start()
            started.append(thread)
    except RuntimeError as exc:
        refused = str(exc)
    time.sleep(1.0)  # hold them: a watchdog that samples must see them
    release.set()
    for thread in started:
        thread.join()
    return [len(started), refused]


class Escape(WorkflowEntrypoint):
    def run(self, event, step):
        kind, arg = event.payload["kind"], event.payload.get("arg")
        if kind == "unix":
            return step.do("unix", lambda: connect_unix(arg), **ONCE)
        if kind == "sockets":
            return step.do("sockets", other_sockets, **ONCE)
        if kind == "locks":
            return step.do("locks", lambda: locks(*arg), **ONCE)
        if kind == "threads":
            return step.do("threads", lambda: thread_bomb(arg), **ONCE)
        raise ValueError(kind)
"""


@pytest.fixture
def ref(client: Client, tenant: str) -> str:
    return publish(client, tenant, ESCAPES)


def escape(client: Client, tenant: str, ref: str, kind: str, arg: object = None) -> pb.Instance:
    """Run one attack as a step, another tenant's workflow in flight meanwhile; the finished instance."""
    inst = client.create(tenant, "Escape", ref, params={"kind": kind, "arg": arg})
    bystander_completes(client, tenant)
    return client.wait(tenant, inst.id, timeout=60)


def output(done: pb.Instance) -> object:
    assert done.status == pb.STATUS_COMPLETE, done
    return Client.output(done)


def test_host_unix_sockets_are_out_of_reach(client: Client, tenant: str, ref: str, tmp_path: Path) -> None:
    """F1: a root-owned listening socket file (docker.sock, dbus, systemd) outside every granted
    directory. Landlock does not cover connect(); seccomp refuses the socket itself."""
    path = tmp_path / "host.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(8)
        listener.setblocking(False)
        assert output(escape(client, tenant, ref, "unix", str(path))) == ["socket", errno.EPERM]
        with pytest.raises(BlockingIOError):
            listener.accept()  # no peer ever reached the host's listener


def test_no_socket_without_the_network_but_socketpairs_work(client: Client, tenant: str, ref: str) -> None:
    found = output(escape(client, tenant, ref, "sockets"))
    assert found == {
        "AF_INET": errno.EPERM,
        "AF_INET6": errno.EPERM,
        "AF_NETLINK": errno.EPERM,
        "AF_PACKET": errno.EPERM,
        "socketpair": "x",
    }


def test_no_lease_dnotify_or_flock_on_the_interpreters_files(client: Client, tenant: str, ref: str) -> None:
    """F7: uid 0 owns the interpreter's files; a lease would stall the host's writers for 45 s."""
    target = os.path.join(sys.prefix, "pyvenv.cfg")
    if not os.path.exists(target):
        target = os.__file__
    found = output(escape(client, tenant, ref, "locks", [target, sys.prefix]))
    assert found == {"lease": errno.EPERM, "notify": errno.EPERM, "flock": errno.EPERM, "getfl": 0}


def _sandbox_threads(kernel_pid: int) -> dict[int, int]:
    """Threads of each sandbox process (template and runs) of one kernel."""
    marker, found = f"tenantflow-kernel={kernel_pid}".encode(), {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes():
                    found[int(entry.name)] = len(os.listdir(entry / "task"))
            except OSError:
                continue
    return found


def _holds_a_spare(cgroup: Path) -> bool:
    """A run cgroup whose one process is a spare waiting for its job (no tenant code ran in it), or
    a warm runner parked for its tenant's next wake-up (one thread, back to how it started)."""
    try:
        pids = (cgroup / "cgroup.procs").read_text().split()
        return len(pids) == 1 and Path(f"/proc/{pids[0]}/comm").read_text().strip() in ("tf-spare", "tf-warm")
    except OSError:
        return False


def test_a_thread_bomb_is_held_to_the_runs_task_limit(
    client: Client, tenant: str, ref: str, kernel: KernelProcess
) -> None:
    """F4: 2,000 threads of 32 KiB stacks. RLIMIT_NPROC does not bind uid 0; the run's pids cgroup
    (or, where none can be made, the watchdog) does, so the host's pid table stays untouched."""
    assert kernel.proc is not None
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max([peak[0], *_sandbox_threads(kernel.proc.pid).values()])  # type: ignore[union-attr]
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        done = escape(client, tenant, ref, "threads", 2000)
    finally:
        stop.set()
        sampler.join()
    hard = not any("no pids cgroup" in line or "pids cgroup could not" in line for line in kernel.lines)
    if hard:
        started, refused = output(done)  # type: ignore[misc]
        assert started < MAX_TASKS and refused == "can't start new thread", (started, refused)
        assert peak[0] <= MAX_TASKS, peak
        base = next(Path("/sys/fs/cgroup").glob(f"**/tenantflow-{kernel.proc.pid}"), None)
        if base is not None:  # every run's cgroup is removed once it ends; spares waiting keep theirs
            wait_for(lambda: all(_holds_a_spare(p) for p in base.iterdir() if p.is_dir()), timeout=10)
            assert len([p for p in base.iterdir() if p.is_dir()]) <= SPARES + KernelConfig.warm_runners
    else:  # sampled: the run is killed once seen over the limit
        assert done.status == pb.STATUS_ERRORED, done
        assert "thread limit exceeded" in done.error.message, done.error.message
        assert peak[0] < 2000, peak


# -- F6: the Publish checker parses and compiles hostile input: it is confined too ----------------
def _check(target: str, *args: object, limits: isolated.ChildLimits = isolated.DEFAULT_LIMITS) -> object:
    return isolated.call(target, list(args), limits)


def test_a_check_holds_no_privilege() -> None:
    """What a check child itself reports (it cannot read /proc: Landlock), and the fork server's
    /proc/<pid>/status seen from outside."""
    state = _check("tenantflow.plugins.sandboxing.linux:capability_state")
    assert isinstance(state, dict)
    assert {
        k: state[k] for k in ("effective", "permitted", "inheritable", "bounding", "ambient")
    } == dict.fromkeys(("effective", "permitted", "inheritable", "bounding", "ambient"), 0)
    assert _check("tenantflow.plugins.sandboxing.linux:prctl", 39) == 1  # PR_GET_NO_NEW_PRIVS
    assert _check("tenantflow.plugins.sandboxing.linux:prctl", 21) == 2  # PR_GET_SECCOMP: filter mode
    server = isolated._server._proc
    assert server is not None
    status = dict(line.split(":", 1) for line in Path(f"/proc/{server.pid}/status").read_text().splitlines())
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0, status
    assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2", status


@pytest.mark.parametrize(
    ("target", "args", "error"),
    [
        ("os:listdir", ["/tmp"], "PermissionError"),  # Landlock: only the interpreter's directories
        ("os:mkdir", ["/tmp/tenantflow-checker-escape"], "PermissionError"),
        ("socket:socket", [], "PermissionError"),  # no socket at all: F1 for the checker
        ("os:kill", [os.getpid(), 0], "PermissionError"),  # signals only to itself
        ("os:fork", [], "PermissionError"),
    ],
)
def test_a_check_cannot_reach_the_host(target: str, args: list[object], error: str) -> None:
    with pytest.raises(CodeError, match=error):
        _check(target, *args)
    assert not os.path.exists("/tmp/tenantflow-checker-escape")


def test_a_confined_check_still_compiles_wasm_into_the_cache(tmp_path: Path) -> None:
    """Cranelift needs threads and executable memory; the artifact lands in the one writable directory."""
    module = wasmtime.wat2wasm('(module (memory (export "memory") 1) (func (export "workflow_Hello")))')
    cache = tmp_path / "wasm-cache"
    found = _check(
        "tenantflow.plugins.sandbox_wasm.rawcheck:inspect_packed",
        isolated.pack_files({"m.wasm": bytes(module)}),
        str(cache),
        limits=isolated.ChildLimits(writable=(str(cache),)),
    )
    assert found == {"Hello": "m.wasm"}, found
    assert [p.suffix for p in cache.iterdir()] == [".cwasm"]
