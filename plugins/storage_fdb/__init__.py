"""FoundationDB storage plugin, over a small transaction layer that also runs on LMDB.

URLs: ``fdb://`` (the default cluster file), ``fdb:///etc/foundationdb/fdb.cluster``, with
``?api_version=730`` (730 and up) and ``?root=tenantflow`` (the subspace, so clusters can be shared);
``kv+lmdb:///path/to/dir`` (one machine, any number of kernels on it) with ``?map_size_mb=8192``.

Needs the ``[fdb]`` extra (the FoundationDB binding and lmdb), imported at load (lmdb here, fdb
through :mod:`.keys`): without it the plugin does not load, and the kernel names the extra when
asked for ``fdb://`` or ``kv+lmdb://``.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from tenantflow.kernel import hookimpl
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.errors import InvalidArgument
from tenantflow.kernel.storage import Storage
from tenantflow.plugins.storage_fdb.kv_storage import KVStorage
from tenantflow.plugins.storage_fdb.layer import Layer
from tenantflow.plugins.storage_fdb.lmdb_layer import LmdbLayer

_OPTIONS = {"fdb": {"api_version", "root"}, "kv+lmdb": {"map_size_mb", "root"}}


def _int(url: str, options: dict[str, str], name: str, default: int, low: int) -> int:
    try:
        value = int(options.get(name, default))
    except ValueError:
        value = low - 1
    if value < low:
        raise InvalidArgument(f"storage URL {url!r}: {name} must be an integer of at least {low}")
    return value


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
        layer = LmdbLayer(Path(parts.path), map_size=map_size)
    else:
        from tenantflow.plugins.storage_fdb.fdb_layer import DEFAULT_API_VERSION, FdbLayer

        api_version = _int(url, options, "api_version", DEFAULT_API_VERSION, 730)
        layer = FdbLayer(parts.path or None, api_version=api_version)
    return KVStorage(layer, root=root)


@hookimpl
def tenantflow_storage(url: str, config: KernelConfig) -> Storage | None:
    if not url.startswith(("fdb:", "kv+lmdb:")):
        return None
    return open_url(url)
