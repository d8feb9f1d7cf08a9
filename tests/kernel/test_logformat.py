"""``--log-format json``: every line a live kernel writes to stderr is one JSON object, with tenant,
instance, step and node where known; text stays the default."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

from tenantflow.client import Client
from tenantflow.kernel import logformat
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import TEST_LIMITS, KernelProcess
from tests.helpers import publish, wait_for

SLOW = """
import time
from tenantflow.workflow import WorkflowEntrypoint

class Slow(WorkflowEntrypoint):
    def run(self, event, step):
        step.do("slow", lambda: time.sleep(30), retries={"limit": 0}, timeout=0.5)
"""


def test_every_stderr_line_of_a_json_kernel_is_a_json_object(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "tenantflow.kernel.cli", "serve", "--listen", "127.0.0.1:0",
           "--data-dir", str(tmp_path), "--log-format", "json", "--node-id", "node-7", *TEST_LIMITS]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    out: list[str] = []
    err: list[str] = []
    assert proc.stdout is not None and proc.stderr is not None
    pumps = [threading.Thread(target=lambda s=s, d=d: d.extend(s), daemon=True)  # type: ignore[misc]
             for s, d in ((proc.stdout, out), (proc.stderr, err))]  # fmt: skip
    for pump in pumps:
        pump.start()
    try:
        wait_for(lambda: any("listening on" in line for line in out), timeout=60)
        address = next(line for line in out if "listening on" in line).split("listening on ")[1].split()[0]
        with Client(address) as client:
            ref = publish(client, "acme", SLOW)
            client.create("acme", "Slow", ref, id="slowpoke")
            assert client.wait("acme", "slowpoke").status == pb.STATUS_ERRORED
    finally:
        proc.terminate()
        proc.wait(30)
        for pump in pumps:
            pump.join(10)
        proc.stdout.close()
        proc.stderr.close()
    assert err, "the kernel logged nothing"
    lines = [json.loads(line) for line in err]  # every line parses
    for line in lines:
        assert {"time", "level", "logger", "message"} <= line.keys() and line["node"] == "node-7"
    started = [line for line in lines if line["message"].startswith("kernel started")]
    assert started and started[0]["level"] == "info" and started[0]["logger"] == "tenantflow.kernel"
    (kill,) = [line for line in lines if line["logger"] == "tenantflow.sandbox"]
    assert kill["tenant"] == "acme" and kill["instance"] == "slowpoke" and kill["step"] == "slow"
    assert "timeout" in kill["message"]


def test_text_stays_the_default(kernel: KernelProcess) -> None:
    assert any(" INFO tenantflow.kernel: kernel started" in line for line in kernel.lines)


def test_json_formatter_fields_context_and_exceptions() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logformat.JsonFormatter(node="n1"))
    logger = logging.getLogger("tenantflow.test-logformat")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        tokens = logformat.bind(tenant="t", instance="i")
        try:
            logger.warning("two\nlines %s", "here")
            try:
                raise ValueError("boom")
            except ValueError:
                logger.exception("failed", extra={"step": "charge"})
        finally:
            logformat.unbind(tokens)
        logger.info("outside")
    finally:
        logger.removeHandler(handler)
    first, second, third = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "two\nlines here" and first["level"] == "warning"
    assert (first["tenant"], first["instance"], first["node"]) == ("t", "i", "n1") and "step" not in first
    assert second["step"] == "charge" and "ValueError: boom" in second["exception"]
    assert "tenant" not in third and logformat.context() == {}
