"""Publish-time check of a raw wasm bundle, in a limited child process: validating and compiling a
hostile module is tenant input too, so the kernel never does it first.

The child validates and compiles the module on the shared engine's settings, writes the compiled
artifact to the disk cache (so a run only loads it), and checks its imports and exports.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from tenantflow.plugins.sandbox_wasm import cache
from tenantflow.plugins.sandboxing import isolated


def inspect_raw(files: Mapping[str, bytes]) -> dict[str, str]:
    """``RawWasmSandbox.inspect`` done in a child: ``{workflow: path}`` or :class:`CodeError`."""
    found: dict[str, str] = isolated.call(
        f"{__name__}:inspect_packed",
        [isolated.pack_files(files), str(cache.cache_dir())],
        isolated.ChildLimits(what="validating and compiling your module", writable=(str(cache.cache_dir()),)),
    )
    return found


def inspect_packed(packed: dict[str, str], cache_dir: str) -> dict[str, str]:
    """The child side of :func:`inspect_raw` (the child's environment is empty: use the kernel's
    cache directory)."""
    from tenantflow.plugins.sandbox_wasm.raw import RawWasmSandbox

    os.environ["TENANTFLOW_WASM_CACHE"] = cache_dir
    return RawWasmSandbox(max_runs=1, cached_modules=1).inspect_here(isolated.unpack_files(packed))
