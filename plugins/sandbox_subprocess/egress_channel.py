"""The kernel's end of a run's egress channel: each request names a host and port; the answer is
the run's end of a connection the kernel made and relays (``tenantflow.kernel.egress``), passed
over SCM_RIGHTS, or why there is none. One request at a time per run; see ``egress_guest``."""

from __future__ import annotations

import array
import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from tenantflow.kernel.egress import Refused, Unreachable

Opener = Callable[[str, int], Awaitable[socket.socket]]
NO_EGRESS = "this kernel gives tenant code no network (it runs without an egress-checking host)"


async def serve(channel: socket.socket, opener: Opener | None) -> None:
    """Answer the run's requests on ``channel`` until it closes it."""
    loop = asyncio.get_running_loop()
    channel.setblocking(False)
    while data := await loop.sock_recv(channel, 4096):
        try:
            request = json.loads(data)
            host, port = request["host"], request["port"]
            if not isinstance(host, str) or not isinstance(port, int) or isinstance(port, bool):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            await _send(channel, {"error": "a malformed egress request", "refused": True})
            continue
        if opener is None:
            await _send(channel, {"error": NO_EGRESS, "refused": True})
            continue
        try:
            theirs = await opener(host, port)
        except Unreachable as exc:
            await _send(channel, {"error": str(exc)})
            continue
        except Refused as exc:
            await _send(channel, {"error": str(exc), "refused": True})
            continue
        try:
            await _send(channel, {"ok": True}, theirs.fileno())
        finally:
            theirs.close()


async def _send(channel: socket.socket, reply: dict[str, Any], fd: int = -1) -> None:
    """One reply (with ``fd``); the run is waiting for it, so its buffer has room at once."""
    body = [json.dumps(reply).encode()]
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())] if fd >= 0 else []
    for _ in range(500):
        try:
            channel.sendmsg(body, ancillary)
            return
        except BlockingIOError:
            await asyncio.sleep(0.01)
