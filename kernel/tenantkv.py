"""A tenant's own key-value store: its records, the rules every key and value follows, and the
quota check every engine runs in the transaction that writes.

Keys are 1-512 bytes of UTF-8 without control characters; values are JSON text. A tenant's usage
(keys, and bytes of keys plus values as stored) is a counter the writes maintain, so a quota check
never scans the tenant's keys.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

MAX_KEY_BYTES = 512
# A write the storage applies: (key, JSON value), or (key, None) to delete.
KVWrite = tuple[str, str | None]


@dataclass
class KVEntry:
    """One stored key."""

    key: str
    value_json: str
    updated_at: float


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
