"""Compiled wasm, cached on disk: each distinct module is compiled once per machine.

Artifacts are ``wasmtime serialize`` output keyed by the wasm's sha256 and :data:`ENGINE_TAG`
(wasmtime version + engine settings). Loading one maps native code into the kernel, so the
directory must belong to this user and be writable by no one else; otherwise nothing is cached.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

from wasmtime import Engine, Module, WasmtimeError
from wasmtime.component import Component

from tenantflow.plugins.sandbox_wasm.wasmtime_engine import ENGINE_TAG

log = logging.getLogger("tenantflow.sandbox.wasm")
T = TypeVar("T", Module, Component)


def cache_dir() -> Path:
    """``$TENANTFLOW_WASM_CACHE``, else ``$XDG_CACHE_HOME/tenantflow/wasm`` (``~/.cache/...``)."""
    explicit = os.environ.get("TENANTFLOW_WASM_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tenantflow" / "wasm"


def usable_dir() -> Path | None:
    """The cache directory, created private; None if it is not safe or not writable."""
    path = cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = path.stat()
    except OSError as exc:
        log.warning("wasm compile cache disabled: %s", exc)
        return None
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        log.warning("wasm compile cache disabled: %s is not private to this user", path)
        return None
    return path


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (and threads) on ``path``."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def compiled(engine: Engine, kind: type[T], wasm: bytes) -> tuple[T, bool]:
    """``kind`` (Module or Component) for ``wasm``, from the disk cache when possible.

    Returns the object and whether it came from the cache."""
    directory = usable_dir()
    digest = hashlib.sha256(wasm).hexdigest()
    path = directory / f"{kind.__name__.lower()}-{digest[:40]}-{ENGINE_TAG}.cwasm" if directory else None
    if path is not None and path.exists():
        try:
            return kind.deserialize_file(engine, str(path)), True
        except WasmtimeError as exc:  # stale or foreign: compile again
            log.warning("ignoring cached %s: %s", path.name, exc)
    obj = kind(engine, wasm)
    if path is not None:
        try:
            write_atomic(path, bytes(obj.serialize()))
        except OSError as exc:
            log.warning("could not cache %s: %s", path.name, exc)
    return obj, False
