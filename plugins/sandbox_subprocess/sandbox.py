"""The subprocess sandbox, kernel side: a warm template process forks a confined child per run."""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.sandbox import Host, Inspection, Limits, RunExit
from tenantflow.kernel.workspace import prepare_root
from tenantflow.plugins.sandbox_subprocess import egress_channel, warm, wire
from tenantflow.plugins.sandbox_subprocess.cgroups import MAX_TASKS, RunCgroup, RunCgroups
from tenantflow.plugins.sandbox_subprocess.spares import Child, SparePool, close_child_ends
from tenantflow.plugins.sandbox_subprocess.warm import Key, WarmPool, WarmRunner
from tenantflow.plugins.sandboxing.pysource import decode_files, inspect_python

log = logging.getLogger("tenantflow.sandbox.subprocess")
YIELD_EVERY = 64  # frames read from one guest between turns of the kernel's event loop
RUN_OUTPUT_BYTES = 64 * 1024  # of a run's raw stdout/stderr kept as tenant log lines
TEMPLATE_OUTPUT_BYTES = 64 * 1024  # of a template's own output logged by the kernel
UNSAFE_FLAG = "--unsafe-allow-weak-sandbox"
IDLE_WAIT_SECONDS = 2.0  # for a guest to say it is idle after its wake-up, before it is not kept warm


def describe_exit(status: int | None, limits: Limits) -> str:
    """A person-readable reason for a child's exit status."""
    if status is None:
        return "the sandbox process ended without reporting a result"
    if status == -signal.SIGXCPU:
        return f"CPU time backstop for the whole run exceeded ({run_cpu_backstop(limits)} s)"
    if status < 0:
        name = signal.Signals(-status).name
        if -status == signal.SIGKILL:
            return f"the sandbox process was killed ({name}): CPU time or memory limit exceeded"
        if -status == signal.SIGSEGV:
            return f"the sandbox process crashed ({name})"
        return f"the sandbox process was killed by {name}"
    if status == 70:
        return "the sandbox runtime crashed"
    return (
        f"the sandbox process exited with status {status} before reporting a result (os._exit or sys.exit?)"
    )


def run_cpu_backstop(limits: Limits) -> int:
    """RLIMIT_CPU of a run's process: behind the per-step watchdog, never before it."""
    return int(limits.cpu_seconds + limits.wall_seconds + 1)


def process_sample(pid: int) -> tuple[float, int] | None:
    """CPU seconds (all threads) and number of threads of a process (None once it is gone)."""
    seen = warm.usage(pid)
    return None if seen is None else (seen.cpu, seen.threads)


async def cpu_watchdog(pid: int, limits: Limits, calls: list[int], kill: Callable[[int], None]) -> str:
    """Kill ``pid`` once it spends ``limits.cpu_seconds`` of CPU without a host call; say why.

    ``calls[0]`` counts the run's host calls: each one starts a new budget (a step attempt, or the
    workflow code between steps). Sampling, not per-call reads, keeps steps cheap; a segment is
    charged from the first sample after its call, at most one tick late. A run seen with more than
    ``MAX_TASKS`` threads is killed too: the bound where no pids cgroup holds it (see ``cgroups``)."""
    tick = min(0.25, max(limits.cpu_seconds / 4, 0.01))
    seen, base = -1, 0.0
    while True:
        await asyncio.sleep(tick)
        sample = process_sample(pid)
        if sample is None:
            return ""
        used, threads = sample
        if threads > MAX_TASKS:
            kill(pid)
            return f"thread limit exceeded ({threads} threads; a run may have at most {MAX_TASKS})"
        if calls[0] != seen:
            seen, base = calls[0], used
        elif used - base > limits.cpu_seconds:
            kill(pid)
            return f"CPU limit exceeded ({limits.cpu_seconds:g} s of CPU per step)"


class _Spawner:
    """Starts templates from one thread that lives as long as the kernel process: a template's
    parent-death signal fires when the *thread* that started it ends, not the whole process."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.Future[Any]]] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="tenantflow-sandbox-spawner", daemon=True).start()

    def _serve(self) -> None:
        while True:
            start, future = self._requests.get()
            loop = future.get_loop()
            try:
                result = start()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                loop.call_soon_threadsafe(_settle_future, future, None, exc)
            else:
                loop.call_soon_threadsafe(_settle_future, future, result, None)

    async def spawn(self, start: Callable[[], Any]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._requests.put((start, future))
        return await future


def _noting(host: Host, connected: list[bool]) -> egress_channel.Opener | None:
    """The host's egress opener, noting in ``connected[0]`` that the run asked it for a connection."""
    opener = getattr(host, "egress_open", None)
    if opener is None:
        return None

    async def open_noted(name: str, port: int) -> socket.socket:
        connected[0] = True
        return await opener(name, port)  # type: ignore[no-any-return]

    return open_noted


def _settle_future(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


_spawner_lock = threading.Lock()
_spawner: _Spawner | None = None


def _the_spawner() -> _Spawner:
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = _Spawner()
        return _spawner


class _TemplateOutput:
    """Logs what a template writes to its own stdout/stderr as ``sandbox-template`` lines, up to
    ``TEMPLATE_OUTPUT_BYTES``; the rest is counted and said once (runs never write there)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._kept = self._dropped = 0
        self._partial = b""
        os.set_blocking(fd, False)
        asyncio.get_running_loop().add_reader(fd, self._read)

    def _read(self) -> None:
        try:
            chunk = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.close()
            return
        room = max(0, TEMPLATE_OUTPUT_BYTES - self._kept)
        kept, self._dropped = chunk[:room], self._dropped + len(chunk) - min(room, len(chunk))
        self._kept += len(kept)
        *lines, self._partial = (self._partial + kept).split(b"\n")
        for line in lines:
            log.warning("sandbox-template: %s", line.decode("utf-8", "replace"))

    def close(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._fd)
        if self._partial:
            log.warning("sandbox-template: %s", self._partial.decode("utf-8", "replace"))
        if self._dropped:
            log.warning("sandbox-template: %d more bytes of output dropped", self._dropped)
        self._fd = -1


class RunOutput:
    """A run's own stdout/stderr (what bypasses ``sys.stdout``: ``os.write(2, ...)``, C libraries,
    a crash's traceback) becomes its tenant log, as stderr lines, up to ``budget`` bytes. Past it
    the pipe is read at most 20 times a second (a flood costs the kernel next to nothing, and a
    chatty run is slowed, not stuck) and the rest is dropped, counted in one closing line that
    :meth:`close` says before the run reports its end. Takes ownership of ``fd``."""

    def __init__(self, fd: int, host: Host, budget: int = RUN_OUTPUT_BYTES) -> None:
        self._fd, self._host, self._budget = fd, host, budget
        self.left_open = False
        self._kept = self._dropped = 0
        self._partial = b""
        self._lines: asyncio.Queue[str | None] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._later: asyncio.TimerHandle | None = None
        self._sender = asyncio.create_task(self._send())
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self._read)

    async def _send(self) -> None:
        while (line := await self._lines.get()) is not None:
            await self._host.notify({"op": "log", "stream": "stderr", "line": line})

    def _read(self) -> None:
        if self._drain(once=True) and self._kept >= self._budget:
            self._loop.remove_reader(self._fd)
            self._later = self._loop.call_later(0.05, self._loop.add_reader, self._fd, self._read)

    def _drain(self, once: bool = False) -> bool:
        """Read what the pipe holds (one chunk if ``once``); False at its end."""
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except BlockingIOError:
                return True
            except OSError:
                chunk = b""
            if not chunk:
                self._loop.remove_reader(self._fd)
                return False
            room = max(0, self._budget - self._kept)
            kept = chunk[:room]
            self._kept, self._dropped = self._kept + len(kept), self._dropped + len(chunk) - len(kept)
            *lines, self._partial = (self._partial + kept).split(b"\n")
            for line in lines:
                self._emit(line)
            if self._kept >= self._budget and self._partial:
                self._emit(self._partial)
                self._partial = b""
            if once:
                return True

    def _emit(self, line: bytes) -> None:
        if self._host.admit(len(line)):
            self._lines.put_nowait(line.decode("utf-8", "replace"))

    async def close(self, keep_fd: bool = False) -> None:
        """Take what the run wrote so far, say what was dropped, stop reading. Idempotent.
        ``keep_fd``: leave the pipe open (``left_open``) for the process's next wake-up."""
        if self._fd < 0:
            return
        if self._later is not None:
            self._later.cancel()
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._fd)
        self._drain()
        if keep_fd:
            self.left_open = True
        else:
            os.close(self._fd)
        self._fd = -1
        if self._partial:
            self._emit(self._partial)
        if self._dropped:
            self._lines.put_nowait(
                f"[tenantflow] {self._dropped} more bytes this run wrote to stdout/stderr were dropped "
                f"(the limit is {self._budget // 1024} KiB per run)"
            )
        self._lines.put_nowait(None)
        try:
            await asyncio.wait_for(self._sender, 5.0)
        except TimeoutError:
            log.warning("a run's output could not be logged in time; the rest is dropped")


class SubprocessSandbox:
    """``runtime = "python"``: CPython in a forked, confined child process."""

    runtime = "python"

    def __init__(
        self,
        *,
        network: bool = False,
        filesystem: bool = True,
        writable: list[str] | None = None,
        unsafe_allow_weak: bool = False,
        workspaces: str | None = None,
        warm_runners: int = KernelConfig.warm_runners,
        warm_idle_seconds: float = KernelConfig.warm_runner_idle_seconds,
    ) -> None:
        self._unsafe_allow_weak = unsafe_allow_weak
        self._template_output: _TemplateOutput | None = None
        self._writable = [str(Path(p).resolve()) for p in writable or []]
        self._settings: dict[str, Any] = {
            "network": network,
            "filesystem": filesystem,
            "writable": self._writable,
            "workspaces": workspaces,  # the workspace root (kernel/workspace.py), or None
        }
        self._ctrl: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pending: dict[int, asyncio.Future[int]] = {}
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._early_exits: dict[int, int] = {}
        self._req = 0
        self._lock = asyncio.Lock()
        self.protections_off: list[str] = []  # each protection missing, with why
        self._cgroups: RunCgroups | None = None
        self._cgroup_warned = False
        self._releases: set[asyncio.Task[None]] = set()
        self._spares = SparePool(self._child, self._discard, self._usable)
        self._warm = WarmPool(warm_runners, warm_idle_seconds, self._retire)
        self._closing = False

    def inspect(self, files: Mapping[str, bytes]) -> Inspection:
        return inspect_python(files)

    async def start(self) -> None:
        if self._cgroups is None:
            self._cgroups = RunCgroups()
            self._warn_cgroup()
            if self._cgroups.memory_problem:
                log.warning(
                    "subprocess sandbox: %s; tenant code may not call memfd_create, and files it writes to a"
                    " grant on tmpfs are memory no run's limit counts. Give the kernel a writable memory"
                    " cgroup (root, or a delegated cgroup v2) to count them",
                    self._cgroups.memory_problem,
                )
        self._settings["memfd"] = self._cgroups.memory  # else the template's filter refuses it
        if self._settings["workspaces"]:  # before the template takes its mount namespace
            await asyncio.to_thread(prepare_root, Path(self._settings["workspaces"]))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {
            "MALLOC_ARENA_MAX": "2",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0",
            "LANG": "C.UTF-8",
        }
        argv = [sys.executable, "-I", "-m", "tenantflow.plugins.sandbox_subprocess.zygote", str(theirs.fileno()),
                json.dumps(self._settings), f"tenantflow-kernel={os.getpid()}"]  # fmt: skip
        try:
            self._proc = await _the_spawner().spawn(
                lambda: subprocess.Popen(
                    argv,
                    pass_fds=[theirs.fileno()],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    cwd="/",
                )  # fmt: skip
            )
        finally:
            theirs.close()
        assert self._proc is not None and self._proc.stdout is not None
        self._template_output = _TemplateOutput(self._proc.stdout.fileno())
        self._ctrl = ours
        loop = asyncio.get_running_loop()
        hello = json.loads(await loop.sock_recv(ours, 65536) or b"{}")
        if not hello.get("ready"):
            raise RuntimeError("the subprocess sandbox template failed to start (its output is logged above)")
        if unusable := hello.get("unusable", []):
            await self.close()
            raise SystemExit(
                "error: a --sandbox-writable-dir the python sandbox's tenant code cannot use: "
                + "; ".join(unusable)
                + ". The kernel does not change an operator's files itself."
            )
        missing: dict[str, str] = hello.get("missing", {})
        self.protections_off = [f"{name}: {why}" for name, why in missing.items()]
        if self._settings["network"]:
            log.warning("subprocess sandbox: network access granted to tenant code (--sandbox-network)")
        for note in hello.get("notes", []):
            log.info("subprocess sandbox: %s", note)
        if missing and not self._unsafe_allow_weak:
            await self.close()
            raise SystemExit(
                "error: the python sandbox cannot establish "
                + "; ".join(self.protections_off)
                + ". Tenant code would run with less isolation than it needs, so the kernel does not"
                " start. Run it where these are available (Linux with Landlock, seccomp and network"
                f" namespaces; see the README's Security model), or pass {UNSAFE_FLAG} to run without them."
            )
        for line in self.protections_off:
            log.warning("UNSAFE (%s): subprocess sandbox runs tenant code WITHOUT %s", UNSAFE_FLAG, line)
        ours.setblocking(False)
        loop.add_reader(ours.fileno(), self._on_control)

    def _warn_cgroup(self) -> None:
        """Say once that runs' threads are bounded by sampling only (not a refusal to start: many
        hosts give the kernel no writable cgroup)."""
        if self._cgroups is None or not self._cgroups.problem or self._cgroup_warned:
            return
        self._cgroup_warned = True
        log.warning(
            "subprocess sandbox: %s; a run's threads are limited to %d by a watchdog that samples "
            "them (a burst between samples can still take many pids). Give the kernel a writable pids "
            "cgroup (root, or a delegated cgroup v2) for a hard limit",
            self._cgroups.problem,
            MAX_TASKS,
        )

    def _on_control(self) -> None:
        assert self._ctrl is not None
        while True:
            try:
                data = self._ctrl.recv(65536)
            except BlockingIOError:
                return
            if not data:
                asyncio.get_running_loop().remove_reader(self._ctrl.fileno())
                for fut in [*self._pending.values(), *self._exits.values()]:
                    if not fut.done():
                        fut.set_exception(RuntimeError("the sandbox template process died"))
                return
            message = json.loads(data)
            if "pid" in message:
                forked = self._pending.pop(int(message["req"])) if message["req"] in self._pending else None
                if forked is not None and not forked.done():
                    forked.set_result(message["pid"])
            elif "exit" in message:
                pid, status = message["exit"], message["status"]
                waiter = self._exits.pop(pid, None)
                if waiter and not waiter.done():
                    waiter.set_result(status)
                elif waiter is None:
                    self._early_exits[pid] = status

    async def _respawn_if_gone(self, broken: subprocess.Popen[bytes] | None = None) -> None:
        """Start a new template if the old one died (it should not: runs cannot signal it).
        ``broken``: a template that just failed us, so it is dying even if not yet reaped (unless
        another run has replaced it already)."""
        async with self._lock:
            if self._proc is None:
                return
            if broken is self._proc and self._proc.poll() is None:
                self._proc.kill()
                await asyncio.to_thread(self._proc.wait, 5)
            if self._proc.poll() is None:
                return
            log.error("the sandbox template exited with %s; starting a new one", self._proc.returncode)
            if self._template_output is not None:
                self._template_output.close()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            if self._ctrl is not None:
                with contextlib.suppress(Exception):
                    asyncio.get_running_loop().remove_reader(self._ctrl.fileno())
                self._ctrl.close()
            await self.start()

    def _fork_limits(self, limits: Limits) -> str:
        """The limits a fork request gives the child (JSON): also what a spare must match."""
        return json.dumps({
            "memory_bytes": limits.memory_bytes, "cpu_seconds": run_cpu_backstop(limits),
            "open_files": limits.open_files,
            "file_bytes": 256 * 1024 * 1024 if self._writable or self._settings["workspaces"] else 0,
        })  # fmt: skip

    async def _child(self, limits: str) -> Child:
        """Fork a run process and move it into a pids and a memory cgroup of its own, before any job
        is sent: it is blocked reading its job, so no tenant code runs outside them. The move waits in
        a thread (it can take milliseconds), never on the event loop."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        output_r, output_w = os.pipe()  # the run's own stdout/stderr
        # Without the network, its connections are asked of the kernel (egress_channel.py).
        egress = (
            None if self._settings["network"] else socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        )
        try:
            pid = await self._fork(theirs, output_w, limits, egress[1] if egress else None)
        except BaseException:
            ours.close()
            os.close(output_r)
            if egress:
                egress[0].close()
            raise
        finally:
            theirs.close()
            os.close(output_w)
            if egress:
                egress[1].close()
        child = Child(pid, ours, output_r, None, limits, self._proc, egress[0] if egress else None)
        if self._cgroups is None:
            return child
        memory = int(json.loads(limits)["memory_bytes"])
        attach = asyncio.ensure_future(asyncio.to_thread(self._cgroups.attach, pid, memory))
        try:
            child.cgroup = await asyncio.shield(attach)
        except BaseException:  # cancelled: the child goes once the move is over
            attach.add_done_callback(lambda done: self._discard(dataclasses.replace(
                child, cgroup=None if done.cancelled() or done.exception() else done.result())))  # fmt: skip
            raise
        return child

    def _usable(self, child: Child) -> bool:
        """Whether a spare can still run: its template is the current one and it has not died."""
        alive = child.template is self._proc and child.template is not None and child.template.poll() is None
        return alive and self._early_exits.pop(child.pid, None) is None

    def _discard(self, child: Child, exited: asyncio.Future[int] | None = None) -> None:
        """Kill a child that will never run (again), and free what it holds."""
        self._kill(child.pid)
        close_child_ends(child)
        self._release(child.cgroup, exited)

    def _release(self, cgroup: RunCgroup | None, exited: asyncio.Future[int] | None = None) -> None:
        """Remove a killed child's cgroups; with ``exited`` (its exit status from the template), once
        it has exited: a cgroup is removable only then, and each early try is a wasted syscall."""
        if cgroup is not None and self._cgroups is not None:
            release = asyncio.create_task(self._release_after(cgroup, exited))
            self._releases.add(release)
            release.add_done_callback(self._releases.discard)

    async def _release_after(self, cgroup: RunCgroup, exited: asyncio.Future[int] | None) -> None:
        assert self._cgroups is not None
        if exited is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(exited), 2.0)
        await self._cgroups.release(cgroup)

    async def _fork(
        self, child_sock: socket.socket, output: int, limits: str, egress: socket.socket | None = None
    ) -> int:
        """A confined child from the template; a template found dead is replaced, and asked again."""
        await self._respawn_if_gone()
        template = self._proc
        try:
            return await self._fork_once(child_sock, output, limits, egress)
        except (OSError, RuntimeError) as exc:  # it died between our check and our request
            log.warning("the sandbox template failed a fork (%s); replacing it", exc)
            await self._respawn_if_gone(broken=template)
            return await self._fork_once(child_sock, output, limits, egress)

    async def _fork_once(
        self, child_sock: socket.socket, output: int, limits: str, egress: socket.socket | None = None
    ) -> int:
        assert self._ctrl is not None
        self._req += 1
        req = self._req
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending[req] = fut
        request = f'{{"op": "fork", "req": {req}, "limits": {limits}}}'
        fds = array.array("i", [child_sock.fileno(), output, *([egress.fileno()] if egress else [])])
        self._ctrl.sendmsg([request.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        pid = await fut
        if pid <= 0:
            raise RuntimeError("the sandbox template could not fork a run")
        return pid

    def _kill(self, pid: int) -> None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            if self._ctrl is not None:
                with contextlib.suppress(OSError):
                    self._ctrl.send(json.dumps({"op": "kill", "pid": pid}).encode())

    def _warm_key(self, job: dict[str, Any], limits: str) -> Key | None:
        """The pool key of a wake-up a warm runner may serve, or None (no pool, a workspace, or a
        job that does not say whose code it runs)."""
        tenant, code = job.get("tenant"), job.get("code")
        if (
            self._warm.size <= 0
            or "workspace" in job
            or not isinstance(tenant, str)
            or not isinstance(code, str)
        ):
            return None
        return tenant, code, limits

    async def run(self, job: dict[str, Any], host: Host, limits: Limits) -> RunExit:
        key = self._fork_limits(limits)
        warm_key = self._warm_key(job, key)
        job = {**job, "files": decode_files(job["files"]), "warm": warm_key is not None}
        runner = self._warm.take(warm_key) if warm_key is not None else None
        keep = runner is not None or (warm_key is not None and self._warm.wanted(warm_key))
        loop = asyncio.get_running_loop()
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        if runner is not None:
            child, reader, writer, exit_future = runner.child, runner.reader, runner.writer, runner.exited
        else:
            child = self._spares.take(key) or await self._child(key)
            exit_future = loop.create_future()
            if child.pid in self._early_exits:
                exit_future.set_result(self._early_exits.pop(child.pid))
            else:
                self._exits[child.pid] = exit_future
        pid, ours, cgroup = child.pid, child.sock, child.cgroup
        if cgroup is None:
            self._warn_cgroup()
        output = RunOutput(child.output, host)
        ended = parked = out_of_memory = False
        calls = [0]
        watchdog = asyncio.create_task(cpu_watchdog(pid, limits, calls, self._kill))
        egress = None
        connected = [False]  # whether the run made a connection (its runner is then not kept)
        if child.egress is not None:
            egress = asyncio.create_task(egress_channel.serve(child.egress, _noting(host, connected)))
        try:  # from here on a cancelled run still kills its child and releases its cgroup
            if reader is None or writer is None:
                reader, writer = await asyncio.open_unix_connection(sock=ours)
            writer.write(wire.encode(job))
            await writer.drain()
            frames = 0
            while True:
                frames += 1
                if frames % YIELD_EVERY == 0:  # a guest's stream must not hold the kernel's loop
                    await asyncio.sleep(0)
                frame = await wire.read_header(reader, limits.message_bytes)
                if frame is None:
                    break
                size, kind = frame
                if kind == wire.NOTIFY:
                    if not host.admit(size):  # over its log budget: dropped without decoding
                        if not await wire.skip(reader, size):
                            break
                        continue
                    if (note := await wire.read_body(reader, size)) is None:
                        break
                    await host.notify(note)
                    continue
                message = await wire.read_body(reader, size)
                if message is None:
                    break
                calls[0] += 1
                if message.get("op") in ("finish", "suspend"):
                    await output.close(keep_fd=keep)  # its raw output is logged before it ends
                reply = await host.call(message)
                writer.write(wire.encode(reply))
                await writer.drain()
                if message.get("op") in ("finish", "suspend"):
                    ended = True
                    break
        except ConnectionResetError:
            pass  # the guest died with a reply unread (e.g. killed while running ahead): its exit says why
        except (ConnectionError, ValueError) as exc:
            if not ended:
                return RunExit(True, f"sandbox protocol error: {exc}")
        finally:
            watchdog.cancel()
            if egress is not None:
                egress.cancel()
            if (
                ended
                and keep
                and warm_key is not None
                and not connected[0]
                and reader is not None
                and writer is not None
            ):
                kept = runner or WarmRunner(warm_key, child, reader, writer, exit_future)
                self._settle(kept, limits)
                parked = True
            else:
                if writer is not None:
                    writer.close()
                else:
                    ours.close()
                self._kill(pid)
                if egress is not None and (channel := child.egress) is not None:
                    egress.add_done_callback(lambda _: channel.close())  # once the task let go of it
                # Read before the cgroup goes; only for a run that did not report its end (no news then).
                out_of_memory = not ended and cgroup is not None and cgroup.oom_killed()
                self._release(cgroup, exit_future)
            await output.close(keep_fd=parked)
            if not parked and output.left_open:
                with contextlib.suppress(OSError):
                    os.close(child.output)
        if ended:
            return RunExit(False)
        # The watchdog kills and returns in one loop step, so it is done before the EOF is seen.
        if watchdog.done() and not watchdog.cancelled() and (reason := watchdog.result()):
            return RunExit(True, reason)
        if out_of_memory:
            return RunExit(
                True,
                f"memory limit exceeded ({limits.memory_bytes // (1024 * 1024)} MiB per run, counting memfd"
                " and tmpfs files the run created)",
            )
        try:
            status: int | None = await asyncio.wait_for(asyncio.shield(exit_future), 2.0)
        except TimeoutError:
            status = None
        return RunExit(True, describe_exit(status, limits))

    def _settle(self, runner: WarmRunner, limits: Limits) -> None:
        """Park ``runner`` once its guest says it is back to how it started (in the background: the
        wake-up has ended), or retire it."""
        task = asyncio.create_task(self._park_when_idle(runner, limits))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _park_when_idle(self, runner: WarmRunner, limits: Limits) -> None:
        try:
            frame = await asyncio.wait_for(wire.read_header(runner.reader, 1024), IDLE_WAIT_SECONDS)
            note = (
                await asyncio.wait_for(wire.read_body(runner.reader, frame[0]), IDLE_WAIT_SECONDS)
                if frame
                else None
            )
        except (Exception, asyncio.CancelledError):  # noqa: BLE001 - a guest that does not say so is not kept
            note = None
        why = (
            "it did not say it was idle"
            if note != {"op": "idle"} or frame is None or frame[1] != wire.NOTIFY
            else ""
        )
        seen = warm.usage(runner.child.pid)
        why = why or warm.keepable(seen, limits.memory_bytes, run_cpu_backstop(limits))
        if why or seen is None or self._closing:
            log.debug("run process %d not kept warm: %s", runner.child.pid, why or "closing")
            self._retire(runner)
            return
        runner.uses, runner.cpu, runner.parked = runner.uses + 1, seen.cpu, time.monotonic()
        self._warm.park(runner)

    def _retire(self, runner: WarmRunner) -> None:
        """Kill a warm runner and free what it holds."""
        runner.writer.close()  # its transport lets go of the socket; closing it again is a no-op
        self._discard(runner.child, runner.exited)

    async def close(self) -> None:
        self._closing = True
        await self._warm.close()
        await self._spares.close()
        if self._template_output is not None:
            self._template_output.close()
            self._template_output = None
        if self._ctrl is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._ctrl.fileno())
            self._ctrl.close()
            self._ctrl = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None
        if self._cgroups is not None:
            self._cgroups.close()
