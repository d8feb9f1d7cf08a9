"""Publish bombs (issue 7, finding 7): tenant code is parsed and compiled in a limited child process,
never in the kernel. A bomb fails its own Publish with INVALID_ARGUMENT or RESOURCE_EXHAUSTED and a
clear message, the kernel's memory stays flat, and other tenants publish and run meanwhile."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from tenantflow.client import Client, TenantflowRpcError
from tests.conftest import KernelProcess
from tests.helpers import publish
from tests.security.bystander import BYSTANDER, bystander_completes

MiB = 1024 * 1024
RSS_MARGIN = 400 * MiB  # the request itself and its copies; compiling in the kernel took 4.3 GiB
OTHER_PUBLISH_WITHIN = 5.0  # seconds for another tenant's tiny Publish while a bomb is inspected
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
LIMIT_HIT = r"(used more than \d+ s of CPU|needed more than \d+ MiB of memory|took more than \d+ s): split it"
WORKFLOW = """
from tenantflow.workflow import WorkflowEntrypoint

class W(WorkflowEntrypoint):
    def run(self, event, step):
        return 1
"""

# name: (source builder, status, message pattern)
PYTHON_BOMBS: dict[str, tuple[Callable[[], str], grpc.StatusCode, str]] = {
    "list-literal-9MB": (lambda: "X = [" + "1," * 4_500_000 + "]\n", EXHAUSTED, r"MiB of memory: split it"),
    "plus-chain-6MB": (lambda: "X = " + "1+" * 3_000_000 + "1\n", EXHAUSTED, LIMIT_HIT),
    "nested-parentheses": (lambda: "X = " + "(" * 100_000 + "1" + ")" * 100_000 + "\n", INVALID,
                           r"wf\.py, line 1: too many nested parentheses"),
    "nested-brackets": (lambda: "X = " + "[" * 100_000 + "]" * 100_000 + "\n", INVALID,
                        r"wf\.py, line 1: too many nested parentheses"),
    "nested-unary": (lambda: "X = " + "-" * 1_000_000 + "1\n", INVALID, r"nested too deeply"),
    "attribute-chain": (lambda: "X = a" + ".b" * 2_000_000 + "\n", INVALID, r"nested too deeply"),
    "huge-f-string-literal": (lambda: "X = f'" + "{1}" * 2_500_000 + "'\n", EXHAUSTED, LIMIT_HIT),
}  # fmt: skip

# Only parsed, never run: still fine, and cheap.
PYTHON_HARMLESS: dict[str, Callable[[], str]] = {
    "huge-string-literal": lambda: "X = '" + "a" * 9_000_000 + "'\n",
    "while-true-in-decorator-and-default": lambda: (
        "def forever(f=(lambda: [0 for _ in iter(int, 1)])()):\n    return f\n\n"
        "@forever\ndef g(x=exec('while True: pass')):\n    pass\n"
    ),
}


def _leb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _section(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + _leb(len(body)) + body


def _wasm_with_body(code: bytes) -> bytes:
    """A module exporting ``memory`` and ``workflow_Big`` () -> () whose body is ``code``."""
    body = b"\x00" + code + b"\x0b"  # no locals
    return b"\0asm\1\0\0\0" + b"".join([
        _section(1, b"\x01\x60\x00\x00"),  # type () -> ()
        _section(3, b"\x01\x00"),  # one function of that type
        _section(5, b"\x01\x00\x01"),  # one memory, min 1 page
        _section(7, b"\x02" + _leb(6) + b"memory\x02\x00" + _leb(12) + b"workflow_Big\x00\x00"),
        _section(10, b"\x01" + _leb(len(body)) + body),
    ])  # fmt: skip


WASM_BOMBS: dict[str, tuple[Callable[[], dict[str, bytes]], grpc.StatusCode, str]] = {
    "garbage": (lambda: {"m.wasm": b"\0asm\1\0\0\0" + bytes(range(256)) * 30_000}, INVALID,
                r"m\.wasm: not a valid WebAssembly module"),
    "not-wasm-at-all": (lambda: {"m.wasm": b"\x7fELF" * 2_000_000}, INVALID, r"not a valid WebAssembly module"),
    "2M-nested-blocks-6MB": (
        lambda: {"m.wasm": _wasm_with_body(b"\x02\x40" * 2_000_000 + b"\x0b" * 2_000_000)}, EXHAUSTED, LIMIT_HIT
    ),
    "huge-function": (lambda: {"m.wasm": _wasm_with_body(b"\x41\x00\x1a" * 3_000_000)}, INVALID,
                      r"function body size .* exceeds limit"),
}  # fmt: skip


def rss(kernel: KernelProcess) -> int:
    """The kernel process's resident memory in bytes."""
    assert kernel.proc is not None
    status = Path(f"/proc/{kernel.proc.pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert match is not None
    return int(match.group(1)) * 1024


class PeakRss:
    """Samples the kernel's RSS in the background; ``peak`` is the highest seen."""

    def __init__(self, kernel: KernelProcess) -> None:
        self.kernel = kernel
        self.peak = rss(kernel)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss(self.kernel))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def attack(
    kernel: KernelProcess, client: Client, tenant: str, runtime: str, files: dict[str, bytes]
) -> tuple[BaseException | None, float]:
    """Publish ``files`` in a thread while another tenant publishes a tiny module and runs the
    bystander; return the bomb's error (None if accepted) and how long it took."""
    tenant = tenant[:40]  # so that the other tenants' names (tenant + suffix, cut at 60) differ
    others = "python" if runtime == "wasm" else runtime
    before = rss(kernel)
    sampler = PeakRss(kernel)
    outcome: list[BaseException | None] = []
    started = time.monotonic()

    def bomb() -> None:
        try:
            client.publish(tenant, "bomb", files, runtime=runtime)
            outcome.append(None)
        except TenantflowRpcError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=bomb)
    thread.start()
    try:
        time.sleep(0.2)  # the bomb is being inspected (or already refused)
        t0 = time.monotonic()
        publish(client, f"{tenant}-other", BYSTANDER, name="tiny", runtime=others)
        other = time.monotonic() - t0
        assert other < OTHER_PUBLISH_WITHIN, f"another tenant's tiny Publish took {other:.2f} s"
        bystander_completes(client, tenant, runtime=others)
    finally:
        thread.join(120)
        took = time.monotonic() - started
        peak = sampler.stop()
    assert not thread.is_alive(), "the bomb's Publish did not return within 120 s"
    assert peak - before < RSS_MARGIN, f"kernel RSS went {before / MiB:.0f} -> {peak / MiB:.0f} MiB"
    return outcome[0], took


def assert_refused(error: BaseException | None, status: grpc.StatusCode, says: str) -> None:
    assert isinstance(error, TenantflowRpcError), f"the bomb was accepted: {error}"
    assert error.code == status, error
    assert re.search(says, error.message), error.message


@pytest.mark.parametrize("runtime", ["python", "python-wasm"])
@pytest.mark.parametrize("bomb", list(PYTHON_BOMBS))
def test_python_bomb_fails_its_own_publish(
    kernel: KernelProcess, client: Client, tenant: str, runtime: str, bomb: str
) -> None:
    build, status, says = PYTHON_BOMBS[bomb]
    files = {"wf.py": (build() + WORKFLOW).encode()}
    error, _ = attack(kernel, client, tenant, runtime, files)
    assert_refused(error, status, says)


@pytest.mark.parametrize("runtime", ["python", "python-wasm"])
@pytest.mark.parametrize("case", list(PYTHON_HARMLESS))
def test_code_is_only_parsed_never_run(
    kernel: KernelProcess, client: Client, tenant: str, runtime: str, case: str
) -> None:
    files = {"wf.py": (PYTHON_HARMLESS[case]() + WORKFLOW).encode()}
    error, took = attack(kernel, client, tenant, runtime, files)
    assert error is None, error
    assert took < 60, f"publishing took {took:.1f} s"


@pytest.mark.parametrize("bomb", list(WASM_BOMBS))
def test_raw_wasm_bomb_fails_its_own_publish(
    kernel: KernelProcess, client: Client, tenant: str, bomb: str
) -> None:
    build, status, says = WASM_BOMBS[bomb]
    error, _ = attack(kernel, client, tenant, "wasm", build())
    assert_refused(error, status, says)


def test_one_tenants_bombs_queue_behind_each_other_not_others(
    kernel: KernelProcess, client: Client, tenant: str
) -> None:
    """Six bombs at once from one tenant hold one check slot: others still publish at once."""
    tenant = tenant[:40]
    files = {"wf.py": (PYTHON_BOMBS["list-literal-9MB"][0]() + WORKFLOW).encode()}
    errors: list[BaseException] = []

    def bomb() -> None:
        try:
            client.publish(tenant, "bomb", files)
        except TenantflowRpcError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=bomb) for _ in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    for i in range(3):
        t0 = time.monotonic()
        publish(client, f"{tenant}-other{i}", BYSTANDER, name="tiny")
        assert time.monotonic() - t0 < OTHER_PUBLISH_WITHIN
    bystander_completes(client, tenant)
    for thread in threads:
        thread.join(300)
    assert len(errors) == 6 and all(e.code == EXHAUSTED for e in errors)  # type: ignore[attr-defined]


def test_cancelled_bombs_keep_their_slot_until_their_check_ends(
    kernel: KernelProcess, client: Client, tenant: str
) -> None:
    """A tenant that gives up on each bomb (1 s deadline) and sends the next still has only one
    check running: the others' Publish does not queue behind a pile of abandoned checks."""
    tenant = tenant[:40]
    files = {"wf.py": (PYTHON_BOMBS["list-literal-9MB"][0]() + WORKFLOW).encode()}
    with Client(kernel.address, timeout=1.0) as impatient:
        for _ in range(6):
            with pytest.raises(TenantflowRpcError) as err:
                impatient.publish(tenant, "bomb", files)
            assert err.value.code in (grpc.StatusCode.DEADLINE_EXCEEDED, EXHAUSTED), err.value
    for i in range(2):
        t0 = time.monotonic()
        publish(client, f"{tenant}-other{i}", BYSTANDER, name="tiny")
        assert time.monotonic() - t0 < OTHER_PUBLISH_WITHIN
    bystander_completes(client, tenant)
