"""The key layout, on FoundationDB's tuple layer (``fdb.tuple`` is pure Python: no libfdb_c needed).

Tenant first, so a tenant's data is one key range. Under the root subspace ``R``:

``R "T" tenant "i" id ...``   one instance: ``"h"`` head (small, mutable), ``"e" n`` envelope and
                             ``"o" n`` result (chunked JSON), ``"s" key n`` journal, ``"sk" key`` and
                             ``"sq" seq key`` its seq index (value: the step's size, for
                             steps_bytes), ``"v" seq n`` events, ``"w" type seq`` unconsumed
                             events by type (value: its size, for the inbox cap), ``"c" key
                             seq`` events a step consumed, ``"wt" type key`` steps waiting for
                             a type (``"wi"``: present when the instance's are all indexed there),
                             ``"y" seq n`` history, ``"vn"``/``"yn"`` last seqs, ``"vb"`` events' bytes
                             (atomic counter), ``"x"`` last batch
``R "T" tenant "l" cseq``     creation order (list); ``"s" status cseq`` the same by status
``R "T" tenant "c"``          last cseq; ``"live"`` instances not ended (atomic counter); ``"lr"``
                             ended instances run again; ``"kn"`` leases taken (atomic counters
                             whose writes a create under a limit or a capped claim conflicts with)
``R "T" tenant "ni"``         instances (atomic counter; ``"nc"``: it counts them all, see tenants.py)
``R "T" tenant "q" run_at id`` runnable queue (due); ``"k" id`` leases (value: lease_until)
``R "T" tenant "a" name ...`` artifacts: ``"m" digest`` meta, ``"f" digest n`` files, ``"latest"``
``R "T" tenant "kv" head ...`` the tenant's key-value store; ``"kvn"``/``"kvb"`` its keys and bytes
                             (atomic counters), ``"kvc"`` its clock (key versions); see tenantkv.py
``R "t" run_at tenant id``    timers not yet due, ordered by due time (moved to ``q`` when due)
``R "r" tenant``              tenants whose runnable queue may be non-empty
``R "o" owner tenant id``     leases by owner (value: lease_until, and the id of the claim)
``R "e" updated_at tenant id`` ended instances by age (retention)
``R "n" status shard``        instance counts (atomic, sharded so no key is hot)
``R "S" tenant name``         tenants' secrets, sealed (one range across tenants, for re-sealing)
"""

from __future__ import annotations

import hashlib
from typing import Any

import fdb.tuple

SHARDS = 16
_LONG = 64  # bytes of a name kept as is in a key; longer ones become their SHA-256 (a key stays < 511)


def part(name: str) -> str | bytes:
    """A free-form name (step key, event type) as a bounded key element. Digests are bytes, never
    equal to a name (a different tuple type)."""
    raw = name.encode()
    return name if len(raw) <= _LONG else hashlib.sha256(raw).digest()


def pack(items: tuple[Any, ...]) -> bytes:
    key: bytes = fdb.tuple.pack(items)
    return key


def unpack(key: bytes) -> tuple[Any, ...]:
    items: tuple[Any, ...] = fdb.tuple.unpack(key)
    return items


def prefix_range(items: tuple[Any, ...]) -> tuple[bytes, bytes]:
    """Every key that extends the tuple ``items`` (not ``items`` itself)."""
    raw = pack(items)
    return raw + b"\x00", raw + b"\xff"


class Keys:
    """Key builders under one root subspace."""

    def __init__(self, root: str) -> None:
        self.root = (root,)

    def tenant(self, tenant: str, *rest: Any) -> bytes:
        return pack((*self.root, "T", tenant, *rest))

    def tenant_range(self, tenant: str, *rest: Any) -> tuple[bytes, bytes]:
        return prefix_range((*self.root, "T", tenant, *rest))

    def inst(self, tenant: str, id: str, *rest: Any) -> bytes:
        return pack((*self.root, "T", tenant, "i", id, *rest))

    def inst_range(self, tenant: str, id: str, *rest: Any) -> tuple[bytes, bytes]:
        return prefix_range((*self.root, "T", tenant, "i", id, *rest))

    def glob(self, *rest: Any) -> bytes:
        return pack((*self.root, *rest))

    def glob_range(self, *rest: Any) -> tuple[bytes, bytes]:
        return prefix_range((*self.root, *rest))

    def strip(self, key: bytes) -> tuple[Any, ...]:
        """The elements of ``key`` after the root."""
        return unpack(key)[len(self.root) :]

    @staticmethod
    def shard(tenant: str, id: str) -> int:
        return hashlib.blake2b(f"{tenant}/{id}".encode(), digest_size=2).digest()[0] % SHARDS
