"""What a workspace (``ctx.workspace()``) costs for a 10,000-file repository (issue 25).

Lays the code out once (the first lay-out, reported apart), then makes ``--workspaces`` workspaces
of it, one per instance, and removes them: per-workspace time (median, p90, max) for each way the
kernel can make one on this machine (``overlay``: a root kernel's overlayfs over the laid-out tree;
``links``: an ordinary user's kernel's hard-link farm). The goal is under 50 ms per workspace once
the commit has been laid out. Runs in-process on a directory of the machine's disk (``--dir``).

    .venv/bin/python loadtests/bench_workspace.py [--files 10000] [--workspaces 30] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from tenantflow.kernel.workspace import Workspaces


def repository(files: int) -> list[tuple[str, bytes, bool]]:
    """A repository's worth of files: 100 per directory, two levels deep, ~1 KiB each."""
    body = b"def f(x):\n    return x + 1\n" * 40
    return [(f"src/pkg{i // 100:03d}/mod{i % 7}/file{i}.py", body, i % 50 == 0) for i in range(files)]


def measure(root: Path, mode: str, files: list[tuple[str, bytes, bool]], count: int) -> None:
    spaces = Workspaces(root / mode, mode=mode)
    try:
        started = time.perf_counter()
        spaces.lower("bench", "git+file:///repo.git@" + "a" * 40 + "#wf.py", lambda: files)
        first = time.perf_counter() - started
        made, removed = [], []
        for i in range(count):
            started = time.perf_counter()
            path = spaces.workspace(
                "bench", f"i{i}", "git+file:///repo.git@" + "a" * 40 + "#wf.py", lambda: files
            )
            made.append(time.perf_counter() - started)
        assert sum(len(names) for _, _, names in os.walk(path)) == len(files)
        for i in range(count):
            started = time.perf_counter()
            spaces.remove("bench", f"i{i}")
            removed.append(time.perf_counter() - started)
        made.sort()
        print(f"{mode:8} first lay-out {first * 1000:8.1f} ms | per workspace: median {statistics.median(made) * 1000:7.2f} ms,"
              f" p90 {made[int(len(made) * 0.9)] * 1000:7.2f} ms, max {made[-1] * 1000:7.2f} ms"
              f" ({'under' if statistics.median(made) < 0.05 else 'OVER'} the 50 ms goal)"
              f" | removal median {statistics.median(removed) * 1000:7.1f} ms")  # fmt: skip
    finally:
        spaces.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--workspaces", type=int, default=30)
    parser.add_argument("--dir", default="/var/tmp", help="a directory on the disk workspaces would use")
    args = parser.parse_args()
    files = repository(args.files)
    root = Path(tempfile.mkdtemp(prefix="bench-workspace-", dir=args.dir))
    print(
        f"{args.files} files, {sum(len(d) for _, d, _ in files) // 1024} KiB, {args.workspaces} workspaces, under {root}"
    )
    try:
        modes = ["overlay", "links"] if os.geteuid() == 0 else ["links"]
        for mode in modes:
            measure(root, mode, files, args.workspaces)
        if os.geteuid() != 0:
            print("overlay: not measured (an overlay needs a root kernel)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
