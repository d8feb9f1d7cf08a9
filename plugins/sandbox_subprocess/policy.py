"""Process confinement for the sandbox template and its children (Linux; best effort elsewhere).

The template (zygote) confines itself once, so every forked child inherits it for free: no
capabilities at all (bounding, permitted, effective, inheritable and ambient sets empty, securebits
locked so uid 0 cannot regain them), no network (a fresh network namespace, unless the operator
grants it), read-only access to the interpreter's directories and the CA certificates only
(Landlock), no privilege gain, a seccomp allow-list of system calls, and never uid 0: a root
kernel's template becomes uid 65534, with a private file view that lets that uid reach the
interpreter and the grants wherever they live (see ``tenant_uid``); an ordinary user's kernel runs
tenant code as that user. Each child then sets its own limits and filter. What could not be
applied is reported, never hidden: the kernel refuses to start the sandbox without it unless the
operator opts out.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import struct
import sys
from typing import Any, NamedTuple

from tenantflow.plugins.sandbox_subprocess import syscalls, tenant_uid
from tenantflow.plugins.sandboxing import trust
from tenantflow.plugins.sandboxing.linux import (
    NETWORK_READ_PATHS,
    capability_state,
    clear_capabilities,
    die_with_parent,
    landlock,
    lock_capabilities,
    no_new_privs,
    read_only_paths,
    scope_child,
    set_name,
    syscall,
    unshare_network,
)

__all__ = [
    "NETWORK_READ_PATHS", "Confinement", "capability_state", "confine_template", "die_with_parent",
    "filter_child", "limit_child", "read_only_paths", "scope_child", "set_name",
]  # fmt: skip

# The protections the python sandbox refuses to run without (unless the operator opts out).
CAPABILITIES = "capability drop"
NO_NEW_PRIVS = "no_new_privs"
SECCOMP = "seccomp syscall filter"
NETWORK = "network namespace"
LANDLOCK = "Landlock file isolation"
UNPRIVILEGED_UID = "an unprivileged uid"


class Confinement(NamedTuple):
    """What ``confine_template`` could not establish (``{protection: why}``), what it notes, and
    why each granted directory tenant code could not use is unusable."""

    missing: dict[str, str]
    notes: list[str]
    unusable: list[str]


_pyseccomp: Any = None  # the module, once the template loaded it (children filter with it too)


def _load_pyseccomp() -> Any:
    """Import pyseccomp before the file view is confined (finding libseccomp needs ldconfig)."""
    global _pyseccomp
    try:
        import pyseccomp

        _pyseccomp = pyseccomp
        return pyseccomp
    except Exception as exc:  # libseccomp missing on this machine
        return f"libseccomp is not available ({exc})"


# Stands for a run's own pid in the run filter built once in the template: above any pid_max.
_SENTINEL_PID = 0x7E5A1D0F
_SOCK_FILTER = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k
_SECCOMP_SET_MODE_FILTER = 1
_run_filter: tuple[bytes, list[int], int] | None = None  # BPF, offsets of the pid's k fields, syscall nr


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def run_filter_program(pid: int) -> bytes | None:
    """The run filter of process ``pid`` as BPF, patched from the one the template built (None
    where it could not build one: then each run builds its own with libseccomp)."""
    if _run_filter is None:
        return None
    program, offsets, _ = _run_filter
    patched = bytearray(program)
    for at in offsets:
        struct.pack_into("=I", patched, at, pid)
    return bytes(patched)


def _prepare_run_filter(pyseccomp: Any) -> None:
    """Build the run filter once, with a placeholder pid that each run patches to its own: building
    it with libseccomp in every run cost 0.6-0.7 ms of CPU, loading it 0.15 ms. Used only if a
    second placeholder, patched the same way, gives exactly the program libseccomp builds for it."""
    global _run_filter
    try:
        program = export_bpf(syscalls.build_run_filter(pyseccomp, _SENTINEL_PID))
        check = export_bpf(syscalls.build_run_filter(pyseccomp, _SENTINEL_PID + 1))
        number = int(pyseccomp.resolve_syscall(pyseccomp.system_arch(), "seccomp"))
    except (OSError, ValueError, RuntimeError):
        return
    if len(program) % 8 or number <= 0:
        return
    offsets = [
        at + 4
        for at in range(0, len(program), 8)
        if _SOCK_FILTER.unpack_from(program, at)[3] == _SENTINEL_PID
    ]
    _run_filter = (program, offsets, number)
    if not offsets or run_filter_program(_SENTINEL_PID + 1) != check:
        _run_filter = None


def export_bpf(rules: Any) -> bytes:
    """A pyseccomp filter's BPF program, as the kernel loads it."""
    read_end, write_end = os.pipe()
    try:
        with os.fdopen(write_end, "wb", closefd=True) as out:
            write_end = -1
            rules.export_bpf(out)
        chunks = []
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def filter_child() -> None:
    """In a run's child, stacked on the template's filter: threads yes, processes no (a fork bomb
    fails with EPERM instead of filling the process table; RLIMIT_NPROC binds neither root nor
    tenants sharing one uid), signals only to itself, and a death signal it cannot unset."""
    if _pyseccomp is None:  # no libseccomp: the template reported the filter missing
        return
    program = run_filter_program(os.getpid())
    if program is not None and _run_filter is not None:
        buffer = ctypes.create_string_buffer(program, len(program))
        fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
        if syscall(_run_filter[2], _SECCOMP_SET_MODE_FILTER, 0, ctypes.byref(fprog)) == 0:
            return
    syscalls.build_run_filter(_pyseccomp, os.getpid()).load()


def _seccomp(pyseccomp: Any, network: bool, memfd: bool) -> str:
    if isinstance(pyseccomp, str):
        return pyseccomp
    try:
        syscalls.build_filter(pyseccomp, network=network, memfd=memfd).load()
    except OSError as exc:
        return f"the filter could not be loaded ({exc})"
    return ""


def confine_template(
    *,
    network: bool = False,
    filesystem: bool = True,
    writable: list[str] | None = None,
    memfd: bool = False,
    workspaces: str | None = None,
) -> Confinement:
    """Confine the calling (template) process for good; say what could not be established.
    ``memfd``: runs may call memfd_create (only where a memory cgroup counts what they put there).
    ``workspaces``: the workspace root, writable here; each run narrows it to its own instance's
    directory (:func:`confine_run`)."""
    missing: dict[str, str] = {}
    notes: list[str] = []
    writable = writable or []
    root = os.geteuid() == 0
    unusable = [] if root else tenant_uid.unusable_grants(writable)  # before a user namespace hides owners
    pyseccomp = _load_pyseccomp()
    if not isinstance(pyseccomp, str):
        _prepare_run_filter(pyseccomp)
    if not network and (problem := unshare_network()):
        missing[NETWORK] = problem
    if problem := no_new_privs():
        missing[NO_NEW_PRIVS] = problem
    lock_capabilities()
    if root:
        if problem := _leave_root(_readable(network), [*writable, *([workspaces] if workspaces else [])]):
            missing[UNPRIVILEGED_UID] = problem
        unusable = tenant_uid.unusable_grants(writable)
    if filesystem:
        problem = (
            landlock(_readable(network), [*writable, *([workspaces] if workspaces else [])], network)
            if sys.platform == "linux"
            else "landlock needs Linux"
        )
        if problem:
            missing[LANDLOCK] = problem
    problem = clear_capabilities()
    if problem:
        missing[CAPABILITIES] = problem
    problem = _seccomp(pyseccomp, network, memfd)  # last: it forbids the set-up above
    if problem:
        missing[SECCOMP] = problem
    return Confinement(missing, notes, unusable)


def _readable(network: bool) -> list[str]:
    """What tenant code may read: the interpreter's directories, and the CA certificates its TLS
    verifies servers with (egress goes through the kernel, but TLS is the step's own)."""
    return [*read_only_paths(network), *trust.ca_paths()]


def confine_run(writable: list[str], workspace: str | None, network: bool) -> None:
    """In a run's child, before any tenant code: a Landlock layer of its own that reaches the
    operator's grants and its instance's workspace directory only, not the rest of the workspace
    root (other instances', other tenants'). Raises if it cannot: the run must not go on."""
    if problem := landlock(_readable(network), [*writable, *([workspace] if workspace else [])], network):
        raise RuntimeError(f"the run could not confine itself to its workspace: {problem}")


def _leave_root(needed: list[str], writable: list[str]) -> str:
    """As root: make ``needed`` (and the grants) reachable by the tenant uid, then become it; a
    problem, or "" (a grant the tenant uid cannot use is said by ``unusable_grants``). An ordinary
    user's kernel needs none of this: tenant code runs as that user."""
    view = tenant_uid.open_view([*needed, *writable])
    if lost := tenant_uid.unreachable_as_tenant(needed):
        return (
            f"tenant code would run as uid 0: uid {tenant_uid.TENANT_UID} cannot read {', '.join(lost)}"
            + (f" and {view}" if view else "")
            + " (install Python where any user may read it, e.g. /usr/bin/python3, or run the kernel as"
            " an ordinary user)"
        )
    return tenant_uid.drop()


def limit_child(memory_bytes: int, cpu_seconds: float, open_files: int, file_bytes: int = 0) -> None:
    """Resource limits for one sandboxed run (called in the forked child)."""
    cpu = max(1, int(cpu_seconds + 0.999))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writing a file then fails with EFBIG instead of killing
