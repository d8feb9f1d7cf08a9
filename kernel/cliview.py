"""How the ``tenantflow`` client commands show what the kernel answered: aligned tables for people,
the timeline's lines for ``watch``, and protobuf's JSON mapping for ``--json``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

TRACEBACK_INDENT = "  "


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain-text table with aligned columns."""
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def short(text: str, width: int = 60, wide: bool = False) -> str:
    """``text`` on one line, cut to ``width`` with "…" unless ``wide``."""
    text = text.replace("\n", " ")
    return text if wide or len(text) <= width else text[: width - 1] + "…"


def status(value: int) -> str:
    from tenantflow.client._client import status_name

    return status_name(value)


def as_json(message: Any) -> str:
    """A protobuf message (or a list of them) in protobuf's JSON mapping, field names as in the
    .proto, defaults included."""
    from google.protobuf import json_format

    def one(m: Any) -> Any:
        return json_format.MessageToDict(
            m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )

    value = [one(m) for m in message] if isinstance(message, list) else one(message)
    return json.dumps(value, indent=2, ensure_ascii=False)


def _rollback(inst: Any) -> str:
    rb = inst.rollback
    why = {"failed": "after run() raised", "terminated": "asked for by terminate"}.get(rb.reason, rb.reason)
    if rb.status == "failed":
        return f"rollback failed ({why}): {rb.error.name}: {rb.error.message}"
    if rb.status == "complete":
        return f"rolled back ({why}): every undo ran"
    return f"rollback {rb.status} ({why})"


def print_instance(inst: Any, wide: bool = False) -> None:
    """The instance as a field/value table, its steps as a table, then the tracebacks in full."""
    error = f"{inst.error.name}: {inst.error.message}" if inst.error.name else "-"
    print(table([
        ["tenant", inst.tenant], ["id", inst.id], ["workflow", inst.workflow], ["code", inst.code],
        ["status", status(inst.status)], ["created", inst.created_at], ["updated", inst.updated_at],
        ["output", short(inst.output_json or "-", 100, wide)],
        ["error", error.replace("\n", " ")],  # never cut: it is what a person came for
        *([["parent", inst.parent_id]] if inst.parent_id else []),
        *([["concurrency", f"at most {inst.concurrency_limit} at once, key {inst.concurrency_key!r}"]]
          if inst.concurrency_limit else []),
        *([["children", short(", ".join(inst.child_ids), 100, wide)]] if inst.child_ids else []),
        *([["rollback", _rollback(inst)]] if inst.HasField("rollback") else []),
    ], ["field", "value"]))  # fmt: skip
    if inst.steps:
        print()
        rows = []
        for s in inst.steps:
            name = (
                ("undo " if s.kind == "rollback" else "")
                + s.name
                + (f" #{s.occurrence}" if s.occurrence else "")
            )
            failure = f"{s.error.name}: {s.error.message}" if s.error.name else ""
            shown = (
                short(failure, 60, True)
                if failure and not s.output_json
                else short(s.output_json or s.wake_at, 60, wide)
            )
            rows.append([name, s.kind, s.status, s.attempts, shown])
        print(table(rows, ["step", "kind", "status", "attempts", "output / error"]))
    tracebacks = [(f"step {s.name!r}", s.error.traceback) for s in inst.steps if s.error.traceback]
    if inst.error.traceback and all(tb != inst.error.traceback for _, tb in tracebacks):
        tracebacks.append(("run()", inst.error.traceback))
    for where, tb in tracebacks:
        print(f"\n{where} raised:")
        print("\n".join(TRACEBACK_INDENT + line for line in tb.rstrip().splitlines()))


def print_schedule(s: Any) -> None:
    from tenantflow.v1 import tenantflow_pb2 as pb

    print(table([
        ["tenant", s.tenant], ["name", s.name], ["cron", s.cron], ["time zone", s.time_zone or "UTC"],
        ["workflow", s.workflow], ["code", s.code], ["params", short(s.params_json or "-", 100)],
        ["overlap", pb.OverlapPolicy.Name(s.overlap).removeprefix("OVERLAP_POLICY_").lower()],
        ["catch-up", pb.CatchupPolicy.Name(s.catchup).removeprefix("CATCHUP_POLICY_").lower()
         + f" (window {s.catchup_window_seconds} s)"],
        ["paused", "yes" if s.paused else "no"], ["next fire", s.next_fire or "-"],
        *([["upcoming fires", ", ".join(s.upcoming_fires)]] if s.upcoming_fires else []),
        ["last fire", s.last_fire or "-"], ["last instance", s.last_instance_id or "-"],
        ["fires", s.fires], ["skipped", s.skipped_fires], ["last error", s.last_error or "-"],
    ], ["field", "value"]))  # fmt: skip


def _data(event: Any) -> dict[str, Any]:
    try:
        data = json.loads(event.data_json) if event.data_json else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _rollback_line(kind: str, message: str, data: dict[str, Any]) -> str:
    if kind == "rollback_started":
        return f"↶ rollback started: {message}"
    if kind == "rollback_completed":
        return f"↶ rolled back: {message}"
    failed = data.get("failed") or []
    if failed:
        undos = ", ".join(f"undo {f.get('step', '?')!r} failed ({f.get('name', '')}: {f.get('message', '')})"
                          for f in failed)  # fmt: skip
        return f"↶ rollback failed: {undos}"
    return f"↶ rollback failed: {message}"


def describe(event: Any) -> str:
    """One line of a watched timeline (a step's traceback, when it has one, on the lines after)."""
    kind, data = event.kind, _data(event)
    step = ("undo " if data.get("undo") else "") + event.step
    if kind == "status":
        text = f"status → {status(event.status)}" + (f" ({event.message})" if event.message else "")
    elif kind == "step_started":
        text = f"{'↶' if data.get('undo') else '▶'} {step}  attempt {event.attempt}"
    elif kind == "step_completed":
        text = f"✔ {step}" + (f"  {event.message}" if event.message else "")
    elif kind == "step_failed":
        text = f"✘ {step}" + (f"  attempt {event.attempt}" if event.attempt else "") + f": {event.message}"
    elif kind == "step_retrying":
        text = f"↻ {step}  {event.message}"
    elif kind == "kv_conflict":
        text = f"↻ {step}  kv conflict: {event.message}"
    elif kind in ("sleeping", "waiting"):
        text = f"⏸ {step}  {kind} {event.message}"
    elif kind == "log":
        text = f"│ {event.message}"
    elif kind in ("child_created", "child_ended"):
        text = f"⎇ {event.step + '  ' if event.step else ''}{event.message}"
    elif kind.startswith("rollback_"):
        text = _rollback_line(kind, event.message, data)
    else:
        text = f"{kind}: {event.message}"
    tb = data.get("traceback")
    if isinstance(tb, str) and tb and (kind == "status" or data.get("final")):
        text += "\n" + "\n".join(" " * 14 + line for line in tb.rstrip().splitlines())
    return f"{event.at[11:23]}  {text}"
