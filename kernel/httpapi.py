"""The tenantflow.v1 API over HTTP/1.1 and JSON (``tenantflow serve --http-listen``): the Connect
protocol, its routes and messages read from the .proto's descriptors, each call admitted by the
gRPC server's :class:`~tenantflow.kernel.server.Gate` and served by the same servicers, with the
same error codes and metrics.

Unary RPCs: ``POST /tenantflow.v1.<Service>/<Method>`` with ``Content-Type: application/json`` (the
protobuf JSON mapping) or ``application/proto``; the answer is the response message, or an error
status with ``{"code": "not_found", "message": "..."}`` (codes and statuses as the Connect
protocol maps them). Server streaming (``Watch``): ``Content-Type: application/connect+json``, the
request and every response message in an envelope (a flag byte, then the length as 4 bytes
big-endian); the last envelope has flag 2 and holds ``{}`` or ``{"error": {...}}``.

Why not the ``connectrpc`` package: it brings a second protobuf runtime (``protobuf-py``) and its
own generated code beside the committed stubs, a Rust HTTP client the kernel does not need, and an
ASGI server to run it; and its hooks split what :class:`Gate` must do in one order (token and
size before the body is read, tenant after it is decoded). The protocol's unary and
server-streaming halves fit in this module on asyncio streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from tenantflow.kernel import console, errors, httpwire, metrics
from tenantflow.kernel.admission import Budgets
from tenantflow.kernel.auth import Tokens
from tenantflow.kernel.server import Gate, decode_request, new_gate, servicers, status_code, status_message
from tenantflow.kernel.service import Kernel
from tenantflow.v1 import tenantflow_pb2 as pb

log = logging.getLogger("tenantflow.http")

MAX_CONNECTIONS = 1000  # open at once; more are answered 503 and closed
END_STREAM = 0x02
COMPRESSED = 0x01
# The Connect protocol's HTTP status for each code.
HTTP_STATUS = {
    "canceled": 499, "unknown": 500, "invalid_argument": 400, "deadline_exceeded": 504, "not_found": 404,
    "already_exists": 409, "permission_denied": 403, "resource_exhausted": 429, "failed_precondition": 400,
    "aborted": 409, "out_of_range": 400, "unimplemented": 501, "internal": 500, "unavailable": 503,
    "data_loss": 500, "unauthenticated": 401,
}  # fmt: skip


def connect_code(code: grpc.StatusCode) -> str:
    """The Connect name of a gRPC status code (``NOT_FOUND`` is ``not_found``)."""
    return "canceled" if code == grpc.StatusCode.CANCELLED else str(code.name).lower()


@dataclass(frozen=True)
class Route:
    """One RPC as the HTTP API serves it."""

    key: str  # "Workflows/Create", as admission and the gRPC server name it
    service: str  # "tenantflow.v1.Workflows"
    name: str
    request: type[Message]
    streaming: bool
    behavior: Callable[..., Any]


def routes(services: dict[str, Any]) -> dict[str, Route]:
    """``/tenantflow.v1.<Service>/<Method>`` for every RPC of the proto's services."""
    found = {}
    for name, servicer in services.items():
        service = pb.DESCRIPTOR.services_by_name[name]
        for method in service.methods:
            found[f"/{service.full_name}/{method.name}"] = Route(
                f"{name}/{method.name}", service.full_name, method.name,
                GetMessageClass(method.input_type), method.server_streaming, getattr(servicer, method.name),
            )  # fmt: skip
    return found


def decode_json(cls: type[Message], data: bytes) -> Message:
    """A request message from the protobuf JSON mapping; InvalidArgument saying what is wrong."""
    what = cls.DESCRIPTOR.full_name
    try:
        return json_format.Parse(data.decode("utf-8") or "{}", cls())
    except UnicodeDecodeError as exc:
        raise errors.InvalidArgument(
            f"the {what} request is not UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None
    except (json_format.ParseError, RecursionError) as exc:
        raise errors.InvalidArgument(
            f"the request is not a {what} in JSON: {exc or 'nested too deep'}"
        ) from None


def encode_json(message: Message) -> bytes:
    return json_format.MessageToJson(message, indent=None, ensure_ascii=False).encode()


CODECS: dict[str, tuple[Callable[[type[Message], bytes], Message], Callable[[Message], bytes]]] = {
    "json": (decode_json, encode_json),
    "proto": (decode_request, lambda message: message.SerializeToString()),
}


def envelope(flags: int, data: bytes) -> bytes:
    return struct.pack(">BI", flags, len(data)) + data


def error_json(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


class Call:
    """One HTTP request: the :class:`~tenantflow.kernel.server.Caller` that admission reads, and
    the context metrics, tracing and the servicers read (as they read a gRPC one)."""

    def __init__(
        self, conn: Connection, request: httpwire.Request, route: Route, codec: str, limit: int
    ) -> None:
        self.conn, self.request, self.route, self.codec, self.limit = conn, request, route, codec, limit
        self.status: grpc.StatusCode | None = None
        self.consumed = request.content_length == 0
        self.deadline: float | None = None

    def metadata(self) -> Sequence[tuple[str, str | bytes]]:
        return self.request.headers

    def peer(self) -> str:
        return self.conn.peer

    def declared_size(self) -> int | None:
        return self.request.content_length

    async def read(self) -> bytes:
        reader, size = self.conn.reader, self.request.content_length
        if (self.request.header("expect") or "").lower() == "100-continue":
            self.conn.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # admitted: now send the body
        try:
            if size is None:
                data = await httpwire.read_chunked(reader, self.limit)
            else:
                data = await httpwire.read_exactly(reader, size)
        except httpwire.BadRequest as exc:
            raise errors.InvalidArgument(str(exc)) from None
        except TimeoutError:
            raise errors.InvalidArgument(
                f"the request body stopped arriving for {httpwire.BODY_SECONDS:g} s"
            ) from None
        self.consumed = size is not None
        return data

    def decode(self, data: bytes) -> Any:
        if self.route.streaming:
            data = self._unwrap(data)
        return CODECS[self.codec][0](self.route.request, data)

    def _unwrap(self, data: bytes) -> bytes:
        if len(data) < 5:
            raise errors.InvalidArgument(
                "a streaming request is one enveloped message: a flag byte 0, its length as 4 bytes "
                f"big-endian, then the message; got {len(data)} bytes"
            )
        flags, size = struct.unpack(">BI", data[:5])
        if flags & COMPRESSED:
            raise errors.Unimplemented("compressed messages are not supported: send them uncompressed")
        if flags or size != len(data) - 5:
            raise errors.InvalidArgument(
                f"the request envelope says flags {flags} and {size} bytes, and {len(data) - 5} bytes "
                "follow it: send flags 0 and the message's exact length"
            )
        return data[5:]

    # -- as a servicer context (metrics.rpc, tracing, Code.Publish) --------------------------------
    def invocation_metadata(self) -> Sequence[tuple[str, str]]:
        return self.request.headers

    def code(self) -> grpc.StatusCode | None:
        return self.status

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - asyncio.get_running_loop().time())


class Reply:
    """The response to one call: a unary body or error, or a stream of enveloped messages."""

    def __init__(
        self, writer: asyncio.StreamWriter, route: Route, codec: str, keep_alive: Callable[[], bool]
    ) -> None:
        self.writer, self.route, self.codec, self.keep_alive = writer, route, codec, keep_alive
        self.started = False

    async def message(self, message: Message) -> None:
        data = CODECS[self.codec][1](message)
        if not self.route.streaming:
            self.writer.write(httpwire.whole(200, f"application/{self.codec}", data, not self.keep_alive()))
        else:
            self._start()
            self.writer.write(httpwire.chunk(envelope(0, data)))
        await self.writer.drain()

    async def end(self, error: dict[str, str] | None = None) -> None:
        """End a stream, with ``error`` if it failed."""
        self._start()
        body = json.dumps({"error": error} if error else {}).encode()
        self.writer.write(httpwire.chunk(envelope(END_STREAM, body)) + httpwire.chunk(b""))
        await self.writer.drain()

    async def error(self, code: grpc.StatusCode, message: str) -> None:
        name = connect_code(code)
        if self.route.streaming:
            await self.end(error_json(name, message))
            return
        body = json.dumps(error_json(name, message), ensure_ascii=False).encode()
        self.writer.write(httpwire.whole(HTTP_STATUS[name], "application/json", body, not self.keep_alive()))
        await self.writer.drain()

    def _start(self) -> None:
        if not self.started:
            self.started = True
            headers = [("content-type", f"application/connect+{self.codec}"), ("transfer-encoding", "chunked"),
                       ("connection", "close")]  # fmt: skip
            self.writer.write(httpwire.head(200, headers))


class Gone(Exception):
    """The client closed the connection during a call."""


@dataclass
class Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer: str


class HttpApi:
    """The HTTP server: connections, requests, and each call through :class:`Gate`."""

    def __init__(
        self,
        gate: Gate,
        services: dict[str, Any],
        max_calls: int,
        assets: dict[str, console.Asset] | None = None,
    ) -> None:
        self.gate = gate
        self.assets = assets  # the console's files (--ui), or None
        self.routes = routes(services)
        self.max_calls = max_calls  # in progress at once, streams included (0: no cap), like gRPC's
        self.calls = 0
        self.stopping = False
        self.connections: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self, address: str, tls: ssl.SSLContext | None) -> int:
        """Listen on ``address`` (HOST:PORT, port 0 for any); return the bound port."""
        host, _, port = address.rpartition(":")
        try:
            self.server = await asyncio.start_server(
                self._accept, host.strip("[]"), int(port), ssl=tls, limit=httpwire.MAX_HEAD_BYTES
            )
        except OSError as exc:
            raise errors.Unavailable(f"cannot listen on {address} for HTTP: {exc.strerror}") from None
        bound = int(self.server.sockets[0].getsockname()[1])
        self.url = f"{'https' if tls else 'http'}://{host}:{bound}"
        return bound

    async def stop(self) -> None:
        """Stop listening and end every connection (open Watch streams with ``unavailable``)."""
        self.stopping = True
        if self.server is not None:
            self.server.close()
        for task in list(self.connections):
            task.cancel()
        await asyncio.gather(*self.connections, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        host, port = (writer.get_extra_info("peername") or ("?", 0))[:2]
        conn = Connection(reader, writer, f"http:{host}:{port}")
        try:
            if len(self.connections) > MAX_CONNECTIONS:
                body = json.dumps(
                    error_json("unavailable", "too many open connections; retry later")
                ).encode()
                writer.write(httpwire.whole(503, "application/json", body, True))
                return
            await self._serve(conn)
        except (ConnectionError, Gone, asyncio.IncompleteReadError, TimeoutError, asyncio.CancelledError):
            pass  # a connection task ends quietly, also when stop() cancels it
        finally:
            self.connections.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _serve(self, conn: Connection) -> None:
        while True:
            try:
                request = await httpwire.read_head(conn.reader)
            except httpwire.BadRequest as exc:
                body = json.dumps(error_json("invalid_argument", str(exc))).encode()
                conn.writer.write(httpwire.whole(exc.status, "application/json", body, True))
                await httpwire.linger(conn.reader, conn.writer)
                return
            if request is None:
                return
            if not await self._request(conn, request):
                await httpwire.linger(conn.reader, conn.writer)
                return

    async def _refuse(
        self, conn: Connection, status: int, code: str, message: str, *extra: tuple[str, str]
    ) -> bool:
        """Answer a request that reaches no RPC; the connection then closes (its body is unread)."""
        body = json.dumps(error_json(code, message)).encode()
        conn.writer.write(httpwire.whole(status, "application/json", body, True, extra))
        await conn.writer.drain()
        return False

    async def _request(self, conn: Connection, request: httpwire.Request) -> bool:
        """Serve one request; whether the connection may carry another."""
        path = request.path.partition("?")[0]
        if self.assets is not None and request.method in ("GET", "HEAD") and path in self.assets:
            return await self._asset(conn, request, self.assets[path])
        route = self.routes.get(path)
        if route is None:
            return await self._refuse(
                conn, 404, "unimplemented",
                f"no RPC at {path[:200]!r}: the API's RPCs are POST /tenantflow.v1.<Service>/<Method>, "
                "e.g. /tenantflow.v1.Workflows/Get (see tenantflow.proto)",
            )  # fmt: skip
        if request.method != "POST":
            return await self._refuse(
                conn,
                405,
                "unimplemented",
                f"{route.key} takes POST, not {request.method[:20]}",
                ("allow", "POST"),
            )
        prefix = "application/connect+" if route.streaming else "application/"
        media = (request.header("content-type") or "").partition(";")[0].strip().lower()
        codec = media.removeprefix(prefix) if media.startswith(prefix) else ""
        if codec not in CODECS:
            return await self._refuse(
                conn, 415, "unimplemented",
                f"{route.key} takes Content-Type {prefix}json (or {prefix}proto), not {media or 'none'!r}"
                + (": it is a streaming RPC, so its request is enveloped" if route.streaming else ""),
                ("accept-post", f"{prefix}json, {prefix}proto"),
            )  # fmt: skip
        call = Call(conn, request, route, codec, self.gate.budgets.limit(route.key))
        reply = Reply(conn.writer, route, codec, lambda: request.keep_alive and call.consumed)
        with metrics.rpc(route.service, route.name, call) as rpc:
            try:
                await self._call(call, reply, rpc)
            except errors.TenantflowError as exc:
                call.status = status_code(exc)
                await reply.error(call.status, status_message(exc))
            except TimeoutError:
                call.status = grpc.StatusCode.DEADLINE_EXCEEDED
                await reply.error(call.status, "the call's Connect-Timeout-Ms passed")
            except (Gone, ConnectionError):
                call.status = grpc.StatusCode.CANCELLED
                return False
            except asyncio.CancelledError:
                if not self.stopping:
                    raise
                call.status = grpc.StatusCode.UNAVAILABLE  # a Watch open at shutdown: tell it why
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1):
                        await reply.error(call.status, "the kernel is stopping; call again in a moment")
                return False
            except Exception:
                log.exception("%s failed", route.key)
                call.status = grpc.StatusCode.INTERNAL
                await reply.error(call.status, "internal error; see the kernel log")
        return not route.streaming and request.keep_alive and call.consumed

    async def _asset(self, conn: Connection, request: httpwire.Request, asset: console.Asset) -> bool:
        """Send one of the console's files (``HEAD``: its head only)."""
        keep = request.keep_alive and request.content_length == 0
        data = httpwire.whole(200, asset.content_type, asset.body, not keep, console.HEADERS)
        conn.writer.write(data if request.method == "GET" else data[: len(data) - len(asset.body)])
        await conn.writer.drain()
        return keep

    async def _call(self, call: Call, reply: Reply, rpc: metrics.RpcCall) -> None:
        request, route = call.request, call.route
        if (version := request.header("connect-protocol-version")) not in (None, "1"):
            raise errors.InvalidArgument(f"Connect-Protocol-Version must be 1, not {version[:20]!r}")
        encoding = request.header("connect-content-encoding" if route.streaming else "content-encoding")
        if encoding not in (None, "identity"):
            raise errors.Unimplemented(
                f"compression {encoding[:20]!r} is not supported: send the body uncompressed"
            )
        timeout = request.header("connect-timeout-ms")
        if timeout is not None and not (timeout.isdecimal() and len(timeout) <= 10):
            raise errors.InvalidArgument("Connect-Timeout-Ms must be a positive integer of at most 10 digits")
        if self.max_calls and self.calls >= self.max_calls:
            raise errors.ResourceExhausted(
                f"the kernel has {self.calls} HTTP calls and Watch streams in progress, its limit; retry later"
            )
        self.calls += 1
        try:
            with contextlib.ExitStack() as held:
                await self.gate.admit(route.key, call, held, rpc)
                seconds = int(timeout) / 1000 if timeout is not None else None
                call.deadline = None if seconds is None else asyncio.get_running_loop().time() + seconds
                async with asyncio.timeout(seconds):
                    if route.streaming:
                        await self._stream(call, reply, rpc.request)
                    else:
                        rpc.response = await route.behavior(rpc.request, call)
                        await reply.message(rpc.response)
        finally:
            self.calls -= 1

    async def _stream(self, call: Call, reply: Reply, request: Message) -> None:
        """Send the stream's messages until it ends, or the client goes (nothing may follow a
        stream on its connection, so any byte or the end of input means it went)."""

        async def pump() -> None:
            async for item in call.route.behavior(request, call):
                await reply.message(item)

        sending = asyncio.ensure_future(pump())
        gone = asyncio.ensure_future(call.conn.reader.read(1))
        try:
            await asyncio.wait({sending, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not sending.done():
                raise Gone()
            sending.result()
            await reply.end()
        finally:
            sending.cancel()
            gone.cancel()


async def create_http_server(
    kernel: Kernel,
    address: str,
    tokens: Tokens | None = None,
    tls_files: tuple[str, str] | None = None,
    budgets: Budgets | None = None,
    services: dict[str, Any] | None = None,
    ui: bool = False,
) -> HttpApi:
    """The HTTP API listening on ``address``; ``tls_files``: (PEM certificate chain, PEM key) to
    speak HTTPS only; ``budgets`` and ``services``: shared with the gRPC server; ``ui``: also serve
    the console's files at ``/`` and ``/ui/...``."""
    budgets = budgets or Budgets.of(kernel.config)
    context = None
    if tls_files is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*tls_files)
        context.set_alpn_protocols(["http/1.1"])
    api = HttpApi(
        new_gate(kernel, budgets, tokens),
        services or servicers(kernel),
        kernel.config.max_concurrent_rpcs,
        console.load() if ui else None,
    )
    await api.start(address, context)
    return api
