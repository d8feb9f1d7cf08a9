"""The subprocess sandbox, kernel side: a warm template process forks a confined child per run."""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tenantflow.kernel.sandbox import Host, Limits, RunExit
from tenantflow.plugins.pysource import decode_files, inspect_python
from tenantflow.plugins.sandbox_subprocess import wire

log = logging.getLogger("tenantflow.sandbox.subprocess")


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


def process_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU of a process, all its threads (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


async def cpu_watchdog(pid: int, limits: Limits, calls: list[int], kill: Callable[[int], None]) -> str:
    """Kill ``pid`` once it spends ``limits.cpu_seconds`` of CPU without a host call; say why.

    ``calls[0]`` counts the run's host calls: each one starts a new budget (a step attempt, or the
    workflow code between steps). Sampling, not per-call reads, keeps steps cheap; a segment is
    charged from the first sample after its call, at most one tick late."""
    tick = min(0.25, max(limits.cpu_seconds / 4, 0.01))
    seen, base = -1, 0.0
    while True:
        await asyncio.sleep(tick)
        used = process_cpu_seconds(pid)
        if used is None:
            return ""
        if calls[0] != seen:
            seen, base = calls[0], used
        elif used - base > limits.cpu_seconds:
            kill(pid)
            return f"CPU limit exceeded ({limits.cpu_seconds:g} s of CPU per step)"


class SubprocessSandbox:
    """``runtime = "python"``: CPython in a forked, confined child process."""

    runtime = "python"

    def __init__(
        self, *, network: bool = False, filesystem: bool = True, writable: list[str] | None = None
    ) -> None:
        self._writable = [str(Path(p).resolve()) for p in writable or []]
        self._settings: dict[str, Any] = {
            "network": network,
            "filesystem": filesystem,
            "writable": self._writable,
        }
        self._ctrl: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pending: dict[int, asyncio.Future[int]] = {}
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._early_exits: dict[int, int] = {}
        self._req = 0
        self._lock = asyncio.Lock()
        self.protections_off: list[str] = []

    def inspect(self, files: Mapping[str, bytes]) -> dict[str, str]:
        return inspect_python(files)

    async def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {
            "MALLOC_ARENA_MAX": "2",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0",
            "LANG": "C.UTF-8",
        }
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-m", "tenantflow.plugins.sandbox_subprocess.zygote", str(theirs.fileno()),
             json.dumps(self._settings)],
            pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL, cwd="/",
        )  # fmt: skip
        theirs.close()
        self._ctrl = ours
        loop = asyncio.get_running_loop()
        hello = json.loads(await loop.sock_recv(ours, 65536) or b"{}")
        if not hello.get("ready"):
            raise RuntimeError("the subprocess sandbox template failed to start")
        self.protections_off = list(hello.get("off", []))
        if self._settings["network"]:
            log.warning("subprocess sandbox: network access granted to tenant code (--sandbox-network)")
        for line in self.protections_off:
            log.warning("subprocess sandbox: %s", line)
        ours.setblocking(False)
        loop.add_reader(ours.fileno(), self._on_control)

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
            if self._ctrl is not None:
                with contextlib.suppress(Exception):
                    asyncio.get_running_loop().remove_reader(self._ctrl.fileno())
                self._ctrl.close()
            await self.start()

    async def _fork(self, child_sock: socket.socket, limits: Limits) -> int:
        """A confined child from the template; a template found dead is replaced, and asked again."""
        await self._respawn_if_gone()
        template = self._proc
        try:
            return await self._fork_once(child_sock, limits)
        except (OSError, RuntimeError) as exc:  # it died between our check and our request
            log.warning("the sandbox template failed a fork (%s); replacing it", exc)
            await self._respawn_if_gone(broken=template)
            return await self._fork_once(child_sock, limits)

    async def _fork_once(self, child_sock: socket.socket, limits: Limits) -> int:
        assert self._ctrl is not None
        self._req += 1
        req = self._req
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending[req] = fut
        request = {
            "op": "fork",
            "req": req,
            "limits": {"memory_bytes": limits.memory_bytes, "cpu_seconds": run_cpu_backstop(limits),
                       "open_files": limits.open_files, "file_bytes": 256 * 1024 * 1024 if self._writable else 0},
        }  # fmt: skip
        fds = array.array("i", [child_sock.fileno()])
        self._ctrl.sendmsg([json.dumps(request).encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        return await fut

    def _kill(self, pid: int) -> None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            if self._ctrl is not None:
                with contextlib.suppress(OSError):
                    self._ctrl.send(json.dumps({"op": "kill", "pid": pid}).encode())

    async def run(self, job: dict[str, Any], host: Host, limits: Limits) -> RunExit:
        job = {**job, "files": decode_files(job["files"])}
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pid = await self._fork(theirs, limits)
        finally:
            theirs.close()
        loop = asyncio.get_running_loop()
        exit_future: asyncio.Future[int] = loop.create_future()
        if pid in self._early_exits:
            exit_future.set_result(self._early_exits.pop(pid))
        else:
            self._exits[pid] = exit_future
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        ended = False
        calls = [0]
        watchdog = asyncio.create_task(cpu_watchdog(pid, limits, calls, self._kill))
        try:
            writer.write(wire.encode(job))
            await writer.drain()
            while True:
                message = await wire.read(reader)
                if message is None:
                    break
                if message.pop("notify", False):
                    await host.notify(message)
                    continue
                calls[0] += 1
                reply = await host.call(message)
                writer.write(wire.encode(reply))
                await writer.drain()
                if message.get("op") in ("finish", "suspend"):
                    ended = True
                    break
        except (ConnectionError, ValueError) as exc:
            if not ended:
                return RunExit(True, f"sandbox protocol error: {exc}")
        finally:
            writer.close()
            self._kill(pid)
            watchdog.cancel()
        if ended:
            return RunExit(False)
        # The watchdog kills and returns in one loop step, so it is done before the EOF is seen.
        if watchdog.done() and not watchdog.cancelled() and (reason := watchdog.result()):
            return RunExit(True, reason)
        try:
            status: int | None = await asyncio.wait_for(asyncio.shield(exit_future), 2.0)
        except TimeoutError:
            status = None
        return RunExit(True, describe_exit(status, limits))

    async def close(self) -> None:
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
            self._proc = None
