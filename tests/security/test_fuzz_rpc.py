"""Property-based fuzz of every RPC against one real kernel: bad input is refused with a status a person can
act on (never INTERNAL or UNKNOWN), the kernel's memory stays bounded, and another tenant's workflow still
completes (issue 7, finding 8).

Reproducible: examples are derandomized and no example database is kept. ``TENANTFLOW_FUZZ_EXAMPLES``
scales the run (examples per RPC and kind; default 100) for a longer search on a developer's machine."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tenantflow.client import Client
from tenantflow.kernel.auth import new_token
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import source
from tests.security.bystander import bystander_completes

TENANT = "fuzz"
MIB = 1024 * 1024
EXAMPLES = int(os.environ.get("TENANTFLOW_FUZZ_EXAMPLES", "100"))
RSS_GROWTH_LIMIT_MIB = 300  # the kernel may keep some gRPC buffers; an unbounded leak goes far past this

WAITER = """
from tenantflow.workflow import WorkflowEntrypoint

class Waiter(WorkflowEntrypoint):
    async def run(self, event, step):
        return await step.wait_for_event("go", type="go", timeout="1 hour")
"""

Code = grpc.StatusCode
LOOKUP = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND}
CONTROL = LOOKUP | {Code.FAILED_PRECONDITION}
# The codes each RPC may answer bad input with (see kernel/errors.py): anything else, INTERNAL and
# UNKNOWN above all, is a bug.
ALLOWED: dict[str, set[grpc.StatusCode]] = {
    "Create": LOOKUP | {Code.ALREADY_EXISTS, Code.RESOURCE_EXHAUSTED},
    "CreateBatch": LOOKUP | {Code.ALREADY_EXISTS, Code.RESOURCE_EXHAUSTED},
    "Get": LOOKUP,
    "List": {Code.OK, Code.INVALID_ARGUMENT},
    "Pause": CONTROL,
    "Resume": CONTROL,
    "Terminate": CONTROL,
    "Restart": LOOKUP,
    "SendEvent": CONTROL | {Code.RESOURCE_EXHAUSTED},
    "Watch": LOOKUP,
    "Delete": LOOKUP,
    "Publish": {Code.OK, Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED},
}
SERVICE = {name: "Code" if name == "Publish" else "Workflows" for name in ALLOWED}
REQUEST: dict[str, type[Message]] = {
    m.name: getattr(pb, m.input_type.name)
    for service in ("Workflows", "Code")
    for m in pb.DESCRIPTOR.services_by_name[service].methods
}


# -- strategies ------------------------------------------------------------------------------------
SIZES = [0, 1, 99, 100, 101, 255, 256, 257, 1024, 1025, 2048, 2049, 65_536, 4 * MIB]
ODD = ["\0", "\n", "\r", "\t", "\x7f", "\x85", "\u2028", "\ufeff", "/", "..", " ", "'", '"', "\\", "%s", "🦀"]


def spliced(valid: list[str]) -> st.SearchStrategy[str]:
    """A valid value with an odd character put somewhere in it."""
    return st.builds(
        lambda v, odd, at: v[:at] + odd + v[at:],
        st.sampled_from(valid),
        st.sampled_from(ODD),
        st.integers(0, 12),
    )


def texts(valid: list[str]) -> st.SearchStrategy[str]:
    """Names, ids and other string fields: valid ones, random Unicode (NUL and control characters
    included), valid ones with an odd character inside, and sizes at and over every boundary."""
    return st.one_of(
        st.sampled_from(valid),
        st.text(max_size=40),
        spliced(valid),
        st.sampled_from(SIZES).map(lambda n: "a" * n),
    )


DEEP = 10_000
JSON_SPECIALS = [
    "NaN", "-Infinity", "[Infinity]", '{"ratio": NaN}', "1e999", "-1e400", '"\\ud800"', '{"\\udfff": 1}',
    "[" * DEEP + "]" * DEEP, '{"a":' * DEEP + "1" + "}" * DEEP, "[" * DEEP, '{"a":' * DEEP,
    "[" * 64 + "]" * 64, "[" * 65 + "]" * 65, '["' + "[" * DEEP + '"]', "9" * 5000, "\ufeff{}", "{} {}",
    '"\\u0000"', "[1,]", "'single'", "",
]  # fmt: skip
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
json_values_finite = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
json_texts = st.one_of(
    json_values.map(json.dumps),  # floats include NaN and Infinity, which json.dumps writes as such
    st.text(max_size=60),  # mostly not JSON at all
    st.sampled_from(JSON_SPECIALS),
    # a JSON string of exactly the 1 MiB limit, and one byte over
    st.sampled_from([MIB, MIB + 1]).map(lambda n: '"' + "x" * (n - 2) + '"'),
)
int32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([-1, 0, 1, 8, 9, 999, 1000, 1001]))
file_names = st.one_of(
    st.sampled_from(["wf.py", "pkg/__init__.py", "pkg/util.py", "data.txt"]),
    st.text(max_size=30),
    spliced(["wf.py", "pkg/util.py"]),
    st.sampled_from(
        [
            "/etc/passwd",
            "../wf.py",
            "pkg/../../wf.py",
            "./wf.py",
            "pkg//wf.py",
            "pkg/",
            "C:\\wf.py",
            "a" * 255 + ".py",
            "a" * 256,
            "a/" * 600 + "wf.py",
            "",
        ]
    ),  # fmt: skip
)


def requests(
    message: type[Message], valid: dict[str, st.SearchStrategy[Any]], wild: dict[str, st.SearchStrategy[Any]]
) -> st.SearchStrategy[Message]:
    """Requests with some fields wild and the rest valid, so that every check, the deep ones included,
    meets bad input (all fields wild, almost every request would stop at the first check)."""

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        chosen = draw(st.sets(st.sampled_from(sorted(wild)), max_size=len(wild)))
        fields = {f: draw(wild[f] if f in chosen else valid[f]) for f in valid}
        return message(**fields)

    return build()


def strategies(ref: str, ids: list[str], steps: list[str]) -> dict[str, st.SearchStrategy[Message]]:
    """One request strategy per RPC."""
    tenant, tenants = st.sampled_from([TENANT, f"{TENANT}-other"]), texts([TENANT, "fuzz.x"])
    instance, instances = st.sampled_from(ids), texts(ids)
    good_json = json_values_finite.map(json.dumps)
    refs = [ref, f"artifact://{TENANT}/wf"]
    wild_refs = texts([*refs, f"artifact://{TENANT}/wf@sha256:" + "0" * 64, "git+file:///etc/passwd@main#x.py",
                       "ftp://x", "artifact://other/wf"])  # fmt: skip
    create_valid = {"tenant": st.just(TENANT), "workflow": st.just("Waiter"), "code": st.sampled_from(refs),
                    "id": st.one_of(st.just(""), instance), "params_json": good_json}  # fmt: skip
    create_wild = {"tenant": tenants, "workflow": texts(["Waiter", "Nope"]), "code": wild_refs,
                   "id": instances, "params_json": json_texts}  # fmt: skip
    create = requests(pb.CreateRequest, create_valid, create_wild)
    ref_of = requests(
        pb.InstanceRef, {"tenant": tenant, "id": instance}, {"tenant": tenants, "id": instances}
    )
    waiter = source(WAITER).encode()
    files = st.dictionaries(file_names, st.one_of(st.just(waiter), st.binary(max_size=64)), max_size=3)
    many_files = st.sampled_from([1000, 1001]).map(lambda n: {f"m{i}.py": b"" for i in range(n)})
    return {
        "Create": create,
        "CreateBatch": st.builds(
            pb.CreateBatchRequest,
            requests=st.one_of(
                st.lists(create, max_size=3),
                st.sampled_from([100, 101]).map(
                    lambda n: [pb.CreateRequest(tenant=TENANT, workflow="Nope", code=ref)] * n
                ),
            ),
        ),
        "Get": ref_of,
        "List": requests(
            pb.ListRequest,
            {
                "tenant": tenant,
                "status": st.integers(0, 8),
                "page_size": st.integers(0, 1000),
                "page_token": st.sampled_from(["", "1"]),
            },
            {
                "tenant": tenants,
                "status": int32,
                "page_size": int32,
                "page_token": st.one_of(
                    st.text(max_size=30),
                    st.sampled_from(["0", "9" * 18, "9" * 19, "-1", "1e3", "١٢", " 1", "1\n"]),
                ),
            },
        ),  # fmt: skip
        "Pause": ref_of,
        "Resume": ref_of,
        "Terminate": ref_of,
        "Restart": requests(
            pb.RestartRequest,
            {"tenant": tenant, "id": instance, "from_step": st.sampled_from(["", *steps])},
            {"tenant": tenants, "id": instances, "from_step": texts(steps)},
        ),
        "SendEvent": requests(
            pb.SendEventRequest,
            {
                "tenant": tenant,
                "id": instance,
                "type": st.sampled_from(["go", "other"]),
                "payload_json": good_json,
            },
            {"tenant": tenants, "id": instances, "type": texts(["go"]), "payload_json": json_texts},
        ),
        "Watch": ref_of,
        "Delete": ref_of,
        "Publish": requests(
            pb.PublishRequest,
            {
                "tenant": tenant,
                "name": st.sampled_from(["wf", "other.v2"]),
                "runtime": st.sampled_from(["", "python"]),
                "files": st.just({"wf.py": waiter}),
            },
            {
                "tenant": tenants,
                "name": texts(["wf"]),
                "runtime": texts(["python", "wasm"]),
                "files": st.one_of(files, many_files),
            },
        ),  # fmt: skip
    }


# -- raw bytes: what a client that is not protobuf-correct sends ------------------------------------------
BAD_UTF8 = [
    b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xe2\x82", b"\xf4\x90\x80\x80", b"ok\xfe",
]  # fmt: skip  # stray byte, overlong NUL, CESU lone surrogates (a JavaScript string's), cut short, > U+10FFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def string_paths(descriptor: Descriptor) -> list[list[int]]:
    """Field numbers leading to every string field, through nested messages."""
    paths: list[list[int]] = []
    for f in descriptor.fields:
        if f.type == FieldDescriptor.TYPE_STRING:
            paths.append([f.number])
        elif f.message_type is not None:
            paths.extend([f.number, *inner] for inner in string_paths(f.message_type))
    return paths


def with_bad_string(path: list[int], bad: bytes) -> bytes:
    data = bad
    for number in reversed(path):
        data = field(number, data)
    return data


def raw_requests(name: str) -> st.SearchStrategy[bytes]:
    """Bytes for one RPC: a valid request with a string field (nested ones included) that is not UTF-8,
    fields of the wrong wire type, truncated encodings, and random bytes."""
    bad_strings = st.builds(
        lambda path, bad, tail: with_bad_string(path, bad) + tail,
        st.sampled_from(string_paths(REQUEST[name].DESCRIPTOR)),
        st.one_of(st.sampled_from(BAD_UTF8), st.binary(min_size=1, max_size=16).filter(_not_utf8)),
        st.binary(max_size=8),
    )
    return st.one_of(
        bad_strings, st.binary(max_size=64), st.sampled_from([b"\x0a\x05ab", b"\x08", b"\x0b", b"\x0f"])
    )


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


# -- the run -----------------------------------------------------------------------------------------------
def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


class Fuzzer:
    """Sends requests, checks every answer's code, counts requests and tracks the kernel's peak RSS."""

    def __init__(self, kernel: KernelProcess, channel: grpc.Channel) -> None:
        assert kernel.proc is not None
        self.pid = kernel.proc.pid
        self.channel = channel
        self.sent: Counter[str] = Counter()
        self.codes: Counter[str] = Counter()
        self.baseline = self.peak = rss_mib(self.pid)

    def call(self, name: str, data: bytes) -> tuple[grpc.StatusCode, str]:
        method = f"/tenantflow.v1.{SERVICE[name]}/{name}"
        self.sent[name] += 1
        try:
            if name == "Watch":
                stream = self.channel.unary_stream(
                    method, request_serializer=None, response_deserializer=None
                )
                call = stream(data, timeout=30)
                try:
                    next(iter(call), None)  # the first event is enough; a live instance streams on
                finally:
                    call.cancel()
            else:
                self.channel.unary_unary(method, request_serializer=None, response_deserializer=None)(
                    data, timeout=60
                )
            code, details = Code.OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        self.codes[code.name] += 1
        self.peak = max(self.peak, rss_mib(self.pid))
        return code, details

    def check(self, name: str, data: bytes, what: str) -> tuple[grpc.StatusCode, str]:
        code, details = self.call(name, data)
        assert code in ALLOWED[name], f"{name} answered {code.name} ({details!r}) to {what}"
        assert code == Code.OK or details.strip(), f"{name} answered {code.name} without a message to {what}"
        return code, details


def fuzz_settings() -> settings:
    return settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=list(HealthCheck),
    )


@pytest.fixture(scope="module")
def fuzz_kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProcess]:
    k = KernelProcess(tmp_path_factory.mktemp("fuzz-kernel"), TEST_LIMITS)
    k.start()
    yield k
    k.stop()


def _short(request: Message) -> str:
    text = str(request)
    return text if len(text) < 300 else text[:300] + f"... ({len(text)} characters)"


def test_fuzz_every_rpc_never_internal_and_memory_bounded(fuzz_kernel: KernelProcess) -> None:
    started = time.monotonic()
    with (
        fuzz_kernel.client() as client,
        grpc.insecure_channel(fuzz_kernel.address, options=_options()) as channel,
    ):
        ref = client.publish(TENANT, "wf", {"wf.py": source(WAITER)}).ref
        ids = [client.create(TENANT, "Waiter", ref, id=f"live-{i}").id for i in range(3)]
        client.wait_ready()
        fuzzer = Fuzzer(fuzz_kernel, channel)
        per_rpc = strategies(ref, [*ids, "ghost"], ["go", "nope"])

        # Meanwhile another tenant's workflow must complete on time.
        bystander: dict[str, Any] = {}
        thread = threading.Thread(target=_bystander, args=(fuzz_kernel, bystander), daemon=True)
        thread.start()

        for name, strategy in per_rpc.items():
            _run(fuzzer, name, strategy)
            _run_raw(fuzzer, name)
        thread.join(120)
        assert bystander.get("took") is not None, bystander.get("error", "the bystander did not finish")

        after = bystander_completes(client, TENANT, within=30.0)
        rss_end = rss_mib(fuzzer.pid)
    total = sum(fuzzer.sent.values())
    print(
        f"\nfuzz: {total} requests in {time.monotonic() - started:.1f} s "
        f"({', '.join(f'{n} {c}' for n, c in sorted(fuzzer.sent.items()))}); codes {dict(fuzzer.codes)}; "
        f"kernel RSS {fuzzer.baseline:.0f} MiB at start, peak {fuzzer.peak:.0f}, end {rss_end:.0f}; "
        f"bystander {bystander['took']:.2f} s during, {after:.2f} s after"
    )
    assert set(fuzzer.sent) == set(ALLOWED)
    assert fuzzer.peak - fuzzer.baseline < RSS_GROWTH_LIMIT_MIB, (fuzzer.baseline, fuzzer.peak)
    crashes = [line for line in fuzz_kernel.lines if "Unexpected [" in line or "tenantflow.server" in line]
    assert not crashes, "\n".join(crashes[:20])


def _options() -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", 64 * MIB), ("grpc.max_receive_message_length", 64 * MIB)]


def _bystander(kernel: KernelProcess, out: dict[str, Any]) -> None:
    try:
        with kernel.client() as client:
            out["took"] = bystander_completes(client, "fuzz-meanwhile", within=30.0)
    except BaseException as exc:  # reported by the main thread
        out["error"] = repr(exc)


def _run(fuzzer: Fuzzer, name: str, strategy: st.SearchStrategy[Message]) -> None:
    @fuzz_settings()
    @given(request=strategy)
    def one(request: Message) -> None:
        fuzzer.check(name, request.SerializeToString(), _short(request))

    one()


def _run_raw(fuzzer: Fuzzer, name: str) -> None:
    @fuzz_settings()
    @given(data=raw_requests(name))
    def one(data: bytes) -> None:
        fuzzer.check(name, data, f"raw bytes {data[:80]!r}")

    one()


# -- the findings, one by one ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "path", "needle"),
    [
        ("Get", [1], "field 'tenant' is not valid UTF-8"),
        ("SendEvent", [3], "field 'type' is not valid UTF-8"),
        ("CreateBatch", [1, 5], "field 'requests.params_json' is not valid UTF-8"),
        ("Publish", [4, 1], "field 'files.key' is not valid UTF-8"),
        ("Watch", [2], "field 'id' is not valid UTF-8"),
    ],
)
def test_invalid_utf8_is_invalid_argument_naming_the_field(
    fuzz_kernel: KernelProcess, name: str, path: list[int], needle: str
) -> None:
    """What a JavaScript client sends for a lone surrogate (CESU-8 bytes) was UNKNOWN "DecodeError"."""
    with grpc.insecure_channel(fuzz_kernel.address) as channel:
        fuzzer = Fuzzer(fuzz_kernel, channel)
        code, details = fuzzer.call(name, with_bad_string(path, b"\xed\xa0\xbd"))
    assert code == Code.INVALID_ARGUMENT, details
    assert needle in details and "UTF-8" in details, details


@pytest.mark.parametrize(
    ("call", "expected", "needle"),
    [
        (lambda c, ref: c.code.Publish(pb.PublishRequest(tenant=TENANT, name="n", files={"w\0.py": b"x=1"})),
         Code.INVALID_ARGUMENT, "control characters"),
        (lambda c, ref: c.code.Publish(pb.PublishRequest(tenant=TENANT, name="n", files={"/etc/x.py": b"x=1"})),
         Code.INVALID_ARGUMENT, "relative paths"),
        (lambda c, ref: c.code.Publish(pb.PublishRequest(tenant=TENANT, name="n", files={"a/../../x.py": b"1"})),
         Code.INVALID_ARGUMENT, "relative paths"),
        (lambda c, ref: c.code.Publish(pb.PublishRequest(tenant=TENANT, name="n", files={"x" * 2000: b"1"})),
         Code.INVALID_ARGUMENT, "the limit is 1024"),
        (lambda c, ref: c.code.Publish(pb.PublishRequest(tenant=TENANT, name="n\n", files={"w.py": b"1"})),
         Code.INVALID_ARGUMENT, "bad code name"),
        (lambda c, ref: c.workflows.Create(pb.CreateRequest(tenant=TENANT, workflow="Waiter", code=ref,
                                                            params_json="[" * DEEP + "]" * DEEP)),
         Code.INVALID_ARGUMENT, "nests arrays and objects 10000 deep; the limit is 64"),
        (lambda c, ref: c.workflows.Create(pb.CreateRequest(tenant=TENANT, workflow="Waiter", code=ref,
                                                            params_json='{"ratio": NaN}')),
         Code.INVALID_ARGUMENT, "NaN is not a JSON number"),
        (lambda c, ref: c.workflows.SendEvent(pb.SendEventRequest(tenant=TENANT, id="ghost", type="go",
                                                                  payload_json="[Infinity]")),
         Code.INVALID_ARGUMENT, "Infinity is not a JSON number"),
        (lambda c, ref: c.workflows.Create(pb.CreateRequest(tenant=TENANT, workflow="Waiter", code=ref,
                                                            id="trailing\n")),
         Code.INVALID_ARGUMENT, "bad instance id"),
        (lambda c, ref: c.workflows.Get(pb.InstanceRef(tenant="x y" * 1_000_000, id="a")),
         Code.INVALID_ARGUMENT, "(3000000 characters)"),
    ],
)  # fmt: skip
def test_reported_bad_input_is_refused_clearly(
    fuzz_kernel: KernelProcess,
    call: Callable[[Client, str], Any],
    expected: grpc.StatusCode,
    needle: str,
) -> None:
    """Each input issue 7 reported (INTERNAL, UNKNOWN, or a status too large for the client to read)."""
    with fuzz_kernel.client() as client:
        ref = client.publish(TENANT, "wf", {"wf.py": source(WAITER)}).ref
        with pytest.raises(grpc.RpcError) as err:
            call(client, ref)
        assert err.value.code() == expected, err.value.details()
        assert needle in (err.value.details() or ""), err.value.details()
        assert len((err.value.details() or "").encode()) <= 1024
        bystander_completes(client, f"{TENANT}-finding", within=30.0)


def test_undecodable_requests_still_need_a_token(tmp_path: Path) -> None:
    """A request that does not decode names no tenant, but is not a way around authentication."""
    token, entry = new_token("ci", ["acme", "acme-*"])
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": [entry]}))
    kernel = KernelProcess(tmp_path / "kernel", [*TEST_LIMITS, "--auth-tokens", str(tokens)])
    kernel.start()
    try:
        bad = with_bad_string([1], b"\xed\xa0\xbd")
        with grpc.insecure_channel(kernel.address) as channel:
            get = channel.unary_unary("/tenantflow.v1.Workflows/Get", request_serializer=None)
            with pytest.raises(grpc.RpcError) as err:
                get(bad, timeout=30)
            assert err.value.code() == Code.UNAUTHENTICATED, err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                get(bad, timeout=30, metadata=[("authorization", f"Bearer {token}")])
            assert err.value.code() == Code.INVALID_ARGUMENT and "UTF-8" in (err.value.details() or "")
        with Client(kernel.address, token=token) as client:
            bystander_completes(client, "acme", within=30.0)
    finally:
        kernel.stop()
