"""Framing between the kernel and a sandboxed child: 4-byte big-endian length, then JSON."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
from typing import Any

MAX_FRAME = 256 * 1024 * 1024
_HEADER = struct.Struct(">I")


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ValueError(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte frame limit")
    return _HEADER.pack(len(body)) + body


async def read(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None at end of stream."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes exceeds the limit")
    try:
        body = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        return None
    message = json.loads(body)
    if not isinstance(message, dict):
        raise ValueError("a frame must hold a JSON object")
    return message


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
        (size,) = _HEADER.unpack(header)
        body = self._file.read(size)
        if len(body) < size:
            raise EOFError("the kernel closed the connection")
        message: dict[str, Any] = json.loads(body)
        return message

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._sock.sendall(encode(message))
            return self.recv()

    def notify(self, message: dict[str, Any]) -> None:
        with self._lock:
            self._sock.sendall(encode({**message, "notify": True}))
