"""The operator's tenant listing on the key-value layer. Under the root subspace ``R``:

``R "T" tenant "ni"``   how many instances the tenant has (atomic, kept by ``indexes.reindex``)
``R "T" tenant "nc"``   present when ``"ni"`` counts every one of them: set with the tenant's first
                        instance; a tenant whose instances predate the counter is counted once, in
                        one transaction (its ``"l"`` index, an entry an instance), when first listed
``R "T" tenant "avn"``  how many versions it has published (atomic, kept by ``artifacts``); ``"avm"``
                        marks it complete, once counted from the version index in one transaction

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


def _names(tr: Txn, k: Keys, tenant: str, index: str) -> int:
    """Distinct names under ``index`` (one read per name, jumping over its chunks)."""
    count, (begin, end) = 0, k.tenant_range(tenant, index)
    while rows := tr.get_range(begin, end, limit=1, snapshot=True):
        count += 1
        begin = k.tenant_range(tenant, index, k.strip(rows[0][0])[3])[1]
    return count


def _backfill(layer: Layer, k: Keys, tenant: str, index: str, counter: str, marker: str) -> None:
    """Count a tenant's entries of ``index`` made before ``counter``, once: the index is read for
    real, so a write to it meanwhile (a create, a delete, a publish) conflicts and this runs again."""

    def count(tr: Txn) -> None:
        if tr.get(k.tenant(tenant, marker)) is None:
            tr.set(k.tenant(tenant, counter), encode_int(len(tr.get_range(*k.tenant_range(tenant, index)))))
            tr.set(k.tenant(tenant, marker), b"")

    layer.transact(count)


def _counts(tr: Txn, k: Keys, tenant: str) -> TenantSummary | str:
    """The tenant's counts in one read, or what must be done first: ``"index"`` its versions
    published before the version index, ``"versions"`` count them, ``"count"`` its instances made
    before the counter."""
    avi, avm, avn, nc, ni, live, scn = tr.get_many(
        [k.tenant(tenant, key) for key in ("avi", "avm", "avn", "nc", "ni", "live", "scn")], snapshot=True
    )
    if avi is None:
        return "index"
    if avm is None:
        return "versions"
    if nc is None and tr.get_range(*k.tenant_range(tenant, "l"), limit=1, snapshot=True):
        return "count"
    return TenantSummary(
        tenant=tenant,
        instances=decode_int(ni),
        live=decode_int(live),
        schedules=decode_int(scn) if scn is not None else _names(tr, k, tenant, "sc"),
        code_versions=decode_int(avn),
    )


def _summary(layer: Layer, k: Keys, tenant: str) -> TenantSummary | None:
    """The tenant's counts (None if it has nothing listed): one read transaction of seven keys (in
    stores made before the schedule counter, also a read per schedule), after indexing or counting
    once what predates the indexes and counters."""
    while not isinstance(found := layer.read(functools.partial(_counts, k=k, tenant=tenant)), TenantSummary):
        if found == "index":
            artifacts.index_older(layer, k, tenant)  # as Code.List does on its first use
        elif found == "versions":
            _backfill(layer, k, tenant, "av", "avn", "avm")
        else:
            _backfill(layer, k, tenant, "l", "ni", "nc")
    return found if found.instances or found.schedules or found.code_versions else None


def list_page(
    layer: Layer, k: Keys, prefix: str, cursor: str | None, limit: int, keep: Callable[[str], bool] | None
) -> tuple[list[TenantSummary], str | None]:
    """See ``Storage.list_tenants``. Cost per call: at most :data:`SCAN` tenants looked at, each a
    read transaction of one key; for each the caller's filter keeps, one more of seven point reads.
    No read grows with a tenant's instances or versions (counters hold their numbers) except the
    one-time counts of a tenant that predates the counters."""
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
