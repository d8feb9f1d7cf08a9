"""PNG plots of a kernel's samples over time (what locust does not chart)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from sampler import Sample  # noqa: E402

# (file name, title, y label, series: (Sample attribute, legend, scale))
CHARTS: list[tuple[str, str, str, list[tuple[str, str, float]]]] = [
    ("rss.png", "Kernel RSS", "MiB", [("rss_mib", "RSS", 1.0)]),
    ("cpu.png", "Kernel CPU", "% of one core", [("cpu_percent", "CPU", 1.0)]),
    ("fds.png", "Kernel open file descriptors", "fds", [("fds", "open fds", 1.0)]),
    ("processes.png", "Processes under the kernel", "processes",
     [("processes", "all (templates, spares, runs)", 1.0), ("sandbox_runs", "sandbox runs alive", 1.0)]),
    ("hibernating.png", "Hibernating instances (the kernel recounts every 10 s)", "instances", [("hibernating", "hibernating", 1.0)]),
    ("storage.png", "Storage (SQLite file + WAL)", "MiB", [("storage_bytes", "storage", 1 / 2**20)]),
]  # fmt: skip


def _draw(
    ax: Axes, samples: list[Sample], title: str, unit: str, series: list[tuple[str, str, float]]
) -> None:
    t = [s.t for s in samples]
    for attr, label, scale in series:
        values = [getattr(s, attr) * scale for s in samples]
        ax.plot(t, values, label=label, linewidth=1.2)
    ax.set_title(title)
    ax.set_xlabel("seconds")
    ax.set_ylabel(unit)
    ax.set_ylim(bottom=0, top=None if ax.get_ylim()[1] >= 1 else 1)  # an all-zero series reads as 0
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend(loc="upper left", fontsize="small")


def write_plots(
    samples: list[Sample], folder: Path, title: str = "", skip: frozenset[str] = frozenset()
) -> list[Path]:
    """One PNG per chart plus ``kernel.png`` with all of them; returns the files written.
    ``skip``: charts (file names) with nothing sampled, e.g. /proc of a kernel on another machine."""
    if not samples:
        return []
    skip = skip | ({"hibernating.png"} if samples[-1].hibernating < 0 else set())
    charts = [c for c in CHARTS if c[0] not in skip]
    if not charts:
        return []
    written = []
    for name, chart_title, unit, series in charts:
        fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
        _draw(ax, samples, chart_title, unit, series)
        fig.tight_layout()
        fig.savefig(folder / name)
        plt.close(fig)
        written.append(folder / name)
    rows = (len(charts) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(14, 3.6 * rows), dpi=100, squeeze=False)
    for ax, (_, chart_title, unit, series) in zip(axes.flat, charts, strict=False):
        _draw(ax, samples, chart_title, unit, series)
    for ax in list(axes.flat)[len(charts) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(folder / "kernel.png")
    plt.close(fig)
    written.append(folder / "kernel.png")
    return written
