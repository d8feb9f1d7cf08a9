"""The platform's side of what tenant code keeps: the ``KV`` service (a tenant's key-value store,
under the same quotas as its steps' writes) and the ``Secrets`` service (values go in, sealed;
only names and times come out). Validation, then one storage call each."""

from __future__ import annotations

import asyncio
import re
import time

from tenantflow.kernel import secretbox
from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.errors import FailedPrecondition, InvalidArgument, NotFound, excerpt
from tenantflow.kernel.storage import Storage
from tenantflow.kernel.tenantkv import KVEntry, KVQuota, KVUsage, key_problem, value_problem
from tenantflow.kernel.validate import check_tenant

MAX_PAGE = 1000
SECRET_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
MAX_SECRET_BYTES = 64 * 1024
NO_KEY = (
    "this kernel keeps no secrets: its operator starts it with --secrets-key FILE (see the README's Secrets)"
)


def _key(tenant: str, key: str) -> None:
    check_tenant(tenant)
    if problem := key_problem(key):
        raise InvalidArgument(f"bad key {excerpt(key)}: {problem}")


def quota(config: KernelConfig) -> KVQuota:
    return KVQuota(config.kv_max_keys, config.kv_max_bytes)


async def kv_get(storage: Storage, tenant: str, key: str) -> KVEntry:
    _key(tenant, key)
    found = await asyncio.to_thread(storage.kv_get, tenant, key)
    if found is None:
        raise NotFound(f"tenant {tenant!r} has no key {excerpt(key)}")
    return found


async def kv_put(storage: Storage, config: KernelConfig, tenant: str, key: str, value_json: str) -> KVEntry:
    """Store ``value_json`` under ``key``; ``ResourceExhausted`` past the tenant's quota."""
    _key(tenant, key)
    if problem := value_problem(value_json, config.kv_max_value_bytes):
        raise InvalidArgument(f"bad value_json for key {excerpt(key)}: {problem}")
    now = time.time()
    await asyncio.to_thread(storage.kv_write, tenant, [(key, value_json)], now, quota(config))
    return KVEntry(key, value_json, now)


async def kv_delete(storage: Storage, tenant: str, key: str) -> None:
    _key(tenant, key)
    (existed,) = await asyncio.to_thread(storage.kv_write, tenant, [(key, None)], time.time())
    if not existed:
        raise NotFound(f"tenant {tenant!r} has no key {excerpt(key)}")


async def kv_list(
    storage: Storage, tenant: str, prefix: str, page_size: int, page_token: str
) -> tuple[list[KVEntry], str, KVUsage]:
    """A page of the tenant's keys under ``prefix``, the next page's token ("" on the last), and
    the tenant's whole usage."""
    check_tenant(tenant)
    if prefix and (problem := key_problem(prefix)):
        raise InvalidArgument(f"bad prefix {excerpt(prefix)}: {problem}")
    if not 0 <= page_size <= MAX_PAGE:
        raise InvalidArgument(f"page_size must be 0..{MAX_PAGE} (0 means 50), got {page_size}")
    if page_token and (key_problem(page_token) or not page_token.startswith(prefix)):
        raise InvalidArgument("page_token is not one this kernel handed out; pass next_page_token as is")

    def read() -> tuple[list[KVEntry], str | None, KVUsage]:
        entries, cursor = storage.kv_list(tenant, prefix, page_token or None, page_size or 50)
        return entries, cursor, storage.kv_usage(tenant)

    entries, cursor, usage = await asyncio.to_thread(read)
    return entries, cursor or "", usage


def _secret(tenant: str, name: str) -> None:
    check_tenant(tenant)
    if not SECRET_NAME.fullmatch(name):
        raise InvalidArgument(
            f"bad secret name {excerpt(name)}: 1-64 of A-Z, 0-9 and '_', starting with a letter"
        )


async def secret_put(storage: Storage, config: KernelConfig, tenant: str, name: str, value: str) -> float:
    """Seal and store ``value``; when it was set. The value appears in no error."""
    _secret(tenant, name)
    box = secretbox.load(config.secrets_key_file)
    if box is None:
        raise FailedPrecondition(NO_KEY)
    size = len(value.encode("utf-8", "surrogatepass"))
    if not 0 < size <= MAX_SECRET_BYTES:
        raise InvalidArgument(f"secret {name!r}: a value is 1-{MAX_SECRET_BYTES} bytes of UTF-8, got {size}")
    now = time.time()
    await asyncio.to_thread(storage.put_secret, tenant, name, box.seal(value, tenant, name), now)
    return now


async def secret_delete(storage: Storage, tenant: str, name: str) -> None:
    _secret(tenant, name)
    if not await asyncio.to_thread(storage.delete_secret, tenant, name):
        raise NotFound(f"tenant {tenant!r} has no secret {name!r}")


async def secret_list(storage: Storage, tenant: str) -> list[tuple[str, float]]:
    """The tenant's secrets' names and times, by name (never a value)."""
    check_tenant(tenant)
    found: list[tuple[str, float]] = []
    after: tuple[str, str] | None = None
    while page := await asyncio.to_thread(storage.list_secrets, tenant, after, 1000):
        found += [(name, at) for _, name, _, at in page]
        after = (tenant, page[-1][1])
    return found


def rotate(storage: Storage, box: secretbox.SecretBox) -> tuple[int, int]:
    """Re-seal every tenant's secrets under the key file's first key (``tenantflow secrets rotate``);
    (re-sealed, already current). Their times are kept."""
    done = current = 0
    after: tuple[str, str] | None = None
    while page := storage.list_secrets(None, after, 500):
        for tenant, name, sealed, at in page:
            if box.current(sealed):
                current += 1
                continue
            storage.put_secret(tenant, name, box.seal(box.open(sealed, tenant, name), tenant, name), at)
            done += 1
        after = (page[-1][0], page[-1][1])
    return done, current
