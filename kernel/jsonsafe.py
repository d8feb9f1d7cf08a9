"""Strict JSON for every ``*_json`` field a caller sends: RFC 8259 only, bounded before it is parsed.

``json.loads`` alone accepts ``NaN`` and ``Infinity`` (which no other language's parser reads), turns
``1e999`` into infinity, keeps lone surrogate escapes (which no UTF-8 text can hold) and recurses once
per nesting level, so a document nested thousands deep raises ``RecursionError`` instead of a
``ValueError``. :func:`check_json` refuses all of these with a message saying what to send instead.
"""

from __future__ import annotations

import json
import math
import re
from array import array
from itertools import accumulate
from typing import Any

from tenantflow.kernel.errors import InvalidArgument, ResourceExhausted

MAX_DEPTH = 64  # arrays and objects inside each other
_MAX_DIGITS = 4300  # CPython's own limit for int(str) (sys.get_int_max_str_digits())
_PAIRED_QUOTE = re.compile(r'"[^"]*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 and -1 as signed bytes
# A \uD800-\uDFFF escape: a lone surrogate if no partner follows it (checked on the parsed value).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")


class _NotJson(ValueError):
    """A value JSON's grammar allows that RFC 8259 interoperability rules out."""


def nesting(text: str) -> int:
    """How deep arrays and objects nest in ``text``, brackets inside strings not counted. Linear and
    without recursion, so it is safe on any input; on text that is not JSON the answer is at least the
    depth a JSON parser would reach before failing."""
    # Escapes first: "\\" pairs, then "\"", so every quote left delimits a string.
    bare = _PAIRED_QUOTE.sub("", text.replace("\\\\", "").replace('\\"', ""))
    brackets = _NOT_BRACKET.sub("", bare).encode("ascii")
    return max(accumulate(array("b", brackets.translate(_STEPS))), default=0)


def check_json(text: str, what: str, max_bytes: int) -> str:
    """``text`` if it is one RFC 8259 JSON value within the limits (``"null"`` when empty).

    Raises :class:`ResourceExhausted` over ``max_bytes`` (UTF-8) and :class:`InvalidArgument` for
    anything else: not JSON, nested deeper than :data:`MAX_DEPTH`, NaN, Infinity, numbers out of a
    double's range, lone surrogates."""
    if not text:
        return "null"
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise ResourceExhausted(
            f"{what} is {size} bytes; the limit is {max_bytes}{_unit(max_bytes)}: "
            "pass a reference to large data instead"
        )
    depth = nesting(text) if text.count("[") + text.count("{") > MAX_DEPTH else 0
    if depth > MAX_DEPTH:
        raise InvalidArgument(
            f"{what} nests arrays and objects {depth} deep; the limit is {MAX_DEPTH}: flatten the document"
        )
    try:
        value = json.loads(text, parse_constant=_constant, parse_float=_finite, parse_int=_integer)
    except _NotJson as exc:
        raise InvalidArgument(f"{what} is not RFC 8259 JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"{what} is not valid JSON: {exc}") from None
    if (_SURROGATE_ESCAPE.search(text) or _SURROGATE.search(text)) and _has_surrogate(value):
        raise InvalidArgument(
            f"{what} holds a lone UTF-16 surrogate (\\ud800-\\udfff without its partner), which is not "
            "Unicode text: send whole characters, or base64 for binary data"
        )
    return text


def _unit(size: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size % scale == 0:
            return f" ({size // scale} {unit})"
    return ""


def _constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON number (other languages cannot parse it): send null or a string")


def _finite(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):
        raise _NotJson(f"{literal[:40]} is beyond a double's range: send it as a string")
    return value


def _integer(literal: str) -> int:
    if len(literal.lstrip("-")) > _MAX_DIGITS:
        raise _NotJson(f"an integer of {len(literal)} digits is too long to read: send it as a string")
    return int(literal)


def _has_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False
