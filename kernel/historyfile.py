"""Read an exported history (``tenantflow history export``, format ``tenantflow.history.v1``).

The file is protobuf's JSON mapping of ``tenantflow.v1.History``; this turns it back into the
records a replay copies into its scratch store (:mod:`tenantflow.kernel.replay`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from google.protobuf import json_format

from tenantflow.kernel.model import EventRecord, InstanceRecord, Status, StepRecord
from tenantflow.v1 import tenantflow_pb2 as pb

FORMAT = "tenantflow.history.v1"


@dataclass(frozen=True)
class RecordedHistory:
    """An exported instance as records: what a replay needs of it."""

    record: InstanceRecord
    steps: list[StepRecord]
    events: list[EventRecord]


def _time(text: str) -> float | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def parse(text: str) -> RecordedHistory:
    """The history in ``text``; ``ValueError`` saying what is wrong with it."""
    try:
        history = json_format.Parse(text, pb.History())
    except json_format.ParseError as exc:
        raise ValueError(f"not a tenantflow history (JSON of tenantflow.v1.History): {exc}") from None
    if history.format != FORMAT:
        raise ValueError(f"unknown history format {history.format!r}: this tenantflow reads {FORMAT!r}")
    i = history.instance
    if not i.id or not i.workflow:
        raise ValueError("the history names no instance (instance.id and instance.workflow are empty)")
    created = _time(i.created_at) or 0.0
    record = InstanceRecord(
        tenant=i.tenant, id=i.id, workflow=i.workflow, code=i.code, runtime=i.runtime or "python", module="",
        params_json=i.params_json or "null", status=Status(i.status or Status.RUNNING), created_at=created,
        updated_at=created, parent=i.parent_id, output_json=i.output_json, error_name=i.error.name,
        error_message=i.error.message,
    )  # fmt: skip
    steps = [
        StepRecord(
            key=e.key,
            seq=e.seq,
            name=e.name,
            kind=e.kind,
            status=e.status,
            attempts=e.attempts,
            output_json=e.output_json,
            error_name=e.error.name,
            error_message=e.error.message,
            wake_at=_time(e.wake_at),
            event_type=e.event_type,
            updated_at=created,
        )  # fmt: skip
        for e in history.journal
    ]
    events = [
        EventRecord(
            seq=e.sequence,
            type=e.type,
            payload_json=e.payload_json,
            created_at=_time(e.at) or created,
            consumed_by=e.consumed_by,
        )  # fmt: skip
        for e in history.events
    ]
    return RecordedHistory(record, steps, events)
