"""Leases: which node runs an instance, and until when.

The head holds the owner (claims and releases change it) and the lease's end as claimed; the
current end lives in the lease keys, which only claims, releases and renewals write:
``R "T" tenant "k" id`` (until), ``R "o" owner tenant id`` (until, claim id) and, for an instance
with a concurrency limit, ``R "T" tenant "g" group id`` (until). So a renewal conflicts only with a
claim or release of the same lease, never with the ordinary changes that rewrite an instance's
head at every step (a renewal that read the heads failed ``not_committed`` on a busy node until its
leases lapsed).
"""

from __future__ import annotations

from collections.abc import Sequence

from tenantflow.plugins.storage_fdb.keys import Keys, pack, unpack
from tenantflow.plugins.storage_fdb.layer import Txn
from tenantflow.plugins.storage_fdb.records import Head


def renew(
    tr: Txn, k: Keys, owner: str, keys: Sequence[tuple[str, str]], until: float
) -> list[tuple[str, str]]:
    """Extend ``owner``'s leases on ``keys`` to ``until``; the ones it no longer holds."""
    # For real: a claim or release meanwhile clears the owner's entry, and one of us retries.
    held = tr.get_many([k.glob("o", owner, tenant, id) for tenant, id in keys])
    # A snapshot read: only the instance's concurrency group, which never changes.
    heads = tr.get_many([k.inst(tenant, id, "h") for tenant, id in keys], snapshot=True)
    lost = []
    for (tenant, id), entry, raw in zip(keys, held, heads, strict=True):
        if entry is None or raw is None:
            lost.append((tenant, id))
            continue
        tr.set(k.tenant(tenant, "k", id), pack((until,)))
        tr.set(k.glob("o", owner, tenant, id), pack((until, *unpack(entry)[1:])))  # keeps the claim id
        group = Head.decode(raw).group
        if group is not None:
            tr.set(k.tenant(tenant, "g", *group, id), pack((until,)))
    return lost


def until_of(entry: bytes | None) -> float | None:
    """The end of a lease from its ``"k"`` entry (None: not leased)."""
    return unpack(entry)[0] if entry is not None else None
