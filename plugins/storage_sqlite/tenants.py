"""The operator's tenant listing on SQLite: a tenant is any name with an instance, a schedule or a
published version, found by seeking the three tables' tenant-first indexes (no tenant table)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from tenantflow.kernel.model import TERMINAL, TenantSummary

SCAN = 1000  # tenants looked at per call (those ``keep`` refuses included) before a short page
_TABLES = ("instances", "schedules", "artifacts")
_ENDED = ", ".join(str(int(s)) for s in sorted(TERMINAL))


def _next(conn: sqlite3.Connection, after: str, inclusive: bool) -> str | None:
    """The first tenant name of any table at or after ``after`` (one index seek a table)."""
    op = ">=" if inclusive else ">"
    found = [
        row[0]
        for table in _TABLES
        if (
            row := conn.execute(
                f"SELECT tenant FROM {table} WHERE tenant {op} ? ORDER BY tenant LIMIT 1", (after,)
            ).fetchone()
        )  # fmt: skip
    ]
    return min(found) if found else None


def _summary(conn: sqlite3.Connection, tenant: str) -> TenantSummary:
    def count(sql: str) -> int:
        return int(conn.execute(sql, (tenant,)).fetchone()[0])

    return TenantSummary(
        tenant=tenant,
        instances=count("SELECT COUNT(*) FROM instances WHERE tenant = ?"),
        live=count(f"SELECT COUNT(*) FROM instances WHERE tenant = ? AND status NOT IN ({_ENDED})"),
        schedules=count("SELECT COUNT(*) FROM schedules WHERE tenant = ?"),
        code_versions=count("SELECT COUNT(*) FROM artifacts WHERE tenant = ?"),
    )


def list_page(
    conn: sqlite3.Connection, prefix: str, cursor: str | None, limit: int, keep: Callable[[str], bool] | None
) -> tuple[list[TenantSummary], str | None]:
    """See ``Storage.list_tenants``. Cost: three index seeks per tenant looked at (at most
    :data:`SCAN` a call), then for each tenant listed four index-only counts, which read its
    instances' index entries (never a row): the one cost here that grows with a tenant's size."""
    inclusive = cursor is None or cursor < prefix
    after = prefix if inclusive else str(cursor)
    page: list[TenantSummary] = []
    for _ in range(SCAN):
        tenant = _next(conn, after, inclusive)
        if tenant is None or not tenant.startswith(prefix):
            return page, None
        after, inclusive = tenant, False
        if keep is not None and not keep(tenant):
            continue
        if len(page) == limit:
            return page, page[-1].tenant
        page.append(_summary(conn, tenant))
    return page, after
