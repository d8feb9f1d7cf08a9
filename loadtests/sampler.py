"""Samples what a kernel process costs while a load runs: /proc, its storage file, its metrics.

Every ``interval`` seconds a daemon thread records one :class:`Sample`: the kernel's RSS, CPU
(percent of one core since the previous sample), open file descriptors, processes under it (all,
and sandbox runs: children of a sandbox template), storage bytes and, when the kernel serves
Prometheus metrics, its hibernating instances and code cache entries.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
TEMPLATE_MARK = b"sandbox_subprocess.zygote"  # in the command line of a subprocess sandbox template


@dataclasses.dataclass
class Sample:
    t: float  # seconds since the sampler started
    rss_mib: float
    cpu_percent: float  # of one core
    fds: int
    processes: int  # every process under the kernel (templates, spares, runs)
    sandbox_runs: int  # processes running tenant code: children of a template
    storage_bytes: int
    hibernating: int  # -1 where unknown (no metrics endpoint)
    code_cache_entries: int  # -1 where unknown
    cpu_seconds: float = 0.0  # the kernel's own CPU time so far
    tree_cpu_seconds: float = 0.0  # ... plus every process under it, living or reaped (sandbox runs)


def _ppids() -> dict[int, int]:
    """Every process's parent, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    stat = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[1])
    return parents


def descendants(pid: int) -> list[int]:
    """Processes under ``pid`` (children, their children...)."""
    children: dict[int, list[int]] = {}
    for child, parent in _ppids().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_seconds(pid: int, reaped: bool = False) -> float:
    """User + system CPU time of ``pid`` (with ``reaped``: and of its children it has waited for)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if reaped else 0)
    return ticks / _TICKS


def running_seconds(pid: int) -> float:
    """CPU time of ``pid``'s living threads to the nanosecond (``/proc/<pid>/task/*/schedstat``).
    ``/proc/<pid>/stat`` counts whole clock ticks per process: summed over hundreds of short-lived
    or mostly idle processes (warm run processes, spares) it loses up to 10 ms each."""
    total = 0
    for task in os.scandir(f"/proc/{pid}/task"):
        try:
            with open(f"{task.path}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and everything under it, including processes already reaped."""
    total = 0.0
    for process in [pid, *descendants(pid)]:
        try:
            own = cpu_seconds(process)  # whole ticks, but with its threads that ended (python-wasm's)
            reaped = cpu_seconds(process, reaped=True) - own
            total += max(own, running_seconds(process)) + reaped
        except OSError:  # gone meanwhile: its parent's reaped time has it (or soon will)
            continue
    return total


def sandbox_runs(pid: int) -> tuple[int, int]:
    """(processes under ``pid``, of which running tenant code: children of a sandbox template that
    are not spares)."""
    under = descendants(pid)
    parents = _ppids()
    templates = set()
    for p in under:
        try:
            if TEMPLATE_MARK in Path(f"/proc/{p}/cmdline").read_bytes():
                templates.add(p)
        except OSError:
            continue
    return len(under), sum(1 for p in under if parents.get(p) in templates and not _spare(p))


def _spare(pid: int) -> bool:
    """A template's child that waits for a run, not running tenant code: a spare (named so until a job
    arrives) or a warm runner parked between its tenant's wake-ups (named so until the next one)."""
    try:
        return Path(f"/proc/{pid}/comm").read_bytes().strip() in (b"tf-spare", b"tf-warm")
    except OSError:
        return False


def prometheus_values(url: str, names: tuple[str, ...]) -> dict[str, float]:
    """Unlabelled gauge values from a Prometheus text endpoint."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            values[name] = float(value)
    return values


class KernelSampler:
    """Samples a kernel until :meth:`stop`; ``samples`` grows as it runs."""

    def __init__(
        self,
        pid: int | None,
        storage_bytes: Callable[[], int] | None = None,
        metrics_url: str = "",
        interval: float = 1.0,
    ) -> None:
        self.pid = pid
        self._storage_bytes = storage_bytes
        self.metrics_url = metrics_url
        self.interval = interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kernel-sampler", daemon=True)
        self._started = time.monotonic()
        self._cpu: tuple[float, float] | None = None

    def start(self) -> KernelSampler:
        self._thread.start()
        return self

    def stop(self) -> list[Sample]:
        self._stop.set()
        self._thread.join(30)
        return self.samples

    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.sample())
            except (OSError, ValueError):  # the kernel went away, or a scrape failed once
                pass
            self._stop.wait(self.interval)

    def _cpu_percent(self) -> float:
        assert self.pid is not None
        busy = cpu_seconds(self.pid)
        now = time.monotonic()
        previous, self._cpu = self._cpu, (now, busy)
        if previous is None or now <= previous[0]:
            return 0.0
        return 100.0 * (busy - previous[1]) / (now - previous[0])

    def sample(self) -> Sample:
        rss = cpu = own = tree = 0.0
        fds = processes = runs = 0
        if self.pid is not None:
            with open(f"/proc/{self.pid}/statm", "rb") as f:
                rss = int(f.read().split()[1]) * _PAGE / 2**20
            cpu = self._cpu_percent()
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
            processes, runs = sandbox_runs(self.pid)
            own, tree = cpu_seconds(self.pid), tree_cpu_seconds(self.pid)
        hibernating = cache = -1
        if self.metrics_url:
            names = ("tenantflow_instances_hibernating", "tenantflow_code_cache_entries")
            try:
                values = prometheus_values(self.metrics_url, names)
                hibernating = int(values.get(names[0], -1))
                cache = int(values.get(names[1], -1))
            except OSError:
                pass
        return Sample(
            t=round(time.monotonic() - self._started, 2),
            rss_mib=round(rss, 1),
            cpu_percent=round(cpu, 1),
            fds=fds,
            processes=processes,
            sandbox_runs=runs,
            storage_bytes=self._storage_bytes() if self._storage_bytes else 0,
            hibernating=hibernating,
            code_cache_entries=cache,
            cpu_seconds=round(own, 2),
            tree_cpu_seconds=round(tree, 2),
        )


def write_csv(samples: list[Sample], path: Path) -> None:
    fields = [f.name for f in dataclasses.fields(Sample)]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for s in samples:
            writer.writerow(dataclasses.asdict(s))


def summary_rows(samples: list[Sample]) -> list[tuple[str, str, str, str]]:
    """(what, first, peak, last) for the closing table."""
    if not samples:
        return []
    first, last = samples[0], samples[-1]

    def row(label: str, attr: str, fmt: str = "{:,.0f}") -> tuple[str, str, str, str]:
        peak = max(getattr(s, attr) for s in samples)
        return label, fmt.format(getattr(first, attr)), fmt.format(peak), fmt.format(getattr(last, attr))

    rows = [
        row("kernel RSS (MiB)", "rss_mib", "{:,.1f}"),
        row("kernel CPU (% of a core)", "cpu_percent"),
        row("open fds", "fds"),
        row("processes under the kernel", "processes"),
        row("sandbox runs alive", "sandbox_runs"),
        row("storage (bytes)", "storage_bytes"),
    ]
    if last.hibernating >= 0:
        rows.append(row("hibernating instances", "hibernating"))
        rows.append(row("code cache entries", "code_cache_entries"))
    return rows


def table(rows: Sequence[tuple[str, ...]], header: tuple[str, ...]) -> str:
    """A plain-text table (also valid Markdown)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: tuple[str, ...]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
