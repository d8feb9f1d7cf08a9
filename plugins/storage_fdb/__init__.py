"""FoundationDB storage plugin, over a small transaction layer that also runs on LMDB.

URLs: ``fdb://`` (the default cluster file), ``fdb:///etc/foundationdb/fdb.cluster``, with
``?api_version=730`` (730 and up; by default the newest the binding and the installed libfdb_c both
speak) and ``?root=tenantflow`` (the subspace, so clusters can be shared);
``kv+lmdb:///path/to/dir`` (one machine, any number of kernels on it) with ``?map_size_mb=8192``,
held to FoundationDB's rules (see :mod:`.lmdb_layer`), and for tests ``?read_latency_ms=1``,
``?fault_rate=0.01``, ``?fault_seed=7`` and ``?faults=not_committed,commit_unknown_result``
(faults FoundationDB may return, injected at random; all four kinds unless named).

Needs the ``[fdb]`` extra (the FoundationDB binding and lmdb), imported at load (lmdb here, fdb
through :mod:`.keys`): without it the plugin does not load, and the kernel names the extra when
asked for ``fdb://`` or ``kv+lmdb://``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from tenantflow.kernel import hookimpl
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.errors import InvalidArgument
from tenantflow.kernel.storage import Storage
from tenantflow.plugins.storage_fdb.kv_storage import KVStorage
from tenantflow.plugins.storage_fdb.layer import Layer
from tenantflow.plugins.storage_fdb.lmdb_layer import FAULTS, LmdbLayer, Rules

if TYPE_CHECKING:
    from tenantflow.conformance.harness import Harness

_OPTIONS = {
    "fdb": {"api_version", "root"},
    "kv+lmdb": {"map_size_mb", "root", "read_latency_ms", "fault_rate", "fault_seed", "faults"},
}


def _int(url: str, options: dict[str, str], name: str, default: int, low: int) -> int:
    try:
        value = int(options.get(name, default))
    except ValueError:
        value = low - 1
    if value < low:
        raise InvalidArgument(f"storage URL {url!r}: {name} must be an integer of at least {low}")
    return value


def _fraction(url: str, options: dict[str, str], name: str, high: float) -> float:
    try:
        value = float(options.get(name, 0))
    except ValueError:
        value = -1.0
    if not 0 <= value <= high:
        raise InvalidArgument(f"storage URL {url!r}: {name} must be a number from 0 to {high:g}")
    return value


def _faults(url: str, options: dict[str, str]) -> tuple[str, ...]:
    kinds = tuple(options["faults"].split(",")) if options.get("faults") else FAULTS
    unknown = set(kinds) - set(FAULTS)
    if unknown:
        raise InvalidArgument(
            f"storage URL {url!r}: unknown fault {sorted(unknown)[0]!r} (known: {', '.join(FAULTS)})"
        )
    return kinds


def open_url(url: str) -> KVStorage:
    """Open the storage a ``fdb://`` or ``kv+lmdb://`` URL names."""
    parts = urlsplit(url)
    options = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = set(options) - _OPTIONS[parts.scheme]
    if unknown:
        raise InvalidArgument(
            f"storage URL {url!r}: unknown option {sorted(unknown)[0]!r} "
            f"(known: {', '.join(sorted(_OPTIONS[parts.scheme]))})"
        )
    root = options.get("root", "tenantflow") or "tenantflow"
    layer: Layer
    if parts.scheme == "kv+lmdb":
        if parts.netloc or not parts.path:
            raise InvalidArgument(f"storage URL {url!r} names no directory: use kv+lmdb:///path/to/dir")
        map_size = _int(url, options, "map_size_mb", 8192, 1) << 20
        rules = Rules(
            read_latency=_fraction(url, options, "read_latency_ms", 1000) / 1000,
            fault_rate=_fraction(url, options, "fault_rate", 0.5),
            faults=_faults(url, options),
            seed=_int(url, options, "fault_seed", 0, 0) if "fault_seed" in options else None,
        )
        layer = LmdbLayer(Path(parts.path), map_size=map_size, rules=rules)
    else:
        from tenantflow.plugins.storage_fdb.fdb_layer import MIN_API_VERSION, FdbLayer

        wanted = _int(url, options, "api_version", 0, MIN_API_VERSION) if "api_version" in options else None
        layer = FdbLayer(parts.path or None, api_version=wanted)
    return KVStorage(layer, root=root)


TENANTFLOW_CONTRACTS = {"hookspecs": [1], "storage": [2]}  # the versions this plugin supports


@hookimpl
def tenantflow_storage(url: str, config: KernelConfig) -> Storage | None:
    if not url.startswith(("fdb:", "kv+lmdb:")):
        return None
    return open_url(url)


@hookimpl
def tenantflow_conformance(kind: str, name: str) -> Harness | None:
    if kind != "storage" or name not in ("kv+lmdb", "fdb"):
        return None
    from tenantflow.plugins.storage_fdb.conformance import FdbHarness, LmdbHarness

    return LmdbHarness() if name == "kv+lmdb" else FdbHarness()
