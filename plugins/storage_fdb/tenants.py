"""The operator's tenant listing on the key-value layer. Under the root subspace ``R``:

``R "T" tenant "ni"``   how many instances the tenant has (atomic, kept by ``indexes.reindex``)
``R "T" tenant "nc"``   present when ``"ni"`` counts every one of them: set with the tenant's first
                        instance; a tenant whose instances predate the counter is counted once, in
                        one transaction (its ``"l"`` index, an entry an instance), when first listed

Tenants are found by skipping through ``R "T"``: one range read of one key per tenant, then a jump
past everything the tenant holds. A tenant is listed if it has an instance, a schedule or a
published version (the others, e.g. one whose instances were all deleted, are skipped).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from tenantflow.kernel.model import TenantSummary
from tenantflow.plugins.storage_fdb import artifacts
from tenantflow.plugins.storage_fdb.keys import Keys, pack
from tenantflow.plugins.storage_fdb.layer import Layer, Txn, decode_int, encode_int

SCAN = 200  # tenants looked at per call (skipped ones included) before a short page
_STRING = b"\x02"  # the tuple layer's code of a str element


def _first_after(tr: Txn, k: Keys, begin: bytes, end: bytes) -> str | None:
    rows = tr.get_range(begin, end, limit=1, snapshot=True)
    return str(k.strip(rows[0][0])[1]) if rows else None


def _count_keys(tr: Txn, begin: bytes, end: bytes) -> int:
    return len(tr.get_range(begin, end, snapshot=True))


def _names(tr: Txn, k: Keys, tenant: str, index: str) -> int:
    """Distinct names under ``index`` (one read per name, jumping over its chunks)."""
    count, (begin, end) = 0, k.tenant_range(tenant, index)
    while rows := tr.get_range(begin, end, limit=1, snapshot=True):
        count += 1
        begin = k.tenant_range(tenant, index, k.strip(rows[0][0])[3])[1]
    return count


def _backfill(layer: Layer, k: Keys, tenant: str) -> None:
    """Count a tenant's instances made before the counter, once: its ``"l"`` index is read for real,
    so a create or delete in the tenant meanwhile conflicts and this runs again."""

    def count(tr: Txn) -> None:
        if tr.get(k.tenant(tenant, "nc")) is None:
            tr.set(k.tenant(tenant, "ni"), encode_int(len(tr.get_range(*k.tenant_range(tenant, "l")))))
            tr.set(k.tenant(tenant, "nc"), b"")

    layer.transact(count)


def _counts(tr: Txn, k: Keys, tenant: str) -> TenantSummary | str:
    """The tenant's counts in one read, or what must be done first: ``"index"`` its versions
    published before the version index, ``"count"`` its instances made before the counter."""
    avi, nc, ni, live, scn = tr.get_many(
        [k.tenant(tenant, key) for key in ("avi", "nc", "ni", "live", "scn")], snapshot=True
    )
    if avi is None:
        return "index"
    if nc is None and tr.get_range(*k.tenant_range(tenant, "l"), limit=1, snapshot=True):
        return "count"
    return TenantSummary(
        tenant=tenant,
        instances=decode_int(ni),
        live=decode_int(live),
        schedules=decode_int(scn) if scn is not None else _names(tr, k, tenant, "sc"),
        code_versions=_count_keys(tr, *k.tenant_range(tenant, "av")),
    )


def _summary(layer: Layer, k: Keys, tenant: str) -> TenantSummary | None:
    """The tenant's counts (None if it has nothing listed): one read transaction of five keys and
    its version index (a key a version; in stores made before the schedule counter, also a read
    per schedule), after indexing or counting once what predates the indexes."""
    while not isinstance(found := layer.read(functools.partial(_counts, k=k, tenant=tenant)), TenantSummary):
        if found == "index":
            artifacts.index_older(layer, k, tenant)  # as Code.List does on its first use
        else:
            _backfill(layer, k, tenant)
    return found if found.instances or found.schedules or found.code_versions else None


def list_page(
    layer: Layer, k: Keys, prefix: str, cursor: str | None, limit: int, keep: Callable[[str], bool] | None
) -> tuple[list[TenantSummary], str | None]:
    """See ``Storage.list_tenants``. Cost per call: at most :data:`SCAN` tenants looked at, each a
    read transaction of one key; for each the caller's filter keeps, one more of five point reads
    and its version index (a key per published version). No read grows with a tenant's instances
    (a counter holds their number) except the one-time count of a tenant made before the counter."""
    base = pack((*k.root, "T")) + _STRING + prefix.encode()
    begin, end = base, base + b"\xff"
    if cursor is not None and cursor >= prefix:
        begin = max(begin, k.tenant_range(cursor)[1])
    page: list[TenantSummary] = []
    last = cursor
    for _ in range(SCAN):
        tenant = layer.read(functools.partial(_first_after, k=k, begin=begin, end=end))
        if tenant is None:
            return page, None
        begin = k.tenant_range(tenant)[1]
        if keep is not None and not keep(tenant):
            last = tenant
            continue
        if len(page) == limit:
            return page, last
        summary = _summary(layer, k, tenant)
        last = tenant
        if summary is not None:
            page.append(summary)
    return page, last
