"""Limits per run that rlimits cannot give: a pids and a memory cgroup the kernel makes for each run.

Tasks: RLIMIT_NPROC binds neither uid 0 nor tenants sharing one uid, and a run may start threads:
with 32 KiB stacks one run could start ~6,850 of them, and five runs would take every pid of a
host with the default pid_max. ``pids.max = MAX_TASKS``: a thread past it fails to start
(``RuntimeError: can't start new thread``).

Memory: RLIMIT_AS bounds what a run maps, not what it creates. memfd and tmpfs pages are shared
memory no address space counts (a step held 1,000 MiB in memfds under a 512 MiB limit), so the
run's memory cgroup is limited to the run's memory limit as well, counting them (and swap); past
it the host's OOM killer kills the run, and the sandbox reports the step's memory limit.

The kernel (which keeps its privileges; the confined template has none) makes both, and moves the
forked child in before sending the job: the child is blocked reading its job then, so no tenant
code runs outside them. Uses each controller's v1 hierarchy where one is mounted, else cgroup v2
(controllers enabled below the kernel's own cgroup). Many hosts give a process no writable cgroup
(containers, non-root kernels): then :attr:`RunCgroups.problem` (tasks) and
:attr:`RunCgroups.memory_problem` say why; the kernel warns and the sandbox's watchdog kills a
run seen over the task limit instead (sampling: a weaker bound), and the template's filter
refuses ``memfd_create``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
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


@dataclasses.dataclass(frozen=True)
class _Hierarchy:
    """Where this kernel's run cgroups go for some controllers: ``base`` = ``tenantflow-<pid>``."""

    base: Path
    controllers: frozenset[str]
    v2: bool

    def limit(self, run: Path, memory_bytes: int) -> None:
        if "pids" in self.controllers:
            _write(run / "pids.max", str(MAX_TASKS))
        if "memory" in self.controllers:
            if self.v2:
                _write(run / "memory.max", str(memory_bytes))
                with contextlib.suppress(FileNotFoundError):
                    _write(run / "memory.swap.max", "0")
            else:
                _write(run / "memory.limit_in_bytes", str(memory_bytes))
                with contextlib.suppress(FileNotFoundError):  # no swap accounting on this host
                    _write(run / "memory.memsw.limit_in_bytes", str(memory_bytes))


@dataclasses.dataclass(frozen=True)
class RunCgroup:
    """One run's cgroups (one per hierarchy) and which of them holds its memory limit."""

    paths: tuple[Path, ...]
    memory: Path | None
    memory_v2: bool = False

    def oom_killed(self) -> bool:
        """Whether the host's OOM killer killed something here: the run went past its memory."""
        if self.memory is None:
            return False
        name = "memory.events" if self.memory_v2 else "memory.oom_control"
        try:
            lines = (self.memory / name).read_text().splitlines()
        except OSError:
            return False
        counts = dict(line.split(None, 1) for line in lines if " " in line)
        return counts.get("oom_kill", "0").strip() not in ("", "0")


def _v1(controller: str, mounts: list[tuple[str, str, set[str]]]) -> _Hierarchy:
    point = next((p for p, kind, opts in mounts if kind == "cgroup" and controller in opts), None)
    own = _own_cgroup(controller)
    if point is None or own is None:
        raise OSError(0, f"no {controller} cgroup hierarchy is mounted")
    parent = Path(point, own)
    _sweep(parent)
    base = parent / f"tenantflow-{os.getpid()}"
    base.mkdir(exist_ok=True)
    return _probe(_Hierarchy(base, frozenset({controller}), v2=False))


def _v2(controllers: set[str], mounts: list[tuple[str, str, set[str]]]) -> _Hierarchy:
    point = next((p for p, kind, _ in mounts if kind == "cgroup2"), None)
    own = _own_cgroup("")
    if point is None or own is None:
        raise OSError(0, "no cgroup v2 hierarchy is mounted")
    parent = Path(point, own)
    available = set((parent / "cgroup.controllers").read_text().split()) & controllers
    if not available:
        raise OSError(0, f"the {' and '.join(sorted(controllers))} controllers are not available in {parent}")
    enabled = set((parent / "cgroup.subtree_control").read_text().split())
    if available - enabled:  # EBUSY if processes live there
        _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(available - enabled)))
    _sweep(parent)
    base = parent / f"tenantflow-{os.getpid()}"
    base.mkdir(exist_ok=True)
    _write(base / "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(available)))
    return _probe(_Hierarchy(base, frozenset(available), v2=True))


def _probe(hierarchy: _Hierarchy) -> _Hierarchy:
    probe = hierarchy.base / "probe"
    probe.mkdir(exist_ok=True)
    try:
        hierarchy.limit(probe, 64 * 1024 * 1024)
    finally:
        probe.rmdir()
    return hierarchy


class RunCgroups:
    """This kernel's run cgroups: ``tenantflow-<kernel pid>/run-<run pid>`` in each hierarchy."""

    def __init__(self) -> None:
        self.problem = ""  # why runs have no pids cgroup ("" when they have one)
        self.memory_problem = ""  # why runs have no memory cgroup
        self._hierarchies: list[_Hierarchy] = []
        mounts = _mounts()
        v2_wanted: set[str] = set()
        for controller in ("pids", "memory"):
            try:
                self._hierarchies.append(_v1(controller, mounts))
            except OSError:
                v2_wanted.add(controller)
        if v2_wanted:
            with contextlib.suppress(OSError):
                self._hierarchies.append(_v2(v2_wanted, mounts))
        held = {c for h in self._hierarchies for c in h.controllers}
        if "pids" not in held:
            self.problem = (
                "no pids cgroup could be made (neither a v1 pids hierarchy nor v2 pids is writable)"
            )
        if "memory" not in held:
            self.memory_problem = (
                "no memory cgroup could be made (neither a v1 memory hierarchy nor v2 memory is writable)"
            )

    @property
    def memory(self) -> bool:
        """Whether runs get a memory cgroup (so memfd and tmpfs pages count against the limit)."""
        return not self.memory_problem

    def attach(self, pid: int, memory_bytes: int) -> RunCgroup | None:
        """Put process ``pid`` (all its threads) in new cgroups of its own; None if none could be
        made (``problem`` says why)."""
        paths: list[Path] = []
        memory: _Hierarchy | None = None
        for hierarchy in self._hierarchies:
            path = hierarchy.base / f"run-{pid}"
            try:
                path.mkdir()
                hierarchy.limit(path, memory_bytes)
                _write(path / "cgroup.procs", str(pid))
            except OSError as exc:
                self.release_now(path)
                what = " and ".join(sorted(hierarchy.controllers))
                problem = f"a run's {what} cgroup could not be set up ({exc})"
                if "pids" in hierarchy.controllers:
                    self.problem = problem
                if "memory" in hierarchy.controllers:
                    self.memory_problem = problem
                continue
            paths.append(path)
            if "memory" in hierarchy.controllers:
                memory = hierarchy
        if not paths:
            return None
        memory_path = memory.base / f"run-{pid}" if memory is not None else None
        return RunCgroup(tuple(paths), memory_path, memory.v2 if memory is not None else False)

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

    async def release(self, run: RunCgroup) -> None:
        """Remove a run's cgroups once its (killed) process has left them."""
        for path in run.paths:
            for _ in range(_RMDIR_TRIES):
                if self.release_now(path):
                    break
                await asyncio.sleep(0.05)

    def close(self) -> None:
        """Remove every cgroup this kernel made (runs still in one keep it: they are being killed)."""
        for hierarchy in self._hierarchies:
            with contextlib.suppress(OSError):
                for run in hierarchy.base.iterdir():
                    if run.is_dir():
                        self.release_now(run)
            self.release_now(hierarchy.base)
