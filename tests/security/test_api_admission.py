"""The API is a shared resource: a call is bounded per caller before its body is read.

Issue 16: 100 concurrent 10 MB CreateBatch calls without a token took kernel RSS 70 -> 3,250 MiB
(the body was decoded before the token was checked), and 1,030 Watch streams from one tenant made
every other tenant's Create fail with RESOURCE_EXHAUSTED (one global cap, no per-caller budget).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from tenantflow.client import Client, TenantflowRpcError
from tenantflow.kernel.auth import new_token
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish
from tests.security.bystander import bystander_completes
from tests.security.test_kernel_limits import PeakRss

MiB = 1024 * 1024
CREATE_BATCH = "/tenantflow.v1.Workflows/CreateBatch"
WATCH = "/tenantflow.v1.Workflows/Watch"

WAITER = """
from tenantflow.workflow import WorkflowEntrypoint

class Waiter(WorkflowEntrypoint):
    def run(self, event, step):
        return step.wait_for_event("go", type="go", timeout="1 hour")
"""


@pytest.fixture
def make_kernel(tmp_path: Path) -> Iterator[Callable[..., KernelProcess]]:
    started: list[KernelProcess] = []

    def make(*args: str) -> KernelProcess:
        k = KernelProcess(tmp_path / f"kernel{len(started)}", [*TEST_LIMITS, *args])
        started.append(k)
        k.start()
        return k

    yield make
    for k in started:
        k.stop()


def _tokens(tmp_path: Path, **tenants: list[str]) -> tuple[Path, dict[str, str]]:
    """A tokens file granting each name its tenants; returns it and the tokens by name."""
    entries, tokens = [], {}
    for name, allowed in tenants.items():
        tokens[name], entry = new_token(name, allowed)
        entries.append(entry)
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": entries}))
    return path, tokens


def _channel(address: str) -> grpc.Channel:
    """A channel with a connection of its own (channels with equal options share one by default)."""
    options = [("grpc.max_send_message_length", 128 * MiB), ("grpc.max_receive_message_length", 64 * MiB),
               ("grpc.use_local_subchannel_pool", 1)]  # fmt: skip
    return grpc.insecure_channel(address, options=options)


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def _pid(kernel: KernelProcess) -> int:
    assert kernel.proc is not None
    return kernel.proc.pid


def _batch(tenant: str, count: int, params_bytes: int) -> bytes:
    params = json.dumps("x" * (params_bytes - 2))
    requests = [pb.CreateRequest(tenant=tenant, workflow="Waiter", code="artifact://x/y", params_json=params)
                for _ in range(count)]  # fmt: skip
    return pb.CreateBatchRequest(requests=requests).SerializeToString()


def test_calls_without_a_known_token_are_refused_before_their_body_is_read(
    make_kernel: Callable[..., KernelProcess], tmp_path: Path, tenant: str
) -> None:
    path, tokens = _tokens(tmp_path, bystander=["*"])
    kernel = make_kernel("--auth-tokens", str(path))
    body = _batch(tenant, 10, 1000 * 1000)  # 10 MB
    with Client(kernel.address, token=tokens["bystander"]) as client, _channel(kernel.address) as channel:
        bystander_completes(client, f"{tenant}-warm", within=30)
        create_batch = channel.unary_unary(CREATE_BATCH, request_serializer=None, response_deserializer=None)

        def attack(k: int) -> str:
            metadata = _bearer(f"tf_guess{k}") if k % 2 else None  # none, or an unknown one
            try:
                create_batch(body, metadata=metadata, timeout=60)
                return "OK"
            except grpc.RpcError as exc:
                return str(exc.code().name)

        with PeakRss(_pid(kernel)) as memory, ThreadPoolExecutor(100) as pool:
            attacks = [pool.submit(attack, k) for k in range(100)]
            took = bystander_completes(client, tenant, within=10)
            codes = Counter(a.result() for a in attacks)
        grew = memory.peak - memory.start
    print(f"100 x 10 MB CreateBatch without a token: {dict(codes)}, kernel RSS +{grew / MiB:.0f} MiB "
          f"(peak {memory.peak / MiB:.0f} MiB), bystander {took:.2f} s")  # fmt: skip
    assert codes == {"UNAUTHENTICATED": 100}
    assert grew < 300 * MiB, f"kernel RSS grew {grew / MiB:.0f} MiB for bodies it should not read (was 3 GiB)"


def test_each_rpc_takes_a_body_of_its_own_size_and_a_batch_up_to_16_mib(
    make_kernel: Callable[..., KernelProcess], tmp_path: Path, tenant: str
) -> None:
    path, tokens = _tokens(tmp_path, platform=["*"])
    kernel = make_kernel("--auth-tokens", str(path))
    metadata = _bearer(tokens["platform"])
    with Client(kernel.address, token=tokens["platform"]) as client, _channel(kernel.address) as channel:
        ref = publish(client, tenant, WAITER)
        get = channel.unary_unary("/tenantflow.v1.Workflows/Get", request_serializer=None)
        with pytest.raises(grpc.RpcError) as err:
            get(
                pb.InstanceRef(tenant=tenant, id="x" * MiB).SerializeToString(), metadata=metadata, timeout=30
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Workflows.Get request is 1.0 MiB, over the 64 KiB" in str(err.value.details())

        create = channel.unary_unary("/tenantflow.v1.Workflows/Create", request_serializer=None)
        huge = pb.CreateRequest(
            tenant=tenant, workflow="Waiter", code=ref, params_json=json.dumps("x" * 3 * MiB)
        )
        with pytest.raises(grpc.RpcError) as err:
            create(huge.SerializeToString(), metadata=metadata, timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Workflows.Create request is 3.0 MiB; this kernel takes at most 1.1 MiB" in str(
            err.value.details()
        )

        # A batch takes at most 16 MiB (gRPC's one receive limit is what any read may assemble):
        # 15 creates of 1 MiB of params fit in one call; 100 are refused unread, 17 read and refused.
        params = json.dumps("x" * (MiB - 2))
        one = pb.CreateRequest(tenant=tenant, workflow="Waiter", code=ref, params_json=params)
        create_batch = channel.unary_unary(CREATE_BATCH, request_serializer=None, response_deserializer=None)
        create_batch(
            pb.CreateBatchRequest(requests=[one] * 15).SerializeToString(), metadata=metadata, timeout=60
        )
        assert sum(1 for _ in client.iter_instances(tenant)) == 15
        for count in (100, 16):
            with pytest.raises(grpc.RpcError) as err:
                body = pb.CreateBatchRequest(requests=[one] * count).SerializeToString()
                create_batch(body, metadata=metadata, timeout=60)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, count
            assert "16777216" in str(err.value.details()) or "at most 16.0 MiB" in str(err.value.details())
        bystander_completes(client, tenant, within=10)


def _hold_watches(
    channel: grpc.Channel, requests: list[tuple[pb.InstanceRef, list[tuple[str, str]] | None]]
) -> tuple[list[grpc.Call], Counter[str]]:
    """Open a Watch stream per request; keep those admitted (their first event arrived) open."""
    watch = channel.unary_stream(WATCH, request_serializer=pb.InstanceRef.SerializeToString)
    held, codes = [], Counter[str]()
    for request, metadata in requests:
        call = watch(request, metadata=metadata, timeout=120)
        try:
            next(call)
            held.append(call)
            codes["held"] += 1
        except grpc.RpcError as exc:
            codes[exc.code().name] += 1
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                assert "calls and Watch streams in progress" in str(exc.details()), exc.details()
    return held, codes


def _waiting(client: Client, tenant: str) -> str:
    ref = publish(client, tenant, WAITER)
    return client.create(tenant, "Waiter", ref).id


def test_watch_streams_past_a_tokens_budget_refuse_only_that_caller(
    make_kernel: Callable[..., KernelProcess], tmp_path: Path, tenant: str
) -> None:
    path, tokens = _tokens(tmp_path, attacker=[tenant], helper=[tenant], bystander=["*"])
    # A global cap of 12 that one caller could fill alone, were it not for its own budgets.
    kernel = make_kernel("--auth-tokens", str(path), "--max-concurrent-rpcs", "12",
                         "--max-rpcs-per-token", "6", "--max-rpcs-per-tenant", "8")  # fmt: skip
    with Client(kernel.address, token=tokens["bystander"]) as client, _channel(kernel.address) as channel:
        inst = _waiting(client, tenant)
        ref = pb.InstanceRef(tenant=tenant, id=inst)
        held, codes = _hold_watches(channel, [(ref, _bearer(tokens["attacker"]))] * 20)
        assert codes == {"held": 6, "RESOURCE_EXHAUSTED": 14}, codes
        # The tenant's budget holds across its tokens: 2 more through another token, then no more.
        more, codes = _hold_watches(channel, [(ref, _bearer(tokens["helper"]))] * 5)
        assert codes == {"held": 2, "RESOURCE_EXHAUSTED": 3}, codes
        try:
            other = _waiting(client, f"{tenant}-other")  # another tenant's Create, meanwhile
            client.send_event(f"{tenant}-other", other, "go", {"ok": True})
            assert client.wait(f"{tenant}-other", other, timeout=10).status == pb.STATUS_COMPLETE
            bystander_completes(client, tenant, within=10)
        finally:
            for call in [*held, *more]:
                call.cancel()


def test_without_tokens_a_connections_budget_holds_whatever_tenants_it_names(
    make_kernel: Callable[..., KernelProcess], tenant: str
) -> None:
    kernel = make_kernel("--max-concurrent-rpcs", "12", "--max-rpcs-per-connection", "6")
    with kernel.client() as client, _channel(kernel.address) as channel:
        names = [f"{tenant[:50]}-{k}" for k in range(10)]  # tenant names cost nothing here
        refs = [pb.InstanceRef(tenant=name, id=_waiting(client, name)) for name in names]
        held, codes = _hold_watches(channel, [(refs[k % 10], None) for k in range(20)])
        try:
            assert codes == {"held": 6, "RESOURCE_EXHAUSTED": 14}, codes
            bystander_completes(client, tenant, within=10)
        finally:
            for call in held:
                call.cancel()


def test_a_thousand_watch_streams_of_one_tenant_leave_the_others_room(
    make_kernel: Callable[..., KernelProcess], tenant: str
) -> None:
    """The reported attack at the default flags: 1,030 streams from one tenant and one connection."""
    kernel = make_kernel()
    with kernel.client() as client, _channel(kernel.address) as channel:
        ref = pb.InstanceRef(tenant=tenant, id=_waiting(client, tenant))
        started = time.monotonic()
        held, codes = _hold_watches(channel, [(ref, None)] * 1030)
        try:
            print(f"1,030 Watch streams: {dict(codes)} in {time.monotonic() - started:.1f} s")
            assert codes == {"held": 256, "RESOURCE_EXHAUSTED": 774}, codes  # --max-rpcs-per-tenant
            bystander_completes(client, tenant, within=10)
        finally:
            for call in held:
                call.cancel()


SEND_EVENT = "/tenantflow.v1.Workflows/SendEvent"


def _event(tenant: str, size: int) -> bytes:
    payload = json.dumps("x" * (size - 2))
    return pb.SendEventRequest(tenant=tenant, id="x", type="go", payload_json=payload).SerializeToString()


@pytest.mark.parametrize("size", [100 * 1000 * 1000, 15 * 1000 * 1000])
def test_bodies_over_their_rpcs_limit_from_a_valid_token_are_bounded_before_they_are_read(
    make_kernel: Callable[..., KernelProcess], tmp_path: Path, tenant: str, size: int
) -> None:
    """32 concurrent SendEvent bodies far over SendEvent's limit, from one valid token: gRPC took
    each whole (up to the ~106 MiB a CreateBatch needed) before admission refused it, 32 x 100 MB
    held at once. Now the server-wide receive limit is 16 MiB and a body under it is read only
    within the token's share of the kernel's read slots."""
    path, tokens = _tokens(tmp_path, attacker=[tenant], bystander=["*"])
    kernel = make_kernel("--auth-tokens", str(path))
    body = _event(tenant, size)
    with Client(kernel.address, token=tokens["bystander"]) as client:
        bystander_completes(client, f"{tenant}-warm", within=30)
        channels = [_channel(kernel.address) for _ in range(4)]
        calls = [
            c.unary_unary(SEND_EVENT, request_serializer=None, response_deserializer=None) for c in channels
        ]

        def attack(k: int) -> str:
            try:
                calls[k % 4](body, metadata=_bearer(tokens["attacker"]), timeout=60)
                return "OK"
            except grpc.RpcError as exc:
                return str(exc.code().name)

        with PeakRss(_pid(kernel)) as memory, ThreadPoolExecutor(32) as pool:
            attacks = [pool.submit(attack, k) for k in range(32)]
            took = bystander_completes(client, tenant, within=10)
            codes = Counter(a.result() for a in attacks)
        grew = memory.peak - memory.start
        for channel in channels:
            channel.close()
    print(f"32 x {size / 1e6:.0f} MB SendEvent from a valid token: {dict(codes)}, kernel RSS "
          f"+{grew / MiB:.0f} MiB (peak {memory.peak / MiB:.0f} MiB), bystander {took:.2f} s")  # fmt: skip
    assert codes == {"RESOURCE_EXHAUSTED": 32}, codes
    assert grew < 250 * MiB, f"kernel RSS grew {grew / MiB:.0f} MiB for bodies over their RPC's limit"


BIG = """
from tenantflow.workflow import WorkflowEntrypoint

class Big(WorkflowEntrypoint):
    def run(self, event, step):
        for i in range(24):
            step.do(f"s{i}", lambda: "x" * 1_000_000)
        return "done"
"""


@pytest.mark.parametrize(
    ("rpc", "storage"),
    [("get", "sqlite"), ("export_history", "sqlite"), ("get", "kv+lmdb"), ("export_history", "kv+lmdb")],
)
def test_concurrent_reads_of_a_large_instance_take_the_response_budget_before_loading_it(
    make_kernel: Callable[..., KernelProcess], tenant: str, rpc: str, storage: str, tmp_path: Path
) -> None:
    """96 Gets (32 at once) of an instance with 24 MB of step outputs loaded 24 MB each before the
    response budget was asked: kernel RSS +1,147 MiB (SQLite; kv+lmdb +1,000 MiB). Now the budget
    is taken from the size storage counts, before the journal is loaded; past it a Get fails fast."""
    kernel = make_kernel(
        *(["--storage", f"kv+lmdb://{tmp_path / 'lmdb'}?map_size_mb=512"] if storage != "sqlite" else [])
    )
    with kernel.client() as client:
        ref = publish(client, tenant, BIG)
        inst = client.create(tenant, "Big", ref)
        assert client.wait(tenant, inst.id, timeout=60).status == pb.STATUS_COMPLETE
        clients = [Client(kernel.address) for _ in range(8)]

        def get(k: int) -> str:
            try:
                getattr(clients[k % 8], rpc)(tenant, inst.id)
                return "OK"
            except TenantflowRpcError as exc:
                assert "too many large " in exc.message and "are being read at once" in exc.message, (
                    exc.message
                )
                return str(exc.code.name)

        try:
            with PeakRss(_pid(kernel)) as memory, ThreadPoolExecutor(32) as pool:
                gets = [pool.submit(get, k) for k in range(96)]
                took = bystander_completes(client, tenant, within=10)
                codes = Counter(g.result() for g in gets)
        finally:
            for c in clients:
                c.close()
        grew = memory.peak - memory.start
    print(
        f"96 {rpc} of a 24 MB instance ({storage}): {dict(codes)}, kernel RSS +{grew / MiB:.0f} MiB, bystander {took:.2f} s"
    )
    assert codes["OK"] >= 1 and set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert grew < 600 * MiB, f"kernel RSS grew {grew / MiB:.0f} MiB (was +1,147 MiB)"


def test_concurrent_lists_of_large_instances_hold_the_response_budget_per_chunk(
    make_kernel: Callable[..., KernelProcess], tenant: str
) -> None:
    """96 Lists (32 at once) of a tenant whose 40 instances carry 1 MB of params each: every page
    (~14 MB, chunks bounded to 16 MiB) was held at once. Now a large page holds its bytes in the
    response budget as each chunk is read: pages end early, or fail fast, when it is short; a
    List of small instances (under 1 MiB a page) never asks it."""
    kernel = make_kernel()
    with kernel.client() as client:
        ref = publish(client, tenant, WAITER)
        params = "x" * 1_000_000
        for _ in range(4):  # 10 MB a batch, under CreateBatch's 16 MiB
            client.create_batch(tenant, [{"workflow": "Waiter", "code": ref, "params": params}] * 10)
        small = f"{tenant[:50]}-small"
        small_ref = publish(client, small, WAITER)
        client.create_batch(
            small, [{"workflow": "Waiter", "code": small_ref, "params": n} for n in range(60)]
        )
        clients = [Client(kernel.address) for _ in range(8)]

        def list_page(k: int) -> str:
            try:
                page = clients[k % 8].list(tenant, page_size=50)
                assert page.instances and page.next_page_token, len(page.instances)  # 40 do not fit
                return "OK"
            except TenantflowRpcError as exc:
                assert "too many large lists are being read at once" in exc.message, exc.message
                return str(exc.code.name)

        def page_through(k: int) -> list[str]:
            """Every id, paging on (and retrying a refused page) while the budget is contended."""
            ids, token = [], ""
            while True:
                try:
                    page = clients[k % 8].list(tenant, page_size=50, page_token=token)
                except TenantflowRpcError as exc:
                    assert exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                    continue
                ids += [i.id for i in page.instances]
                if not (token := page.next_page_token):
                    return ids

        try:
            with PeakRss(_pid(kernel)) as memory, ThreadPoolExecutor(32) as pool:
                lists = [pool.submit(list_page, k) for k in range(96)]
                pagers = [pool.submit(page_through, k) for k in range(8)]
                ordinary = [len(client.list(small, page_size=50).instances) for _ in range(5)]
                took = bystander_completes(client, tenant, within=10)
                codes = Counter(f.result() for f in lists)
                seen = [p.result() for p in pagers]
            every = page_through(0)  # alone: pages end only at 16 MiB
        finally:
            for c in clients:
                c.close()
        grew = memory.peak - memory.start
    print(
        f"96 Lists of 40 x 1 MB instances: {dict(codes)}, kernel RSS +{grew / MiB:.0f} MiB, bystander {took:.2f} s"
    )
    assert ordinary == [50] * 5, ordinary  # a List of small instances is never cut short
    assert len(set(every)) == 40 and all(ids == every for ids in seen)  # an early end resumes there
    assert codes["OK"] >= 1 and set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert grew < 600 * MiB, f"kernel RSS grew {grew / MiB:.0f} MiB"
