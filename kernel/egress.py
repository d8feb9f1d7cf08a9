"""A tenant's egress allow-list, and the kernel's side of every connection a step makes.

Without ``--sandbox-network`` tenant code has no network of its own: each TCP connection it opens
is asked of the kernel (:class:`RunEgress`), which checks host and port against the tenant's rules,
resolves a name itself (never trusting an address the guest resolved), refuses answers outside the
public internet (loopback, private, link-local, ...) unless the matching rule names that address or
its block literally, connects, and relays the bytes over a socket pair whose other end the guest
holds, within the run's connection and byte budgets. Refusals are logged and raised with a message
naming the host; the step sees them as ``PermissionError``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import json
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tenantflow.kernel.errors import InvalidArgument
from tenantflow.kernel.storage import Storage
from tenantflow.kernel.validate import check_tenant

log = logging.getLogger("tenantflow.egress")

MAX_RULES = 256
MAX_PORTS = 32
MAX_CONNECTIONS = 64  # connections a run may open in all
MAX_OPEN = 16  # connections a run may hold open at once
MAX_BYTES = 256 * 1024 * 1024  # bytes a run may move through its connections, both ways together
CONNECT_SECONDS = 10.0
_NAME = re.compile(
    r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$"
)
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Refused(Exception):
    """A connection the allow-list does not permit; the message is the step's to read."""


class Unreachable(Refused):
    """An allowed connection that could not be made (no answer for the name, refused, timed out)."""


@dataclass(frozen=True)
class Rule:
    """One allow-list entry: ``host`` is a lower-case name, ``*.suffix``, or a network; its ports."""

    host: str
    ports: tuple[int, ...]

    @property
    def network(self) -> _Network | None:
        try:
            return ipaddress.ip_network(self.host, strict=False)
        except ValueError:
            return None

    def names(self, name: str) -> bool:
        """Whether this (name) rule matches the host name ``name``."""
        if self.host.startswith("*."):
            return name.endswith(self.host[1:]) and len(name) > len(self.host) - 1
        return name == self.host


def parse_rule(host: str, ports: Sequence[int], where: str = "rule") -> Rule:
    """A rule from the API, normalised; ``InvalidArgument`` saying what is wrong with it."""
    text = host.strip().lower().rstrip(".")
    if not text:
        raise InvalidArgument(f"{where}: host is empty; give a name, *.suffix, an IP address or a CIDR block")
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        network = None
    if network is not None:  # one address shows as itself, a block as CIDR
        text = str(network.network_address if network.num_addresses == 1 else network)
    elif not _NAME.match(text[2:] if text.startswith("*.") else text):
        raise InvalidArgument(
            f"{where}: host {host[:80]!r} is not a host name, *.suffix, IP address or CIDR block"
        )
    if not ports:
        raise InvalidArgument(
            f"{where}: no ports for {text!r}; list the ports it may be reached on (e.g. 443)"
        )
    if len(ports) > MAX_PORTS:
        raise InvalidArgument(f"{where}: {len(ports)} ports; a rule lists at most {MAX_PORTS}")
    for port in ports:
        if not 1 <= port <= 65535:
            raise InvalidArgument(f"{where}: port {port} is not in 1-65535")
    return Rule(text, tuple(sorted(set(ports))))


def parse_rules(raw: Sequence[tuple[str, Sequence[int]]]) -> list[Rule]:
    """A whole list from the API; ``InvalidArgument`` naming the first bad rule."""
    if len(raw) > MAX_RULES:
        raise InvalidArgument(f"{len(raw)} egress rules; a tenant has at most {MAX_RULES}")
    return [parse_rule(host, ports, f"rule {i + 1}") for i, (host, ports) in enumerate(raw)]


def dumps(rules: Sequence[Rule]) -> str:
    return json.dumps([[r.host, list(r.ports)] for r in rules], separators=(",", ":"))


def loads(text: str) -> list[Rule]:
    return [Rule(str(host), tuple(int(p) for p in ports)) for host, ports in json.loads(text)]


async def stored_rules(storage: Storage, tenant: str) -> list[Rule]:
    """The tenant's rules as stored (none if never set)."""
    return (await get(storage, tenant))[0]


async def get(storage: Storage, tenant: str) -> tuple[list[Rule], float | None]:
    """``Egress.Get``: the tenant's rules and when they were set (None: never)."""
    check_tenant(tenant)
    found = await asyncio.to_thread(storage.get_egress, tenant)
    return (loads(found[0]), found[1]) if found is not None else ([], None)


async def put(
    storage: Storage, tenant: str, raw: Sequence[tuple[str, Sequence[int]]]
) -> tuple[list[Rule], float]:
    """``Egress.Set``: replace the tenant's rules (checked first); what was stored, and when."""
    check_tenant(tenant)
    rules = parse_rules(raw)
    now = time.time()
    await asyncio.to_thread(storage.put_egress, tenant, dumps(rules), now)
    return rules, now


def _literal(host: str) -> _Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _named_literally(rules: Sequence[Rule], address: _Address, port: int) -> bool:
    return any(
        port in r.ports
        and (net := r.network) is not None
        and net.version == address.version
        and address in net
        for r in rules
    )


def _public(address: _Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_global
    return address.is_global


Resolver = Callable[[str, int], Awaitable[list[str]]]


async def _resolve(name: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def addresses(rules: Sequence[Rule], host: str, port: int, resolve: Resolver = _resolve) -> list[str]:
    """The addresses a connection to ``host:port`` may go to under ``rules``; ``Refused`` saying why
    there is none. A name is resolved here (by the kernel): an answer outside the public internet
    is used only if a rule names that address (or its block) literally."""
    if not isinstance(host, str) or not isinstance(port, int) or not 1 <= port <= 65535 or len(host) > 253:
        raise Refused("a connection needs a host name or address and a port in 1-65535")
    literal = _literal(host)
    if literal is not None:
        if _named_literally(rules, literal, port):
            return [str(literal)]
        raise Refused(f"{literal} port {port} is not on this tenant's egress allow-list")
    name = host.lower().rstrip(".")
    if not any(port in r.ports and r.network is None and r.names(name) for r in rules):
        raise Refused(f"{name} port {port} is not on this tenant's egress allow-list")
    try:
        found = await asyncio.wait_for(resolve(name, port), CONNECT_SECONDS)
    except (OSError, TimeoutError) as exc:
        raise Unreachable(f"{name} could not be resolved ({exc})") from None
    usable = [
        a
        for a in found
        if (ip := _literal(a)) is not None and (_public(ip) or _named_literally(rules, ip, port))
    ]
    if not usable:
        raise Refused(
            f"{name} resolves to {', '.join(found[:4]) or 'nothing'}, an address outside the public internet"
            " that this tenant's egress allow-list does not name (a rule naming the address itself allows it)"
        )
    return usable


class RunEgress:
    """One wake-up's connections: the tenant's rules (read once, on first use), its budgets, and the
    relays it keeps running until :meth:`close`."""

    def __init__(
        self, tenant: str, rules: Callable[[], Awaitable[list[Rule]]], resolve: Resolver = _resolve
    ) -> None:
        self.tenant = tenant
        self._load, self._resolve = rules, resolve
        self._rules: list[Rule] | None = None
        self.opened = 0
        self.bytes = 0
        self._relays: set[asyncio.Task[None]] = set()

    async def open(self, host: str, port: int) -> socket.socket:
        """The guest's end of a socket pair relayed to ``host:port``; ``Refused`` if not allowed."""
        try:
            return await self._open(host, port)
        except Refused as exc:
            log.warning("egress refused for tenant %r: %s", self.tenant, exc)
            raise

    async def _open(self, host: str, port: int) -> socket.socket:
        if self._rules is None:
            self._rules = await self._load()
        if not self._rules:
            raise Refused(
                f"tenant {self.tenant!r} has no egress allow-list: a step reaches only what the platform"
                " allows with `tenantflow egress set`"
            )
        if self.opened >= MAX_CONNECTIONS:
            raise Refused(f"a run may open at most {MAX_CONNECTIONS} connections")
        if len(self._relays) >= MAX_OPEN:
            raise Refused(f"a run may hold at most {MAX_OPEN} connections open at once")
        self.opened += 1
        targets = await addresses(self._rules, host, port, self._resolve)
        problem = ""
        for address in targets:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(address, port), CONNECT_SECONDS
                )
                break
            except (OSError, TimeoutError) as exc:
                problem = f"{host} port {port} ({address}): {exc or 'timed out'}"
        else:
            raise Unreachable(f"could not connect to {problem}")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        task = asyncio.create_task(self._relay(ours, reader, writer))
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)
        return theirs

    async def _relay(
        self, ours: socket.socket, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        guest_reader, guest_writer = await asyncio.open_unix_connection(sock=ours)
        pumps = [asyncio.create_task(self._pump(guest_reader, writer)),
                 asyncio.create_task(self._pump(reader, guest_writer))]  # fmt: skip
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for pump in pumps:
                pump.cancel()
            for w in (writer, guest_writer):
                w.close()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """Copy one direction until its end (then half-close the other side); raise to cut both."""
        while chunk := await source.read(65536):
            self.bytes += len(chunk)
            if self.bytes > MAX_BYTES:
                log.warning("egress of tenant %r: a run moved more than %d bytes; its connection is cut",
                            self.tenant, MAX_BYTES)  # fmt: skip
                raise ConnectionAbortedError("egress byte budget spent")
            sink.write(chunk)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()

    async def close(self) -> None:
        """Cut every connection the run still holds."""
        for task in list(self._relays):
            task.cancel()
        for task in list(self._relays):
            with contextlib.suppress(BaseException):
                await task


class HostConnections:
    """Connections a guest without sockets of its own (python-wasm) drives through host calls:
    ``{"op": "net", "connect": [host, port]}`` -> ``{"handle"}``; ``"send": h, "data": base64`` ->
    ``{"sent"}``; ``"recv": h, "max": n, "timeout": s`` -> ``{"data": base64}`` (empty: the peer
    closed); ``"close": h`` -> ``{}``. Refusals answer ``{"error", "refused": true}``; other
    failures ``{"error"}`` (``"timeout": true`` for a read that timed out). Each connection is one
    :meth:`RunEgress.open`: the same checks, budgets and relays as the python sandbox's."""

    CHUNK = 256 * 1024

    def __init__(self, open: Callable[[str, int], Awaitable[socket.socket]]) -> None:
        self._open = open
        self._streams: dict[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        self._next = 0

    async def answer(self, m: dict[str, Any]) -> dict[str, Any]:
        if "connect" in m:
            host, port = m["connect"]
            try:
                sock = await self._open(str(host), int(port))
            except Unreachable as exc:
                return {"error": str(exc)}
            except Refused as exc:
                return {"error": str(exc), "refused": True}
            self._next += 1
            self._streams[self._next] = await asyncio.open_unix_connection(sock=sock)
            return {"handle": self._next}
        handle = next((m[k] for k in ("send", "recv", "close") if k in m), None)
        stream = self._streams.get(handle) if isinstance(handle, int) else None
        if stream is None or not isinstance(handle, int):
            return {"error": f"no open connection {handle!r}"}
        reader, writer = stream
        try:
            if "send" in m:
                data = base64.b64decode(m["data"])
                writer.write(data)
                await writer.drain()
                return {"sent": len(data)}
            if "recv" in m:
                most = max(1, min(int(m.get("max", 65536)), self.CHUNK))
                timeout = m.get("timeout")
                chunk = await asyncio.wait_for(
                    reader.read(most), float(timeout) if timeout is not None else None
                )
                return {"data": base64.b64encode(chunk).decode()}
        except TimeoutError:
            return {"error": "timed out", "timeout": True}
        except (OSError, ValueError) as exc:
            return {"error": str(exc) or type(exc).__name__}
        del self._streams[handle]
        writer.close()
        return {}

    def close(self) -> None:
        for _reader, writer in self._streams.values():
            writer.close()
        self._streams.clear()
