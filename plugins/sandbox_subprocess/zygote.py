"""The warm template process: imported once, confined once, forks one child per run.

Run as ``python -m tenantflow.plugins.sandbox_subprocess.zygote <control-fd> <settings>
tenantflow-kernel=<pid>`` by the sandbox, with an empty environment and its own stdout/stderr (a
pipe the kernel logs). The control socket (SOCK_SEQPACKET) carries JSON requests with two
SCM_RIGHTS fds, the child's socket and the write end of its stdout/stderr pipe (and, without the
network granted, its egress channel: see ``egress_guest``); the template
answers ``{"pid"}`` and later ``{"exit", "status"}``. The template dies with the kernel's thread
that started it, and each child with the template (SIGKILL), so no run outlives its kernel.
"""

from __future__ import annotations

import array

# Imported here so every child starts with them loaded (that is what makes a run start in ms).
import asyncio  # noqa: F401
import datetime  # noqa: F401
import gc
import inspect  # noqa: F401
import json
import os
import select
import signal
import socket
import sys
import traceback
from typing import Any

import tenantflow.workflow  # noqa: F401
from tenantflow.plugins.sandbox_subprocess import egress_guest, policy, warm_guest
from tenantflow.plugins.sandbox_subprocess.wire import SocketTransport
from tenantflow.workflow._runtime import run_job


def _recv(ctrl: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    fds = array.array("i")
    data, ancdata, _flags, _addr = ctrl.recvmsg(65536, socket.CMSG_LEN(3 * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if not data:
        return None, list(fds)
    return json.loads(data), list(fds)


_settings: dict[str, Any] = {}  # the template's settings, for its children
_WARM_UP_MODULE = "tenantflow_template_warm_up"
_WARM_UP_CODE = """
from tenantflow.workflow import WorkflowEntrypoint

class Sync(WorkflowEntrypoint):
    def run(self, event, step):
        step.do("accept", lambda: {"n": event.payload["n"], "state": "accepted"})
        step.sleep("later", "1 day")

class Async(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.do("accept", lambda: {"n": event.payload["n"], "state": "accepted"})
        await step.sleep("later", "1 day")
"""


class _WarmUpHost:
    """Answers a warm-up run as the kernel answers a new instance: run the step, then hibernate."""

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        if message["op"] == "step":
            return {"do": "run", "attempt": 1} if message["kind"] == "do" else {"do": "suspend"}
        if message["op"] == "result":
            return {"do": "return", "value": message.get("value")}
        return {"do": "ack"}

    def notify(self, message: dict[str, Any]) -> None:
        pass


def _warm_up() -> None:
    """Run a workflow of our own once in the template (threads off: a fork must not inherit one),
    so lazy imports, caches and first-use set-up happen once here instead of in every run
    (measured: 0.4 ms of CPU per run). Nothing of it stays importable."""
    finders = list(sys.meta_path)
    for workflow in ("Sync", "Async"):
        job = {"files": {f"{_WARM_UP_MODULE}.py": _WARM_UP_CODE}, "module": _WARM_UP_MODULE,
               "workflow": workflow, "journal": [],
               "event": {"payload": {"n": 1}, "instance_id": "warm-up", "timestamp": "2026-01-01T00:00:00+00:00"}}  # fmt: skip
        run_job(job, _WarmUpHost(), threads=False)
        sys.meta_path[:] = finders
        sys.modules.pop(_WARM_UP_MODULE, None)


def _child(template: int, fds: list[int], request: dict[str, Any]) -> None:
    """In the forked child: confine, then run one job. Never returns."""
    code = 0
    try:
        if not policy.die_with_parent(template):
            os._exit(75)  # the template died before we could be tied to it: so does this run
        policy.set_name(b"tf-spare")
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        sock_fd, output_fd, *egress = fds
        for target in (1, 2):  # the run's own stdout/stderr, never the template's (nor the kernel's)
            os.dup2(output_fd, target)
        sock_fd = os.dup2(sock_fd, 3)
        egress_fd = os.dup2(egress[0], 4) if egress else -1  # its connections, asked of the kernel
        os.closerange(5 if egress else 4, 65536)
        limits = request.get("limits", {})
        policy.limit_child(
            limits["memory_bytes"], limits["cpu_seconds"], limits["open_files"], limits.get("file_bytes", 0)
        )
        policy.scope_child()  # no signals to the template or other tenants' runs
        policy.filter_child()
        if egress_fd >= 0:
            egress_guest.install(egress_fd)
            warm_guest.adopt(socket)  # a warm runner's connections keep going through the kernel
        sock = socket.socket(fileno=sock_fd)
        transport = SocketTransport(sock)
        job = transport.recv()  # a spare waits here, confined, until a run takes it
        workspace = job.pop("workspace", None)
        if _settings.get("workspaces"):  # before any tenant code: only its own instance's workspace
            policy.confine_run(_settings.get("writable", []), workspace if isinstance(workspace, str) else None,
                               bool(_settings.get("network")))  # fmt: skip
        policy.set_name(b"tf-run")
        _serve_runs(transport, job, limits["open_files"], warm=workspace is None)
    except BaseException:  # noqa: BLE001 - report and exit; the kernel sees the crash
        try:
            traceback.print_exc(file=sys.__stderr__)
        except BaseException:  # noqa: BLE001
            pass
        code = 70
    os._exit(code)


def _serve_runs(transport: SocketTransport, job: dict[str, Any], max_fd: int, warm: bool) -> None:
    """Run ``job``; while the kernel keeps this process warm (``"warm": true``, never after a
    workspace was granted), wait for the same tenant's next wake-up and run it too (``warm_guest``)."""
    baseline = warm_guest.Baseline(max_fd) if warm and job.get("warm") is True else None
    while True:
        if baseline is not None:
            baseline.precompile(job["files"])
        run_job(job, transport, threads=True)
        if baseline is None or not baseline.clean():
            return
        policy.set_name(b"tf-warm")
        transport.notify({"op": "idle"})  # the kernel may now hand this process the next wake-up
        try:
            ended, job = job, transport.recv()
        except EOFError:
            return  # let go of (most runners kept are: the reset below is paid by reuses only)
        baseline.reset(ended)  # before any of the next wake-up's code runs
        if "workspace" in job or job.get("warm") is not True:
            raise RuntimeError("a warm run process was sent a job it may not run")
        policy.set_name(b"tf-run")


def main() -> None:
    try:
        _serve()
    except (BrokenPipeError, ConnectionError):
        pass  # the kernel went away; so do we


def _serve() -> None:
    kernel = int(sys.argv[3].rpartition("=")[2])
    if not policy.die_with_parent(kernel):
        return  # the kernel died while starting us
    ctrl = socket.socket(fileno=int(sys.argv[1]))
    settings = json.loads(sys.argv[2])
    _settings.update(settings)
    confinement = policy.confine_template(
        writable=settings.get("writable", []),
        network=settings.get("network", False),
        filesystem=settings.get("filesystem", True),
        memfd=settings.get("memfd", False),
        workspaces=settings.get("workspaces"),
    )
    if not policy.die_with_parent(kernel):  # again: a change of uid cleared the death signal
        return
    ctrl.send(json.dumps({"ready": True, **confinement._asdict()}).encode())
    template = os.getpid()
    try:
        _warm_up()
    except Exception:  # noqa: BLE001 - an optimisation: runs still work without it
        traceback.print_exc()
    # The heap built so far moves to the permanent generation: a child's full collection never
    # touches (so never copies) the pages it shares with the template (measured: 1,380 page faults
    # and 6 ms per full collection in a run without this, 7 faults and 0.02 ms with it). Once, not per
    # fork: frozen cycles are never collected, and the template makes few objects after this.
    warm_guest.snapshot()
    gc.collect()
    gc.freeze()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    while True:
        watched: list[Any] = [ctrl, wake_r]
        readable, _, _ = select.select(watched, [], [], 1.0)
        if wake_r in readable:
            os.read(wake_r, 512)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            ctrl.send(json.dumps({"exit": pid, "status": os.waitstatus_to_exitcode(status)}).encode())
        if ctrl in readable:
            request, fds = _recv(ctrl)
            if request is None:
                return  # the kernel went away
            if request.get("op") == "kill":
                try:
                    os.killpg(int(request["pid"]), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                continue
            if len(fds) not in (2, 3):
                for fd in fds:
                    os.close(fd)
                ctrl.send(json.dumps({"pid": -1, "req": request.get("req")}).encode())
                continue
            pid = os.fork()
            if pid == 0:
                ctrl.close()
                _child(template, fds, request)
            for fd in fds:
                os.close(fd)
            ctrl.send(json.dumps({"pid": pid, "req": request.get("req")}).encode())


if __name__ == "__main__":
    main()
