"""Run a check of tenant input in a separate, limited process: the kernel never parses or compiles
tenant code itself.

``call("pkg.mod:func", args)`` runs ``func(*args)`` in a child ``python -I`` with an empty
environment, CPU (``RLIMIT_CPU``), address-space (``RLIMIT_AS``), wall-time and output limits, and
returns its JSON result. The child dies with the kernel (parent-death signal). A warm spare child per
module (started, limits set, module imported, waiting on stdin) keeps the process start off the
caller's path; each child serves one call and exits.

Outcomes: the result; :class:`CodeError` for code the check rejects (including nesting too deep for
the parser); :class:`ResourceExhausted` when the check hits a limit.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import importlib
import json
import logging
import math
import os
import resource
import selectors
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from tenantflow.kernel.errors import ResourceExhausted
from tenantflow.kernel.sandbox import CodeError

log = logging.getLogger("tenantflow.plugins.isolated")
MAX_CHILDREN = 4  # checks at once in this process: bounds their total memory
SPARES = 2  # ready children kept per module, so a burst of small checks need not wait for a start
_slots = threading.BoundedSemaphore(MAX_CHILDREN)
_STDERR_BYTES = 16 * 1024
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ChildLimits:
    """What one check may use; ``what`` names the check in error messages."""

    cpu_seconds: float = 10.0
    memory_bytes: int = 1024 * 1024 * 1024
    wall_seconds: float = 20.0  # under the clients' default 30 s deadline
    output_bytes: int = 1024 * 1024
    what: str = "inspecting your code"


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
        proc = _spares.take(module, limits) or _spawn(module, limits)
        _spares.refill(module, limits)
        try:
            return _exchange(proc, request, limits)
        finally:
            _end(proc)


def _end(proc: subprocess.Popen[bytes]) -> None:
    """Kill (if still running), reap and close a child's pipes."""
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


# -- the kernel side -------------------------------------------------------------------------------
def _spawn(module: str, limits: ChildLimits) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-I", "-m", __name__, module, json.dumps(asdict(limits)), str(os.getpid())],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={}, cwd="/",
        start_new_session=True, close_fds=True,
    )  # fmt: skip


class _Spares:
    """Up to :data:`SPARES` idle, ready children per (module, limits), started by one long-lived
    thread (the parent-death signal fires when the *thread* that started a child ends)."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, ChildLimits], list[subprocess.Popen[bytes]]] = {}
        self._wanted: set[tuple[str, ChildLimits]] = set()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def close(self) -> None:
        """End the idle children (at exit: they would die with this process anyway)."""
        with self._cond:
            idle, self._idle = [p for procs in self._idle.values() for p in procs], {}
        for proc in idle:
            _end(proc)

    def take(self, module: str, limits: ChildLimits) -> subprocess.Popen[bytes] | None:
        """A ready child, if one is idle and alive."""
        while True:
            with self._cond:
                procs = self._idle.get((module, limits))
                proc = procs.pop(0) if procs else None
            if proc is None or proc.poll() is None:
                return proc
            _end(proc)

    def refill(self, module: str, limits: ChildLimits) -> None:
        with self._cond:
            self._wanted.add((module, limits))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="tenantflow-isolated", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._wanted:
                    self._cond.wait()
                key = self._wanted.pop()
                if len(self._idle.get(key, ())) >= SPARES:
                    continue
            try:
                proc = _spawn(*key)
            except OSError as exc:
                log.warning("could not start a spare checker process: %s", exc)
                time.sleep(1.0)
                continue
            with self._cond:
                self._idle.setdefault(key, []).append(proc)
                self._wanted.add(key)  # until SPARES are ready


_spares = _Spares()
atexit.register(_spares.close)


def _exchange(proc: subprocess.Popen[bytes], request: bytes, limits: ChildLimits) -> Any:
    """Send the request, read bounded replies until the child exits or the wall limit strikes."""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    deadline = time.monotonic() + limits.wall_seconds
    out, err = bytearray(), bytearray()
    sel = selectors.DefaultSelector()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        os.set_blocking(pipe.fileno(), False)
    sel.register(proc.stdin, selectors.EVENT_WRITE)
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    view = memoryview(request)
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                raise ResourceExhausted(
                    f"{limits.what} took more than {limits.wall_seconds:g} s: split it or make it smaller"
                )
            for key, _ in sel.select(min(left, 1.0)):
                if key.fileobj is proc.stdin:
                    try:
                        view = view[os.write(proc.stdin.fileno(), view[: 1 << 16]) :]
                    except BrokenPipeError:
                        view = view[:0]
                    if not view:
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fileobj.fileno(), 1 << 16)  # type: ignore[union-attr]
                buf: bytearray = key.data
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                cap = limits.output_bytes if buf is out else _STDERR_BYTES
                buf += chunk[: max(0, cap + 1 - len(buf))]
                if buf is out and len(out) > limits.output_bytes:
                    proc.kill()
                    raise ResourceExhausted(
                        f"{limits.what} gave a result over {limits.output_bytes} bytes "
                        "(too many workflows?): split the code"
                    )
        try:
            code = proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            raise ResourceExhausted(
                f"{limits.what} took more than {limits.wall_seconds:g} s: split it or make it smaller"
            ) from None
    finally:
        sel.close()
        if proc.stdin and not proc.stdin.closed:
            proc.stdin.close()
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
    if code in (-signal.SIGXCPU, -signal.SIGKILL):  # soft then hard RLIMIT_CPU (or the OOM killer)
        raise ResourceExhausted(cpu if code == -signal.SIGXCPU or b"Memory" not in err else memory)
    text = err.decode("utf-8", "replace")
    if "MemoryError" in text or "memory" in text.lower():
        raise ResourceExhausted(memory)
    log.warning("the checker died (exit %s) %s: %s", code, limits.what, text[-2000:])
    raise CodeError(f"{limits.what} crashed the checker (exit {code}): the code is too large or too deep")


# -- the child side --------------------------------------------------------------------------------
def _confine(limits: ChildLimits, parent: int) -> None:
    """Die with the kernel, then cap CPU, address space and core dumps before reading any input."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the kernel died before the signal was armed
        os._exit(1)
    cpu = max(1, math.ceil(limits.cpu_seconds))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


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


def _main(argv: list[str]) -> None:
    module_name, limits_json, parent = argv
    _confine(ChildLimits(**json.loads(limits_json)), int(parent))
    try:
        reply = _serve(module_name)
    except MemoryError:
        reply = {"error": "memory", "peak": _peak()}
    sys.stdout.buffer.write(json.dumps(reply).encode())
    sys.stdout.flush()


if __name__ == "__main__":
    _main(sys.argv[1:])
