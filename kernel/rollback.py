"""Rollbacks (saga), kernel side: the ``undo`` step kind and the ``rollback``/``rolled_back`` ops.

When ``run()`` raises, or Terminate asks for a rollback, the undos the workflow registered on its
completed ``step.do`` calls run in reverse step-start order, each a durable step retried by its own
policy. One journal record (key :data:`KEY`, kind ``rollback``) holds the state: why (``failed`` or
``terminated``), the forward error, the undo order once chosen, and the outcome. Undo records are
keyed ``<forward key>#undo``; neither kind of key can be a forward step's (those end in ``#<n>``).

Guest protocol (see ``tenantflow.workflow._compose``)::

    {"op": "rollback", "error": {...}, "keys": [forward keys with an undo]}
        -> {"do": "rollback", "order": [keys, last started first], "error": {...}}
    {"op": "step", "kind": "undo", "key": "<forward key>#undo", "name", "policy"}  (then as ``do``)
    {"op": "rolled_back"} -> {"do": "ack"}: the instance ends errored (or terminated)
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from tenantflow.kernel import guestdata, metrics, stepkinds
from tenantflow.kernel.journal import Journal, guest_entry
from tenantflow.kernel.model import LIVE_STEP, Status, StepRecord

KEY = "#rollback"
UNDO = "#undo"
# Journal kinds the forward replay never sees (pin: Upgrade's record of re-pins, kernel/upgrade.py).
APART = frozenset({"undo", "rollback", "pin"})
# Runtimes whose guest runs the tenant SDK, which knows undos; a raw wasm module does not, so
# Terminate with rollback ends its instance at once.
RUNTIMES = frozenset({"python", "python-wasm"})


def record(key: str, seq: int, reason: str, error: dict[str, str], now: float) -> StepRecord:
    """A new rollback record (state in ``output_json``: reason, then order and failures)."""
    return StepRecord(
        key=key, seq=seq, name="rollback", kind="rollback", status="running",
        output_json=json.dumps({"reason": reason}), error_name=error["name"], error_message=error["message"],
        updated_at=now,
    )  # fmt: skip


def state(step: StepRecord) -> dict[str, Any]:
    value = json.loads(step.output_json or "{}")
    return value if isinstance(value, dict) else {}


def prepare(journal: Journal, job: dict[str, Any]) -> None:
    """Keep undo and rollback records out of the forward journal; tell a guest that is rolling
    back why, and which undos already ran."""
    job["journal"] = [e for e in job["journal"] if e["kind"] not in APART]
    rb = journal.steps.get(KEY)
    if rb is None:
        return
    undos = sorted((s for s in journal.steps.values() if s.kind == "undo"), key=lambda s: s.seq)
    job["rollback"] = {
        "reason": state(rb).get("reason", "failed"),
        "error": {"name": rb.error_name, "message": rb.error_message},
        "undos": [guest_entry(s) for s in undos],
    }


async def begin(journal: Journal, m: dict[str, Any]) -> dict[str, Any]:
    keys = m["keys"]
    if not isinstance(keys, list) or len(keys) > journal.config.max_steps:
        raise ValueError("keys must be a list of step keys")
    now = journal.now()
    rb = journal.steps.get(KEY)
    history = []
    if rb is None:
        rb = record(KEY, journal.next_seq, "failed", guestdata._error(m.get("error"), 16384), now)
        journal.next_seq += 1
        journal.steps[KEY] = rb
    current = state(rb)
    if "order" not in current:  # chosen once, from the steps that completed: replays reuse it
        done = [journal.steps[k] for k in dict.fromkeys(map(str, keys)) if k in journal.steps]
        done = [s for s in done if s.kind == "do" and s.status == "complete"]
        current["order"] = [s.key for s in sorted(done, key=lambda s: s.seq, reverse=True)]
        rb.output_json, rb.updated_at = json.dumps(current), now
        why = "run() raised" if current["reason"] == "failed" else "terminated with rollback"
        history.append(journal.history("rollback_started", message=(
            f"{why} ({rb.error_name}: {rb.error_message[:200]}); undoing {len(current['order'])} step(s)"),
            data_json=json.dumps({"reason": current["reason"], "steps": [journal.steps[k].name for k in current["order"]]})))  # fmt: skip
        await journal.commit(journal.change(steps=[rb], history=history))
    return {
        "do": "rollback",
        "order": current["order"],
        "error": {"name": rb.error_name, "message": rb.error_message},
    }


async def undo(journal: Journal, m: dict[str, Any]) -> dict[str, Any]:
    key = str(m["key"])
    rb = journal.steps.get(KEY)
    forward_key = key.removesuffix(UNDO)
    if rb is None or not key.endswith(UNDO) or forward_key not in state(rb).get("order", []):
        raise ValueError(f"no rollback of step {forward_key!r} is due")
    step = journal.steps.get(key)
    if step is None:
        step = journal.new_step(key, journal.steps[forward_key].name, "undo")
    return await stepkinds.do(journal, step, guestdata._policy(m["policy"]))


async def end(journal: Journal, m: dict[str, Any]) -> dict[str, Any]:
    rb = journal.steps.get(KEY)
    if rb is None:
        raise ValueError("no rollback is running")
    current = state(rb)
    undos = [journal.steps.get(k + UNDO) for k in current.get("order", [])]
    if any(u is None or u.status not in ("complete", "failed") for u in undos):
        raise ValueError("the rollback ended before every undo was settled")
    failed = [u for u in undos if u is not None and u.status == "failed"]
    now = journal.now()
    rb.status, rb.updated_at = ("failed" if failed else "complete"), now
    if failed:
        current["failed"] = [
            {"step": u.name, "name": u.error_name, "message": u.error_message} for u in failed
        ]
    rb.output_json = json.dumps(current)
    terminated = current.get("reason") == "terminated"
    status = Status.TERMINATED if terminated else Status.ERRORED
    summary = (f"{len(failed)} of {len(undos)} undo(s) failed: " + ", ".join(
        f"{u.name!r} ({u.error_name}: {u.error_message[:200]})" for u in failed)) if failed else (
        f"{len(undos)} undo(s) completed")  # fmt: skip
    history = [
        journal.history("rollback_failed" if failed else "rollback_completed", message=summary,
                      data_json=json.dumps({"failed": current.get("failed", [])})),
        journal.status_entry(status, "terminated (rolled back)" if terminated else f"{rb.error_name}: {rb.error_message}"),
    ]  # fmt: skip
    error = {"error_name": "", "error_message": ""} if terminated else {
        "error_name": rb.error_name, "error_message": rb.error_message}  # fmt: skip
    # Terminated: forward steps still waiting, sleeping or retrying end with the instance (as Terminate
    # without rollback ends them), not left "waiting" forever.
    ended = [dataclasses.replace(s, status="terminated", wake_at=None, updated_at=now)
             for s in journal.steps.values() if terminated and s.status in LIVE_STEP and s.kind not in APART]  # fmt: skip
    metrics.outcome(journal, status.name.lower())
    journal.ended = True
    journal.notify_parent(status)
    await journal.commit(journal.change(
        steps=[rb, *ended], history=history,
        set={"status": status, **error, "run_at": None, "lease_owner": None, "lease_until": None},
    ))  # fmt: skip
    return {"do": "ack"}
