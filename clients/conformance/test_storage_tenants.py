"""The storage contract's tenant listing (``Storage.list_tenants``, behind ``Tenants.List``), on
every engine the suite is given: names in order with their counts, prefixes, pages, and the
caller's filter asked before a tenant's counts are read."""

from __future__ import annotations

from collections.abc import Callable

from tenantflow.conformance.test_storage import entry, instance, storage, storage_url
from tenantflow.kernel.model import Artifact, ScheduleRecord, Status, TenantSummary
from tenantflow.kernel.storage import Storage

__all__ = ["storage", "storage_url"]  # the fixtures this suite shares with the storage suite


def seed(storage: Storage) -> None:
    """acme: 3 live and 1 complete; acme-eu: 1 errored; beta: 1 live; gamma: code only; zeta: a
    schedule only."""
    made = [instance("acme", f"i{n}") for n in range(3)] + [instance("acme", "done", status=Status.COMPLETE)]
    made += [instance("acme-eu", "x", status=Status.ERRORED), instance("beta", "y")]
    storage.create_instances(made, [entry() for _ in made])
    storage.create_schedule(ScheduleRecord(tenant="zeta", name="nightly", cron="0 3 * * *", time_zone="UTC",
                                           workflow="W", code="c", params_json="null"))  # fmt: skip
    storage.put_artifact(
        Artifact("gamma", "wf", "sha256:" + "1" * 64, "python", {"a.py": b"x"}, {"W": "a"}, 1.0)
    )


def every(
    storage: Storage, prefix: str = "", limit: int = 50, keep: Callable[[str], bool] | None = None
) -> tuple[list[TenantSummary], int]:
    """Every tenant listed, paging until the cursor is None (pages may be short); and the pages."""
    found: list[TenantSummary] = []
    cursor, pages = None, 0
    while True:
        page, cursor = storage.list_tenants(prefix, cursor, limit, keep)
        assert len(page) <= limit
        found, pages = found + page, pages + 1
        if cursor is None:
            return found, pages


def test_tenants_are_listed_by_name_with_their_counts(storage: Storage) -> None:
    assert every(storage) == ([], 1)
    seed(storage)
    assert every(storage)[0] == [
        TenantSummary("acme", instances=4, live=3),
        TenantSummary("acme-eu", instances=1, live=0),
        TenantSummary("beta", instances=1, live=1),
        TenantSummary("gamma", code_versions=1),
        TenantSummary("zeta", schedules=1),
    ]
    storage.delete_instance("acme", "i0")
    storage.delete_instance("beta", "y")  # beta holds nothing now: not listed
    assert [(t.tenant, t.instances, t.live) for t in every(storage, "a")[0]] == [
        ("acme", 3, 2),
        ("acme-eu", 1, 0),
    ]
    assert "beta" not in [t.tenant for t in every(storage)[0]]


def test_pages_prefixes_and_the_callers_filter(storage: Storage) -> None:
    seed(storage)
    names = [t.tenant for t in every(storage)[0]]
    paged, pages = every(storage, limit=2)
    assert [t.tenant for t in paged] == names and pages >= 3
    assert [t.tenant for t in every(storage, "acme")[0]] == ["acme", "acme-eu"]
    assert [t.tenant for t in every(storage, "acme-")[0]] == ["acme-eu"]
    assert every(storage, "nobody")[0] == []
    asked: list[str] = []

    def keep(tenant: str) -> bool:
        asked.append(tenant)
        return tenant.startswith(("acme-", "z"))

    assert [t.tenant for t in every(storage, keep=keep)[0]] == ["acme-eu", "zeta"]
    assert sorted(set(asked)) == names  # asked by name only: refused tenants' counts are never read
