"""The index of a tenant's published versions, newest first, for ``list_artifacts``.

Under the tenant: ``"av" pseq`` -> (name, digest) for every version, ``"an" name pseq`` -> digest
for one name's, ``"a" name "p" digest`` -> its pseq (so publishing it again moves it), ``"avc"``
the last pseq, ``"avn"`` how many versions (``"avm"``: it counts them all; see tenants.py).
Versions published before the index existed are indexed the first time the tenant's versions are
listed (``"avi"`` marks that done), below every pseq given since, oldest lowest.
"""

from __future__ import annotations

from typing import Any

from tenantflow.kernel.model import ArtifactVersion
from tenantflow.plugins.storage_fdb.keys import Keys, pack, unpack
from tenantflow.plugins.storage_fdb.layer import Layer, Txn, decode_int, encode_int
from tenantflow.plugins.storage_fdb.records import loads

BATCH = 500  # versions indexed per transaction when indexing older ones


def index_version(tr: Txn, k: Keys, tenant: str, name: str, digest: str) -> None:
    """Make (name, digest) the tenant's newest version (in the transaction that publishes it)."""
    pointer = k.tenant(tenant, "a", name, "p", digest)
    old = tr.get(pointer)
    if old is not None:
        (seq,) = unpack(old)
        tr.clear(k.tenant(tenant, "av", seq))
        tr.clear(k.tenant(tenant, "an", name, seq))
    else:
        tr.add(k.tenant(tenant, "avn"), 1)  # one more version (the tenant listing's count)
    seq = decode_int(tr.get(k.tenant(tenant, "avc"))) + 1
    tr.set(k.tenant(tenant, "avc"), encode_int(seq))
    if seq == 1:  # its first version indexed: "avn" counts them all (older ones are added as indexed)
        tr.set(k.tenant(tenant, "avm"), b"")
    _put(tr, k, tenant, name, digest, seq)


def _put(tr: Txn, k: Keys, tenant: str, name: str, digest: str, seq: int) -> None:
    tr.set(k.tenant(tenant, "a", name, "p", digest), pack((seq,)))
    tr.set(k.tenant(tenant, "av", seq), pack((name, digest)))
    tr.set(k.tenant(tenant, "an", name, seq), digest.encode())


def list_versions(
    layer: Layer, k: Keys, tenant: str, name: str | None, cursor: str | None, limit: int
) -> tuple[list[ArtifactVersion], str | None]:
    if layer.read(lambda tr: tr.get(k.tenant(tenant, "avi"))) is None:
        index_older(layer, k, tenant)
    index: tuple[Any, ...] = ("av",) if name is None else ("an", name)
    begin = k.tenant_range(tenant, *index)[0]
    end = k.tenant(tenant, *index, int(cursor)) if cursor else k.tenant_range(tenant, *index)[1]

    def read(tr: Txn) -> list[tuple[int, ArtifactVersion]]:
        found = []
        for key, value in tr.get_range(begin, end, limit=limit + 1, reverse=True):
            seq = k.strip(key)[-1]
            version_name, digest = unpack(value) if name is None else (name, value.decode())
            meta = tr.get(k.tenant(tenant, "a", version_name, "m", digest))
            if meta is not None:
                m = loads(meta)
                found.append((seq, ArtifactVersion(tenant, version_name, digest, m["runtime"],
                                                   m["workflows"], m["created_at"])))  # fmt: skip
        return found

    rows = layer.read(read)
    page = rows[:limit]
    return [v for _, v in page], (str(page[-1][0]) if len(rows) > limit else None)


def index_older(layer: Layer, k: Keys, tenant: str) -> None:
    """Index the versions published before the index, oldest lowest, below every pseq given."""
    older: list[tuple[float, str, str]] = []  # (first published, name, digest) without a pointer
    after = k.tenant_range(tenant, "a")[0]
    end = k.tenant_range(tenant, "a")[1]
    while True:  # one name at a time, jumping over its files

        def next_name(tr: Txn, after: bytes = after) -> str | None:
            rows = tr.get_range(after, end, limit=1)
            return str(k.strip(rows[0][0])[3]) if rows else None

        name = layer.read(next_name)
        if name is None:
            break

        def metas(tr: Txn, name: str = name) -> list[tuple[float, str, str]]:
            found = []
            for key, value in tr.get_range(*k.tenant_range(tenant, "a", name, "m")):
                digest = k.strip(key)[-1]
                if tr.get(k.tenant(tenant, "a", name, "p", digest)) is None:
                    found.append((float(loads(value)["created_at"]), name, digest))
            return found

        older += layer.read(metas)
        after = k.tenant_range(tenant, "a", name)[1]
    older.sort(reverse=True)  # newest first: it gets the highest of the low pseqs

    def lowest(tr: Txn) -> int:
        rows = tr.get_range(*k.tenant_range(tenant, "av"), limit=1)
        return int(k.strip(rows[0][0])[-1]) if rows else 1

    low = layer.read(lowest)
    for start in range(0, len(older), BATCH):

        def write(tr: Txn, start: int = start) -> None:
            for i, (_, name, digest) in enumerate(older[start : start + BATCH], start):
                if tr.get(k.tenant(tenant, "a", name, "p", digest)) is None:
                    _put(tr, k, tenant, name, digest, low - 1 - i)
                    tr.add(k.tenant(tenant, "avn"), 1)

        layer.transact(write)
    layer.transact(lambda tr: tr.set(k.tenant(tenant, "avi"), b""))
