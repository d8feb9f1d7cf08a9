"""Index upkeep: every write of an instance head goes through :func:`reindex`, which turns the change
from the old head to the new one into index writes (blind sets, clears and atomic adds: no reads, so
concurrent transactions conflict only on the instances they both touch)."""

from __future__ import annotations

import time

from tenantflow.plugins.storage_fdb.keys import Keys, pack
from tenantflow.plugins.storage_fdb.layer import Txn
from tenantflow.plugins.storage_fdb.records import Head


def reindex(
    tr: Txn, k: Keys, tenant: str, id: str, old: Head | None, new: Head | None, *, lease: bool = False
) -> None:
    """Bring every index of instance ``tenant/id`` from ``old`` to ``new`` (None: absent); with
    ``lease``, write the lease keys even if the heads agree (a head's ``lease_until`` is the
    claim's: renewals move only the lease keys, see :mod:`.leases`)."""
    if old is None and new is not None:
        tr.set(k.tenant(tenant, "l", new.cseq), id.encode())
        tr.add(k.tenant(tenant, "ni"), 1)  # the tenant's instances (plugins/storage_fdb/tenants.py)
        if new.cseq == 1:  # its first instance: "ni" counts them all
            tr.set(k.tenant(tenant, "nc"), b"")
    if new is None and old is not None:
        tr.clear(k.tenant(tenant, "l", old.cseq))
        tr.add(k.tenant(tenant, "ni"), -1)
    shard = k.shard(tenant, id)
    if old is None or new is None or old.status != new.status:
        if old is not None:
            tr.clear(k.tenant(tenant, "s", int(old.status), old.cseq))
            tr.add(k.glob("n", int(old.status), shard), -1)
        if new is not None:
            tr.set(k.tenant(tenant, "s", int(new.status), new.cseq), id.encode())
            tr.add(k.glob("n", int(new.status), shard), 1)
        # Only a change between ended and not touches the live count (a create's limit check):
        # the steps between running, sleeping and waiting write nothing a create reads.
        was_live, is_live = old is not None and not old.ended, new is not None and not new.ended
        if was_live != is_live:
            tr.add(k.tenant(tenant, "live"), 1 if is_live else -1)
            if is_live and old is not None:  # an ended instance runs again: a create under a limit retries
                tr.add(k.tenant(tenant, "lr"), 1)
    old_run = old.run_at if old is not None else None
    new_run = new.run_at if new is not None else None
    if old_run != new_run or old is None or new is None:
        if old_run is not None:
            tr.clear(k.glob("t", old_run, tenant, id))
            tr.clear(k.tenant(tenant, "q", old_run, id))
        if new_run is not None:
            schedule(tr, k, tenant, id, new_run, new.tag if new is not None else b"")
    old_lease = (old.lease_owner, old.lease_until) if old is not None else (None, None)
    new_lease = (new.lease_owner, new.lease_until) if new is not None else (None, None)
    if old_lease != new_lease or lease:
        if old_lease[0] is not None:
            tr.clear(k.tenant(tenant, "k", id))
            tr.clear(k.glob("o", old_lease[0], tenant, id))
        if new_lease[0] is not None:
            tr.set(k.tenant(tenant, "k", id), pack((new_lease[1],)))
            tr.set(k.glob("o", new_lease[0], tenant, id), pack((new_lease[1],)))
            if new_lease != old_lease:  # a lease taken: a capped claim of the tenant meanwhile retries
                tr.add(k.tenant(tenant, "kn"), 1)
        # The leases of a concurrency group, which the claim counts.
        head = new if new is not None else old
        group = head.group if head is not None else None
        if group is not None:
            if new_lease[0] is not None:
                tr.set(k.tenant(tenant, "g", *group, id), pack((new_lease[1],)))
            else:
                tr.clear(k.tenant(tenant, "g", *group, id))
    old_end = old.updated_at if old is not None and old.ended else None
    new_end = new.updated_at if new is not None and new.ended else None
    if old_end != new_end:
        if old_end is not None:
            tr.clear(k.glob("e", old_end, tenant, id))
        if new_end is not None:
            tr.set(k.glob("e", new_end, tenant, id), b"")


def schedule(tr: Txn, k: Keys, tenant: str, id: str, run_at: float, tag: bytes = b"") -> None:
    """Due now: straight into the tenant's runnable queue. Later: a timer, moved there when due.
    Both hold the instance's concurrency group and limit (``Head.tag``), for the claim."""
    if run_at <= time.time():
        tr.set(k.tenant(tenant, "q", run_at, id), tag)
        tr.set(k.glob("r", tenant), b"")
    else:
        tr.set(k.glob("t", run_at, tenant, id), tag)


def delete(tr: Txn, k: Keys, tenant: str, id: str) -> bool:
    """Delete an instance with everything under it and its index entries; False if there was none."""
    raw = tr.get(k.inst(tenant, id, "h"))
    if raw is None:
        return False
    reindex(tr, k, tenant, id, Head.decode(raw), None)
    tr.clear_range(*k.inst_range(tenant, id))
    return True
