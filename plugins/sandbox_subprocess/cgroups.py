"""A task (thread) limit per run: a pids cgroup that the kernel makes for each run.

RLIMIT_NPROC binds neither uid 0 nor tenants sharing one uid, and a run may start threads: with
32 KiB stacks one run could start ~6,850 of them, and five runs would take every pid of a host
with the default pid_max. So the kernel (which keeps its privileges; the confined template has
none) makes one cgroup per run with ``pids.max = MAX_TASKS`` and moves the forked child into it
before sending the job: the child is blocked reading its job then, so no tenant code runs
outside the cgroup. A thread past the limit fails to start (``RuntimeError: can't start new
thread``). Uses the v1 pids hierarchy where one is mounted, else cgroup v2 (``pids`` enabled
below the kernel's own cgroup). Many hosts give a process no writable cgroup (containers,
non-root kernels): then :attr:`RunCgroups.problem` says why, the kernel warns, and the sandbox's
watchdog kills a run seen over the limit instead (sampling: a weaker bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

MAX_TASKS = 256  # threads a run may have at once (its main thread included)
_RMDIR_TRIES = 100  # a killed run leaves its cgroup within milliseconds; be patient on a busy host


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, file system type, options) of every cgroup mount."""
    found = []
    with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 4 and fields[2] in ("cgroup", "cgroup2"):
                found.append((fields[1].replace("\\040", " "), fields[2], set(fields[3].split(","))))
    return found


def _own_cgroup(controller: str) -> str | None:
    """This process's cgroup path in the hierarchy of ``controller`` ("" for v2's unified one)."""
    with contextlib.suppress(OSError), open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controller in controllers.split(",") or (controller == "" and controllers == ""):
                return path.lstrip("/")
    return None


def _write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _sweep(parent: Path) -> None:
    """Remove what kernels that died without cleaning up left (empty cgroups only)."""
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            name, _, pid = entry.name.partition("-")
            if name != "tenantflow" or not pid.isdigit() or int(pid) == os.getpid():
                continue
            if Path(f"/proc/{pid}").exists():
                continue
            with contextlib.suppress(OSError):
                for run in entry.iterdir():
                    if run.is_dir():
                        with contextlib.suppress(OSError):
                            run.rmdir()
                entry.rmdir()


class RunCgroups:
    """This kernel's pids cgroups: ``tenantflow-<kernel pid>/run-<run pid>``, one per run."""

    def __init__(self) -> None:
        self.base: Path | None = None
        self.problem = ""
        try:
            self.base = self._make_base()
        except OSError as exc:
            self.problem = f"no pids cgroup could be made ({exc.strerror or exc})"
            self.base = None

    def _make_base(self) -> Path:
        mounts = _mounts()
        v1 = next((point for point, kind, opts in mounts if kind == "cgroup" and "pids" in opts), None)
        if v1 is not None and (own := _own_cgroup("pids")) is not None:
            parent = Path(v1, own)
            _sweep(parent)
            base = parent / f"tenantflow-{os.getpid()}"
            base.mkdir(exist_ok=True)
        else:
            v2 = next((point for point, kind, _ in mounts if kind == "cgroup2"), None)
            own = _own_cgroup("")
            if v2 is None or own is None:
                raise OSError(0, "no pids cgroup hierarchy is mounted")
            parent = Path(v2, own)
            if "pids" not in (parent / "cgroup.controllers").read_text().split():
                raise OSError(0, f"the pids controller is not available in {parent}")
            if "pids" not in (parent / "cgroup.subtree_control").read_text().split():
                _write(parent / "cgroup.subtree_control", "+pids")  # EBUSY if processes live there
            _sweep(parent)
            base = parent / f"tenantflow-{os.getpid()}"
            base.mkdir(exist_ok=True)
            _write(base / "cgroup.subtree_control", "+pids")
        probe = base / "probe"
        probe.mkdir(exist_ok=True)
        try:
            _write(probe / "pids.max", str(MAX_TASKS))
        finally:
            probe.rmdir()
        return base

    def attach(self, pid: int) -> Path | None:
        """Put process ``pid`` (all its threads) in a new cgroup of its own; None if that failed
        (``problem`` says why)."""
        if self.base is None:
            return None
        path = self.base / f"run-{pid}"
        try:
            path.mkdir()
            _write(path / "pids.max", str(MAX_TASKS))
            _write(path / "cgroup.procs", str(pid))
        except OSError as exc:
            self.problem = f"a run's pids cgroup could not be set up ({exc})"
            self.release_now(path)
            return None
        return path

    @staticmethod
    def release_now(path: Path) -> bool:
        """Remove a run's cgroup; False while its process has not left it yet."""
        try:
            path.rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True

    async def release(self, path: Path) -> None:
        """Remove a run's cgroup once its (killed) process has left it."""
        for _ in range(_RMDIR_TRIES):
            if self.release_now(path):
                return
            await asyncio.sleep(0.05)

    def close(self) -> None:
        """Remove every cgroup this kernel made (runs still in one keep it: they are being killed)."""
        if self.base is None:
            return
        with contextlib.suppress(OSError):
            for run in self.base.iterdir():
                if run.is_dir():
                    self.release_now(run)
        self.release_now(self.base)
