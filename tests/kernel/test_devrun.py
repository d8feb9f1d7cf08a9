"""Local runs and replays: ``tenantflow dev run``, ``dev replay``, ``history export`` and the test kit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import json_format

from tenantflow.client import Client
from tenantflow.kernel.devrun import files_of
from tenantflow.testing import Event, WorkflowTester
from tenantflow.v1 import tenantflow_pb2 as pb
from tests.conftest import KernelProcess
from tests.helpers import publish, source, wait_for

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "examples" / "ci_pipeline"

ORDER = """
from tenantflow.workflow import WorkflowEntrypoint

class Order(WorkflowEntrypoint):
    def run(self, event, step):
        item = step.do("reserve", lambda: {"item": event.payload["item"]})
        step.sleep("cool-off", "365 days")
        paid = step.wait_for_event("payment", type="paid", timeout="7 days")
        return step.do("ship", lambda: [item["item"], paid["payload"]["amount"]])
"""


def tenantflow(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tenantflow.kernel.cli", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_dev_run_answers_the_approval_and_prints_the_timeline() -> None:
    done = tenantflow(
        "dev", "run", str(PIPELINE), "--workflow", "Pipeline", "--params", '{"repo": "acme/app"}',
        "--event", 'deploy-approval={"approved": true, "by": "ana"}', "--secret", "DEPLOY_TOKEN=dev-t0ken",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "✘ test  attempt 1: ConnectionError" in done.stdout
    assert "⏸ approval  waiting for an event of type 'deploy-approval'" in done.stdout
    assert "complete in" in done.stdout and '"approved_by": "ana"' in done.stdout
    assert "with token ***" in done.stdout and "dev-t0ken" not in done.stdout
    assert "Traceback" not in done.stderr


def test_dev_run_skips_a_year_of_sleep_and_exits_1_on_error(tmp_path: Path) -> None:
    (tmp_path / "order.py").write_text(source(ORDER))
    done = tenantflow("dev", "run", str(tmp_path), "--workflow", "Order", "--params", '{"item": "book"}',
                      "--event", 'paid={"amount": 12}')  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "durable time skipped" in done.stdout and '"book"' in done.stdout
    # no payment: the 7-day time-out passes at once and the run errors
    done = tenantflow(
        "dev", "run", str(tmp_path / "order.py"), "--workflow", "Order", "--params", '{"item": "b"}'
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "EventTimeoutError" in done.stdout


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--params", "{oops"], "--params is not JSON"),
        (["--event", "paid"], "expected TYPE=JSON"),
        (["--event", "paid={x"], "the payload after '=' is not JSON"),
    ],
)
def test_dev_run_refuses_bad_input_without_a_traceback(args: list[str], said: str) -> None:
    done = tenantflow("dev", "run", str(PIPELINE), "--workflow", "Pipeline", *args)
    assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr


def test_dev_run_names_a_missing_file_and_an_unknown_workflow(tmp_path: Path) -> None:
    done = tenantflow("dev", "run", str(tmp_path / "nope.py"), "--workflow", "Pipeline")
    assert done.returncode == 2 and "does not exist" in done.stderr and "Traceback" not in done.stderr
    done = tenantflow("dev", "run", str(PIPELINE), "--workflow", "Nope")
    assert done.returncode == 2 and "defines no workflow class 'Nope'" in done.stderr, done.stderr


def test_an_exported_history_replays_clean_on_compatible_code_and_diverges_on_other(
    kernel: KernelProcess, client: Client, tenant: str, tmp_path: Path
) -> None:
    ref = publish(client, tenant, ORDER)
    inst = client.create(tenant, "Order", ref, params={"item": "book"})
    wait_for(lambda: client.get(tenant, inst.id).status == pb.STATUS_WAITING)  # the year-long cool-off
    history = tmp_path / "order.json"
    done = tenantflow(
        "history", "export", "--address", kernel.address, "--tenant", tenant, inst.id, "-o", str(history)
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(history.read_text())["format"] == "tenantflow.history.v1"

    compatible = tmp_path / "v2"
    compatible.mkdir()
    new_output = '{"item": item["item"], "paid": paid["payload"]["amount"]}'  # what ship returns changes
    (compatible / "order.py").write_text(
        source(ORDER).replace('[item["item"], paid["payload"]["amount"]]', new_output)
    )
    done = tenantflow("dev", "replay", str(compatible), str(history))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("clean:") and "go on at step cool-off (sleep)" in done.stdout

    diverging = tmp_path / "v3"
    diverging.mkdir()
    (diverging / "order.py").write_text(source(ORDER).replace('"reserve"', '"hold"'))
    done = tenantflow("dev", "replay", str(diverging), str(history))
    assert done.returncode == 1
    assert done.stdout.startswith("diverged:") and "'reserve'" in done.stdout and "'hold'" in done.stdout


def test_the_test_kit_runs_in_the_python_sandbox_too() -> None:
    with WorkflowTester(PIPELINE / "pipeline.py", runtime="python") as tester:
        run = tester.run(
            "Pipeline",
            params={"repo": "acme/app"},
            events=[Event("deploy-approval", {"approved": True, "by": "ana"})],
        )
    assert run.status == "complete" and run.step("test").attempts == 2


def test_the_test_kit_replays_a_folder_of_histories(
    kernel: KernelProcess, client: Client, tenant: str, tmp_path: Path
) -> None:
    ref = publish(client, tenant, ORDER)
    inst = client.create(tenant, "Order", ref, params={"item": "pen"})
    wait_for(lambda: client.get(tenant, inst.id).status == pb.STATUS_WAITING)
    (tmp_path / "histories").mkdir()
    (tmp_path / "histories" / "pen.json").write_text(
        json_format.MessageToJson(client.export_history(tenant, inst.id))
    )
    (tmp_path / "order.py").write_text(source(ORDER))
    with WorkflowTester(tmp_path / "order.py") as tester:
        reports = tester.replay_folder(tmp_path / "histories")
    assert list(reports) == ["pen.json"] and reports["pen.json"].clean, reports


def test_a_folder_is_published_without_its_tests(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "pkg").mkdir()
    for name in (
        "flow.py",
        "pkg/util.py",
        "tests/test_flow.py",
        "test_other.py",
        "flow_test.py",
        "conftest.py",
        ".hidden.py",
    ):
        (tmp_path / name).write_text("x = 1\n")
    assert sorted(files_of(tmp_path)) == ["flow.py", "pkg/util.py"]


def test_dev_run_runs_in_python_wasm_too() -> None:
    done = tenantflow(
        "dev", "run", str(PIPELINE), "--workflow", "Pipeline", "--params", '{"repo": "acme/app"}', "--runtime",
        "python-wasm", "--event", 'deploy-approval={"approved": true, "by": "ana"}', "--secret", "DEPLOY_TOKEN=t0k3n",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"approved_by": "ana"' in done.stdout
