"""``Tenants.List``: the operator's listing of tenants, off unless the kernel runs with
``--list-tenants`` (a tenant's name is itself information); a token sees only the tenants its
patterns allow."""

from __future__ import annotations

import asyncio
import re

from tenantflow.kernel.auth import Grant
from tenantflow.kernel.errors import FailedPrecondition, InvalidArgument, excerpt
from tenantflow.kernel.model import TenantSummary
from tenantflow.kernel.storage import Storage
from tenantflow.kernel.validate import check_tenant

MAX_PAGE = 1000
OFF = "tenant listing is off; start the kernel with --list-tenants"
_PREFIX = re.compile(r"[a-zA-Z0-9_.-]{0,100}")


async def list_tenants(
    storage: Storage, enabled: bool, grant: Grant | None, prefix: str, page_size: int, page_token: str
) -> tuple[list[TenantSummary], str]:
    """The page of tenants ``grant`` may see (None: a kernel without tokens, every tenant) whose
    name starts with ``prefix``, and the next page's token (empty on the last page). A page may
    be short when many tenants are passed over; page until the token is empty."""
    if not enabled:
        raise FailedPrecondition(OFF)
    if not _PREFIX.fullmatch(prefix):
        raise InvalidArgument(f"bad prefix {excerpt(prefix)}: up to 100 of letters, digits, '_', '-', '.'")
    if not 0 <= page_size <= MAX_PAGE:
        raise InvalidArgument(f"page_size must be 0..{MAX_PAGE} (0 means 50), got {page_size}")
    if page_token:
        try:
            check_tenant(page_token)
        except InvalidArgument:
            raise InvalidArgument(
                "page_token is not one this kernel handed out; pass next_page_token as is"
            ) from None
    keep = None if grant is None or "*" in grant.tenants else grant.allows
    found, cursor = await asyncio.to_thread(
        storage.list_tenants, prefix, page_token or None, page_size or 50, keep
    )
    return found, cursor or ""
