"""Several real kernel nodes over one SQLite file: a node killed with SIGKILL has its instances taken
over by the others, a node that is merely slow is fenced, and every RPC works on every node."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tenantflow.client import Client
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish, wait_for

# Each step attempt appends "<step> <token>" to the instance's file before it finishes: the side
# effect, counted outside the kernel's storage, and the token tells attempts apart.
CHAIN = """
import time, uuid
from tenantflow.workflow import WorkflowEntrypoint

class Chain(WorkflowEntrypoint):
    async def run(self, event, step):
        p = event.payload
        total = 0
        for i in range(p["steps"]):
            def effect(i=i):
                token = uuid.uuid4().hex
                with open(p["log"], "a") as f:
                    f.write(f"s{i} {token}\\n")
                time.sleep(p["pause"])
                return [i, token]
            total += (await step.do(f"s{i}", effect))[0]
            if i == 2 and p.get("nap", True):
                await step.sleep("nap", 0.3)
            if i == 4 and p.get("wait"):
                got = await step.wait_for_event("go", type="go", timeout="5 minutes")
                total += got["payload"]
        return total
"""

INSTANCES, STEPS = 12, 8


def effects(log: Path) -> list[tuple[str, str]]:
    """(step, token) per attempt that ran, in order."""
    if not log.exists():
        return []
    return [tuple(line.split()) for line in log.read_text().splitlines() if line.strip()]  # type: ignore[misc]


def counts(directory: Path) -> Counter[tuple[str, str]]:
    return Counter((log.stem, step) for log in directory.glob("*.log") for step, _ in effects(log))


def query(database: Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    """Read the shared file directly (WAL: readers never wait for the nodes' writers)."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30) as conn:
        return conn.execute(sql, args).fetchall()


def owners(database: Path) -> dict[str, str]:
    """Instance id -> node holding a live lease on it."""
    rows = query(database, "SELECT id, lease_owner FROM instances WHERE lease_owner IS NOT NULL AND lease_until > ?",
                 time.time())  # fmt: skip
    return {str(id): str(owner) for id, owner in rows}


def committed(database: Path) -> set[tuple[str, str]]:
    rows = query(database, "SELECT id, key FROM steps WHERE status = 'complete' AND kind = 'do'")
    return {(str(id), str(key).split("#")[0]) for id, key in rows}


def history(database: Path, id: str) -> list[tuple[str, str, int]]:
    rows = query(database, "SELECT kind, step, attempt FROM history WHERE id = ? ORDER BY seq", id)
    return [(str(k), str(s), int(a)) for k, s, a in rows]  # type: ignore[call-overload]


def writer_free(database: Path) -> bool:
    """Whether no node holds SQLite's write lock right now (a node stopped inside a transaction
    would keep every other node from writing: the test must not stop one there)."""
    conn = sqlite3.connect(database, timeout=0, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


def halted(pid: int) -> bool:
    """Whether every thread of ``pid`` has stopped (SIGSTOP takes effect asynchronously)."""
    states = [
        (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        for task in Path(f"/proc/{pid}/task").iterdir()
    ]
    return all(state in "tT" for state in states)


def nodes(tmp_path: Path, count: int, *extra: str) -> list[KernelProcess]:
    database = tmp_path / "shared.sqlite3"
    return [
        KernelProcess(tmp_path / f"n{n}", [*TEST_LIMITS, "--node-id", f"n{n}", "--storage", f"sqlite:///{database}",
                                           "--sandbox-writable-dir", str(tmp_path / "effects"), *extra])
        for n in range(1, count + 1)
    ]  # fmt: skip


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[KernelProcess]]:
    (tmp_path / "effects").mkdir()
    (tmp_path / "effects").chmod(0o777)  # tenant code runs as another uid than the test
    kernels = nodes(tmp_path, 3)
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda k: k.start(), kernels))
    yield kernels
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda k: k.stop(), kernels))


def test_three_nodes_one_sigkilled(cluster: list[KernelProcess], tmp_path: Path) -> None:
    database, effects_dir, tenant = tmp_path / "shared.sqlite3", tmp_path / "effects", "multi"
    clients = [k.client() for k in cluster]
    ref = publish(clients[0], tenant, CHAIN)
    ids = [f"chain{n}" for n in range(INSTANCES)]
    for n, id in enumerate(ids):  # creates spread round-robin over the three nodes
        params = {"steps": STEPS, "pause": 0.15, "wait": True, "log": str(effects_dir / f"{id}.log")}
        clients[n % 3].create(tenant, "Chain", ref, id=id, params=params)
    for n, id in enumerate(ids):  # two events each, through another node than the create
        clients[(n + 1) % 3].send_event(tenant, id, "go", 100)
        clients[(n + 2) % 3].send_event(tenant, id, "go", 200)

    wait_for(lambda: sum(counts(effects_dir).values()) >= INSTANCES * STEPS // 4, timeout=60, interval=0.01)
    held = Counter(owners(database).values())
    victim = max(range(3), key=lambda n: held[f"n{n + 1}"])
    cluster[victim].kill()
    killed_at = time.monotonic()
    before_kill, counts_at_kill = committed(database), counts(effects_dir)
    # read after the kill: exactly the leases the dead node held (they outlive it by up to 6 s)
    leased = {id for id, node in owners(database).items() if node == f"n{victim + 1}"}
    assert leased, f"the node killed held no lease (leases: {dict(held)})"
    live = [c for n, c in enumerate(clients) if n != victim]

    # Takeover: every instance the dead node held runs a step again on another node, within the
    # lease (6 s) plus the idle poll (1 s) and a margin for a busy machine.
    def moved_on(id: str) -> bool:
        ran = sum(n for (of, _), n in counts(effects_dir).items() if of == id)
        return ran > sum(n for (of, _), n in counts_at_kill.items() if of == id) or (
            live[0].get(tenant, id).status == pb.STATUS_COMPLETE
        )

    wait_for(lambda: all(moved_on(id) for id in leased), timeout=20)
    takeover = time.monotonic() - killed_at
    assert takeover < 15, takeover
    for n, id in enumerate(ids):
        done = live[n % 2].wait(tenant, id, timeout=60)
        assert done.status == pb.STATUS_COMPLETE, (id, done.error)
        assert Client.output(done) == sum(range(STEPS)) + 100  # the first event, consumed once

    final = counts(effects_dir)
    assert set(final) == {(id, f"s{i}") for id in ids for i in range(STEPS)}
    ran_again = {step for step in before_kill if final[step] != counts_at_kill[step]}
    assert not ran_again, f"completed before the kill but ran again after it: {sorted(ran_again)}"
    rerun = {step: n - 1 for step, n in final.items() if n > 1}
    # only the attempts in flight on the killed node ran twice
    assert all(id in leased for id, _ in rerun) and sum(rerun.values()) <= len(leased), rerun
    for id in ids:  # each journal entry holds the result of an attempt that ran; a timer fired once
        steps = {s.name: s for s in live[0].get(tenant, id).steps}
        tokens = {token for _, token in effects(effects_dir / f"{id}.log")}
        assert all(json.loads(steps[f"s{i}"].output_json)[1] in tokens for i in range(STEPS))
        entries = history(database, id)
        assert [s for k, s, _ in entries if k == "step_completed"].count("nap") == 1
        assert Counter(s for k, s, _ in entries if k == "step_completed" and s.startswith("s")) == {
            f"s{i}": 1 for i in range(STEPS)}  # fmt: skip
    consumed = query(
        database, "SELECT id, seq, consumed_by FROM events WHERE tenant = ? AND consumed_by != ''", tenant
    )
    assert sorted((str(id), seq, by) for id, seq, by in consumed) == sorted((id, 1, "go#0") for id in ids)

    cluster[victim].start()  # restarted later: it serves every RPC again, as the others do
    clients[victim] = cluster[victim].client()
    _control_rpcs_on_other_nodes(clients, database, effects_dir, tenant, ref)
    for c in clients:
        c.close()


def _control_rpcs_on_other_nodes(
    clients: list[Client], database: Path, effects_dir: Path, tenant: str, ref: str
) -> None:
    """Get, List, Pause, Resume, Terminate and Watch through nodes that are not running the instance."""
    # no timer: each runs in one wake-up, on one node, until paused or terminated
    for n, id, steps in ((0, "ctl", 14), (1, "victim", 60)):
        params = {"steps": steps, "pause": 0.2, "nap": False, "log": str(effects_dir / f"{id}.log")}
        clients[n].create(tenant, "Chain", ref, id=id, params=params)
    wait_for(lambda: {"ctl", "victim"} <= set(owners(database)), timeout=20, interval=0.01)
    runs = owners(database)

    def other(id: str, skip: int = -1) -> int:
        return next(n for n in range(3) if f"n{n + 1}" != runs[id] and n != skip)

    watcher = other("ctl")
    watched: list[pb.WatchEvent] = []
    stream = threading.Thread(
        target=lambda: watched.extend(clients[watcher].watch(tenant, "ctl", timeout=60))
    )
    stream.start()

    pauser = other("ctl", skip=watcher)
    clients[pauser].pause(tenant, "ctl")
    wait_for(lambda: clients[watcher].get(tenant, "ctl").status == pb.STATUS_PAUSED, timeout=15)
    ran = effects(effects_dir / "ctl.log")
    time.sleep(1.0)
    assert effects(effects_dir / "ctl.log") == ran, "a paused instance kept running steps"
    # resumed through the node that ran it, which claims it again at once: Watch stays remote
    assert clients[int(runs["ctl"][1:]) - 1].resume(tenant, "ctl").status == pb.STATUS_QUEUED

    assert clients[other("victim")].terminate(tenant, "victim").status == pb.STATUS_TERMINATED
    time.sleep(3.0)  # within a lease renewal the owner learns it; the attempt in flight may end
    stopped = sum(n for (id, _), n in counts(effects_dir).items() if id == "victim")
    time.sleep(1.5)
    assert sum(n for (id, _), n in counts(effects_dir).items() if id == "victim") == stopped
    assert stopped < 60, "terminated through another node, the instance still ran to its end"

    done = clients[pauser].wait(tenant, "ctl", timeout=60)
    assert done.status == pb.STATUS_COMPLETE and Client.output(done) == sum(range(14))
    stream.join(30)
    assert not stream.is_alive(), "Watch on a node not running the instance did not end with it"
    assert [e.sequence for e in watched] == list(range(1, len(watched) + 1))
    assert [e.step for e in watched if e.kind == "step_completed"] == [f"s{i}" for i in range(14)]
    statuses = [e.status for e in watched if e.kind == "status"]
    assert pb.STATUS_PAUSED in statuses and statuses[-1] == pb.STATUS_COMPLETE

    for c in clients:  # Get and List answer the same on every node
        assert c.get(tenant, "victim").status == pb.STATUS_TERMINATED
        assert c.get(tenant, "ctl").status == pb.STATUS_COMPLETE
        assert len(list(c.iter_instances(tenant))) == INSTANCES + 2
        assert len(list(c.iter_instances(tenant, status=pb.STATUS_COMPLETE))) == INSTANCES + 1


def test_slow_owner_is_fenced(tmp_path: Path) -> None:
    """A node stopped past its lease (SIGSTOP) loses the instance to another node; continued
    (SIGCONT), it records nothing more for it, and only the attempt it had in flight ran twice."""
    (tmp_path / "effects").mkdir()
    (tmp_path / "effects").chmod(0o777)  # tenant code runs as another uid than the test
    database, effects_dir, tenant = tmp_path / "shared.sqlite3", tmp_path / "effects", "fenced"
    kernels = nodes(tmp_path, 2, "--lease-seconds", "3")
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda k: k.start(), kernels))
    clients = [k.client() for k in kernels]
    stopped: KernelProcess | None = None
    try:
        ref = publish(clients[0], tenant, CHAIN)
        log = effects_dir / "slow.log"
        clients[0].create(tenant, "Chain", ref, id="slow", params={"steps": 6, "pause": 1.5, "log": str(log)})
        wait_for(lambda: len(effects(log)) == 2 and "slow" in owners(database), timeout=30, interval=0.01)
        time.sleep(0.3)  # the attempt's step_started is committed; the attempt itself runs on
        owner = int(owners(database)["slow"][1:]) - 1
        stopped, other = kernels[owner], clients[1 - owner]
        assert stopped.proc is not None
        for _ in range(50):  # never stop a node inside a write transaction: it would lock the file
            os.kill(stopped.proc.pid, signal.SIGSTOP)
            wait_for(lambda: halted(stopped.proc.pid), timeout=10, interval=0.001)  # type: ignore[union-attr]
            if writer_free(database):
                break
            os.kill(stopped.proc.pid, signal.SIGCONT)
            time.sleep(0.05)
        in_flight = effects(log)[-1][0]
        # the other node takes over and moves past the attempt that was in flight
        try:
            wait_for(lambda: len({s for s, _ in effects(log)}) >= 4, timeout=30)
        except AssertionError:
            row = query(
                database, "SELECT status, run_at, lease_owner, lease_until FROM instances WHERE id = 'slow'"
            )
            raise AssertionError(f"no takeover at {time.time()}: {row}, effects {effects(log)}, other node's log:\n"
                                 + "\n".join(kernels[1 - owner].lines[-30:])) from None  # fmt: skip
        before = history(database, "slow")
        os.kill(stopped.proc.pid, signal.SIGCONT)
        stopped = None
        done = other.wait(tenant, "slow", timeout=60)
        assert done.status == pb.STATUS_COMPLETE and Client.output(done) == sum(range(6))
        time.sleep(1.0)  # anything the continued node still meant to write has had its chance

        entries = history(database, "slow")
        assert entries[: len(before)] == before
        completed = [s for k, s, _ in entries if k == "step_completed"]
        assert sorted(completed) == sorted({*completed}), f"a step was recorded twice: {completed}"
        ran = Counter(s for s, _ in effects(log))
        assert ran == {f"s{i}": 2 if f"s{i}" == in_flight else 1 for i in range(6)}, (ran, in_flight)
        tokens = [t for s, t in effects(log) if s == in_flight]
        journal = {
            s.name: json.loads(s.output_json) for s in other.get(tenant, "slow").steps if s.kind == "do"
        }
        assert journal[in_flight][1] == tokens[1], "the slow node's late result was recorded"
        for c in clients:
            assert c.get(tenant, "slow").status == pb.STATUS_COMPLETE
    finally:
        if stopped is not None and stopped.proc is not None:
            os.kill(stopped.proc.pid, signal.SIGCONT)
        for c in clients:
            c.close()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda k: k.stop(), kernels))


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--lease-seconds", "2", "--lease-renew-seconds", "1.5"], "at most half the 2 s lease"),
        (["--lease-seconds", "0.5"], "at least 1 s"),
    ],
)
def test_lease_settings_that_cannot_work_are_refused(tmp_path: Path, flags: list[str], says: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "tenantflow.kernel.cli", "serve", "--data-dir", str(tmp_path), *flags],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode != 0 and says in run.stderr, run.stderr
