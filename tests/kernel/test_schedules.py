"""Schedules through a real kernel: fires, deterministic ids, overlap, pause/resume/delete, time zones,
catch-up after downtime, two nodes over one SQLite file, and validation; and the cron arithmetic
and fire budget the fire loop counts with."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import grpc
import pytest

from tenantflow.client import Client, TenantflowRpcError
from tenantflow.kernel.firebudget import FireBudget
from tenantflow.kernel.schedules import closest_fires, next_fire, passed_over
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish, wait_for

ECHO = """
from tenantflow.workflow import WorkflowEntrypoint

class Echo(WorkflowEntrypoint):
    def run(self, event, step):
        return step.do("echo", lambda: event.payload)
"""

WAITS = """
from tenantflow.workflow import WorkflowEntrypoint

class Waits(WorkflowEntrypoint):
    def run(self, event, step):
        return step.wait_for_event("go", type="go", timeout="1 hour")
"""

FIRE_ID = re.compile(r"(?P<name>[a-z0-9-]+)@(?P<at>\d{8}T\d{6}Z)")


def fired(client: Client, tenant: str, name: str) -> list[str]:
    return sorted(i.id for i in client.iter_instances(tenant) if i.id.startswith(f"{name}@"))


def fire_time(id: str) -> dt.datetime:
    match = FIRE_ID.fullmatch(id)
    assert match, id
    return dt.datetime.strptime(match["at"], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)


def fired_since(client: Client, tenant: str, ref: str, moment: float) -> None:
    """Wait until a schedule made now has fired for a tick 2 s past ``moment``: the fire loop has
    since finished any pass that was under way then, and made at least one more."""
    client.create_schedule(tenant, "witness", "* * * * * *", "Echo", ref, overlap="allow")
    wait_for(lambda: any(fire_time(i).timestamp() >= moment + 2 for i in fired(client, tenant, "witness")),
             timeout=30)  # fmt: skip
    client.delete_schedule(tenant, "witness")


def rpc_code(call: object) -> grpc.StatusCode:
    with pytest.raises(TenantflowRpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code


def test_a_seconds_schedule_fires_instances_with_deterministic_ids(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, ECHO)
    made = client.create_schedule(
        tenant, "tick", "* * * * * *", "Echo", ref, params={"n": 1}, overlap="allow"
    )
    assert made.next_fire and not made.paused and made.fires == 0
    wait_for(lambda: len(fired(client, tenant, "tick")) >= 3, timeout=30)
    deleted = time.time()
    client.delete_schedule(tenant, "tick")
    ids = fired(client, tenant, "tick")
    times = [fire_time(i) for i in ids]
    assert all(t.microsecond == 0 for t in times) and len(set(times)) == len(times)
    assert (times[-1] - times[0]).total_seconds() >= len(times) - 1  # one per second at most
    for id in ids[:3]:
        done = client.wait(tenant, id, timeout=30)
        assert Client.output(done) == {"n": 1}
    fired_since(client, tenant, ref, deleted)  # deleted: no more fires (one may have been in flight)
    assert len(fired(client, tenant, "tick")) <= len(ids) + 1
    assert all(fire_time(i).timestamp() <= deleted for i in fired(client, tenant, "tick"))
    assert rpc_code(lambda: client.get_schedule(tenant, "tick")) == grpc.StatusCode.NOT_FOUND


def test_overlap_skip_waits_for_the_live_instance(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, WAITS)
    client.create_schedule(tenant, "one-at-a-time", "* * * * * *", "Waits", ref)  # overlap skip: the default
    wait_for(lambda: client.get_schedule(tenant, "one-at-a-time").skipped_fires >= 3, timeout=30)
    (first,) = fired(client, tenant, "one-at-a-time")
    client.send_event(tenant, first, "go", {"ok": True})
    client.wait(tenant, first, timeout=30)
    wait_for(lambda: len(fired(client, tenant, "one-at-a-time")) == 2, timeout=30)
    client.pause_schedule(tenant, "one-at-a-time")
    s = client.get_schedule(tenant, "one-at-a-time")
    assert s.fires == 2 and s.last_instance_id == fired(client, tenant, "one-at-a-time")[1]
    for id in fired(client, tenant, "one-at-a-time"):
        if client.get(tenant, id).status != 6:
            client.terminate(tenant, id)


def test_a_page_of_schedules_with_large_params_ends_at_16_mib_and_pages_on(
    client: Client, tenant: str
) -> None:
    """A page of up to 1,000 schedules of 1 MiB params was read and answered whole (up to 1 GiB);
    it is now read in chunks, ends at 16 MiB (within the kernel's response budget) with a token."""
    ref = publish(client, tenant, ECHO)
    for n in range(20):
        client.create_schedule(tenant, f"s{n:02}", "0 0 1 1 *", "Echo", ref, "x" * 1_000_000, paused=True)
    first = client.list_schedules(tenant, page_size=1000)
    assert 0 < len(first.schedules) < 20 and first.next_page_token, len(first.schedules)
    assert [s.name for s in client.iter_schedules(tenant, page_size=1000)] == [f"s{n:02}" for n in range(20)]
    assert len(client.list_schedules(tenant, page_size=3).schedules) == 3  # small pages as asked


def test_pause_resume_and_list(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, ECHO)
    client.create_schedule(tenant, "p", "* * * * * *", "Echo", ref, overlap="allow")
    client.create_schedule(tenant, "q", "0 0 1 1 *", "Echo", ref, paused=True)
    wait_for(lambda: len(fired(client, tenant, "p")) >= 1, timeout=30)
    at = time.time()
    paused = client.pause_schedule(tenant, "p")
    assert paused.paused and paused.next_fire == ""
    fired_since(client, tenant, ref, at)  # a fire in flight when it paused may still land
    count = len(fired(client, tenant, "p"))
    assert all(fire_time(i).timestamp() <= at for i in fired(client, tenant, "p"))
    fired_since(client, tenant, ref, time.time())
    assert len(fired(client, tenant, "p")) == count
    resumed = client.resume_schedule(tenant, "p")
    assert not resumed.paused and resumed.next_fire
    wait_for(lambda: len(fired(client, tenant, "p")) > count, timeout=30)
    listed = [(s.name, s.paused) for s in client.iter_schedules(tenant, page_size=1)]
    assert listed == [("p", False), ("q", True)]
    assert fired(client, tenant, "q") == []
    client.delete_schedule(tenant, "p")
    assert [s.name for s in client.iter_schedules(tenant)] == ["q"]


def test_the_time_zone_is_respected(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, ECHO)
    for zone in ("Asia/Tokyo", "America/New_York", "Europe/Paris"):
        name = zone.split("/")[1].lower()
        s = client.create_schedule(tenant, name, "30 9 * * *", "Echo", ref, time_zone=zone)
        local = dt.datetime.fromisoformat(s.next_fire.replace("Z", "+00:00")).astimezone(ZoneInfo(zone))
        assert (local.hour, local.minute, local.second) == (9, 30, 0), (zone, s.next_fire)
        assert dt.timedelta(0) < local - dt.datetime.now(ZoneInfo(zone)) <= dt.timedelta(days=1)
    utc = client.create_schedule(tenant, "utc", "30 9 * * *", "Echo", ref)
    assert utc.next_fire.endswith("T09:30:00Z")


def test_bad_schedules_are_refused_with_invalid_argument(client: Client, tenant: str) -> None:
    ref = publish(client, tenant, ECHO)
    bad = [
        {"cron": "not a cron"}, {"cron": "61 * * * *"}, {"cron": "* * * *"}, {"cron": "* * * * * * * *"},
        {"cron": "0 0 30 2 *"},  # never fires
        {"time_zone": "Mars/Olympus"}, {"time_zone": "../../etc/passwd"}, {"name": "bad name"},
        {"name": "x@y"}, {"workflow": "Missing"}, {"catchup_window": -1},
    ]  # fmt: skip
    for override in bad:
        args = {"name": "s", "cron": "* * * * *", "workflow": "Echo", "time_zone": "", **override}
        window = args.pop("catchup_window", 0)
        call = lambda a=args, w=window: client.create_schedule(  # noqa: E731
            tenant, a["name"], a["cron"], a["workflow"], ref, time_zone=a["time_zone"], catchup_window=w
        )
        assert rpc_code(call) == grpc.StatusCode.INVALID_ARGUMENT, override
    client.create_schedule(tenant, "s", "* * * * *", "Echo", ref)
    assert rpc_code(lambda: client.create_schedule(tenant, "s", "* * * * *", "Echo", ref)) == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    assert rpc_code(lambda: client.pause_schedule(tenant, "nope")) == grpc.StatusCode.NOT_FOUND
    # '@' is kept for the instances schedules start
    assert rpc_code(lambda: client.create(tenant, "Echo", ref, id="s@20260101T000000Z")) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


def test_fires_missed_while_no_kernel_ran_follow_the_catch_up_policy(tmp_path: Path) -> None:
    node = KernelProcess(tmp_path, TEST_LIMITS)
    node.start()
    tenant = "catchup"
    with node.client() as c:
        ref = publish(c, tenant, ECHO)
        at = int(time.time()) + 4  # one fire a minute, 4 s from now
        for name, policy in (("skips", "skip"), ("runs", "run_once")):
            c.create_schedule(
                tenant, name, f"* * * * * {at % 60}", "Echo", ref, catchup=policy, catchup_window=2
            )
        due = dt.datetime.fromtimestamp(at, dt.UTC)
    node.stop()
    time.sleep(max(due.timestamp() + 3.5 - time.time(), 0))  # past the fire and its 2 s window
    node.start()
    try:
        with node.client() as c:
            wait_for(lambda: c.get_schedule(tenant, "runs").fires == 1, timeout=30)
            wait_for(lambda: c.get_schedule(tenant, "skips").skipped_fires == 1, timeout=30)
            (ran,) = fired(c, tenant, "runs")
            assert fire_time(ran) == due
            assert Client.output(c.wait(tenant, ran, timeout=30)) is None
            assert fired(c, tenant, "skips") == []
            for name in ("runs", "skips"):
                next_fire = dt.datetime.fromisoformat(
                    c.get_schedule(tenant, name).next_fire.replace("Z", "+00:00")
                )
                assert next_fire == due + dt.timedelta(minutes=1)
    finally:
        node.stop()


def test_two_nodes_over_one_sqlite_file_never_fire_one_fire_twice(tmp_path: Path) -> None:
    database = tmp_path / "shared.sqlite3"
    nodes = [
        KernelProcess(tmp_path / f"n{n}", [*TEST_LIMITS, "--node-id", f"n{n}", "--storage", f"sqlite:///{database}"])
        for n in range(2)
    ]  # fmt: skip
    for node in nodes:
        node.start()
    tenant = "two-nodes"
    try:
        with nodes[0].client() as a, nodes[1].client() as b:
            ref = publish(a, tenant, ECHO)
            for n in range(3):
                a.create_schedule(tenant, f"s{n}", "* * * * * *", "Echo", ref, overlap="allow")
            wait_for(lambda: all(len(fired(b, tenant, f"s{n}")) >= 4 for n in range(3)), timeout=60)
            at = time.time()
            for n in range(3):
                b.pause_schedule(tenant, f"s{n}")
            fired_since(a, tenant, ref, at)  # fires in flight land
            for n in range(3):
                ids = fired(a, tenant, f"s{n}")
                times = [fire_time(i) for i in ids]
                assert len(set(times)) == len(times)
                # every fire made exactly one instance and was counted once, whichever node fired it
                assert a.get_schedule(tenant, f"s{n}").fires == len(ids)
    finally:
        for node in nodes:
            node.stop()
    logs = "\n".join(line for node in nodes for line in node.lines)
    assert "firing due schedules failed" not in logs


def test_the_cli_manages_schedules(kernel: KernelProcess, client: Client, tenant: str) -> None:
    ref = publish(client, tenant, ECHO)

    def cli(*args: str) -> str:
        cmd = [sys.executable, "-m", "tenantflow.kernel.cli", "schedule", *args]
        cmd[5:5] = ["--address", kernel.address, "--tenant", tenant]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    made = cli("create", "nightly", "--cron", "0 2 * * *", "--time-zone", "Europe/Paris", "--workflow", "Echo",
               "--code", ref, "--params", '{"x": 1}', "--catchup", "run_once")  # fmt: skip
    assert "Europe/Paris" in made and "run_once" in made and "next fire" in made
    assert "nightly" in cli("list") and "0 2 * * *" in cli("list")
    assert re.search(r"paused\s+.*yes", cli("pause", "nightly"))
    assert re.search(r"paused\s+.*no", cli("resume", "nightly"))
    assert "fires" in cli("get", "nightly")
    assert "deleted" in cli("delete", "nightly")
    bad = subprocess.run(
        [sys.executable, "-m", "tenantflow.kernel.cli", "schedule", "create", "x", "--address", kernel.address,
         "--tenant", tenant, "--cron", "nope", "--workflow", "Echo", "--code", ref],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 1 and "bad cron expression" in bad.stderr


def test_passed_over_ticks_are_counted_as_iterating_the_cron_would() -> None:
    def iterated(cron: str, zone: str, first: float, before: float) -> int:
        count, at = 0, first
        while at < before:
            count, at = count + 1, next_fire(cron, zone, at)
        return count

    start = next_fire("0 0 * * *", "UTC", time.time())  # a midnight: zone and minute edges
    for cron, zone in [("* * * * * *", "UTC"), ("* * * * * */7", "Asia/Kolkata"), ("* * * * * 5,59", "UTC"),
                       ("* * * * *", "America/New_York"), ("*/5 * * * *", "Europe/Paris"),
                       ("0,30 9-17 * * 1-5", "Europe/Paris")]:  # fmt: skip
        first = next_fire(cron, zone, start - 1)
        for span in (0, 0.5, 1, 59, 60, 61, 3599.5, 7200 if len(cron.split()) == 6 else 86400 * 3):
            assert passed_over(cron, zone, first, first + span) == iterated(cron, zone, first, first + span), (
                cron, span
            )  # fmt: skip
    # past 1,000 ticks a pattern without a fast path is extrapolated, not iterated for ever
    assert 29_000 < passed_over("*/5 1-23 * * *", "UTC", start + 3600, start + 3600 + 86400 * 120) < 36_000


def test_the_closest_two_fires_of_a_cron() -> None:
    now = time.time()
    assert closest_fires("* * * * * *", "UTC", now) == 1
    assert closest_fires("* * * * * 0,59", "UTC", now) == 1  # across the minute
    assert closest_fires("0,1 9 * * *", "Europe/Paris", now) == 60
    assert closest_fires("0 9 * * 1-5", "Europe/Paris", now) >= 86400 - 3600  # a DST night is 23 h


def test_the_fire_budget_defers_past_its_rate_and_refills() -> None:
    clock = [0.0]
    budget = FireBudget(2.0, 3.0, clock=lambda: clock[0])
    assert [budget.take("a") for _ in range(4)] == [True, True, True, False]  # the burst, then none
    assert budget.exhausted() == {"a"} and budget.take("b")  # another tenant's own bucket
    clock[0] = 0.5  # one fire refilled
    assert budget.take("a") and not budget.take("a")
    clock[0] = 10.0
    assert budget.exhausted() == set() and [budget.take("a") for _ in range(4)] == [True, True, True, False]
    assert FireBudget(0, 1).take("a") and FireBudget(0, 1).exhausted() == set()  # 0: no limit
