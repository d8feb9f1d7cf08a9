"""Builds the ONE python-wasm runner component with componentize-py (once per machine).

The runner is our guest app (``guest/app.py``) plus the tenant SDK ``tenantflow.workflow``; tenant
code is data it receives per run, so no tenant ever causes a build. The output is cached by a hash
of every input (guest sources, WIT, SDK sources, componentize-py version), under a file lock so
concurrent kernels build it once.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path

import tenantflow.workflow
from tenantflow.plugins.sandbox_wasm.cache import file_lock, usable_dir

log = logging.getLogger("tenantflow.sandbox.wasm")
GUEST = Path(__file__).resolve().parent / "guest"
WORLD = "runner"
_CLI = "import sys; from componentize_py import script; sys.argv[0] = 'componentize-py'; sys.exit(script())"


def runner_sources() -> dict[str, bytes]:
    """Every file that goes into the runner, by its path in the build tree."""
    sdk = Path(tenantflow.workflow.__file__).resolve().parent
    files = {"app.py": (GUEST / "app.py").read_bytes(), "wit/world.wit": (GUEST / "wit" / "world.wit").read_bytes(),
             "tenantflow/__init__.py": b""}  # fmt: skip
    for path in sorted(sdk.glob("*.py")):
        files[f"tenantflow/workflow/{path.name}"] = path.read_bytes()
    return files


def runner_digest(files: dict[str, bytes]) -> str:
    h = hashlib.sha256(f"componentize-py {version('componentize-py')}\0".encode())
    for path in sorted(files):
        h.update(f"{path}\0{len(files[path])}\0".encode())
        h.update(files[path])
    return h.hexdigest()


_BUILDS: set[subprocess.Popen[str]] = set()
_BUILDS_LOCK = threading.Lock()


def abandon_builds() -> None:
    """Kill runner builds in progress (a stopping kernel does not wait ~20 s for one); the next
    start builds again, since a build only lands in the cache once it is complete."""
    with _BUILDS_LOCK:
        for proc in _BUILDS:
            proc.kill()


def _componentize(files: dict[str, bytes], out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="tenantflow-runner-") as tmp:
        root = Path(tmp)
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        cmd = [sys.executable, "-c", _CLI, "-d", str(root / "wit"), "-w", WORLD,
               "componentize", "-p", str(root), "app", "-o", str(root / "runner.wasm")]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)  # fmt: skip
        with _BUILDS_LOCK:
            _BUILDS.add(proc)
        try:
            _, stderr = proc.communicate()
        finally:
            with _BUILDS_LOCK:
                _BUILDS.discard(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"componentize-py failed ({proc.returncode}):\n{stderr[-4000:]}")
        shutil.move(root / "runner.wasm", out)


def ensure_runner() -> bytes:
    """The runner component's bytes: from the cache, or built now (~10 s, logged)."""
    files = runner_sources()
    digest = runner_digest(files)
    directory = usable_dir()
    if directory is None:
        with tempfile.TemporaryDirectory() as tmp:
            log.info("building the python-wasm runner (no cache directory: every kernel start rebuilds it)")
            _componentize(files, Path(tmp) / "runner.wasm")
            return bytes((Path(tmp) / "runner.wasm").read_bytes())
    path = directory / f"runner-{digest[:40]}.wasm"
    if path.exists():
        return bytes(path.read_bytes())
    with file_lock(directory / "runner.lock"):
        if not path.exists():
            log.info("building the python-wasm runner, once per machine (~10 s) into %s", directory)
            started = time.monotonic()
            _componentize(files, path.with_suffix(".building"))
            path.with_suffix(".building").replace(path)
            log.info("built the python-wasm runner in %.1f s", time.monotonic() - started)
    return bytes(path.read_bytes())
