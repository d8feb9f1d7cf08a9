"""A tenant's own key-value store: its records, the rules every key and value follows, and the
quota check every engine runs in the transaction that writes.

Keys are 1-512 bytes of UTF-8 without control characters; values are JSON text. A tenant's usage
(keys, and bytes of keys plus values as stored) is a counter the writes maintain, so a quota check
never scans the tenant's keys.

Every stored key carries a version: a per-tenant commit counter stamped on each write of it, so a
key's versions only grow, across deletes too (absent: 0). A step attempt's reads are recorded by the
kernel as a read set (:class:`KVReads`); the transaction that commits the attempt's writes checks
that every key read still has the version seen and that every listed page would list the same keys
(:func:`conflict`), else refuses the change with a KV conflict and writes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

MAX_KEY_BYTES = 512
# What the kernel keeps of one attempt's reads to check when it commits: past either, an attempt
# that then writes fails (an attempt that only reads is never checked, so it may read on).
MAX_READ_SET_KEYS = 10_000
MAX_READ_SET_BYTES = 2 * 1024 * 1024
# A write the storage applies: (key, JSON value), or (key, None) to delete.
KVWrite = tuple[str, str | None]


@dataclass
class KVEntry:
    """One stored key."""

    key: str
    value_json: str
    updated_at: float
    version: int = 0  # the tenant's commit counter when the key was last written


class KVConflictError(Exception):
    """A step attempt's writes were refused: a key it read changed before they could commit."""


@dataclass(frozen=True)
class KVRange:
    """A ``list`` page an attempt read: what it asked for, the (key, version) pairs it got in the
    engine's order, and whether the page was the prefix's last (no cursor)."""

    prefix: str
    after: str | None
    limit: int
    seen: tuple[tuple[str, int], ...]
    last: bool


@dataclass
class KVReads:
    """One attempt's read set, bounded by ``MAX_READ_SET_KEYS`` and ``MAX_READ_SET_BYTES``;
    ``overflow`` says why it stopped being kept (the attempt may then not write)."""

    keys: dict[str, int] = field(default_factory=dict)  # key -> version seen (0: absent)
    ranges: list[KVRange] = field(default_factory=list)
    count: int = 0
    bytes: int = 0
    overflow: str = ""

    def _room(self, keys: Sequence[str]) -> bool:
        self.count += len(keys)
        self.bytes += sum(len(k.encode("utf-8", "surrogatepass")) + 8 for k in keys)
        if self.count > MAX_READ_SET_KEYS or self.bytes > MAX_READ_SET_BYTES:
            self.overflow = self.overflow or (
                f"the attempt read {self.count} keys ({self.bytes} bytes) from ctx.kv; a step that writes "
                f"may read at most {MAX_READ_SET_KEYS} keys ({MAX_READ_SET_BYTES} bytes), which are checked "
                "when it commits: read less in the step that writes, or split the work into steps"
            )
            self.keys, self.ranges = {}, []
        return not self.overflow

    def got(self, key: str, version: int) -> None:
        """Record a ``get`` of ``key`` that saw ``version``."""
        if key not in self.keys and self._room([key]):
            self.keys[key] = version

    def listed(
        self, prefix: str, after: str | None, limit: int, entries: Sequence[KVEntry], last: bool
    ) -> None:
        """Record a ``list`` page."""
        if self._room([prefix, *(e.key for e in entries)]):
            seen = tuple((e.key, e.version) for e in entries)
            self.ranges.append(KVRange(prefix, after, limit, seen, last))


def conflict(
    reads: Sequence[tuple[str, int]],
    ranges: Sequence[KVRange],
    versions: Mapping[str, int],
    page: Callable[[str, str | None, int], tuple[list[KVEntry], str | None]],
) -> str:
    """Why a read set no longer holds ("" if it does), given the current ``versions`` of its keys
    (absent: missing or 0) and ``page``, the engine's ``list`` read in the committing transaction."""
    for key, seen in reads:
        if (now := versions.get(key, 0)) != seen:
            what = "deleted" if not now else "created" if not seen else "written"
            return f"key {_short(key)} was {what} after the attempt read it"
    for r in ranges:
        entries, nxt = page(r.prefix, r.after, r.limit)
        if tuple((e.key, e.version) for e in entries) != r.seen or (r.last and nxt is not None):
            return f"keys under prefix {_short(r.prefix)} changed after the attempt listed them"
    return ""


def _short(key: str) -> str:
    return repr(key) if len(key) <= 64 else f"{key[:64]!r}..."


@dataclass
class KVUsage:
    """What a tenant's key space holds: keys, and bytes of keys plus values."""

    keys: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class KVQuota:
    """The per-tenant limits (0: none)."""

    max_keys: int = 0
    max_bytes: int = 0

    def __bool__(self) -> bool:
        return bool(self.max_keys or self.max_bytes)


NO_QUOTA = KVQuota()


def entry_bytes(key: str, value_json: str) -> int:
    """What a key and its value count against the bytes quota."""
    return len(key.encode("utf-8", "surrogatepass")) + len(value_json.encode("utf-8", "surrogatepass"))


def key_problem(key: object) -> str:
    """Why ``key`` is not a valid key ("" if it is)."""
    if not isinstance(key, str):
        return f"a key must be a string, got {type(key).__name__}"
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError:
        return "a key must be valid UTF-8 (no lone surrogates)"
    if not 0 < len(raw) <= MAX_KEY_BYTES:
        return f"a key must be 1-{MAX_KEY_BYTES} bytes of UTF-8, got {len(raw)}"
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        return "a key must not contain control characters"
    return ""


def value_problem(value_json: object, max_value_bytes: int) -> str:
    """Why ``value_json`` is not a storable value ("" if it is)."""
    if not isinstance(value_json, str):
        return "a value must be JSON text"
    try:
        size = len(value_json.encode("utf-8"))
    except UnicodeEncodeError:
        return "a value must be valid UTF-8 (no lone surrogates)"
    if size > max_value_bytes:
        return (
            f"the value is {size} bytes of JSON; the limit is {max_value_bytes} (the kernel's "
            "--kv-max-value-kb): store large data elsewhere and keep a reference"
        )
    try:
        json.loads(value_json, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        return f"the value is not JSON: {exc}"
    return ""


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def usage_after(usage: KVUsage, old: Mapping[str, str | None], writes: Sequence[KVWrite]) -> KVUsage:
    """The usage once ``writes`` apply over keys whose stored values (None: absent) are ``old``."""
    current = dict(old)
    keys, size = usage.keys, usage.bytes
    for key, value in writes:
        before = current.get(key)
        if before is not None:
            keys -= 1
            size -= entry_bytes(key, before)
        if value is not None:
            keys += 1
            size += entry_bytes(key, value)
        current[key] = value
    return KVUsage(keys, size)


def quota_refusal(tenant: str, before: KVUsage, after: KVUsage, quota: KVQuota) -> str:
    """Why ``after`` passes ``quota`` ("" if it does not). A write that shrinks usage is always
    allowed, even over a quota lowered since."""
    if quota.max_keys and after.keys > quota.max_keys and after.keys > before.keys:
        return (
            f"tenant {tenant!r} would hold {after.keys} keys in its key-value store; the quota is "
            f"{quota.max_keys} keys (the kernel's --kv-max-keys): delete keys, or raise the quota"
        )
    if quota.max_bytes and after.bytes > quota.max_bytes and after.bytes > before.bytes:
        return (
            f"tenant {tenant!r} would hold {after.bytes} bytes in its key-value store; the quota is "
            f"{quota.max_bytes} bytes (the kernel's --kv-max-mb): delete keys, or raise the quota"
        )
    return ""
