"""Low-level Linux confinement shared by the python sandbox's template and the code checker's
fork server (:mod:`tenantflow.plugins.sandboxing.isolated`): capability sets, no_new_privs, Landlock, the
network namespace and the parent-death signal, through ctypes. Each helper answers what it could
not do; the caller decides whether that is fatal."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import struct
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_CAPBSET_READ, PR_CAPBSET_DROP = 23, 24
PR_GET_SECUREBITS, PR_SET_SECUREBITS = 27, 28
PR_SET_NO_NEW_PRIVS, PR_GET_NO_NEW_PRIVS = 38, 39
PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, PR_CAP_AMBIENT_CLEAR_ALL = 47, 1, 4
# SECBIT_NOROOT, NO_SETUID_FIXUP and NO_CAP_AMBIENT_RAISE on, KEEP_CAPS off, each with its _LOCKED bit
SECUREBITS_LOCKED = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_RULE_PATH_BENEATH = 1
_FS_EXECUTE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 2, 1 << 3
_FS_ALL_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
# read, write, create and remove regular files and directories (not devices, sockets or links)
_FS_READ_WRITE = (
    _FS_READ_FILE | _FS_READ_DIR | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 7) | (1 << 8) | (1 << 14)
)
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1 << 0, 1 << 1

libc = ctypes.CDLL(None, use_errno=True)


def syscall(number: int, *args: object) -> int:
    result: int = libc.syscall(ctypes.c_long(number), *args)
    return result


# What name resolution and TLS read, granted read-only with the network (where they exist).
NETWORK_READ_PATHS = (
    "/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf", "/etc/gai.conf", "/etc/host.conf",
    "/etc/services", "/etc/protocols", "/etc/ssl", "/etc/pki", "/etc/ca-certificates",
    "/usr/share/ca-certificates", "/usr/lib/ssl",
)  # fmt: skip


def read_only_paths(network: bool = False) -> list[str]:
    """Directories tenant code may read: the interpreter, its stdlib and installed packages."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, "/usr/share/zoneinfo"}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        candidates.add(sysconfig.get_path(key))
    candidates.update(p for p in sys.path if p and os.path.isdir(p))
    if network:
        candidates.update(NETWORK_READ_PATHS)
    return sorted(p for p in candidates if p and os.path.exists(p))


def landlock(paths: list[str], writable: list[str], network: bool) -> str:
    abi = landlock_abi()
    if abi < 1:
        return f"landlock unavailable (errno {ctypes.get_errno()})"
    handled_fs = _FS_ALL_BY_ABI.get(abi, _FS_ALL_BY_ABI[5])
    handled_net = (_NET_BIND_TCP | _NET_CONNECT_TCP) if abi >= 4 and not network else 0
    scoped = (_SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL) if abi >= 6 else 0
    if abi >= 6:
        attr = struct.pack("=QQQ", handled_fs, handled_net, scoped)
    elif abi >= 4:
        attr = struct.pack("=QQ", handled_fs, handled_net)
    else:
        attr = struct.pack("=Q", handled_fs)
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = syscall(_SYS_LANDLOCK_CREATE_RULESET, buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        return f"landlock ruleset refused (errno {ctypes.get_errno()})"
    try:
        rules = [(p, _FS_EXECUTE | _FS_READ_FILE | (_FS_READ_DIR if os.path.isdir(p) else 0)) for p in paths]
        rules += [(p, _FS_READ_WRITE & handled_fs) for p in writable if os.path.isdir(p)]
        for path, access in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = ctypes.create_string_buffer(struct.pack("=Qi", access, fd), 12)
                syscall(_SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH),
                         rule, ctypes.c_uint32(0))  # fmt: skip
            finally:
                os.close(fd)
        if syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            return f"landlock restrict_self failed (errno {ctypes.get_errno()})"
    finally:
        os.close(ruleset)
    return ""


def die_with_parent(parent: int) -> bool:
    """SIGKILL this process when the thread that started it dies; False if ``parent`` is gone
    already (it died before the death signal was set: the race a fork or spawn always has)."""
    libc.prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL), ctypes.c_ulong(0),
                ctypes.c_ulong(0), ctypes.c_ulong(0))  # fmt: skip
    return os.getppid() == parent


PR_SET_NAME = 15


def set_name(name: bytes) -> None:
    """This thread's name as ``ps`` and ``/proc/<pid>/comm`` show it (at most 15 bytes)."""
    libc.prctl(ctypes.c_int(PR_SET_NAME), ctypes.c_char_p(name[:15]), ctypes.c_ulong(0),
               ctypes.c_ulong(0), ctypes.c_ulong(0))  # fmt: skip


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def prctl(option: int, arg: int = 0, arg3: int = 0) -> int:
    result: int = libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(arg3),
                              ctypes.c_ulong(0), ctypes.c_ulong(0))  # fmt: skip
    return result


def _last_cap() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return 63  # PR_CAPBSET_READ answers EINVAL past the last one: counted out below


def capability_state() -> dict[str, int]:
    """This process's capability sets as bit masks, and its securebits (what /proc/self/status shows)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    bounding = ambient = 0
    for cap in range(_last_cap() + 1):
        if prctl(PR_CAPBSET_READ, cap) == 1:
            bounding |= 1 << cap
        if prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, cap) == 1:
            ambient |= 1 << cap
    return {
        "effective": data[0].effective | data[1].effective << 32,
        "permitted": data[0].permitted | data[1].permitted << 32,
        "inheritable": data[0].inheritable | data[1].inheritable << 32,
        "bounding": bounding,
        "ambient": ambient,
        "securebits": prctl(PR_GET_SECUREBITS),
    }


def lock_capabilities() -> None:
    """While CAP_SETPCAP is still ours: empty the bounding and ambient sets, lock the securebits
    (so setuid and execve, setuid binaries included, never give uid 0 a capability again)."""
    for cap in range(_last_cap() + 1):
        prctl(PR_CAPBSET_DROP, cap)
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED)


@contextlib.contextmanager
def without_effective_capabilities() -> Iterator[None]:
    """Empty the effective set for a while (permitted stays, so it comes back): a check of what
    an uid may do must not pass through CAP_DAC_OVERRIDE, which a uid change keeps while the
    securebits say NO_SETUID_FIXUP."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    saved = [half.effective for half in data]
    for half in data:
        half.effective = 0
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    try:
        yield
    finally:
        for half, effective in zip(data, saved, strict=True):
            half.effective = effective
        libc.capset(ctypes.byref(header), data)


def clear_capabilities() -> str:
    """Empty the effective, permitted and inheritable sets, then check every set: a problem, or ""."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capset(ctypes.byref(header), data) != 0:
        return f"capset failed (errno {ctypes.get_errno()})"
    try:
        state = capability_state()
    except OSError as exc:
        return str(exc)
    left = [name for name in ("effective", "permitted", "inheritable", "ambient") if state[name]]
    # Without CAP_SETPCAP (a non-root kernel granting the network: no user namespace) the bounding
    # set cannot shrink; with no capability held and no_new_privs it can never be used.
    if state["bounding"] and (os.geteuid() == 0 or prctl(PR_GET_NO_NEW_PRIVS) != 1):
        left.append("bounding")
    if os.geteuid() == 0 and state["securebits"] & SECUREBITS_LOCKED != SECUREBITS_LOCKED:
        left.append("securebits (not locked)")
    return f"capability sets still hold something: {', '.join(left)}" if left else ""


def scope_child() -> bool:
    """Put this child in its own nested Landlock domain that may not signal outside itself: a
    tenant cannot kill the template, another tenant's run, or anything else. False where the
    kernel's Landlock lacks signal scoping (ABI < 6)."""
    abi = landlock_abi()
    if abi < 6:
        return False
    attr = ctypes.create_string_buffer(struct.pack("=QQQ", 0, 0, _SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL), 24)
    ruleset = syscall(_SYS_LANDLOCK_CREATE_RULESET, attr, ctypes.c_size_t(24), ctypes.c_uint32(0))
    if ruleset < 0:
        return False
    try:
        return syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) == 0
    finally:
        os.close(ruleset)


def unshare_network() -> str:
    """A fresh, empty network namespace for this process (with a user namespace when not root,
    which may not make one alone); a problem, or ""."""
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    if libc.unshare(ctypes.c_int(flags)) != 0:
        return f"unshare failed (errno {ctypes.get_errno()})"
    return ""


def no_new_privs() -> str:
    """Set no_new_privs (execve never gains privileges again); a problem, or ""."""
    if prctl(PR_SET_NO_NEW_PRIVS, 1) != 0:
        return f"prctl failed (errno {ctypes.get_errno()})"
    return ""


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0 or less: no Landlock)."""
    version: int = syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return version
