"""The seccomp allow-list of the subprocess sandbox: what CPython and our runtime need, nothing else.

Derived by tracing the template and its children through the python-sandbox test surface
(``tests/plugins/sandbox_subprocess``, the python conformance suite, ``tests/kernel/test_steps.py``)
and widened only by plain file, socket, thread and time calls a tenant's ordinary Python makes.
Everything else fails with EPERM (default action): the clock, hostname, kernel log, scheduler
policy, priorities, fanotify/inotify, mounts, namespaces, ptrace, bpf, perf, keys, io_uring,
userfaultfd, personality, kexec, SysV/POSIX IPC (shared with the host), ``chmod``/``chown``/
``utimensat`` (Landlock does not cover attribute changes, and uid 0 owns the host's files),
``socket`` unless the network is granted (Landlock does not cover connecting to a socket file),
file leases, dnotify and ``flock``, and ``execve``. Names an architecture lacks are skipped.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

ALLOWED = (
    # memory
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "msync",
    # files and descriptors (Landlock decides which paths)
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2",
    "pwritev2", "lseek", "open", "openat", "close", "close_range", "dup", "dup2", "dup3", "fcntl",
    "stat", "fstat", "lstat", "newfstatat", "statx", "statfs", "fstatfs", "access", "faccessat",
    "faccessat2", "readlink", "readlinkat", "getdents", "getdents64", "getcwd", "chdir", "fchdir",
    "mkdir", "mkdirat", "rmdir", "unlink", "unlinkat", "rename", "renameat", "renameat2",
    "truncate", "ftruncate", "fsync", "fdatasync", "fallocate", "fadvise64", "umask",
    "sendfile", "copy_file_range", "pipe", "pipe2", "eventfd2",
    # waiting and time (reading clocks only)
    "select", "pselect6", "poll", "ppoll", "epoll_create", "epoll_create1", "epoll_ctl",
    "epoll_wait", "epoll_pwait", "epoll_pwait2", "nanosleep", "clock_nanosleep", "clock_gettime",
    "clock_getres", "gettimeofday", "time", "alarm", "getitimer", "setitimer", "timerfd_create",
    "timerfd_settime", "timerfd_gettime",
    # threads, signals, exit
    "futex", "futex_waitv", "set_robust_list", "set_tid_address", "rseq", "arch_prctl",
    "sched_yield", "sched_getaffinity", "sched_getparam", "sched_getscheduler",
    "sched_get_priority_max", "sched_get_priority_min", "rt_sigaction", "rt_sigprocmask",
    "rt_sigreturn", "rt_sigpending", "rt_sigsuspend", "rt_sigtimedwait", "sigaltstack", "pause",
    "restart_syscall", "exit", "exit_group",
    # who am I (read-only)
    "getpid", "getppid", "gettid", "getuid", "geteuid", "getgid", "getegid", "getresuid",
    "getresgid", "getgroups", "getpgid", "getpgrp", "getsid", "uname", "sysinfo", "getrusage",
    "times", "getcpu", "getpriority", "capget", "getrlimit", "setrlimit", "getrandom",
    # sockets: a run's transport is inherited and ``socketpair`` makes private pairs; ``socket``
    # itself only with the network granted (see ``build_filter``)
    "socketpair", "connect", "accept", "accept4", "bind", "listen", "shutdown", "getsockname",
    "getpeername", "getsockopt", "setsockopt", "sendto", "recvfrom", "sendmsg", "recvmsg",
    "sendmmsg", "recvmmsg",
)  # fmt: skip

# The template only: forking runs, reaping them, confining each one. A run's own filter drops these.
TEMPLATE_ONLY = (
    "fork", "vfork", "wait4", "waitid", "setsid", "seccomp", "landlock_create_ruleset",
    "landlock_add_rule", "landlock_restrict_self",
)  # fmt: skip

# Extended attributes are not Landlock-governed either: "not supported" lets shutil and friends carry on.
XATTR = (
    "getxattr", "lgetxattr", "fgetxattr", "listxattr", "llistxattr", "flistxattr", "setxattr",
    "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
)  # fmt: skip

# ioctl requests: isatty (TCGETS), terminal size, bytes readable, blocking mode, close-on-exec.
IOCTLS = (0x5401, 0x5413, 0x541B, 0x5421, 0x5450, 0x5451)
# prctl options: death signal, name, dumpable, and reading the privilege state (capabilities,
# securebits, seccomp, no_new_privs); PR_CAP_AMBIENT only with PR_CAP_AMBIENT_IS_SET.
PR_SET_PDEATHSIG = 1
PRCTLS = (PR_SET_PDEATHSIG, 2, 3, 15, 16, 21, 23, 27, 38, 39)
PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET = 47, 1
CLONE_THREAD = 0x00010000
F_SETLEASE, F_NOTIFY = 1024, 1026
_LOW32 = 0xFFFFFFFF


def build_filter(seccomp: Any, *, network: bool, memfd: bool = False) -> Any:
    """The template's allow-list as a pyseccomp filter (default: EPERM); its runs inherit it.
    ``memfd_create`` only with ``memfd``: its pages are memory no rlimit counts, so only where the
    run's memory cgroup does."""
    rules = seccomp.SyscallFilter(seccomp.ERRNO(errno.EPERM))
    allow = seccomp.ALLOW
    for name in (*ALLOWED, *TEMPLATE_ONLY, "clone", "kill", "tgkill", *(("memfd_create",) if memfd else ())):
        _add(rules, allow, name)
    for name in XATTR:
        _add(rules, seccomp.ERRNO(errno.EOPNOTSUPP), name)
    _add(rules, seccomp.ERRNO(errno.ENOSYS), "clone3")  # glibc then falls back to clone, which we can filter
    for request in IOCTLS:
        _add(rules, allow, "ioctl", _masked(seccomp, 1, request))
    # No socket() without the network: Landlock does not cover connect() on a socket file, so an
    # AF_UNIX socket would reach docker.sock, dbus or systemd as uid 0. With the network granted,
    # IP and netlink (name resolution) only: host daemons' UNIX sockets stay out of reach.
    for family in (socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK) if network else ():
        _add(rules, allow, "socket", _masked(seccomp, 0, family))
    _add(rules, allow, "prlimit64", seccomp.Arg(0, seccomp.EQ, 0))  # its own limits, never another process's
    for option in PRCTLS:
        _add(rules, allow, "prctl", _masked(seccomp, 0, option))
    _add(
        rules, allow, "prctl", _masked(seccomp, 0, PR_CAP_AMBIENT), _masked(seccomp, 1, PR_CAP_AMBIENT_IS_SET)
    )
    return rules


def build_run_filter(seccomp: Any, pid: int) -> Any:
    """One run's filter, stacked on the template's (the stricter answer wins): threads but no
    processes (``clone`` only with ``CLONE_THREAD``), signals only to itself, its death signal
    fixed, no new session, filter or Landlock domain, no file lease or dnotify. A handful of rules: a run starts fast."""
    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    deny = seccomp.ERRNO(errno.EPERM)
    for name in TEMPLATE_ONLY:
        if not name.startswith("landlock_"):  # Landlock only narrows: a run narrows itself to its workspace
            _add(rules, deny, name)
    _add(rules, deny, "clone", _masked(seccomp, 0, 0, CLONE_THREAD))
    _add(rules, deny, "kill", seccomp.Arg(0, seccomp.NE, pid))
    _add(rules, deny, "tgkill", seccomp.Arg(0, seccomp.NE, pid))
    _add(rules, deny, "prctl", _masked(seccomp, 0, PR_SET_PDEATHSIG))
    # File leases and dnotify on the interpreter's files (uid 0 owns them) would stall or watch
    # the host. (``flock`` is not on the allow-list at all: it needs no write access to a file.)
    for command in (F_SETLEASE, F_NOTIFY):
        _add(rules, deny, "fcntl", _masked(seccomp, 1, command))
    return rules


def _add(rules: Any, action: Any, name: str, *args: Any) -> None:
    try:
        rules.add_rule(action, name, *args)
    except (OSError, ValueError, RuntimeError):  # a syscall this architecture lacks
        pass


def _masked(seccomp: Any, index: int, value: int, mask: int = _LOW32) -> Any:
    """Argument ``index`` equals ``value`` in the bits of ``mask`` (ints are 32-bit in registers)."""
    return seccomp.Arg(index, seccomp.MASKED_EQ, mask, value & mask)
