"""HTTP/1.1 as the HTTP API needs it, on asyncio streams: request heads read within limits, bodies
read only when the caller asks (so a call can be refused unread), responses whole or chunked.

Only what a Connect client, ``curl`` or a browser's ``fetch`` sends is understood: one request at a
time per connection, ``Content-Length`` or chunked bodies, ``Expect: 100-continue``. Anything else
is a 4xx and the connection is closed. A body sent with both ``Content-Length`` and
``Transfer-Encoding`` is refused rather than guessed at (request smuggling through a proxy).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from http import HTTPStatus

MAX_HEAD_BYTES = 16 * 1024  # request line and headers: a bearer token and a few headers fit
HEAD_SECONDS = 30.0  # a connection that sends no whole request head this long is closed (idle, slow-loris)
BODY_SECONDS = 30.0  # each chunk of a body must arrive within this long
LINGER_SECONDS = 2.0  # after refusing an unread body: read and drop it this long, so the reply is not reset
CHUNK = 64 * 1024


class BadRequest(Exception):
    """The bytes are not an HTTP/1.1 request this server takes; the connection ends after saying so."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    """A request head; the body is still on the connection."""

    method: str
    path: str
    version: str
    headers: list[tuple[str, str]]  # names lowercased, in order

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    @property
    def chunked(self) -> bool:
        return self.header("transfer-encoding") is not None

    @property
    def content_length(self) -> int | None:
        """The declared body size; None for a chunked body."""
        if self.chunked:
            return None
        return int(self.header("content-length") or 0)

    @property
    def keep_alive(self) -> bool:
        connection = (self.header("connection") or "").lower()
        return "close" not in connection if self.version == "HTTP/1.1" else "keep-alive" in connection


async def read_head(reader: asyncio.StreamReader) -> Request | None:
    """The next request head on the connection, or None once the client has closed it (or stayed
    idle past :data:`HEAD_SECONDS`). The reader must have been made with ``limit=MAX_HEAD_BYTES``."""
    try:
        data = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_SECONDS)
    except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
        return None
    except (asyncio.LimitOverrunError, ValueError):
        raise BadRequest(431, f"the request head is over {MAX_HEAD_BYTES // 1024} KiB") from None
    try:
        line, *fields = data[:-4].decode("latin-1").split("\r\n")
        method, path, version = line.split(" ")
    except ValueError:
        raise BadRequest(400, "the request line is not 'METHOD /path HTTP/1.1'") from None
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequest(505, f"{version!r} is not HTTP/1.1")
    headers = []
    for field in fields:
        name, sep, value = field.partition(":")
        if not sep or not name or name != name.strip() or name[0] in " \t":
            raise BadRequest(400, f"malformed header line {field[:80]!r}")
        headers.append((name.lower(), value.strip()))
    request = Request(method, path, version, headers)
    lengths = {v for k, v in headers if k == "content-length"}
    encoding = request.header("transfer-encoding")
    if encoding is not None and lengths:
        raise BadRequest(400, "a request may not have both Content-Length and Transfer-Encoding")
    if encoding is not None and encoding.lower() != "chunked":
        raise BadRequest(501, f"Transfer-Encoding {encoding!r} is not supported; send Content-Length")
    if len(lengths) > 1 or any(not v.isdecimal() or len(v) > 15 for v in lengths):
        raise BadRequest(400, "Content-Length must be one non-negative integer")
    return request


async def read_exactly(reader: asyncio.StreamReader, size: int) -> bytes:
    """``size`` bytes of body, each :data:`CHUNK` within :data:`BODY_SECONDS`."""
    parts = []
    while size > 0:
        part = await asyncio.wait_for(reader.readexactly(min(size, CHUNK)), BODY_SECONDS)
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


async def read_chunked(reader: asyncio.StreamReader, limit: int) -> bytes:
    """A chunked body, or its first ``limit + 1`` bytes if it is longer (the caller refuses it)."""
    parts: list[bytes] = []
    total = 0
    while True:
        line = await asyncio.wait_for(reader.readuntil(b"\r\n"), BODY_SECONDS)
        try:
            size = int(line.split(b";")[0].strip(), 16)
        except ValueError:
            raise BadRequest(400, "malformed chunk size in a chunked body") from None
        if size == 0:
            while await asyncio.wait_for(reader.readuntil(b"\r\n"), BODY_SECONDS) != b"\r\n":
                pass  # trailers: none are used
            return b"".join(parts)
        if total + size > limit:
            parts.append(await read_exactly(reader, limit + 1 - total))
            return b"".join(parts)
        parts.append(await read_exactly(reader, size))
        total += size
        if await asyncio.wait_for(reader.readexactly(2), BODY_SECONDS) != b"\r\n":
            raise BadRequest(400, "a chunk of a chunked body is longer than its size")


def head(status: int, headers: list[tuple[str, str]]) -> bytes:
    """A response head."""
    reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers), "", ""]
    return "\r\n".join(lines).encode("latin-1")


def whole(
    status: int, content_type: str, body: bytes, close: bool, extra: tuple[tuple[str, str], ...] = ()
) -> bytes:
    """A whole response: head and body."""
    headers = [("content-type", content_type), ("content-length", str(len(body))), *extra]
    if close:
        headers.append(("connection", "close"))
    return head(status, headers) + body


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked response body; ``b""`` makes the last one."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Close a connection whose request body was not read: half-close, then read and drop what the
    client still sends for a moment, so its TCP stack does not reset the reply away unread."""
    with contextlib.suppress(Exception):
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(LINGER_SECONDS):
            while await reader.read(CHUNK):
                pass
