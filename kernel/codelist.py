"""``Code.List``: a tenant's published versions, newest first, a page at a time."""

from __future__ import annotations

import asyncio
import re

from tenantflow.kernel.errors import InvalidArgument
from tenantflow.kernel.model import ArtifactVersion
from tenantflow.kernel.storage import Storage
from tenantflow.kernel.validate import CODE_NAME, check_tenant

MAX_PAGE = 1000
_CURSOR = re.compile(r"-?[0-9]{1,19}")


async def list_code(
    storage: Storage, tenant: str, name: str, page_size: int, page_token: str
) -> tuple[list[ArtifactVersion], str]:
    """The page of ``tenant``'s versions (only ``name``'s unless empty) and the next page's token
    (empty on the last page)."""
    check_tenant(tenant)
    if name and not CODE_NAME.fullmatch(name):
        raise InvalidArgument(f"bad code name {name[:100]!r}: 1-100 of letters, digits, '_', '-', '.'")
    if not 0 <= page_size <= MAX_PAGE:
        raise InvalidArgument(f"page_size must be 0..{MAX_PAGE} (0 means 50), got {page_size}")
    if page_token and not _CURSOR.fullmatch(page_token):
        raise InvalidArgument("page_token is not one this kernel handed out; pass next_page_token as is")
    found, cursor = await asyncio.to_thread(
        storage.list_artifacts, tenant, name or None, page_token or None, page_size or 50
    )
    return found, cursor or ""
