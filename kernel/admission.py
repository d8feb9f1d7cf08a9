"""Who may use how much of the API at once: budgets taken before a request is read or decoded.

A call passes, in order: the token (``--auth-tokens``: none or an unknown one is refused unread), the
calls in flight of its token and of its peer (unread), its RPC's request size limit (read, not
decoded), the kernel-wide bytes of requests in flight (then decoded), and the calls in flight of
each tenant it names. Each budget is a count per key (or bytes kernel-wide) released when the call
ends, Watch streams included, so one caller at its budget leaves the rest of the global cap
(``--max-concurrent-rpcs``) to the others.

The peer is gRPC's peer string, ``ipv4:10.0.0.7:53124``: one connection, not one host. Keyed per
host, every client behind one address — a platform backend and its console on one machine, every
call through a sidecar proxy, every test on loopback — would share one budget that is really a
second global cap. Keyed per connection, a client that opens more connections gets more budget;
that is why, with ``--auth-tokens``, the per-token budget is the one that holds (a token is one
caller however many connections it opens), and why a kernel whose API tenants can reach should run
with tokens: without them a caller may name any tenant, and the per-connection budget only stops a
runaway client (e.g. one leaking Watch streams on its channel).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from tenantflow.kernel.config import KernelConfig
from tenantflow.kernel.errors import InvalidArgument, ResourceExhausted

MIB = 1024 * 1024
SMALL_REQUEST_BYTES = 64 * 1024  # an RPC without a payload field: names, ids, a page token
# Fields beside a payload (tenant, workflow, code ref, id, concurrency key, event type: a few KiB).
ENVELOPE_BYTES = 64 * 1024
# Defaults of the serve flags: per token and per connection half of the default global cap of 1,024
# calls (one platform backend behind one token or connection still gets most of the kernel), per
# tenant a quarter; decoded requests of 256 MiB hold two documented-maximum CreateBatch calls.
PER_TOKEN = 512
PER_PEER = 512
PER_TENANT = 256
REQUEST_BYTES_IN_FLIGHT = 256 * MIB
# The most one CreateBatch may send: gRPC has one receive limit per server, and it is what any read
# of any RPC may assemble, so this (with Publish's 11 MiB) sets the size of every read slot.
BATCH_REQUEST_BYTES = 16 * MIB
READ_WAIT = 10.0  # seconds a call waits for a read slot before RESOURCE_EXHAUSTED
# Seconds a body may take to arrive within its slot (16 MiB at 0.5 MiB/s): a slow sender cannot hold
# a slot, and so a share of the kernel's reads, for longer.
READ_DEADLINE = 30.0


class BytesInFlight:
    """A kernel-wide budget of bytes being worked on (request bodies, responses): a caller takes its
    size or fails fast, instead of queuing memory. One caller alone always fits."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def fits(self, size: int) -> bool:
        return not self.used or self.used + size <= self.limit

    def take(self, size: int) -> bool:
        if not self.fits(size):
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size

    @contextlib.contextmanager
    def hold(self, size: int, busy: str) -> Iterator[None]:
        """Hold ``size`` bytes for the block; ResourceExhausted(``busy``) if they do not fit now."""
        if not self.take(size):
            raise ResourceExhausted(busy)
        try:
            yield
        finally:
            self.give(size)


class InFlight:
    """Calls in flight per key (a token, a peer, a tenant), at most ``limit`` each (0: no limit).
    Keys at zero are forgotten, so the map holds only callers with a call in progress."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what  # "token 'acme-ci'"-style noun for messages: "token", "connection", "tenant"
        self.counts: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, key: str, name: str) -> Iterator[None]:
        """One call of ``key`` for the block; ResourceExhausted naming ``name`` past the limit."""
        count = self.counts.get(key, 0)
        if self.limit and count >= self.limit:
            raise ResourceExhausted(
                f"{self.what} {name} already has {count} calls and Watch streams in progress, its limit "
                "on this kernel: end some (close idle Watch streams) or retry when they finish"
            )
        self.counts[key] = count + 1
        try:
            yield
        finally:
            if self.counts[key] == 1:
                del self.counts[key]
            else:
                self.counts[key] -= 1


def request_limits(config: KernelConfig) -> dict[str, int]:
    """The largest request each RPC takes, in bytes, by ``Service/Method``; the rest take
    :data:`SMALL_REQUEST_BYTES`. A Create carries one payload; a batch ``max_batch`` of them
    (at most 16 MiB, however many the batch size allows); a Publish the code limit plus its file names."""
    one = config.max_payload_bytes + ENVELOPE_BYTES
    return {
        "Workflows/Create": one,
        "Workflows/CreateBatch": min(config.max_batch * (one + 16), max(BATCH_REQUEST_BYTES, one + 16)),
        "Workflows/SendEvent": one,
        "Schedules/Create": one,
        "Code/Publish": config.max_code_bytes + MIB,
        "KV/Put": config.kv_max_value_bytes + ENVELOPE_BYTES,
        "Secrets/Put": 2 * ENVELOPE_BYTES,  # a value of up to 64 KiB
    }


class ReadSlots:
    """Request bodies being received at once. gRPC assembles a whole message, up to the server-wide
    receive limit whatever the RPC, before a handler sees its size, so a read takes a slot of that
    size first: at most ``slots`` reads kernel-wide, ``share`` of them per caller (a token, or a
    connection without tokens). A call past either waits up to ``wait`` seconds for a slot, then
    fails with RESOURCE_EXHAUSTED; a read of a small message holds its slot for microseconds."""

    def __init__(
        self, slots: int, share: int, wait: float = READ_WAIT, deadline: float = READ_DEADLINE
    ) -> None:
        self.slots, self.share, self.wait = slots, share, wait
        self.deadline = deadline  # seconds a body may take to arrive once its read has a slot
        self.used = 0
        self.by_caller: dict[str, int] = {}
        self._freed = asyncio.Condition()

    def _free(self, caller: str) -> bool:
        return self.used < self.slots and self.by_caller.get(caller, 0) < self.share

    @contextlib.asynccontextmanager
    async def hold(self, caller: str, name: str) -> AsyncIterator[None]:
        """A read slot of ``caller`` (``name`` in messages) for the block."""
        async with self._freed:
            try:
                await asyncio.wait_for(self._freed.wait_for(lambda: self._free(caller)), self.wait)
            except TimeoutError:
                mine = self.by_caller.get(caller, 0)
                raise ResourceExhausted(
                    f"{name} has {mine} request bodies being received, its share is {self.share} of the "
                    f"kernel's {self.slots} (--max-request-mb-in-flight / the largest request); "
                    "send fewer large requests at once or retry in a few seconds"
                    if mine >= self.share
                    else f"the kernel is receiving {self.used} request bodies, its limit; retry in a few seconds"
                ) from None
            self.used += 1
            self.by_caller[caller] = self.by_caller.get(caller, 0) + 1
        try:
            yield
        finally:
            async with self._freed:
                self.used -= 1
                if self.by_caller[caller] == 1:
                    del self.by_caller[caller]
                else:
                    self.by_caller[caller] -= 1
                self._freed.notify_all()


@dataclass(frozen=True)
class Budgets:
    """Everything a call is admitted against, built once per server."""

    per_token: InFlight
    per_peer: InFlight
    per_tenant: InFlight
    requests: BytesInFlight  # decoded request bodies, kernel-wide
    limits: dict[str, int]
    reads: ReadSlots  # bodies gRPC is receiving, each counted at the server-wide receive limit

    @classmethod
    def of(
        cls,
        config: KernelConfig,
        per_token: int = PER_TOKEN,
        per_peer: int = PER_PEER,
        per_tenant: int = PER_TENANT,
        request_bytes: int = REQUEST_BYTES_IN_FLIGHT,
    ) -> Budgets:
        """The budgets of ``tenantflow serve``'s flags (0: no limit on that key). Bodies being
        received share ``request_bytes`` with those being decoded: as many reads as it holds of the
        largest request (at least 2), a quarter of them per caller."""
        limits = request_limits(config)
        slots = max(2, request_bytes // max([SMALL_REQUEST_BYTES, *limits.values()]))
        return cls(
            InFlight(per_token, "token"),
            InFlight(per_peer, "connection"),
            InFlight(per_tenant, "tenant"),
            BytesInFlight(request_bytes),
            limits,
            ReadSlots(slots, max(1, slots // 4)),
        )

    def limit(self, method: str) -> int:
        return self.limits.get(method, SMALL_REQUEST_BYTES)

    @property
    def largest(self) -> int:
        """The server-wide receive limit: larger messages are refused by gRPC before they are read."""
        return max([SMALL_REQUEST_BYTES, *self.limits.values()])

    @contextlib.contextmanager
    def body(self, method: str, size: int) -> Iterator[None]:
        """Hold a received body of ``size`` bytes while it is decoded and served, or refuse it
        (over its RPC's limit, or past the kernel-wide bytes in flight) before it is decoded."""
        limit, rpc = self.limit(method), method.replace("/", ".")
        if size > limit and method in self.limits:
            raise ResourceExhausted(
                f"the {rpc} request is {_size(size)}; this kernel takes at most {_size(limit)} for it: "
                + (
                    "split it into smaller batches"
                    if method == "Workflows/CreateBatch"
                    else "send less (payloads and code have limits: see the README)"
                )
            )
        if size > limit:  # names and ids only: no valid request is this large
            raise InvalidArgument(
                f"the {rpc} request is {_size(size)}, over the {_size(limit)} a request of names and ids "
                "can take: check its fields (ids, names and tenants are at most a few hundred characters)"
            )
        busy = (
            f"the kernel is decoding {self.requests.used / MIB:.0f} MiB of requests, its limit; "
            "retry in a few seconds"
        )
        with self.requests.hold(size, busy):
            yield


def _size(n: int) -> str:
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n / 1024:.0f} KiB" if n >= 1024 else f"{n} bytes"
