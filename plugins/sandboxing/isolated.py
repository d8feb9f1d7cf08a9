"""Run a check of tenant input in a separate, limited process: the kernel never parses or compiles
tenant code itself.

``call("pkg.mod:func", args)`` runs ``func(*args)`` in a child process with CPU (``RLIMIT_CPU``),
address-space (``RLIMIT_AS``), wall-time and output limits and returns its JSON result. Children
are forked from a fork server (``python -I``, empty environment, working directory ``/``) that has
imported the checking module already, so a check costs a fork, not an interpreter start. The
server exits when the kernel does; each child dies with the server (parent-death signal) and serves
one call.

The checker parses hostile input, so it is confined like the python sandbox's template: the server
drops every capability, sets no_new_privs, enters an empty network namespace and loads a seccomp
deny-list of the dangerous calls (not an allow-list: wasmtime's compiler needs threads and
executable memory); each child then adds Landlock (the interpreter's directories read-only, its
``writable`` ones read-write, nothing else), signals only to itself and no new processes. What the
server could not establish is logged by the kernel as a WARNING.

Outcomes: the result; :class:`CodeError` for code the check rejects (including nesting too deep for
the parser); :class:`ResourceExhausted` when the check hits a limit.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import importlib
import importlib.util
import json
import logging
import math
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tenantflow.kernel.errors import ResourceExhausted
from tenantflow.kernel.sandbox import CodeError
from tenantflow.plugins.sandboxing import linux

log = logging.getLogger("tenantflow.plugins.sandboxing.isolated")
MAX_CHILDREN = 4  # checks at once in this process: bounds their total memory
_slots = threading.BoundedSemaphore(MAX_CHILDREN)
_STDERR_BYTES = 16 * 1024


@dataclass(frozen=True)
class ChildLimits:
    """What one check may use; ``what`` names the check in error messages."""

    cpu_seconds: float = 10.0
    memory_bytes: int = 1024 * 1024 * 1024
    wall_seconds: float = 20.0  # under the clients' default 30 s deadline
    output_bytes: int = 1024 * 1024
    what: str = "inspecting your code"
    writable: tuple[str, ...] = ()  # directories the check may write (made if missing), e.g. a cache


DEFAULT_LIMITS = ChildLimits()


def pack_files(files: Mapping[str, bytes]) -> dict[str, str]:
    """Files as JSON-able text (base64), for :func:`call`."""
    return {path: base64.b64encode(data).decode("ascii") for path, data in files.items()}


def unpack_files(packed: Mapping[str, str]) -> dict[str, bytes]:
    """The inverse of :func:`pack_files` (in the child)."""
    return {path: base64.b64decode(text) for path, text in packed.items()}


def call(target: str, args: list[Any], limits: ChildLimits = DEFAULT_LIMITS) -> Any:
    """Run ``target`` (``"module:function"``) on ``args`` in a limited child; return its result."""
    module, _, function = target.partition(":")
    request = json.dumps({"function": function, "args": args}).encode()
    with _slots:
        child = _server.fork(module, limits)
        try:
            return _exchange(child, request, limits)
        finally:
            child.close()


# -- the kernel side -------------------------------------------------------------------------------
@dataclass
class _Child:
    """A forked checker as the kernel sees it: its pid and our ends of its pipes."""

    pid: int
    stdin: int
    stdout: int
    stderr: int
    status: int  # the server writes the child's exit code here once it has reaped it

    def kill(self) -> None:
        _server.kill(self.pid)

    def close(self) -> None:
        for fd in (self.stdin, self.stdout, self.stderr, self.status):
            with contextlib.suppress(OSError):
                os.close(fd)


class _ForkServer:
    """The fork server process and the socket to it (one request at a time: a fork is quick)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._warned = False

    def _ensure(self) -> socket.socket:
        if self._proc is not None and self._proc.poll() is None and self._sock is not None:
            return self._sock
        self._stop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        started: list[subprocess.Popen[bytes] | BaseException] = []
        ready = threading.Event()

        def run() -> None:
            # The parent-death signal fires when the *thread* that started the server ends, so a
            # thread of our own starts it and stays until it exits.
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-m", __name__, str(theirs.fileno()), str(os.getpid())],
                    pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env={}, cwd="/",
                    start_new_session=True,
                )  # fmt: skip
            except BaseException as exc:
                started.append(exc)
                ready.set()
                return
            started.append(proc)
            ready.set()
            proc.wait()

        with ours, theirs:
            threading.Thread(target=run, name="tenantflow-checker-server", daemon=True).start()
            ready.wait()
            if isinstance(started[0], BaseException):
                raise started[0]
            self._proc = started[0]
            theirs.close()
            ours.settimeout(60)
            try:
                hello = json.loads(ours.recv(65536) or b"{}")
            except (OSError, ValueError):
                hello = {}
            ours.settimeout(None)
            if not hello.get("ready"):
                self._stop()
                raise RuntimeError("the code checker's fork server failed to start; see the kernel log")
            self._warn(hello.get("missing", {}))
            self._sock = ours.dup()
        return self._sock

    def _warn(self, missing: dict[str, str]) -> None:
        if missing and not self._warned:
            self._warned = True
            log.warning(
                "the code checker parses tenant code WITHOUT %s",
                "; ".join(f"{name} ({why})" for name, why in missing.items()),
            )

    def _stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            self._proc.wait()
            self._proc = None

    def _ask(self, message: dict[str, Any], fds: Sequence[int] = ()) -> dict[str, Any]:
        for _ in range(2):  # a server that died is restarted once
            with self._lock:
                sock = self._ensure()
                try:
                    socket.send_fds(sock, [json.dumps(message).encode()], list(fds))
                    reply = sock.recv(65536)
                except OSError:
                    reply = b""
                if reply:
                    answer: dict[str, Any] = json.loads(reply)
                    return answer
                self._stop()
        raise RuntimeError("the code checker's fork server is not answering; see the kernel log")

    def fork(self, module: str, limits: ChildLimits) -> _Child:
        """A new child that has imported ``module`` and set ``limits``, waiting on its stdin."""
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        status_r, status_w = os.pipe()
        try:
            reply = self._ask(
                {"module": module, "limits": asdict(limits)}, [stdin_r, stdout_w, stderr_w, status_w]
            )
        except BaseException:
            for fd in (stdin_w, stdout_r, stderr_r, status_r):
                os.close(fd)
            raise
        finally:
            for fd in (stdin_r, stdout_w, stderr_w, status_w):
                os.close(fd)
        if "pid" not in reply:
            for fd in (stdin_w, stdout_r, stderr_r, status_r):
                os.close(fd)
            raise RuntimeError(f"the code checker could not start: {reply.get('error')}")
        return _Child(reply["pid"], stdin_w, stdout_r, stderr_r, status_r)

    def kill(self, pid: int) -> None:
        """Kill a child of the server (only a child it has not reaped yet: never a reused pid)."""
        self._ask({"kill": pid})

    def close(self) -> None:
        with self._lock:
            self._stop()


_server = _ForkServer()
atexit.register(_server.close)


def _exchange(child: _Child, request: bytes, limits: ChildLimits) -> Any:
    """Send the request, read bounded replies until the child exits or the wall limit strikes."""
    deadline = time.monotonic() + limits.wall_seconds
    too_long = f"{limits.what} took more than {limits.wall_seconds:g} s: split it or make it smaller"
    out, err, status = bytearray(), bytearray(), bytearray()
    caps = {child.stdout: limits.output_bytes, child.stderr: _STDERR_BYTES, child.status: 64}
    bufs = {child.stdout: out, child.stderr: err, child.status: status}
    sel = selectors.DefaultSelector()
    for fd in (child.stdin, child.stdout, child.stderr, child.status):
        os.set_blocking(fd, False)
    sel.register(child.stdin, selectors.EVENT_WRITE)
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    view = memoryview(request)
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                child.kill()
                raise ResourceExhausted(too_long)
            for key, _ in sel.select(min(left, 1.0)):
                fd = key.fd
                if fd == child.stdin:
                    try:
                        view = view[os.write(fd, view[: 1 << 16]) :]
                    except BrokenPipeError:
                        view = view[:0]
                    if not view:
                        sel.unregister(fd)
                        os.close(fd)
                        child.stdin = -1
                    continue
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    sel.unregister(fd)
                    continue
                buf = bufs[fd]
                buf += chunk[: max(0, caps[fd] + 1 - len(buf))]
                if fd == child.stdout and len(out) > limits.output_bytes:
                    child.kill()
                    raise ResourceExhausted(
                        f"{limits.what} gave a result over {limits.output_bytes} bytes "
                        "(too many workflows?): split the code"
                    )
    finally:
        sel.close()
    try:
        code = int(status)
    except ValueError:
        raise RuntimeError(f"the code checker's fork server lost child {child.pid}") from None
    return _outcome(code, bytes(out), bytes(err), limits)


def _outcome(code: int, out: bytes, err: bytes, limits: ChildLimits) -> Any:
    cpu = f"{limits.what} used more than {limits.cpu_seconds:g} s of CPU: split it or make it smaller"
    memory = (
        f"{limits.what} needed more than {limits.memory_bytes // (1024 * 1024)} MiB of memory: "
        "split it or make it smaller"
    )
    if code == 0:
        try:
            reply = json.loads(out)
        except ValueError:
            reply = {"error": "internal", "message": f"unreadable reply {out[:200]!r}"}
        if "ok" in reply:
            return reply["ok"]
        kind, message = reply.get("error"), str(reply.get("message", ""))
        if kind == "code":
            raise CodeError(message)
        if kind == "recursion":
            raise CodeError(f"{message}: the code is nested too deeply (expressions, brackets or blocks)")
        if kind == "memory" and reply.get("peak", 0) < limits.memory_bytes // 2:
            # CPython 3.11's parser reports its own stack limit (deep nesting) as a bare MemoryError
            raise CodeError("the code is nested too deeply for the parser (expressions, brackets or blocks)")
        if kind == "memory":
            raise ResourceExhausted(memory)
        log.error("%s failed in the checker: %s\n%s", limits.what, message, reply.get("trace", ""))
        raise CodeError(f"{limits.what} failed: {message}")
    if code == -signal.SIGALRM:  # the child's own wall-clock backstop
        raise ResourceExhausted(
            f"{limits.what} took more than {limits.wall_seconds:g} s: split it or make it smaller"
        )
    if code in (-signal.SIGXCPU, -signal.SIGKILL):  # soft then hard RLIMIT_CPU (or the OOM killer)
        raise ResourceExhausted(cpu if code == -signal.SIGXCPU or b"Memory" not in err else memory)
    text = err.decode("utf-8", "replace")
    if "MemoryError" in text or "memory" in text.lower():
        raise ResourceExhausted(memory)
    log.warning("the checker died (exit %s) %s: %s", code, limits.what, text[-2000:])
    raise CodeError(f"{limits.what} crashed the checker (exit {code}): the code is too large or too deep")


# -- the fork server and its children -------------------------------------------------------------
def _die_with_parent(parent: int) -> None:
    if not linux.die_with_parent(parent):  # the parent died before the signal was armed
        os._exit(1)


def _confine(limits: ChildLimits, parent: int) -> None:
    """Die with the server, cap CPU, address space, wall time and core dumps, then confine files
    (Landlock), signals and processes, all before reading any input."""
    _die_with_parent(parent)
    cpu = max(1, math.ceil(limits.cpu_seconds))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for path in limits.writable:
        with contextlib.suppress(OSError):
            os.makedirs(path, mode=0o700, exist_ok=True)
    if linux.landlock_abi() >= 1:  # else the server reported it missing
        readable = [*linux.read_only_paths(), *_package_dirs()]
        problem = linux.landlock(readable, list(limits.writable), False)
        if problem:
            raise RuntimeError(f"the checker could not confine its files: {problem}")
    if _pyseccomp is not None:
        _child_filter(_pyseccomp).load()
    signal.alarm(math.ceil(limits.wall_seconds) + 1)  # SIGALRM ends the process: a backstop


def _package_dirs() -> set[str]:
    """Where tenantflow's own packages live (an editable install maps them from outside
    ``sys.path``): a check may import more of them lazily, e.g. the wasm sandbox."""
    found: set[str] = set()
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "tenantflow":
            found.update(getattr(module, "__path__", None) or [])
    for name in ("tenantflow.kernel", "tenantflow.plugins", "tenantflow.workflow"):  # not yet imported
        with contextlib.suppress(ImportError, ValueError):
            spec = importlib.util.find_spec(name)
            found.update((spec.submodule_search_locations or []) if spec else [])
    return found


# What neither the server nor a check needs, refused with EPERM (the rest is allowed).
_DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "pidfd_open", "pidfd_getfd",
    "pidfd_send_signal", "kcmp", "mount", "umount2", "move_mount", "open_tree", "fsopen", "fsmount",
    "fsconfig", "fspick", "mount_setattr", "pivot_root", "chroot", "unshare", "setns", "bpf",
    "perf_event_open", "io_uring_setup", "io_uring_enter", "io_uring_register", "userfaultfd",
    "keyctl", "add_key", "request_key", "kexec_load", "kexec_file_load", "init_module",
    "finit_module", "delete_module", "reboot", "swapon", "swapoff", "acct", "settimeofday",
    "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname", "syslog",
    "fanotify_init", "fanotify_mark", "inotify_init", "inotify_init1", "name_to_handle_at",
    "open_by_handle_at", "personality", "quotactl", "quotactl_fd", "iopl", "ioperm", "modify_ldt",
    "execve", "execveat", "socket", "setuid", "setgid", "setreuid", "setregid", "setresuid",
    "setresgid", "setgroups", "setfsuid", "setfsgid", "capset", "chmod", "fchmod", "fchmodat",
    "fchmodat2", "chown", "fchown", "lchown", "fchownat", "mknod", "mknodat", "utime", "utimes",
    "utimensat", "futimesat", "setpriority", "sched_setscheduler", "sched_setattr", "sched_setparam",
    "shmget", "shmat", "msgget", "semget", "mq_open", "migrate_pages", "move_pages", "mbind",
    "set_mempolicy", "flock", "vhangup", "lookup_dcookie", "uselib", "memfd_secret",
)  # fmt: skip
_F_SETLEASE, _F_NOTIFY, _CLONE_THREAD = 1024, 1026, 0x00010000
_pyseccomp: Any = None


def _add(rules: Any, action: Any, name: str, *args: Any) -> None:
    with contextlib.suppress(OSError, ValueError, RuntimeError):  # a call this architecture lacks
        rules.add_rule(action, name, *args)


def _server_filter(seccomp: Any) -> Any:
    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    deny = seccomp.ERRNO(1)  # EPERM
    for name in _DENIED:
        _add(rules, deny, name)
    _add(rules, seccomp.ERRNO(38), "clone3")  # ENOSYS: glibc falls back to clone, which is filtered
    for command in (_F_SETLEASE, _F_NOTIFY):
        _add(rules, deny, "fcntl", seccomp.Arg(1, seccomp.EQ, command))
    _add(rules, deny, "prlimit64", seccomp.Arg(0, seccomp.NE, 0))
    return rules


def _child_filter(seccomp: Any) -> Any:
    """Stacked in each check: threads but no processes, signals only to itself."""
    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    deny, pid = seccomp.ERRNO(1), os.getpid()
    for name in ("fork", "vfork", "tkill", "seccomp", "landlock_create_ruleset", "landlock_restrict_self"):
        _add(rules, deny, name)
    _add(rules, deny, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, _CLONE_THREAD, 0))
    for name in ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
        _add(rules, deny, name, seccomp.Arg(0, seccomp.NE, pid))
    return rules


def _confine_server() -> dict[str, str]:
    """Confine the fork server for good (its children inherit it); what could not be done."""
    global _pyseccomp
    missing: dict[str, str] = {}
    try:
        import pyseccomp  # before the file view shrinks: finding libseccomp runs ldconfig

        _pyseccomp = pyseccomp
    except Exception as exc:  # libseccomp missing on this machine
        missing["seccomp syscall filter"] = f"libseccomp is not available ({exc})"
    uid, gid = os.geteuid(), os.getegid()
    if problem := linux.unshare_network():
        missing["network namespace"] = problem
    elif uid != 0:  # a new user namespace came with it: keep our uid there, so files stay ours
        with contextlib.suppress(OSError):
            for name, text in (
                ("uid_map", f"{uid} {uid} 1"),
                ("setgroups", "deny"),
                ("gid_map", f"{gid} {gid} 1"),
            ):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
    if problem := linux.no_new_privs():
        missing["no_new_privs"] = problem
    linux.lock_capabilities()
    if problem := linux.clear_capabilities():
        missing["capability drop"] = problem
    if linux.landlock_abi() < 1:
        missing["Landlock file isolation"] = "landlock unavailable"
    if _pyseccomp is not None:
        try:
            _server_filter(_pyseccomp).load()
        except OSError as exc:
            missing["seccomp syscall filter"] = f"the filter could not be loaded ({exc})"
            _pyseccomp = None
    return missing


def _serve(module_name: str) -> dict[str, Any]:
    module = importlib.import_module(module_name)
    request = json.loads(sys.stdin.buffer.read())
    function = getattr(module, request["function"])
    try:
        return {"ok": function(*request["args"])}
    except CodeError as exc:
        return {"error": "code", "message": str(exc)}
    except RecursionError as exc:
        return {"error": "recursion", "message": str(exc)}
    except MemoryError:
        return {"error": "memory", "peak": _peak()}
    except Exception as exc:
        return {"error": "internal", "message": f"{type(exc).__name__}: {exc}"[:2000],
                "trace": traceback.format_exc()[-8000:]}  # fmt: skip


def _peak() -> int:
    """Bytes of the child's peak resident memory."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(module: str, limits: ChildLimits, server: int, fds: list[int]) -> None:
    """In the forked child: take the pipes as stdin/stdout/stderr, confine, serve one call, exit."""
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
    os.closerange(3, 1 << 16)
    code = 0
    try:
        _confine(limits, server)
        try:
            reply = _serve(module)
        except MemoryError:
            reply = {"error": "memory", "peak": _peak()}
        os.write(1, json.dumps(reply).encode())  # small: a result or an error
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def _server_main(sock_fd: int, kernel: int) -> None:
    """Fork a confined child per request; reap them and report each exit code on its status pipe."""
    _die_with_parent(kernel)
    sock = socket.socket(fileno=sock_fd)
    missing = _confine_server()
    _die_with_parent(kernel)  # again: a new user namespace (a non-root kernel) clears the death signal
    sock.send(json.dumps({"ready": True, "missing": missing}).encode())
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    live: dict[int, int] = {}  # pid -> status pipe
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fd == wake_r:
                os.read(wake_r, 4096)
                _reap(live)
                continue
            message, fds, _, _ = socket.recv_fds(sock, 65536, 4)
            if not message:  # the kernel is gone
                for pid in live:
                    os.kill(pid, signal.SIGKILL)
                os._exit(0)
            request = json.loads(message)
            if "kill" in request:
                if request["kill"] in live:
                    os.kill(request["kill"], signal.SIGKILL)
                sock.send(b"{}")
                continue
            sock.send(json.dumps(_fork(request, fds, live)).encode())


def _fork(request: dict[str, Any], fds: list[int], live: dict[int, int]) -> dict[str, Any]:
    try:
        importlib.import_module(request["module"])  # once, here: every child starts with it
        limits = ChildLimits(
            **{**request["limits"], "writable": tuple(request["limits"].get("writable", ()))}
        )
        pid = os.fork()
    except Exception as exc:
        for fd in fds:
            os.close(fd)
        return {"error": f"{type(exc).__name__}: {exc}"}
    if pid == 0:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _child(request["module"], limits, os.getppid(), fds)
    live[pid] = fds[3]
    for fd in fds[:3]:
        os.close(fd)
    return {"pid": pid}


def _reap(live: dict[int, int]) -> None:
    while live:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = live.pop(pid, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.write(fd, str(os.waitstatus_to_exitcode(status)).encode())
            os.close(fd)


if __name__ == "__main__":
    _server_main(int(sys.argv[1]), int(sys.argv[2]))
