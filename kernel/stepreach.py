"""What a running step attempt may reach beyond its journal: the tenant's key-value store
(``ctx.kv``) and its secrets (``ctx.secrets``).

The kernel, never the guest, decides: a read is answered only for an attempt in flight (a guest
asking outside a step callback, or for another attempt, breaks the protocol), only within the
instance's own tenant, and at most ``kv_max_reads_per_step`` times an attempt. The attempt's writes
arrive with its result (:func:`writes`) and commit in the step's transaction. What each ``ctx.kv``
read saw (key versions, listed pages) is kept in the attempt's flight, by the kernel that answered
it, as the read set that transaction checks (kernel/tenantkv.py). Secret values given to
a wake-up are remembered by its journal, which redacts them from everything the guest sends back.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from tenantflow.kernel import secretbox
from tenantflow.kernel.journal import Flight, Journal
from tenantflow.kernel.tenantkv import KVWrite, key_problem, value_problem

SECRET_NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
MAX_LIST = 1000


def _flight(journal: Journal, m: dict[str, Any], what: str) -> Flight:
    flight = journal.flights.get(str(m.get("key")))
    if flight is None or m.get("attempt") != flight.attempt:
        raise ValueError(f"{what} asked for outside a running step attempt ({m.get('key')!r})")
    flight.reads += 1
    return flight


def _over_budget(journal: Journal, flight: Flight) -> dict[str, Any] | None:
    most = journal.config.kv_max_reads_per_step
    if most and flight.reads > most:
        return {"error": (f"a step attempt may read ctx.kv and ctx.secrets at most {most} times (the "
                          "kernel's --kv-max-reads-per-step): read pages, or split the work into steps")}  # fmt: skip
    return None


async def kv(journal: Journal, m: dict[str, Any]) -> dict[str, Any]:
    """Answer a ``ctx.kv`` read: ``get`` one key, or ``list`` a page of keys under a prefix."""
    flight = _flight(journal, m, "ctx.kv")
    if refused := _over_budget(journal, flight):
        return refused
    tenant, storage = journal.record.tenant, journal.storage
    if "get" in m:
        if problem := key_problem(m["get"]):
            return {"error": problem}
        found = await asyncio.to_thread(storage.kv_get, tenant, m["get"])
        flight.kv_reads.got(m["get"], found.version if found is not None else 0)
        return {"value_json": found.value_json if found is not None else None}
    prefix, after, limit = m["list"], m.get("after"), m.get("limit")
    if not isinstance(prefix, str) or (prefix and key_problem(prefix)):
        return {"error": "a prefix must be a string that could start a key"}
    if after is not None and key_problem(after):
        return {"error": "the cursor must be a key"}
    if not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= MAX_LIST:
        return {"error": f"limit must be an integer in 1..{MAX_LIST}"}
    entries, nxt = await asyncio.to_thread(storage.kv_list, tenant, prefix, after, limit)
    flight.kv_reads.listed(prefix, after, limit, entries, nxt is None)
    return {"entries": [[e.key, e.value_json] for e in entries], "next": nxt}


async def secret(journal: Journal, m: dict[str, Any]) -> dict[str, Any]:
    """Answer ``ctx.secrets[name]``: the value (remembered for redaction) or why there is none."""
    flight = _flight(journal, m, "ctx.secrets")
    if refused := _over_budget(journal, flight):
        return refused
    name, tenant = m["name"], journal.record.tenant
    if not isinstance(name, str) or not SECRET_NAME.match(name):
        return {
            "missing": f"{str(name)[:80]!r} is not a secret name: 1-64 of A-Z, 0-9 and '_', starting with a letter"
        }
    box = secretbox.load(journal.config.secrets_key_file)
    if box is None:  # a kernel without a key holds no secret
        return {"missing": f"no secret {name!r}: this kernel keeps no secrets (its operator starts it with "
                           "--secrets-key FILE)"}  # fmt: skip
    stored = await asyncio.to_thread(journal.storage.get_secret, tenant, name)
    if stored is None:
        return {"missing": f"tenant {tenant!r} has no secret {name!r}: set it with `tenantflow secrets put`"}
    try:
        value = box.open(stored[0], tenant, name)
    except secretbox.SecretKeyError as exc:
        return {"error": str(exc)}
    journal.remember_secret(value)
    return {"value": value}


def writes(journal: Journal, raw: Any) -> tuple[list[KVWrite], dict[str, str] | None]:
    """The ``kv`` writes of a result message, checked; or the error that fails the attempt."""
    if raw is None:
        return [], None
    config = journal.config
    if not isinstance(raw, list):
        return [], {"name": "KVError", "message": "the attempt's key-value writes are not a list"}
    if len(raw) > config.kv_max_writes_per_step:
        return [], {"name": "KVError", "message": (
            f"the attempt wrote {len(raw)} keys; a step attempt may write at most "
            f"{config.kv_max_writes_per_step} (the kernel's --kv-max-writes-per-step): split the work into steps")}  # fmt: skip
    out: list[KVWrite] = []
    seen: set[str] = set()
    for item in raw:
        if not isinstance(item, list) or len(item) != 2:
            return [], {"name": "KVError", "message": "a key-value write is not a [key, value] pair"}
        key, value = item
        problem = key_problem(key) or (
            "" if value is None else value_problem(value, config.kv_max_value_bytes)
        )
        if not problem and key in seen:
            problem = f"key {key!r} is written twice"
        if problem:
            return [], {"name": "KVError", "message": f"ctx.kv: {problem}"}
        seen.add(key)
        out.append((key, value))
    return out, None
