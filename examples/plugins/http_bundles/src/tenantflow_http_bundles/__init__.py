"""tenantflow plugin: tenant code as zip bundles on an HTTP server, pinned by their sha256.

Refs: ``https://host/path/bundle.zip#sha256=<64 hex>`` (pinned) or without the fragment (pinned at
create, by fetching it once); ``http://`` only for loopback hosts. Add ``&runtime=<name>`` to the
fragment for another runtime than ``python``. The operator names the URL prefixes tenants may use in
``TENANTFLOW_BUNDLE_PREFIXES`` (comma-separated; ``{tenant}`` stands for the calling tenant): none
set refuses every ref. See :mod:`.loader` for the limits and the cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tenantflow.kernel import hookimpl
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.loader import Loader
from tenantflow.kernel.storage import Storage
from tenantflow_http_bundles.loader import BundleLoader, prefixes_from_env

if TYPE_CHECKING:
    from tenantflow.conformance.harness import Harness

# The contract versions this plugin was written for: a kernel with others refuses to start with it.
TENANTFLOW_CONTRACTS = {"hookspecs": [1], "loader": [1]}


@hookimpl
def tenantflow_loaders(storage: Storage, config: KernelConfig) -> list[Loader]:
    """One loader for ``https://`` and (loopback) ``http://`` refs, caching under the data dir."""
    return [BundleLoader(config.data_dir / "http-bundles", prefixes_from_env(), config.max_code_bytes)]


@hookimpl
def tenantflow_conformance(kind: str, name: str) -> Harness | None:
    """The loader suite's harness (``--tenantflow-loader https``); imported only when asked."""
    if kind != "loader" or name not in ("https", "http"):
        return None
    from tenantflow_http_bundles.conformance import BundleHarness

    return BundleHarness(name)
