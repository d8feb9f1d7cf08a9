"""The compile cache: each distinct module is compiled once, then deserialized; unsafe dirs are not used."""

from __future__ import annotations

from pathlib import Path

import pytest
from wasmtime import Module, wat2wasm

from tenantflow.plugins.sandbox_wasm import cache
from tenantflow.plugins.sandbox_wasm.wasmtime_engine import ENGINE_TAG, shared_engine, trap_reason

WASM = bytes(wat2wasm('(module (memory (export "memory") 1) (func (export "workflow_X")))'))


def test_compiled_once_then_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENANTFLOW_WASM_CACHE", str(tmp_path / "c"))
    engine, _ = shared_engine()
    _, cached = cache.compiled(engine, Module, WASM)
    assert not cached
    [artifact] = (tmp_path / "c").glob("*.cwasm")
    assert ENGINE_TAG in artifact.name and oct(artifact.parent.stat().st_mode)[-3:] == "700"
    _, cached = cache.compiled(engine, Module, WASM)
    assert cached
    # A broken artifact is replaced, not trusted. (Never edit one in place: loaded ones are memory-mapped.)
    cache.write_atomic(artifact, b"garbage")
    _, cached = cache.compiled(engine, Module, WASM)
    assert not cached


def test_a_shared_cache_dir_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    monkeypatch.setenv("TENANTFLOW_WASM_CACHE", str(shared))
    assert cache.usable_dir() is None
    _, cached = cache.compiled(shared_engine()[0], Module, WASM)
    assert not cached and not list(shared.iterdir())


def test_trap_reason_keeps_the_cause() -> None:
    text = "error while executing at wasm backtrace:\n    0: 0x21 - <unknown>!f\n\nCaused by:\n    wasm trap: interrupt\n"
    assert trap_reason(Exception(text)) == "wasm trap: interrupt"
