"""Attacks on the wasm sandboxes (issue 7, findings 5 and 6), each against a real kernel.

- A guest blocked in a WASI wait (``time.sleep``, ``select``, ``poll_oneoff``) is stopped by its
  step's time-out and by termination like any other code; it holds no kernel thread or dispatch
  slot that another tenant needs.
- A raw module cannot allocate outside its one memory cap: several memories, shared or 64-bit
  memory are refused at Publish; huge tables and memories fail their own run; kernel RSS stays
  bounded.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tenantflow.client import Client, TenantflowRpcError
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish, wait_for
from tests.security.bystander import bystander_completes

MIB = 1024 * 1024

SLEEPERS = """
import select, time
from tenantflow.workflow import WorkflowEntrypoint

ONCE = {"limit": 1, "delay": 0, "backoff": "constant"}

class Sleep(WorkflowEntrypoint):
    def run(self, event, step):
        return step.do("nap", lambda: time.sleep(3600), timeout=event.payload["timeout"], retries=ONCE)

class Select(WorkflowEntrypoint):
    def run(self, event, step):
        return step.do("nap", lambda: select.select([], [], [], 3600), timeout=event.payload["timeout"],
                       retries=ONCE)
"""

# A raw module whose step sleeps an hour in WASI poll_oneoff (one relative monotonic clock); once
# the step has failed for good (the reply is not {"do":"run"...), it finishes with an error.
RAW_SLEEPER = """
(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "tenantflow" "call" (func $call (param i32 i32) (result i32)))
  (import "tenantflow" "reply" (func $reply (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "{\\"op\\":\\"step\\",\\"kind\\":\\"do\\",\\"name\\":\\"nap\\",\\"timeout\\":2,\\"retries\\":{\\"limit\\":0,\\"delay\\":0,\\"backoff\\":\\"constant\\"}}")
  (data (i32.const 512) "{\\"op\\":\\"finish\\",\\"ok\\":false,\\"error\\":{\\"name\\":\\"Slept\\",\\"message\\":\\"the nap failed\\"}}")
  (func (export "workflow_Sleep")
    (if (i32.gt_u (call $call (i32.const 16) (i32.const 103)) (i32.const 60000)) (then unreachable))
    (call $reply (i32.const 4096))
    (if (i32.ne (i32.load8_u (i32.const 4104)) (i32.const 117))  ;; not "ru(n)": the step is over
      (then (drop (call $call (i32.const 512) (i32.const 78))) (return)))
    (i32.store (i32.const 1040) (i32.const 1))
    (i64.store (i32.const 1048) (i64.const 3600000000000))
    (drop (call $poll (i32.const 1024) (i32.const 2048) (i32.const 1) (i32.const 3000)))))
"""


def _proc_status(kernel: KernelProcess, field: str) -> int:
    assert kernel.proc is not None
    for line in Path(f"/proc/{kernel.proc.pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{kernel.proc.pid}/status")


def _guest_threads(kernel: KernelProcess) -> int:
    """Kernel threads running wasm guests (the sandboxes name them ``tf-wasm-guest``)."""
    assert kernel.proc is not None
    tasks = Path(f"/proc/{kernel.proc.pid}/task")
    names = []
    for task in tasks.iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            continue
    return names.count("tf-wasm-guest")


def _no_stuck_guest(kernel: KernelProcess) -> None:
    stuck = [line for line in kernel.lines if "did not stop within" in line]
    assert not stuck, stuck


@pytest.fixture
def two_slots(tmp_path: Path) -> Iterator[KernelProcess]:
    """A kernel that runs only two wake-ups at once, as a small deployment would."""
    k = KernelProcess(tmp_path / "kernel", [*TEST_LIMITS, "--max-concurrent", "2"])
    k.start()
    yield k
    k.stop()


@pytest.mark.parametrize("bystander_runtime", ["python", "python-wasm"])
def test_sleeping_guests_time_out_and_hold_no_slot_or_thread(
    two_slots: KernelProcess, tenant: str, bystander_runtime: str
) -> None:
    with two_slots.client() as client:
        bystander_completes(client, f"{tenant}-warm", runtime=bystander_runtime, within=60)  # warm up
        started = time.monotonic()
        sleepers = []
        for i, workflow in enumerate(["Sleep", "Sleep", "Select"]):  # three tenants, one sleeper each
            ref = publish(client, f"{tenant}-{i}", SLEEPERS, runtime="python-wasm")
            sleepers.append(client.create(f"{tenant}-{i}", workflow, ref, params={"timeout": 2}))
        wait_for(lambda: any(s.name == "nap" for s in client.get(f"{tenant}-0", sleepers[0].id).steps))
        # Both slots hold sleepers now; they must still let another tenant through in time.
        assert _guest_threads(two_slots) >= 1
        bystander_completes(client, tenant, runtime=bystander_runtime, within=10)
        for i, sleeper in enumerate(sleepers):
            done = client.wait(f"{tenant}-{i}", sleeper.id, timeout=60)
            assert done.status == pb.STATUS_ERRORED, done
            nap = done.steps[0]
            assert nap.attempts == 2 and "did not finish within 2 s" in nap.error.message, nap
        # 3 sleepers x 2 attempts x 2 s on 2 slots: ~6 s of waits; an hour if they were not stopped
        assert time.monotonic() - started < 45
        wait_for(lambda: _guest_threads(two_slots) == 0, timeout=5)  # every guest thread returned
        _no_stuck_guest(two_slots)


def test_terminating_a_sleeping_python_wasm_instance_returns_promptly(
    two_slots: KernelProcess, tenant: str
) -> None:
    with two_slots.client() as client:
        ref = publish(client, tenant, SLEEPERS, runtime="python-wasm")
        inst = client.create(tenant, "Sleep", ref, params={"timeout": 600})
        wait_for(lambda: any(s.name == "nap" for s in client.get(tenant, inst.id).steps))
        time.sleep(0.3)  # well inside time.sleep now
        started = time.monotonic()
        assert client.terminate(tenant, inst.id).status == pb.STATUS_TERMINATED
        assert time.monotonic() - started < 2.0
        # both slots are free again at once: two other tenants run side by side
        bystander_completes(client, f"{tenant}-a", runtime="python-wasm", within=10)
        bystander_completes(client, f"{tenant}-b", runtime="python", within=10)
        _no_stuck_guest(two_slots)


def test_raw_module_sleeping_in_poll_oneoff_times_out(two_slots: KernelProcess, tenant: str) -> None:
    with two_slots.client() as client:
        ref = client.publish(tenant, "sleeper", {"s.wat": RAW_SLEEPER}, runtime="wasm").ref
        started = time.monotonic()
        inst = client.create(tenant, "Sleep", ref)
        bystander_completes(client, tenant, runtime="python-wasm", within=30)
        done = client.wait(tenant, inst.id, timeout=30)
        assert done.status == pb.STATUS_ERRORED and "did not finish within 2 s" in done.steps[0].error.message
        assert time.monotonic() - started < 25
        _no_stuck_guest(two_slots)


MULTI_MEMORY = """(module (memory (export "memory") 1)
  (memory 7600) (memory 7600) (memory 7600) (memory 7600) (func (export "workflow_W")))"""


@pytest.mark.parametrize(
    ("wat", "says"),
    [
        (MULTI_MEMORY, "multiple memories"),
        ('(module (memory (export "memory") 1 1 shared) (func (export "workflow_W")))', "threads"),
        ('(module (memory (export "memory") i64 1) (func (export "workflow_W")))', "memory64"),
    ],
)
def test_memory_outside_the_cap_is_refused_at_publish(
    client: Client, tenant: str, wat: str, says: str
) -> None:
    with pytest.raises(TenantflowRpcError) as err:
        client.publish(tenant, "m", {"m.wat": wat}, runtime="wasm")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "m.wat: not a valid WebAssembly module" in err.value.message and says in err.value.message
    bystander_completes(client, tenant, runtime="python-wasm")


# Fills its whole memory (touching every page, so it is really resident), then finishes.
FILL = """(module
  (import "tenantflow" "call" (func $call (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "{\\"op\\":\\"finish\\",\\"ok\\":true,\\"value\\":0}")
  (func (export "workflow_Fill")
    (loop $grow (br_if $grow (i32.ne (memory.grow (i32.const 64)) (i32.const -1))))
    (memory.fill (i32.const 4096) (i32.const 1) (i32.sub (i32.mul (memory.size) (i32.const 65536)) (i32.const 4096)))
    (drop (call $call (i32.const 16) (i32.const 35))))
  (func (export "workflow_Table") (drop (table.grow $t (ref.null func) (i32.const 100000000))))
  (table $t 1 funcref))"""
HUGE_TABLE = '(module (memory (export "memory") 1) (table 400000000 funcref) (func (export "workflow_W")))'


def test_memory_and_tables_stay_within_the_cap_and_kernel_rss_is_bounded(
    fresh_kernel: KernelProcess, tenant: str
) -> None:
    with fresh_kernel.client() as client:
        fill = client.publish(tenant, "fill", {"fill.wat": FILL}, runtime="wasm").ref
        table = client.publish(tenant, "table", {"t.wat": HUGE_TABLE}, runtime="wasm").ref
        bystander_completes(client, f"{tenant}-warm", runtime="python-wasm", within=60)  # warm up
        rss_before = _proc_status(fresh_kernel, "VmRSS") * 1024
        fills = [client.create(tenant, "Fill", fill) for _ in range(3)]
        tables = [client.create(tenant, w, ref) for w, ref in (("W", table), ("Table", fill))]
        bystander_completes(client, tenant, runtime="python-wasm")
        for inst in fills:
            assert client.wait(tenant, inst.id, timeout=60).status == pb.STATUS_COMPLETE
        huge = client.wait(tenant, tables[0].id, timeout=60)
        assert huge.status == pb.STATUS_ERRORED
        assert "table minimum size of 400000000 elements exceeds table limits" in huge.error.message, huge
        assert client.wait(tenant, tables[1].id, timeout=60).status == pb.STATUS_ERRORED  # no finish
        # 3 x 256 MiB were filled; the memories go with their stores, which a run drops just after
        # its finish is committed (so poll; generous margin)
        wait_for(lambda: _proc_status(fresh_kernel, "VmRSS") * 1024 - rss_before < 200 * MIB, timeout=15)


# -- issue 16: a granted directory is reached with the tenant's privileges, not the kernel's ----------
PROBE = """
import os
from tenantflow.workflow import WorkflowEntrypoint


def attempt(fn):
    try:
        return f"allowed: {fn()!r}"
    except OSError as exc:
        return f"denied: {type(exc).__name__}"


def append(path):
    with open(path, "a") as handle:
        return handle.write("tenant was here")


def make_link(target, link):
    os.symlink(target, link)
    return open(os.path.join(link, "hostname")).read()


ACTIONS = {"list": os.listdir, "read": lambda path: open(path).read(), "append": append,
           "write": lambda path: open(path, "w").write("mine")}


class Probe(WorkflowEntrypoint):
    def run(self, event, step):
        p = event.payload
        if p["action"] == "link":
            return step.do("probe", lambda: attempt(lambda: make_link(p["target"], p["path"])))
        return step.do("probe", lambda: attempt(lambda: ACTIONS[p["action"]](p["path"])))
"""


@pytest.fixture(scope="module")
def granting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KernelProcess, Path, Path]]:
    """A kernel granting one directory (open to the tenant uid) and, beside it, one it does not."""
    grant, outside = tmp_path_factory.mktemp("grant"), tmp_path_factory.mktemp("outside")
    grant.chmod(0o777)
    (outside / "readable.txt").write_text("outside the grant")
    (outside / "readable.txt").chmod(0o644)
    outside.chmod(0o755)
    k = KernelProcess(tmp_path_factory.mktemp("kernel"), [*TEST_LIMITS, "--sandbox-writable-dir", str(grant)])
    k.start()
    yield k, grant, outside
    k.stop()


def _probe(client: Client, tenant: str, ref: str, **payload: str) -> str:
    inst = client.create(tenant, "Probe", ref, params=payload)
    done = client.wait(tenant, inst.id, timeout=60)
    assert done.status == pb.STATUS_COMPLETE, done
    result = Client.output(done)
    assert isinstance(result, str)
    return result


@pytest.mark.skipif(
    os.geteuid() != 0, reason="the tenant uid differs from the kernel's only under a root kernel"
)
def test_python_wasm_cannot_use_the_kernels_privileges_in_a_grant(
    granting: tuple[KernelProcess, Path, Path], tenant: str
) -> None:
    kernel, grant, _ = granting
    private = grant / f"{tenant}-private"  # as an operator's own files in a grant: root's, closed
    private.mkdir(mode=0o700)
    secret = private / "secret"
    secret.write_text("root only")
    secret.chmod(0o600)
    top = grant / f"{tenant}-root-only.log"
    top.write_text("root only")
    top.chmod(0o600)
    with kernel.client() as client:
        ref = publish(client, tenant, PROBE, runtime="python-wasm")
        assert _probe(client, tenant, ref, action="list", path=str(private)).startswith("denied")
        assert _probe(client, tenant, ref, action="read", path=str(secret)).startswith("denied")
        assert _probe(client, tenant, ref, action="append", path=str(top)).startswith("denied")
        assert _probe(client, tenant, ref, action="append", path=str(secret)).startswith("denied")
        mine = grant / f"{tenant}-mine.txt"  # the grant itself works, as the tenant uid
        assert _probe(client, tenant, ref, action="write", path=str(mine)) == "allowed: 4"
        bystander_completes(client, tenant, runtime="python-wasm", within=20)
    assert secret.read_text() == "root only" and top.read_text() == "root only"
    assert (mine.stat().st_uid, mine.stat().st_gid) == (65534, 65534)


def test_python_wasm_follows_no_symlink_out_of_a_grant(
    granting: tuple[KernelProcess, Path, Path], tenant: str
) -> None:
    kernel, grant, outside = granting
    absolute = grant / f"{tenant}-absolute"
    absolute.symlink_to(outside / "readable.txt")
    relative = grant / f"{tenant}-relative"
    relative.symlink_to(Path("..") / outside.name / "readable.txt")
    assert relative.read_text() == "outside the grant"  # the link works for the kernel itself
    with kernel.client() as client:
        ref = publish(client, tenant, PROBE, runtime="python-wasm")
        assert _probe(client, tenant, ref, action="read", path=str(absolute)).startswith("denied")
        assert _probe(client, tenant, ref, action="read", path=str(relative)).startswith("denied")
        made = grant / f"{tenant}-made"  # a link the guest makes itself
        assert _probe(client, tenant, ref, action="link", path=str(made), target="/etc").startswith("denied")
        inside = grant / f"{tenant}-inside.txt"
        inside.write_text("inside")
        inside.chmod(0o644)
        (grant / f"{tenant}-inner").symlink_to(inside.name)  # a link within the grant still works
        assert (
            _probe(client, tenant, ref, action="read", path=str(grant / f"{tenant}-inner"))
            == "allowed: 'inside'"
        )
        bystander_completes(client, tenant, runtime="python-wasm", within=20)
