"""How records are stored as values: the small mutable head of an instance as a tuple, everything
else as JSON split into chunks under the value limit."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from tenantflow.kernel.model import TERMINAL, InstanceRecord, Status, StepRecord
from tenantflow.plugins.storage_fdb.keys import pack, part, unpack
from tenantflow.plugins.storage_fdb.layer import CHUNK_BYTES, Txn


@dataclass
class Head:
    """The fields of an instance that change while it runs, and its creation sequence."""

    status: Status
    run_at: float | None
    generation: int
    lease_owner: str | None
    lease_until: float | None
    created_at: float
    updated_at: float
    cseq: int
    conc: tuple[str, str, int] | None = None  # (workflow, concurrency key, limit); absent in older heads

    def encode(self) -> bytes:
        return pack((int(self.status), self.run_at, self.generation, self.lease_owner, self.lease_until,
                     self.created_at, self.updated_at, self.cseq, *(self.conc or ())))  # fmt: skip

    @staticmethod
    def decode(raw: bytes) -> Head:
        s, run_at, gen, owner, until, created, updated, cseq, *conc = unpack(raw)
        return Head(Status(s), run_at, gen, owner, until, created, updated, cseq,
                    (conc[0], conc[1], conc[2]) if conc else None)  # fmt: skip

    @property
    def group(self) -> tuple[str | bytes, str | bytes] | None:
        """The concurrency group as key elements; None when the instance has no limit."""
        if self.conc is None or self.conc[2] <= 0:
            return None
        return part(self.conc[0]), part(self.conc[1])

    @property
    def tag(self) -> bytes:
        """What its runnable-queue and timer entries hold: its group and limit (``b""``: none)."""
        group = self.group
        return pack((*group, self.conc[2])) if group is not None and self.conc is not None else b""

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL

    def replace(self, **changes: Any) -> Head:
        return dataclasses.replace(self, **changes)


ENVELOPE = (
    "workflow",
    "code",
    "runtime",
    "module",
    "params_json",
    "parent",
)  # parent: absent in older records
RESULT = ("output_json", "error_name", "error_message", "error_traceback")  # traceback: absent in older


def record(
    tenant: str, id: str, head: Head, envelope: dict[str, str], result: dict[str, str]
) -> InstanceRecord:
    return InstanceRecord(
        tenant=tenant, id=id, **envelope, status=head.status,
        output_json=result.get("output_json", ""), error_name=result.get("error_name", ""),
        error_message=result.get("error_message", ""), error_traceback=result.get("error_traceback", ""),
        created_at=head.created_at,
        updated_at=head.updated_at, run_at=head.run_at, generation=head.generation,
        lease_owner=head.lease_owner, lease_until=head.lease_until,
        concurrency_key=head.conc[1] if head.conc else "", concurrency_limit=head.conc[2] if head.conc else 0,
    )  # fmt: skip


def dumps(value: Any) -> bytes:
    """JSON as UTF-8 (not \\u escapes: 1 MiB of non-ASCII text stays near 1 MiB); any string,
    even one with a lone surrogate, round-trips."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


def loads(raw: bytes) -> Any:
    return json.loads(raw.decode("utf-8", "surrogatepass"))


def size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def step_json(step: StepRecord) -> bytes:
    return dumps(dataclasses.asdict(step))


def put_blob(tr: Txn, key: bytes, data: bytes) -> None:
    """Store ``data`` as chunks ``key + (n,)`` under the value limit, replacing what was there."""
    tr.clear_range(key + b"\x00", key + b"\xff")
    for n, start in enumerate(range(0, max(len(data), 1), CHUNK_BYTES)):
        tr.set(key + pack((n,)), data[start : start + CHUNK_BYTES])


def join_chunks(rows: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(value for _, value in rows)


def group_chunks(rows: list[tuple[bytes, bytes]], strip: int) -> list[tuple[tuple[Any, ...], bytes]]:
    """Chunked values read in one range, joined: (key elements without the chunk number, value).
    ``strip``: key elements to drop in front."""
    out: list[tuple[tuple[Any, ...], bytes]] = []
    parts: list[bytes] = []
    current: tuple[Any, ...] | None = None
    for key, value in rows:
        items = unpack(key)[strip:-1]
        if items != current:
            if current is not None:
                out.append((current, b"".join(parts)))
            current, parts = items, []
        parts.append(value)
    if current is not None:
        out.append((current, b"".join(parts)))
    return out
