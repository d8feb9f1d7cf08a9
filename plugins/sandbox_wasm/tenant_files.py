"""Guest file I/O with the tenant's privileges, not the kernel's.

wasmtime performs a guest's WASI file calls in the kernel process, so a kernel running as root
would read a 0700 directory or append to a 0600 root-owned file inside a granted directory. Here
a guest runs with the file credentials of the python sandbox's unprivileged tenant: uid and gid
65534 (nobody), no supplementary groups. Linux keeps those credentials per thread (``setfsuid``,
``setfsgid`` and the raw ``setgroups`` syscall change the calling thread only), so
:func:`as_tenant` switches the guest's own thread for the time it runs, and the kernel's other
threads keep theirs.

wasmtime does the I/O itself on its tokio threads (``tokio-rt-worker``), not on the guest's thread.
A new thread inherits its creator's credentials, and those threads are only ever created from
inside a guest call (every guest runs under :func:`as_tenant`), so they hold the tenant's too.
That is checked, not assumed: before a run that has granted directories, :func:`io_threads_problem`
reads every such thread's credentials, and the run is refused if one could act as the kernel.

Symlinks need nothing here: wasmtime's WASI (cap-std) resolves every path beneath its preopened
directory (``openat2`` with ``RESOLVE_BENEATH``), so no link leads out of a grant. A kernel that is
not root runs guests with its own uid, as the python sandbox runs tenant code then.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from collections.abc import Iterator
from pathlib import Path

TENANT_UID = TENANT_GID = 65534  # nobody / nogroup, as the python sandbox
IO_THREAD = "tokio-rt-worker"  # wasmtime's WASI threads (comm)
# setgroups, setfsuid, setfsgid: raw syscalls (glibc's setgroups would change every thread)
_SYSCALLS = {"x86_64": (116, 122, 123), "aarch64": (159, 151, 152)}
_libc = ctypes.CDLL(None, use_errno=True)


class TenantFilesError(RuntimeError):
    """The guest's thread could not take the tenant's file credentials."""


def switches() -> bool:
    """Whether guests get other file credentials than the kernel (the kernel runs as root)."""
    return os.geteuid() == 0 and platform.system() == "Linux"


def _numbers() -> tuple[int, int, int]:
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        raise TenantFilesError(
            f"wasm guests with a kernel running as root are not supported on {platform.machine()}"
        )
    return numbers


def _set(uid: int, gid: int, groups: list[int]) -> None:
    setgroups, setfsuid, setfsgid = _numbers()
    array = (ctypes.c_uint * max(1, len(groups)))(*groups)
    if _libc.syscall(setgroups, len(groups), array) != 0:
        raise TenantFilesError(f"setgroups failed: {os.strerror(ctypes.get_errno())}")
    _libc.syscall(setfsgid, gid)
    _libc.syscall(setfsuid, uid)
    # setfsuid/setfsgid report no error: an invalid id (-1) changes nothing and returns the current one
    now = (_libc.syscall(setfsuid, -1), _libc.syscall(setfsgid, -1))
    if now != (uid, gid):
        raise TenantFilesError(
            f"cannot switch guest file access to uid {uid}/gid {gid} (still {now[0]}/{now[1]}): "
            "the kernel needs CAP_SETUID and CAP_SETGID, or run it as an ordinary user"
        )


@contextlib.contextmanager
def as_tenant() -> Iterator[None]:
    """File access of the current thread as the tenant, for the duration (a no-op unless root)."""
    if not switches():
        yield
        return
    groups = os.getgroups()
    _set(TENANT_UID, TENANT_GID, [])
    try:
        yield
    finally:
        _set(os.geteuid(), os.getegid(), groups)


def _credentials(status: str) -> tuple[int, int, str]:
    """(fsuid, fsgid, supplementary groups) from a /proc task's ``status``."""
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields["Uid"].split()[3]), int(fields["Gid"].split()[3]), fields.get("Groups", "").strip()


def io_threads_problem() -> str:
    """Why some wasmtime I/O thread of this process could act with the kernel's file access ("")."""
    if not switches():
        return ""
    for task in Path("/proc/self/task").iterdir():
        try:
            if (task / "comm").read_text().strip() != IO_THREAD:
                continue
            fsuid, fsgid, groups = _credentials((task / "status").read_text())
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended
        if (fsuid, fsgid, groups) != (TENANT_UID, TENANT_GID, ""):
            return (
                f"a wasmtime I/O thread ({task.name}) accesses files as uid {fsuid}/gid {fsgid} "
                f"(groups {groups or 'none'}), not as the tenant uid {TENANT_UID}: granted directories "
                "are not offered to this run"
            )
    return ""
