"""What a workspace (``ctx.workspace()``) costs for a 10,000-file repository (issue 25).

Lays the code out once (the first lay-out, reported apart), then makes ``--workspaces`` workspaces
of it, one per instance, and removes them: per-workspace time (median, p90, max) for each way the
kernel can make one on this machine. The goal is under 50 ms per workspace once the commit has been
laid out. Runs in-process on a directory of the machine's disk (``--dir``).

- ``overlay``: a root kernel's overlayfs over the laid-out tree (what a root kernel uses);
- ``links``: an ordinary user's kernel's hard-link farm made when the step asks (no spare);
- ``links+spare``: the same farm made ahead (what an ordinary user's kernel uses): the step's time
  is a rename; instances arriving one at a time (each after the last spare is made), then back to
  back (the spare is still being made: the step makes its own, beside it), and the background
  time a spare takes;
- ``userns overlay``: not in the kernel: an overlay mounted by an unprivileged process in a user
  and mount namespace of its own (Linux 5.11+, ``userxattr``), as uid 65534 when run as root;
  the mount only, with the namespace's set-up apart.

    .venv/bin/python loadtests/bench_workspace.py [--files 10000] [--workspaces 30] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from tenantflow.kernel.workspace import Workspaces

REF = "git+file:///repo.git@" + "a" * 40 + "#wf.py"


def repository(files: int) -> list[tuple[str, bytes, bool]]:
    """A repository's worth of files: 100 per directory, two levels deep, ~1 KiB each."""
    body = b"def f(x):\n    return x + 1\n" * 40
    return [(f"src/pkg{i // 100:03d}/mod{i % 7}/file{i}.py", body, i % 50 == 0) for i in range(files)]


def _figures(name: str, made: list[float], note: str = "") -> str:
    made = sorted(made)
    median = statistics.median(made)
    return (f"{name:16} per workspace: median {median * 1000:7.2f} ms, p90 {made[int(len(made) * 0.9)] * 1000:7.2f} ms,"
            f" max {made[-1] * 1000:7.2f} ms ({'under' if median < 0.05 else 'OVER'} the 50 ms goal){note}")  # fmt: skip


def measure(root: Path, mode: str, files: list[tuple[str, bytes, bool]], count: int, spare: str = "") -> None:
    """``spare``: "" (no spare farm), "paced" (each workspace after the last spare is made) or
    "back-to-back"."""
    spaces = Workspaces(root / f"{mode}{spare}", mode=mode)
    spaces.spares = bool(spare)
    try:
        started = time.perf_counter()
        spaces.lower("bench", REF, lambda: files)
        first = time.perf_counter() - started
        made, removed, background = [], [], []
        for i in range(count):
            if spare == "paced":
                started = time.perf_counter()
                spaces.wait_spares()
                background.append(time.perf_counter() - started)
            started = time.perf_counter()
            path = spaces.workspace("bench", f"i{i}", REF, lambda: files)
            made.append(time.perf_counter() - started)
        spaces.wait_spares()
        assert sum(len(names) for _, _, names in os.walk(path)) == len(files)
        for i in range(count):
            started = time.perf_counter()
            spaces.remove("bench", f"i{i}")
            removed.append(time.perf_counter() - started)
        name = f"{mode}+spare" if spare else mode
        name += f" ({spare})" if spare else ""
        note = f" | removal median {statistics.median(removed) * 1000:7.1f} ms"
        if spare:  # the first workspace after the lay-out has no spare yet: it makes its farm
            note += f" | the first {made[0] * 1000:.1f} ms"
            made = made[1:]
        if background[1:]:
            note += f" | a spare's background time median {statistics.median(background[1:]) * 1000:6.1f} ms"
        print(f"{name:28} first lay-out {first * 1000:8.1f} ms")
        print("    " + _figures(name, made, note))
    finally:
        spaces.close()


def userns_overlay(root: Path, count: int) -> None:
    """Overlays mounted by an unprivileged process in its own user and mount namespace, over the
    ``links`` lower tree (in a child process: a namespace is the child's alone)."""
    lower = next((root / "links").glob("lower/*"), None) or next(root.glob("*/lower/*"))
    base = root / "userns"
    base.mkdir()
    if os.geteuid() == 0:  # uid 65534 reaches the lower tree (read-only files) and its own directory
        os.chown(base, 65534, 65534)
        for directory in (root, lower.parent):
            os.chmod(directory, 0o711)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: as uid 65534 if root, then its own namespaces
        os.close(read)
        out = os.fdopen(write, "w")
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: /proc/self is ours again after setuid
            uid, gid = os.getuid(), os.getgid()
            started = time.perf_counter()
            if libc.unshare(0x10000000 | 0x00020000) != 0:  # CLONE_NEWUSER | CLONE_NEWNS
                raise OSError(ctypes.get_errno(), "unshare")
            Path("/proc/self/setgroups").write_text("deny")
            Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
            Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
            setup = time.perf_counter() - started
            made = []
            for i in range(count):
                top = base / f"i{i}"
                for sub in ("upper", "work", "tree"):
                    (top / sub).mkdir(parents=True)
                started = time.perf_counter()
                options = f"lowerdir={lower},upperdir={top}/upper,workdir={top}/work,userxattr"
                if libc.mount(b"overlay", str(top / "tree").encode(), b"overlay", 0, options.encode()) != 0:
                    raise OSError(ctypes.get_errno(), f"mount: {os.strerror(ctypes.get_errno())}")
                made.append(time.perf_counter() - started)
            seen = sum(len(names) for _, _, names in os.walk(base / "i0" / "tree"))
            out.write(
                _figures(
                    "userns overlay", made, f" | namespace set-up {setup * 1000:.2f} ms, {seen} files seen"
                )
            )
        except OSError as exc:
            out.write(f"userns overlay: not possible here ({exc})")
        out.close()
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as report:
        print(report.read())
    os.waitpid(pid, 0)


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
        if os.geteuid() == 0:
            measure(root, "overlay", files, args.workspaces)
        else:
            print("overlay: not measured (an overlay needs a root kernel)")
        measure(root, "links", files, args.workspaces)
        measure(root, "links", files, args.workspaces, spare="paced")
        measure(root, "links", files, args.workspaces, spare="back-to-back")
        userns_overlay(root, args.workspaces)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
