"""Messages from a guest, as every sandbox reads them: bounded before they are read, decoded safely.

Shared by the sandboxes (as :mod:`tenantflow.plugins.sandboxing.pysource` is). A sandbox checks the length a
guest announces against :attr:`Limits.message_bytes <tenantflow.kernel.sandbox.Limits>` before it
copies the message (:func:`too_large`), then :func:`decode` turns it into a dict, refusing JSON
nested deeper than :data:`MAX_DEPTH` before the parser could recurse (the kernel re-encodes what
it keeps, so a value must stay well inside Python's recursion limit).
"""

from __future__ import annotations

import json
from typing import Any

from tenantflow.kernel.jsonsafe import nesting
from tenantflow.kernel.sandbox import ENVELOPE_BYTES

MAX_DEPTH = 200  # arrays and objects inside each other, the message itself included


class MessageError(ValueError):
    """A guest message the kernel refuses; the text says why, for people."""


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.3g} MiB" if n >= 1024 * 1024 else f"{n // 1024} KiB"


def too_large(size: int, limit: int) -> MessageError | None:
    """The error for a message of ``size`` bytes, or None if it is within ``limit``."""
    if 0 <= size <= limit:
        return None
    return MessageError(
        f"the sandbox sent a message of {size} bytes; messages are limited to {limit} bytes "
        f"({_mib(limit - ENVELOPE_BYTES)} of step output plus {_mib(ENVELOPE_BYTES)} for names and errors): "
        "store large data elsewhere and return a reference to it"
    )


def decode(data: bytes | str) -> dict[str, Any]:
    """One message (a JSON object); :class:`MessageError` for anything else."""
    try:
        text = data if isinstance(data, str) else data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MessageError(f"the sandbox sent a message that is not UTF-8: {exc}") from None
    # Counting brackets first keeps the common case (a shallow message) to two C-speed scans.
    if text.count("[") + text.count("{") > MAX_DEPTH and (depth := nesting(text)) > MAX_DEPTH:
        raise MessageError(
            f"the sandbox sent JSON nested {depth} deep; values may nest at most {MAX_DEPTH - 1} deep"
        )
    try:
        message = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise MessageError(f"the sandbox sent a message that is not JSON: {str(exc)[:200]}") from None
    if not isinstance(message, dict):
        raise MessageError("the sandbox sent a message that is not a JSON object")
    return message
