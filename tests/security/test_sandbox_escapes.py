"""Red-team findings F1, F4 and F7 against the python sandbox: host UNIX sockets, thread bombs,
file leases, dnotify and flock. Each attack runs as a tenant step; the test asserts it failed *and*
that another tenant's workflow completed meanwhile."""

from __future__ import annotations

import errno
import os
import socket
import sys
from pathlib import Path

import pytest

from tenantflow.client import Client
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.helpers import publish
from tests.security.bystander import bystander_completes

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the sandbox's filters need Linux"
)

ESCAPES = """
import ctypes, errno, fcntl, os, socket, threading
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
