"""Process confinement for the sandbox template and its children (Linux; best effort elsewhere).

The template (zygote) confines itself once, so every forked child inherits it for free:
no network (a fresh network namespace, unless the operator grants it), read-only access to the interpreter's directories only
(Landlock), no privilege gain, an unprivileged uid where the interpreter stays readable.
Each child then sets its own resource limits. What could not be applied is reported, never hidden.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
import stat
import struct
import sys
import sysconfig
from pathlib import Path
from typing import Any

CLONE_THREAD = 0x00010000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_NO_NEW_PRIVS = 38
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

# Syscalls tenant code has no business making: debugging other processes, kernel modules and
# keys, mounts and namespaces (escaping the confinement), eBPF, io_uring. They fail with EPERM.
DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root", "chroot",
    "bpf", "perf_event_open", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "keyctl", "add_key", "request_key", "userfaultfd", "unshare", "setns",
    "swapon", "swapoff", "reboot", "acct", "quotactl", "open_by_handle_at", "name_to_handle_at",
    "io_uring_setup", "personality",
)  # fmt: skip

_libc = ctypes.CDLL(None, use_errno=True)


def _syscall(number: int, *args: object) -> int:
    result: int = _libc.syscall(ctypes.c_long(number), *args)
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


def _landlock(paths: list[str], writable: list[str], network: bool) -> str:
    abi = _syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
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
    ruleset = _syscall(_SYS_LANDLOCK_CREATE_RULESET, buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        return f"landlock ruleset refused (errno {ctypes.get_errno()})"
    try:
        rules = [(p, _FS_EXECUTE | _FS_READ_FILE | (_FS_READ_DIR if os.path.isdir(p) else 0)) for p in paths]
        rules += [(p, _FS_READ_WRITE & handled_fs) for p in writable if os.path.isdir(p)]
        for path, access in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = ctypes.create_string_buffer(struct.pack("=Qi", access, fd), 12)
                _syscall(_SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH),
                         rule, ctypes.c_uint32(0))  # fmt: skip
            finally:
                os.close(fd)
        if _syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            return f"landlock restrict_self failed (errno {ctypes.get_errno()})"
    finally:
        os.close(ruleset)
    return ""


_pyseccomp: Any = None  # the module, once the template loaded it (children filter with it too)


def _load_pyseccomp() -> Any:
    """Import pyseccomp before the file view is confined (finding libseccomp needs ldconfig)."""
    global _pyseccomp
    try:
        import pyseccomp

        _pyseccomp = pyseccomp
        return pyseccomp
    except Exception as exc:  # libseccomp missing on this machine
        return f"syscall filter off: {exc}"


def _deny(seccomp: Any, rules: Any, names: tuple[str, ...]) -> None:
    """Make each syscall in ``names`` fail with EPERM (skipping those this architecture lacks)."""
    for name in names:
        try:
            rules.add_rule(seccomp.ERRNO(errno.EPERM), name)
        except Exception:  # noqa: S112 - a syscall this architecture does not have
            continue


def no_new_processes() -> None:
    """In a run's child: threads yes, processes no, so a fork bomb fails with EPERM instead of
    filling the machine's process table (RLIMIT_NPROC does not bind root, nor separate tenants
    sharing one uid). ``clone`` is refused without ``CLONE_THREAD``; ``clone3`` answers ENOSYS, as
    its flags are out of a filter's reach and glibc then falls back to ``clone``."""
    seccomp = _pyseccomp
    if seccomp is None:  # no libseccomp: the template already reported the filter off
        return
    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    _deny(seccomp, rules, ("fork", "vfork"))
    rules.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_THREAD, 0))
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    rules.load()


def _seccomp(pyseccomp: Any) -> str:
    if isinstance(pyseccomp, str):
        return pyseccomp
    rules = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    _deny(pyseccomp, rules, DENIED_SYSCALLS)
    try:
        rules.load()
    except OSError as exc:
        return f"syscall filter off: {exc}"
    return ""


def scope_child() -> bool:
    """Put this child in its own nested Landlock domain that may not signal outside itself: a
    tenant cannot kill the template, another tenant's run, or anything else. False where the
    kernel's Landlock lacks signal scoping (ABI < 6)."""
    abi = _syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 6:
        return False
    attr = ctypes.create_string_buffer(struct.pack("=QQQ", 0, 0, _SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL), 24)
    ruleset = _syscall(_SYS_LANDLOCK_CREATE_RULESET, attr, ctypes.c_size_t(24), ctypes.c_uint32(0))
    if ruleset < 0:
        return False
    try:
        return _syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) == 0
    finally:
        os.close(ruleset)


def _world_readable(path: str) -> bool:
    """True if every directory up to ``path`` can be traversed by any user."""
    current = Path(path).resolve()
    for part in [current, *current.parents]:
        try:
            mode = part.stat().st_mode
        except OSError:
            return False
        if not mode & stat.S_IXOTH:
            return False
    return True


def confine_template(
    *, network: bool = False, filesystem: bool = True, writable: list[str] | None = None
) -> list[str]:
    """Confine the calling (template) process for good; return what could not be applied."""
    off: list[str] = []
    pyseccomp = _load_pyseccomp()
    if not network:
        flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
        if _libc.unshare(ctypes.c_int(flags)) != 0:
            off.append(f"network isolation off: unshare failed (errno {ctypes.get_errno()})")
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        off.append("no_new_privs off")
    if os.geteuid() == 0:
        if all(_world_readable(p) for p in (sys.base_prefix, sys.prefix)):
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            except OSError as exc:
                off.append(f"running as root: could not drop to uid 65534 ({exc})")
        else:
            off.append(
                f"running as root: the interpreter under {sys.base_prefix} is not readable by an unprivileged uid"
            )
    if filesystem:
        problem = (
            _landlock(read_only_paths(network), writable or [], network)
            if sys.platform == "linux"
            else "landlock needs Linux"
        )
        if problem:
            off.append(f"file isolation off: {problem}")
    problem = _seccomp(pyseccomp)  # last: it forbids the unshare and landlock set-up above
    if problem:
        off.append(problem)
    return off


def limit_child(memory_bytes: int, cpu_seconds: float, open_files: int, file_bytes: int = 0) -> None:
    """Resource limits for one sandboxed run (called in the forked child)."""
    cpu = max(1, int(cpu_seconds + 0.999))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writing a file then fails with EFBIG instead of killing
