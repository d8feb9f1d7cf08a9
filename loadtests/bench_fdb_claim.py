"""Reads per claim on the FoundationDB engine, counted as FoundationDB would count them.

Runs the engine on the LMDB stand-in (FoundationDB's rules: conflicts, 5-second transactions,
sizes; see plugins/storage_fdb/lmdb_layer.py), with N tenants each holding one due instance (one
cron minute across tenants), and claims as the kernel does (64 slots, 32 per tenant). Prints, per
N: reads and round trips of one claim (reads sent at once count one round trip) and its time with
the given latency per round trip (FoundationDB: ~1 ms), and the same of a 512-change apply.

    .venv/bin/python loadtests/bench_fdb_claim.py                 # 100, 1,000, 5,000 ready tenants
    .venv/bin/python loadtests/bench_fdb_claim.py --tenants 20000 --latency-ms 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tenantflow.kernel.model import Change, HistoryEntry, InstanceRecord, Status, StepRecord
from tenantflow.plugins.storage_fdb.kv_storage import KVStorage
from tenantflow.plugins.storage_fdb.lmdb_layer import LmdbLayer, Rules

CODE = "artifact://t/c@sha256:" + "0" * 64


def instance(tenant: str, id: str, run_at: float) -> InstanceRecord:
    return InstanceRecord(tenant=tenant, id=id, workflow="W", code=CODE, runtime="python", module="wf",
                          params_json="null", created_at=run_at, updated_at=run_at, run_at=run_at)  # fmt: skip


def measure(tenants: int, latency: float, directory: Path) -> dict[str, float]:
    layer = LmdbLayer(directory / f"kv{tenants}", map_size=4 << 30, rules=Rules(max_age=0, timeout=0))
    storage = KVStorage(layer)
    now = time.time() - 1
    for start in range(0, tenants, 500):
        batch = [instance(f"tenant{n:06}", "due", now) for n in range(start, min(start + 500, tenants))]
        storage.create_instances(
            batch, [HistoryEntry(kind="status", at=now, status=int(Status.QUEUED))] * len(batch)
        )
    c = layer.counters
    c.reset()
    layer.rules.read_latency = latency  # each round trip waits this long, as on a cluster
    started = time.monotonic()
    claimed = storage.claim("node", time.time(), 30, 64, 32)
    claim = {"reads": c.reads, "round_trips": c.round_trips, "claimed": len(claimed), "attempts": c.attempts,
             "seconds": time.monotonic() - started}  # fmt: skip
    # a 512-change apply: a step each, on 512 of the instances (their leases held by "node" or not)
    ids = [f"tenant{n:06}" for n in range(min(tenants, 512))]
    step = StepRecord(key="s#0", seq=1, name="s", kind="do", status="complete", output_json="1")
    changes = [Change(tenant=t, id="due", now=now, steps=[step]) for t in ids]
    changes += changes[: 512 - len(changes)] if len(changes) < 512 else []
    c.reset()
    started = time.monotonic()
    storage.apply(changes)
    claim.update(
        apply_reads=c.reads, apply_round_trips=c.round_trips, apply_seconds=time.monotonic() - started
    )
    storage.close()
    return claim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tenants", type=int, nargs="*", default=[100, 1_000, 5_000])
    parser.add_argument("--latency-ms", type=float, default=1.0, help="read latency per round trip")
    args = parser.parse_args()
    print(f"read latency {args.latency_ms:g} ms a round trip; seconds measured")
    print(f"{'ready tenants':>13} {'claimed':>7} {'reads':>7} {'round trips':>11} {'seconds':>8} "
          f"{'apply 512: reads':>16} {'round trips':>11} {'seconds':>8}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for tenants in args.tenants:
            m = measure(tenants, args.latency_ms / 1000, Path(tmp))
            print(f"{tenants:>13,} {m['claimed']:>7} {m['reads']:>7,} {m['round_trips']:>11,} {m['seconds']:>8.3f} "
                  f"{m['apply_reads']:>16,} {m['apply_round_trips']:>11,} {m['apply_seconds']:>8.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
