"""Kernel log formats: text for people (the default), or one JSON object per line (``--log-format json``).

A JSON line holds ``time``, ``level``, ``logger``, ``message``, ``node``, and, where the record was
logged during a wake-up, ``tenant``, ``instance`` and ``step`` (context variables the wake-up sets),
the current ``trace_id``/``span_id`` when tracing is on, and ``exception`` with the traceback.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
import traceback
from types import TracebackType
from typing import Any, TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")
_FIELDS = ("tenant", "instance", "step")
_vars: dict[str, contextvars.ContextVar[str]] = {
    name: contextvars.ContextVar(f"tenantflow_log_{name}", default="") for name in _FIELDS
}

Tokens = list[tuple[contextvars.ContextVar[str], contextvars.Token[str]]]


def bind(**fields: str) -> Tokens:
    """Set ``tenant``, ``instance`` and/or ``step`` for records logged from this context on."""
    return [(_vars[name], _vars[name].set(value)) for name, value in fields.items()]


def unbind(tokens: Tokens) -> None:
    """Undo :func:`bind` (in reverse order)."""
    for var, token in reversed(tokens):
        var.reset(token)


def context() -> dict[str, str]:
    """The fields bound in this context (only those set)."""
    return {name: value for name, var in _vars.items() if (value := var.get())}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages are escaped by JSON)."""

    def __init__(self, node: str = "") -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        from tenantflow.kernel import tracing

        line: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.node:
            line["node"] = self.node
        line.update(context())
        for name in _FIELDS:  # explicit extra= fields win over the context
            value = getattr(record, name, None)
            if isinstance(value, str) and value:
                line[name] = value
        ids = tracing.current_ids()
        if ids is not None:
            line["trace_id"], line["span_id"] = ids
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return json.dumps(line, ensure_ascii=False, default=str)


def stdout_line(text: str, fmt: str, node: str = "") -> str:
    """A line the kernel prints on stdout ("listening on ..."), as JSON too under ``--log-format
    json``, so a log collector reading both streams sees one format."""
    if fmt != "json":
        return text
    record = logging.LogRecord("tenantflow.kernel", logging.INFO, __file__, 0, text, None, None)
    return JsonFormatter(node).format(record)


def configure(fmt: str = "text", node: str = "", stream: TextIO | None = None) -> None:
    """Send the process's logs to ``stream`` (stderr) at INFO in ``fmt``; in JSON, warnings and
    uncaught exceptions become JSON lines too, so every stderr line parses."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; use one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(node) if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    if fmt == "json":
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("tenantflow").critical(
        "uncaught exception: %s", "".join(traceback.format_exception_only(kind, exc)).strip(),
        exc_info=(kind, exc, tb),
    )  # fmt: skip
