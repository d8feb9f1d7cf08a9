"""Every byte a guest sends is bounded before the kernel reads it (issue 7, findings 2 and 3).

A message's length is checked before its body is read; log lines over their budgets are dropped
without being decoded and counted once; a guest that floods far past its budget is stopped.
Hostile code here writes to the kernel's socket directly (it can find the fd), as an attacker would.
"""

from __future__ import annotations

import concurrent.futures
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tenantflow.client import Client
from tenantflow.kernel.logbudget import LogBudget, TenantLogRate
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish
from tests.security.bystander import bystander_completes

MiB = 1024 * 1024
HOSTILE = """
import os, stat, struct
from tenantflow.workflow import WorkflowEntrypoint

def kernel_socket():
    for fd in range(3, 1024):
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                return fd
        except OSError:
            pass
    raise RuntimeError("no socket found")

def send(data):
    fd, view = kernel_socket(), memoryview(data)
    while view:
        view = view[os.write(fd, view):]

def huge_frame(mib):
    send(struct.pack(">IB", mib * 1024 * 1024, 0))  # a call of `mib` MiB, then its body, 1 MiB at a time
    chunk = b"[" * (1024 * 1024)
    for _ in range(mib):
        send(chunk)
    return "the kernel read it all"

def deep_frame():
    body = b"[" * 200_000 + b"]" * 200_000
    send(struct.pack(">IB", len(body), 0) + body)
    return "the kernel took it"

def raw_logs(frames):
    body = b'{"op":"log","stream":"stdout","line":"x"}'
    batch = (struct.pack(">IB", len(body), 1) + body) * 4096
    for _ in range(frames // 4096):
        send(batch)
    return "all sent"

def printed(lines):
    for i in range(lines):
        print("line", i)
    return "all printed"

def wasm_call(mib):
    import wit_world
    return wit_world.call("x" * (mib * 1024 * 1024))

ATTACKS = {"huge_frame": huge_frame, "deep_frame": deep_frame, "raw_logs": raw_logs, "print": printed,
           "wasm_call": wasm_call}

class Attack(WorkflowEntrypoint):
    def run(self, event, step):
        p = event.payload
        attack = ATTACKS[p["attack"]]
        return step.do("attack", lambda: attack(p["n"]) if "n" in p else attack(),
                       retries={"limit": p.get("retries", 0), "delay": 0}, timeout=120)
"""


def _vm_kib(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    assert match, f"no {field} in /proc/{pid}/status"
    return int(match[1])


def _attack(client: Client, tenant: str, runtime: str, **payload: object) -> str:
    ref = publish(client, tenant, HOSTILE, name="attack", runtime=runtime)
    return client.create(tenant, "Attack", ref, params=payload).id


def _ended(client: Client, tenant: str, ids: list[str], timeout: float = 60.0) -> list[pb.Instance]:
    return [client.wait(tenant, id, timeout=timeout) for id in ids]


def _history(client: Client, tenant: str, id: str) -> list[pb.WatchEvent]:
    return list(client.watch(tenant, id))


def _failures(events: list[pb.WatchEvent]) -> list[str]:
    return [e.message for e in events if e.kind == "step_failed"]


@pytest.fixture
def own_kernel(tmp_path: Path) -> Iterator[KernelProcess]:
    """A kernel of this test's own: its memory is measured, or its flags differ."""
    k = KernelProcess(tmp_path / "kernel", TEST_LIMITS)
    k.start()
    yield k
    k.stop()


# -- message size -----------------------------------------------------------------------------------
def test_a_200_mib_frame_fails_its_run_unread_and_kernel_memory_stays_flat(
    own_kernel: KernelProcess, tenant: str
) -> None:
    assert own_kernel.proc is not None
    pid = own_kernel.proc.pid
    with own_kernel.client() as client:
        bystander_completes(client, tenant)  # warm: templates, code cache, first commits
        peak_before = _vm_kib(pid, "VmHWM")
        ids = [_attack(client, tenant, "python", attack="huge_frame", n=200) for _ in range(4)]
        bystander_completes(client, tenant, within=8.0)
        for done, id in zip(_ended(client, tenant, ids), ids, strict=True):
            assert done.status == pb.STATUS_ERRORED, done
            failures = _failures(_history(client, tenant, id))
            assert failures and "the sandbox sent a message of 209715200 bytes" in failures[0], failures
            assert "messages are limited to 1114112 bytes (1 MiB of step output plus 64 KiB" in failures[0]
        grew_mib = (_vm_kib(pid, "VmHWM") - peak_before) / 1024
    # Before: every frame was read whole first (4 x 200 MiB here; 2.4 GiB in the run).
    assert grew_mib < 150, f"kernel peak RSS grew by {grew_mib:.0f} MiB"


def test_python_wasm_a_huge_call_fails_its_run_before_it_is_decoded(client: Client, tenant: str) -> None:
    # The component model copies a string argument before the host sees it (bounded by the guest's
    # memory cap); the host then refuses it by length, before any JSON decoding.
    id = _attack(client, tenant, "python-wasm", attack="wasm_call", n=16)
    bystander_completes(client, tenant, runtime="python-wasm", within=8.0)
    (done,) = _ended(client, tenant, [id])
    assert done.status == pb.STATUS_ERRORED, done
    failures = _failures(_history(client, tenant, id))
    assert failures and "the sandbox sent a message of 16777216 bytes; messages are limited to" in failures[0]


def test_json_nested_200000_deep_is_a_protocol_error_not_a_kernel_traceback(
    own_kernel: KernelProcess, tenant: str
) -> None:
    with own_kernel.client() as client:
        id = _attack(client, tenant, "python", attack="deep_frame")
        (done,) = _ended(client, tenant, [id])
        bystander_completes(client, tenant)
        failures = _failures(_history(client, tenant, id))
    assert done.status == pb.STATUS_ERRORED, done
    assert failures and "the sandbox sent JSON nested 200000 deep" in failures[0], failures
    assert not [line for line in own_kernel.lines if "Traceback" in line or "RecursionError" in line]


# -- log floods -------------------------------------------------------------------------------------
FLOODS = [
    pytest.param("python", "print", id="python-print-loop"),
    pytest.param("python", "raw_logs", id="python-raw-frames"),
    pytest.param("python-wasm", "print", id="python-wasm-print-loop"),
]


@pytest.mark.parametrize(("runtime", "attack"), FLOODS)
def test_a_3_million_line_log_flood_is_cut_and_counted_while_others_run(
    client: Client, tenant: str, runtime: str, attack: str
) -> None:
    # Three flooding instances, each retried twice: nine wake-ups of 3,000,000 lines each.
    ids = [_attack(client, tenant, runtime, attack=attack, n=3_000_000, retries=2) for _ in range(3)]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        others = pool.submit(
            lambda: [bystander_completes(client, tenant, runtime=runtime, within=8.0) for _ in range(3)]
        )
        done = _ended(client, tenant, ids, timeout=60)
        others.result()
    for instance, id in zip(done, ids, strict=True):
        assert instance.status == pb.STATUS_ERRORED, instance
        events = _history(client, tenant, id)
        failures = _failures(events)
        assert len(failures) == 3, failures  # every attempt was stopped
        assert all("log flood: the workflow sent over 10000 log lines" in f for f in failures), failures
        dropped = [e.message for e in events if e.kind == "log" and "dropped" in e.message]
        assert len(dropped) == 3, dropped  # said once per wake-up
        for line in dropped:
            match = re.fullmatch(
                r"\[tenantflow\] (\d+) log lines \((\d+) bytes\) dropped: over the per-run .*", line
            )
            assert match and int(match[1]) >= 8000, line
        kept = [e for e in events if e.kind == "log" and "dropped" not in e.message]
        assert len(kept) <= 3 * 1000


RAW_FLOOD = """
(module
  (import "tenantflow" "log" (func $log (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "x")
  (func (export "workflow_Flood")
    (loop $again (call $log (i32.const 0) (i32.const 1)) (br $again))))
"""


def test_a_raw_wasm_log_loop_is_cut_and_counted(client: Client, tenant: str) -> None:
    ref = client.publish(tenant, "flood", {"flood.wat": RAW_FLOOD}, runtime="wasm").ref
    id = client.create(tenant, "Flood", ref).id
    bystander_completes(client, tenant, within=8.0)
    (done,) = _ended(client, tenant, [id])
    assert done.status == pb.STATUS_ERRORED, done
    assert "log flood: the workflow sent over 10000 log lines" in done.error.message, done.error
    events = _history(client, tenant, id)
    assert len([e for e in events if e.kind == "log" and "dropped" not in e.message]) == 1000
    (dropped,) = [e.message for e in events if e.kind == "log" and "dropped" in e.message]
    assert re.match(r"\[tenantflow\] \d{4,} log lines \(\d+ bytes\) dropped: over the per-run", dropped)


def test_a_tenant_log_budget_spans_its_wake_ups(tmp_path: Path, tenant: str) -> None:
    k = KernelProcess(tmp_path / "kernel", [*TEST_LIMITS, "--tenant-log-lines-rate", "1"])  # bursts of 10
    k.start()
    try:
        with k.client() as client:
            ref = publish(client, tenant, HOSTILE, name="attack")
            started = time.monotonic()
            ids = [
                client.create(tenant, "Attack", ref, params={"attack": "print", "n": 100}).id
                for _ in range(2)
            ]
            done = _ended(client, tenant, ids)
            took = time.monotonic() - started
            kept, dropped = 0, 0
            for instance, id in zip(done, ids, strict=True):
                assert instance.status == pb.STATUS_COMPLETE, instance
                for e in _history(client, tenant, id):
                    if e.kind == "log" and "dropped" in e.message:
                        assert (
                            "over the per-tenant (1 lines and 256 KiB per second per tenant) log budget"
                            in e.message
                        )
                        dropped += int(e.message.split()[1])
                    elif e.kind == "log":
                        kept += 1
            bystander_completes(client, tenant)
    finally:
        k.stop()
    assert kept + dropped == 200
    assert 10 <= kept <= 11 + took, kept  # the burst, and what refilled at 1 line/s while they ran


# -- the budgets themselves ------------------------------------------------------------------------
def test_log_budget_drops_past_each_limit_and_calls_a_flood_once() -> None:
    floods: list[str] = []
    budget = LogBudget("t", TenantLogRate(0, 0), 3, 100, 10, floods.append)
    assert [budget.admit(10) for _ in range(4)] == [True, True, True, False]
    assert not budget.admit(10) and budget.dropped_lines == 2
    for _ in range(30):
        budget.admit(1)
    assert len(floods) == 1 and "log flood" in floods[0]
    assert budget.summary().startswith("[tenantflow] 32 log lines (50 bytes) dropped: over the per-run")
    assert budget.summary() == ""  # said once
    big = LogBudget("t", TenantLogRate(0, 0), 100, 100, 10, floods.append)
    assert not big.admit(101) and big.admit(100)


def test_tenant_log_rate_refills_and_is_per_tenant() -> None:
    rate = TenantLogRate(2, 1000)  # bursts of 20 lines, 10,000 bytes
    assert all(rate.take("a", 1, now=0.0) for _ in range(20))
    assert not rate.take("a", 1, now=0.0)
    assert rate.take("b", 1, now=0.0)
    assert rate.take("a", 1, now=0.5)  # one line refilled
    assert not rate.take("b", 20_000, now=1.0)  # over the byte burst
