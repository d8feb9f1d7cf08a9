"""Framing between the kernel and a sandboxed child: a 5-byte header (big-endian body length, then
the kind: a call or reply, or a notification that expects none), then the body, one JSON object.

The kernel reads what a guest sends with :func:`read_header` first: the length is checked against
the run's message limit before a byte of the body is read, and the kind lets a notification over
its log budget be skipped (:func:`skip`) without decoding it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
from typing import Any

from tenantflow.plugins.sandboxing import guestmsg

MAX_FRAME = 256 * 1024 * 1024  # what the kernel sends (a job carries the tenant's files and journal)
CALL, NOTIFY = 0, 1
_HEADER = struct.Struct(">IB")


def encode(message: dict[str, Any], kind: int = CALL) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ValueError(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte frame limit")
    return _HEADER.pack(len(body), kind) + body


async def read_header(reader: asyncio.StreamReader, limit: int) -> tuple[int, int] | None:
    """``(body size, kind)`` of the next frame, or None at end of stream; a body over ``limit``
    bytes raises :class:`~tenantflow.plugins.sandboxing.guestmsg.MessageError` before it is read."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError:
        return None
    size, kind = _HEADER.unpack(header)
    if error := guestmsg.too_large(size, limit):
        raise error
    return size, kind


async def read_body(reader: asyncio.StreamReader, size: int) -> dict[str, Any] | None:
    """The message of a frame whose header was read (and checked), or None at end of stream."""
    try:
        body = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        return None
    return guestmsg.decode(body)


async def skip(reader: asyncio.StreamReader, size: int) -> bool:
    """Drop a frame's body unread; False at end of stream."""
    try:
        await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        return False
    return True


class SocketTransport:
    """The guest side: blocking request/reply over a connected stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._file = sock.makefile("rb")
        self._lock = threading.Lock()

    def recv(self) -> dict[str, Any]:
        header = self._file.read(_HEADER.size)
        if len(header) < _HEADER.size:
            raise EOFError("the kernel closed the connection")
        size, _kind = _HEADER.unpack(header)
        body = self._file.read(size)
        if len(body) < size:
            raise EOFError("the kernel closed the connection")
        message: dict[str, Any] = json.loads(body)
        return message

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._sock.sendall(encode(message))
            return self.recv()

    def send(self, message: dict[str, Any]) -> None:
        """A request whose reply is read later with :meth:`receive` (replies come in order)."""
        with self._lock:
            self._sock.sendall(encode(message))

    def receive(self) -> dict[str, Any]:
        with self._lock:
            return self.recv()

    def notify(self, message: dict[str, Any]) -> None:
        with self._lock:
            self._sock.sendall(encode(message, NOTIFY))
