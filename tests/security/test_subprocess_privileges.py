"""Issue 7 findings 1 and 4: tenant code in the python sandbox holds no privilege at all.

Each attack runs as a tenant step that returns the errno it got; the test asserts the attack
failed *and* that another tenant's workflow completed meanwhile. On these machines the kernel
runs as root, so the attacks are exactly those uid 0 could make if a capability were left.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tenantflow.client import Client
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish
from tests.security.bystander import bystander_completes

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")

ATTACKS = """
import ctypes, os, resource, time
from tenantflow.workflow import WorkflowEntrypoint

libc = ctypes.CDLL(None, use_errno=True)
ONCE = {"retries": {"limit": 0}}


def c_errno(result):
    return ctypes.get_errno() if result == -1 else 0


def py_errno(fn, *args):
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno
    return 0


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def prctl(option, arg2=0, arg3=0):
    return libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(0),
                      ctypes.c_ulong(0))


def capabilities():
    header, data = CapHeader(0x20080522, 0), (CapData * 2)()
    assert libc.capget(ctypes.byref(header), data) == 0, ctypes.get_errno()
    bounding = [cap for cap in range(64) if prctl(23, cap) == 1]  # PR_CAPBSET_READ
    ambient = [cap for cap in range(64) if prctl(47, 1, cap) == 1]  # PR_CAP_AMBIENT_IS_SET
    return {"effective": data[0].effective | data[1].effective, "permitted": data[0].permitted | data[1].permitted,
            "inheritable": data[0].inheritable | data[1].inheritable, "bounding": bounding, "ambient": ambient,
            "securebits": prctl(27), "uid": os.getuid(), "euid": os.geteuid()}


def capset_all():
    header, data = CapHeader(0x20080522, 0), (CapData * 2)()
    for half in data:
        half.effective = half.permitted = half.inheritable = 0xFFFFFFFF
    return c_errno(libc.capset(ctypes.byref(header), data))


def adjtimex():
    timex = ctypes.create_string_buffer(256)  # struct timex: modes at 0, maxerror at 24 (x86_64)
    ctypes.memmove(timex, (0x0004).to_bytes(4, "little"), 4)  # ADJ_MAXERROR: a harmless statistic
    ctypes.memmove(ctypes.byref(timex, 24), (16_000_000).to_bytes(8, "little"), 8)
    return c_errno(libc.adjtimex(timex))


def clock_settime():
    now = (ctypes.c_long * 2)(int(time.time()), 0)
    return c_errno(libc.clock_settime(0, now))  # CLOCK_REALTIME, to what it already is


def klogctl():
    buf = ctypes.create_string_buffer(4096)
    return c_errno(libc.klogctl(3, buf, 4096))  # SYSLOG_ACTION_READ_ALL


def fanotify():
    fd = libc.fanotify_init(ctypes.c_uint(0), ctypes.c_uint(0))  # FAN_CLASS_NOTIF, O_RDONLY
    return c_errno(fd)


def write_owned(path):
    with open(path, "w") as f:
        f.write("tenant")
    return os.stat(path).st_uid


def sched_fifo():
    return py_errno(os.sched_setscheduler, 0, os.SCHED_FIFO, os.sched_param(1))


ATTACKS = {
    "sethostname": lambda arg: c_errno(libc.sethostname(b"pwned", 5)),
    "adjtimex": lambda arg: adjtimex(),
    "clock_settime": lambda arg: clock_settime(),
    "klogctl": lambda arg: klogctl(),
    "sched_fifo": lambda arg: sched_fifo(),
    "nice": lambda arg: py_errno(os.nice, -20),
    "setpriority_other": lambda arg: py_errno(os.setpriority, os.PRIO_PROCESS, int(arg), 19),
    "fanotify_init": lambda arg: fanotify(),
    "capset": lambda arg: capset_all(),
    "ambient_raise": lambda arg: c_errno(prctl(47, 2, 21)),  # PR_CAP_AMBIENT_RAISE CAP_SYS_ADMIN
    "setuid": lambda arg: py_errno(os.setuid, 0),
    "setresuid": lambda arg: py_errno(os.setresuid, 0, 0, 0),
    "setgroups": lambda arg: py_errno(os.setgroups, [0]),
    "execve_setuid": lambda arg: py_errno(os.execv, arg, [arg, "--version"]),
    "chmod": lambda arg: py_errno(os.chmod, arg, 0o666),
    "signal_kernel": lambda arg: py_errno(os.kill, int(arg), 0),
    "prlimit_other": lambda arg: py_errno(resource.prlimit, int(arg), resource.RLIMIT_NOFILE, (1, 1)),
    "unset_death_signal": lambda arg: c_errno(prctl(1, 0)),  # PR_SET_PDEATHSIG 0: outlive the kernel
    "proc_status": lambda arg: py_errno(open, "/proc/self/status"),
    "write_owned": lambda arg: write_owned(arg),
    "list_dir": lambda arg: py_errno(os.listdir, arg),
}


class Probe(WorkflowEntrypoint):
    async def run(self, event, step):
        kind, arg = event.payload["kind"], event.payload.get("arg", "")
        if kind == "capabilities":
            return await step.do("probe", capabilities, **ONCE)
        if kind == "linger":
            return await step.do("linger", lambda: time.sleep(float(arg)), **ONCE)
        if kind == "forge":
            def forge():
                os.write(2, arg.encode() + b"\\n")
                os.write(1, b"raw stdout from a tenant\\n")
                return "written"
            return await step.do("forge", forge, **ONCE)
        if kind == "flood":
            def flood():
                chunk = b"x" * 1023 + b"\\n"
                for _ in range(int(arg)):
                    os.write(2, chunk)
                return "flooded"
            return await step.do("flood", flood, **ONCE)
        return await step.do(kind, lambda: ATTACKS[kind](arg), **ONCE)
"""


@pytest.fixture
def ref(client: Client, tenant: str) -> str:
    return publish(client, tenant, ATTACKS)


def run_attack(client: Client, tenant: str, ref: str, kind: str, arg: object = "") -> pb.Instance:
    """Run one attack as a step, with a bystander tenant's workflow in flight meanwhile."""
    inst = client.create(tenant, "Probe", ref, params={"kind": kind, "arg": str(arg)})
    bystander_completes(client, tenant)
    done = client.wait(tenant, inst.id, timeout=60)
    assert done.status == pb.STATUS_COMPLETE, done
    return done


def attack(client: Client, tenant: str, ref: str, kind: str, arg: object = "") -> object:
    """What the attack step returned (the errno it got)."""
    return Client.output(run_attack(client, tenant, ref, kind, arg))


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("sethostname", errno.EPERM),
        ("adjtimex", errno.EPERM),
        ("clock_settime", errno.EPERM),
        ("klogctl", errno.EPERM),
        ("sched_fifo", errno.EPERM),
        ("nice", errno.EPERM),
        ("fanotify_init", errno.EPERM),
        ("capset", errno.EPERM),
        ("ambient_raise", errno.EPERM),
        ("setuid", errno.EPERM),
        ("setresuid", errno.EPERM),
        ("setgroups", errno.EPERM),
        ("unset_death_signal", errno.EPERM),
        ("proc_status", errno.EACCES),  # Landlock: no /proc at all
    ],
)
def test_privileged_calls_fail(client: Client, tenant: str, ref: str, kind: str, expected: int) -> None:
    assert attack(client, tenant, ref, kind) == expected


def test_another_process_is_out_of_reach(
    client: Client, tenant: str, ref: str, kernel: KernelProcess
) -> None:
    """uid 0 without capabilities still owns the kernel's process: seccomp keeps it out of reach."""
    assert kernel.proc is not None
    for kind in ("signal_kernel", "setpriority_other", "prlimit_other"):
        assert attack(client, tenant, ref, kind, kernel.proc.pid) == errno.EPERM, kind
    assert kernel.proc.poll() is None


def test_setuid_binaries_give_nothing(client: Client, tenant: str, ref: str) -> None:
    binary = next((p for p in ("/usr/bin/su", "/bin/su", "/usr/bin/passwd") if os.path.exists(p)), None)
    if binary is None:
        pytest.skip("no setuid binary on this machine to try")
    assert attack(client, tenant, ref, "execve_setuid", binary) == errno.EPERM


def test_root_owned_files_keep_their_mode(client: Client, tenant: str, ref: str, tmp_path: Path) -> None:
    """Landlock does not cover chmod, and uid 0 owns the host's files: the filter refuses it."""
    target = tmp_path / "secret"
    target.write_text("root only")
    target.chmod(0o600)
    assert attack(client, tenant, ref, "chmod", target) == errno.EPERM
    assert target.stat().st_mode & 0o777 == 0o600


def test_a_step_holds_no_capability(client: Client, tenant: str, ref: str) -> None:
    state = attack(client, tenant, ref, "capabilities")
    assert isinstance(state, dict)
    for name in ("effective", "permitted", "inheritable"):
        assert state[name] == 0, (name, state)
    assert state["bounding"] == [] and state["ambient"] == [], state


def test_tenant_code_never_runs_as_uid_0(client: Client, tenant: str, ref: str) -> None:
    """Wherever the interpreter lives (here under /root, 0700): a root kernel runs tenant code as
    uid 65534, an ordinary user's kernel as that user."""
    state = attack(client, tenant, ref, "capabilities")
    assert isinstance(state, dict)
    assert state["uid"] != 0 and state["euid"] != 0, state
    if os.geteuid() == 0:
        assert state["uid"] == state["euid"] == 65534, state


def _status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _sandbox_processes(kernel_pid: int) -> Iterator[int]:
    marker = f"tenantflow-kernel={kernel_pid}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes():
                    yield int(entry.name)
            except OSError:
                continue


def test_proc_status_of_a_running_step_shows_no_privilege(
    client: Client, tenant: str, ref: str, kernel: KernelProcess
) -> None:
    """What /proc/<pid>/status says of the template and of a run in the middle of its step."""
    assert kernel.proc is not None
    inst = client.create(tenant, "Probe", ref, params={"kind": "linger", "arg": "3"})
    deadline, runs = time.monotonic() + 20, []
    while not runs and time.monotonic() < deadline:
        sandbox = list(_sandbox_processes(kernel.proc.pid))
        runs = [pid for pid in sandbox if _status(pid).get("PPid") in {str(p) for p in sandbox}]
        time.sleep(0.05)
    assert runs, "no run process appeared"
    for pid in sandbox:
        status = _status(pid)
        for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[field], 16) == 0, (pid, field, status[field])
        assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", status
        ids = (
            status["Uid"].split() + status["Gid"].split()
        )  # real, effective, saved, fs: as the host sees them
        assert "0" not in ids, status
    bystander_completes(client, tenant)
    assert client.wait(tenant, inst.id, timeout=60).status == pb.STATUS_COMPLETE


FORGED = "2099-01-01 00:00:00,000 ERROR tenantflow.kernel: forged by a tenant"


def test_raw_stderr_is_the_tenants_log_not_the_kernels(
    client: Client, tenant: str, ref: str, kernel: KernelProcess
) -> None:
    inst = run_attack(client, tenant, ref, "forge", FORGED)
    assert Client.output(inst) == "written"
    logs = [e.message for e in client.watch(tenant, inst.id) if e.kind == "log"]
    assert FORGED in logs and "raw stdout from a tenant" in logs, logs
    time.sleep(0.2)  # anything the kernel would have printed has been pumped by now
    assert not any("forged by a tenant" in line for line in kernel.lines)


def test_raw_output_is_bounded_per_run(client: Client, tenant: str, ref: str, kernel: KernelProcess) -> None:
    """1 MiB written straight to fd 2: 64 KiB of it reach the tenant's log, the rest is counted."""
    inst = run_attack(client, tenant, ref, "flood", 1024)
    assert Client.output(inst) == "flooded"
    logs = [e.message for e in client.watch(tenant, inst.id) if e.kind == "log"]
    kept = [line for line in logs if line.startswith("xxx")]
    assert 0 < sum(len(line) + 1 for line in kept) <= 64 * 1024
    dropped = 1024 * 1024 - 64 * 1024
    assert any(f"{dropped} more bytes this run wrote to stdout/stderr were dropped" in line for line in logs)
    assert not any("xxxxxxxx" in line for line in kernel.lines)


def _private_grant(tmp_path: Path, mode: int) -> Path:
    """A granted directory of ``mode`` under a parent no other user may enter (as pytest's own
    tmp directories are: /tmp/pytest-of-<user> is 0700)."""
    parent = tmp_path / "private"
    parent.mkdir(mode=0o700)
    (parent / "sibling").write_text("not granted")
    grant = parent / "grant"
    grant.mkdir()
    grant.chmod(mode)
    return grant


def test_a_grant_tenant_code_cannot_write_is_refused_at_start(tmp_path: Path) -> None:
    """Read-only for its owner and closed to others: whoever tenant code runs as cannot write it,
    so the kernel refuses to start, naming the owner and mode to set (it changes nothing itself)."""
    grant = _private_grant(tmp_path, 0o500)
    kernel = KernelProcess(tmp_path / "kernel", [*TEST_LIMITS, "--sandbox-writable-dir", str(grant)])
    with pytest.raises(RuntimeError, match="did not start"):
        kernel.start()
    kernel.stop()
    said = "\n".join(kernel.lines)
    info = grant.stat()
    assert f"{grant} (owner {info.st_uid}:{info.st_gid}, mode 0500)" in said, said
    assert "chmod 0777" in said and "chown" in said, said
    assert grant.stat().st_mode & 0o777 == 0o500


def test_a_grant_under_a_private_directory_is_usable_and_the_rest_stays_hidden(
    tmp_path: Path, tenant: str
) -> None:
    """The grant is reachable through its closed parent, files there are the tenant uid's (never
    root's), and the parent's other entries are out of sight."""
    grant = _private_grant(tmp_path, 0o777)
    kernel = KernelProcess(tmp_path / "kernel", [*TEST_LIMITS, "--sandbox-writable-dir", str(grant)])
    kernel.start()
    try:
        with kernel.client() as client:
            ref = publish(client, tenant, ATTACKS)
            owner = attack(client, tenant, ref, "write_owned", grant / "out.txt")
            assert owner != 0 and (grant / "out.txt").stat().st_uid != 0  # as tenant code and the host see it
            assert (grant / "out.txt").read_text() == "tenant"
            assert attack(client, tenant, ref, "list_dir", grant.parent) in (errno.EACCES, errno.EPERM)
    finally:
        kernel.stop()
