"""The storage contract's tenant key-value store and secrets, on every engine the suite is given.

Usage is a counter the writes keep; quotas are checked in the writing transaction, and a step's
writes (``Change.kv``) commit with the step's change or not at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from tenantflow.conformance.test_storage import entry, instance, pair, race, storage, storage_url
from tenantflow.kernel.errors import ResourceExhausted
from tenantflow.kernel.model import Change, StepRecord
from tenantflow.kernel.storage import Storage
from tenantflow.kernel.tenantkv import KVQuota, KVUsage, entry_bytes

__all__ = ["pair", "storage", "storage_url"]  # the fixtures this suite shares with the storage suite


def keys_of(storage: Storage, tenant: str, prefix: str = "", limit: int = 1000) -> list[str]:
    """Every key under ``prefix``, paged ``limit`` at a time."""
    out: list[str] = []
    after: str | None = None
    while True:
        page, after = storage.kv_list(tenant, prefix, after, limit)
        out += [e.key for e in page]
        if after is None:
            return out


def test_put_get_delete_round_trip_json_per_tenant(storage: Storage) -> None:
    assert storage.kv_write("t", [("a", '{"n":1}'), ("b", "[1,2]")], 10.0) == [False, False]
    assert storage.kv_write("t", [("a", '"x"'), ("a", "2")], 11.0) == [True, True]
    got = storage.kv_get("t", "a")
    assert got is not None and (got.key, got.value_json, got.updated_at) == ("a", "2", 11.0)
    assert storage.kv_get("other", "a") is None  # tenants never see each other's keys
    assert keys_of(storage, "other") == []
    assert storage.kv_write("t", [("a", None), ("zz", None)], 12.0) == [True, False]
    assert storage.kv_get("t", "a") is None
    assert keys_of(storage, "t") == ["b"]


def test_list_is_in_key_order_by_prefix_in_pages(storage: Storage) -> None:
    names = [f"user/{n:03d}" for n in range(25)] + ["user", "users/x", "usex", "u", "émile", "z"]
    storage.kv_write("t", [(n, "1") for n in names], 1.0)
    storage.kv_write("u", [("user/999", "1")], 1.0)
    assert keys_of(storage, "t", "user/", limit=7) == [f"user/{n:03d}" for n in range(25)]
    assert keys_of(storage, "t", "user", limit=3) == [
        "user",
        *[f"user/{n:03d}" for n in range(25)],
        "users/x",
    ]
    assert keys_of(storage, "t", limit=4) == sorted(names, key=lambda k: k.encode())
    page, cursor = storage.kv_list("t", "user/", None, 25)
    assert len(page) == 25 and cursor is None  # exactly a page: no empty page after it
    assert keys_of(storage, "t", "nothing") == []


def test_long_keys_round_trip_and_list_once(storage: Storage) -> None:
    shared = "k" * 400
    long_keys = [shared + str(n) for n in range(5)] + ["é" * 256]  # 512 bytes of UTF-8
    storage.kv_write("t", [(k, '"v"') for k in long_keys] + [("k", "0")], 1.0)
    for key in long_keys:
        got = storage.kv_get("t", key)
        assert got is not None and got.key == key
    listed = keys_of(storage, "t", shared, limit=2)
    assert sorted(listed) == sorted(long_keys[:5]) and len(listed) == 5
    assert keys_of(storage, "t", "k", limit=1)[0] == "k"


def test_usage_is_kept_by_the_writes(storage: Storage) -> None:
    storage.kv_write("t", [("a", "12345"), ("bb", "1")], 1.0)
    assert storage.kv_usage("t") == KVUsage(2, entry_bytes("a", "12345") + entry_bytes("bb", "1"))
    storage.kv_write("t", [("a", "1"), ("bb", None), ("c", '"é"')], 2.0)
    assert storage.kv_usage("t") == KVUsage(2, entry_bytes("a", "1") + entry_bytes("c", '"é"'))
    storage.kv_write("t", [("c", None), ("a", None)], 3.0)
    assert storage.kv_usage("t") == KVUsage(0, 0)
    assert storage.kv_usage("nobody") == KVUsage(0, 0)


def test_quotas_refuse_growth_naming_the_flag_and_write_nothing(storage: Storage) -> None:
    quota = KVQuota(max_keys=2, max_bytes=100)
    storage.kv_write("t", [("a", "1"), ("b", "2")], 1.0, quota)
    with pytest.raises(ResourceExhausted, match="2 keys.*--kv-max-keys"):
        storage.kv_write("t", [("a", "3"), ("c", "3")], 2.0, quota)
    assert storage.kv_get("t", "a").value_json == "1"  # type: ignore[union-attr]
    with pytest.raises(ResourceExhausted, match="100 bytes.*--kv-max-mb"):
        storage.kv_write("t", [("a", '"' + "x" * 100 + '"')], 2.0, quota)
    storage.kv_write("t", [("a", "9"), ("c", "3"), ("b", None)], 3.0, quota)  # keys stay at 2
    storage.kv_write("u", [("a", "1"), ("b", "1")], 3.0, quota)  # another tenant's quota is its own
    # a quota lowered under what is stored still lets writes shrink the store
    storage.kv_write("t", [("a", None)], 4.0, KVQuota(max_keys=1, max_bytes=1))
    assert storage.kv_usage("t").keys == 1


def test_writers_racing_cannot_pass_the_key_quota(pair: tuple[Storage, Storage]) -> None:
    first, second = pair
    quota = KVQuota(max_keys=3)

    def put(storage: Storage, key: str) -> Callable[[], Any]:
        def call() -> str:
            try:
                storage.kv_write("t", [(key, "1")], 1.0, quota)
            except ResourceExhausted:
                return "refused"
            return "ok"

        return call

    outcomes = race(*(put(first if n % 2 else second, f"k{n}") for n in range(8)))
    assert outcomes.count("ok") == 3
    assert first.kv_usage("t").keys == 3 and len(keys_of(first, "t")) == 3


def _step_done(tenant: str, id: str, value: str, kv: list[tuple[str, str | None]], **kw: Any) -> Change:
    step = StepRecord(key="s#0", seq=1, name="s", kind="do", status="complete", attempts=1, output_json=value)
    return Change(tenant=tenant, id=id, now=time.time(), steps=[step], kv=kv, **kw)


def test_a_changes_kv_writes_commit_with_it_or_not_at_all(storage: Storage) -> None:
    storage.create_instances([instance("t", "a")], [entry()])
    done = _step_done("t", "a", "1", [("count", "1"), ("gone", None)], generation=0)
    stale = _step_done("t", "a", "2", [("count", "2")], generation=7)  # its guard fails
    assert [r.ok for r in storage.apply([done, stale])] == [True, False]
    assert storage.kv_get("t", "count").value_json == "1"  # type: ignore[union-attr]
    assert storage.kv_usage("t").keys == 1
    # past the quota the whole change is refused: the step is not recorded either
    over = _step_done("t", "a", "3", [("more", "1")], kv_quota=(1, 0))
    (result,) = storage.apply([over])
    assert not result.ok and "--kv-max-keys" in result.kv_refused
    assert storage.get_steps("t", "a")[0].output_json == "1"
    assert storage.kv_get("t", "more") is None
    # a refused change does not take the changes batched with it down
    ok = _step_done("t", "a", "4", [("count", "4")])
    assert [r.ok for r in storage.apply([over, ok])] == [False, True]
    assert storage.kv_get("t", "count").value_json == "4"  # type: ignore[union-attr]


def test_secrets_are_per_tenant_and_listed_without_reading_them(storage: Storage) -> None:
    storage.put_secret("t", "B_KEY", b"sealed-b", 1.0)
    storage.put_secret("t", "A_KEY", b"sealed-a", 2.0)
    storage.put_secret("u", "A_KEY", b"sealed-u", 3.0)
    storage.put_secret("t", "A_KEY", b"sealed-a2", 4.0)
    assert storage.get_secret("t", "A_KEY") == (b"sealed-a2", 4.0)
    assert storage.get_secret("v", "A_KEY") is None
    assert [(t, n) for t, n, _, _ in storage.list_secrets("t")] == [("t", "A_KEY"), ("t", "B_KEY")]
    everyone = storage.list_secrets(None)
    assert [(t, n) for t, n, _, _ in everyone] == [("t", "A_KEY"), ("t", "B_KEY"), ("u", "A_KEY")]
    assert [n for _, n, _, _ in storage.list_secrets(None, ("t", "A_KEY"), 1)] == ["B_KEY"]
    assert storage.delete_secret("t", "A_KEY") and not storage.delete_secret("t", "A_KEY")
    assert storage.get_secret("u", "A_KEY") == (b"sealed-u", 3.0)


def test_the_longest_key_of_the_longest_tenant_fits(storage: Storage) -> None:
    tenant, key = "t" * 100, "é" * 256  # 512 bytes of UTF-8
    storage.kv_write(tenant, [(key, '"v"'), (key[:-1] + "x", '"w"')], 1.0)
    got = storage.kv_get(tenant, key)
    assert got is not None and got.value_json == '"v"'
    assert len(keys_of(storage, tenant, "é" * 200)) == 2
    storage.put_secret(tenant, "N" * 64, b"s" * 100, 1.0)
    assert storage.get_secret(tenant, "N" * 64) == (b"s" * 100, 1.0)
