"""The CLI as a person meets it: ordinary mistakes answered without a Python stack trace, help on
every flag, --json on read commands, tracebacks and errors shown whole, watch's stops, code list,
shell completion, and a kernel whose every line is JSON under --log-format json."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tenantflow.kernel.cli import parser
from tests.conftest import TEST_LIMITS, KernelProcess

FAILING = """
from tenantflow.workflow import WorkflowEntrypoint


def lookup(data):
    return data["by"]


class Approve(WorkflowEntrypoint):
    async def run(self, event, step):
        approval = await step.wait_for_event("approval", type="approve", timeout="1 hour")
        return lookup(approval.payload)
"""


def cli(*args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "tenantflow.kernel.cli", *args],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback (most recent call last)" not in result.stderr, result.stderr
    return result


def on(kernel: KernelProcess, tenant: str, command: str, *args: str, code: int = 0) -> str:
    words = command.split()
    result = cli(*words, "--address", kernel.address, "--tenant", tenant, *args, code=code)
    return result.stdout if code == 0 else result.stderr


def test_ordinary_mistakes_are_said_plainly(tmp_path: Path) -> None:
    bad = cli("create", "--tenant", "t", "--workflow", "W", "--code", "c", "--params", "{repo: 1}", code=2)
    assert (
        "argument --params: not valid JSON: Expecting property name enclosed in double quotes at line 1"
        in bad.stderr
    )
    bad = cli("send-event", "--tenant", "t", "i", "go", "--payload", "[1,", code=2)
    assert "argument --payload: not valid JSON" in bad.stderr
    bad = cli("list", "--tenant", "t", "--status", "sleeping", code=2)
    assert "invalid choice: 'sleeping'" in bad.stderr and "waiting" in bad.stderr
    missing = cli("publish", "--tenant", "t", "--name", "n", str(tmp_path / "nope.py"), code=1)
    assert f"error: publish: no such file or directory: {tmp_path / 'nope.py'}" in missing.stderr
    down = cli("status", "--tenant", "t", "x", "--address", "127.0.0.1:9", code=1)
    assert "no kernel answered at 127.0.0.1:9" in down.stderr and "tenantflow serve" in down.stderr
    no_ca = cli("status", "--tenant", "t", "x", "--tls-ca", str(tmp_path / "ca.pem"), code=1)
    assert "No such file or directory" in no_ca.stderr and "ca.pem" in no_ca.stderr


def test_version_and_help_on_every_flag() -> None:
    assert cli("--version").stdout.startswith("tenantflow ")
    missing: list[str] = []

    def walk(p: argparse.ArgumentParser, path: str) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{path} {name}")
            elif not action.help and not isinstance(action, argparse._HelpAction):
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(parser(), "tenantflow")
    assert missing == []
    serve = " ".join(cli("serve", "--help").stdout.split())
    assert "(default: 64)" in serve and "(default: 127.0.0.1:7450)" in serve and "(default: 0.0)" in serve
    assert (
        "--runtime RUNTIME" in cli("publish", "--help").stdout
        and "python-wasm" in cli("publish", "--help").stdout
    )


def test_status_and_watch_show_where_it_failed_whole(
    kernel: KernelProcess, tenant: str, tmp_path: Path
) -> None:
    (tmp_path / "wf.py").write_text(FAILING.lstrip())
    published = json.loads(
        on(kernel, tenant, "publish", "--name", "approve", "--json", str(tmp_path / "wf.py"))
    )
    ref = published["ref"]
    on(kernel, tenant, "create", "--workflow", "Approve", "--code", ref, "--id", "a1")
    waiting = on(kernel, tenant, "watch", "a1", "--until", "waiting")
    assert "status → waiting" in waiting and "⏸ approval" in waiting
    assert json.loads(on(kernel, tenant, "status", "a1", "--json"))["status"] == "STATUS_WAITING"
    long_reason = "x" * 300
    on(kernel, tenant, "send-event", "a1", "approve", "--payload", json.dumps({"why": long_reason}))
    watched = on(kernel, tenant, "watch", "a1")
    assert "status → errored (KeyError: 'by')" in watched
    assert 'File "wf.py", line 5, in lookup' in watched
    status = on(kernel, tenant, "status", "a1")
    assert "KeyError: 'by'" in status and "…" not in status.split("output")[0]
    assert "run() raised:" in status and 'File "wf.py", line 11, in run' in status
    assert long_reason in on(kernel, tenant, "status", "a1", "--wide")
    so_far = on(kernel, tenant, "watch", "a1", "--no-follow", "--json")
    lines = [json.loads(line) for line in so_far.splitlines()]
    assert lines[0]["kind"] == "status" and lines[-1]["id"] == "a1"
    listed = json.loads(on(kernel, tenant, "list", "--status", "errored", "--json"))
    assert [i["id"] for i in listed["instances"]] == ["a1"]
    versions = on(kernel, tenant, "code list")
    assert versions.splitlines()[0].split() == ["name", "digest", "published", "runtime", "workflows"]
    assert "approve" in versions and "Approve" in versions
    assert json.loads(on(kernel, tenant, "code list", "--json"))["versions"][0]["ref"] == ref


def test_schedule_create_prints_the_next_three_fires(
    kernel: KernelProcess, tenant: str, tmp_path: Path
) -> None:
    (tmp_path / "wf.py").write_text(FAILING.lstrip())
    on(kernel, tenant, "publish", "--name", "approve", str(tmp_path / "wf.py"))
    shown = on(kernel, tenant, "schedule create", "every10", "--cron", "* * * * * */10", "--workflow", "Approve",
               "--code", f"artifact://{tenant}/approve", "--paused")  # fmt: skip
    assert "upcoming fires" not in shown  # paused: nothing fires
    shown = json.loads(on(kernel, tenant, "schedule resume", "every10", "--json"))
    fires = shown["upcoming_fires"]
    assert len(fires) == 3 and all(f[17:19] in ("00", "10", "20", "30", "40", "50") for f in fires), fires
    assert "* * * * * */10' every 10 seconds" in " ".join(cli("schedule", "create", "--help").stdout.split())


def test_completion_lists_commands_and_flags(tmp_path: Path) -> None:
    script = tmp_path / "complete.sh"
    script.write_text(cli("completion", "bash").stdout)

    def complete(*words: str) -> list[str]:
        line = " ".join(f"'{w}'" for w in words)
        run = subprocess.run(["bash", "-c", f'source {script}; COMP_WORDS=(tenantflow {line}); '
                              f'COMP_CWORD={len(words)}; _tenantflow; echo "${{COMPREPLY[@]}}"'],
                             capture_output=True, text=True, check=True)  # fmt: skip
        return run.stdout.split()

    assert complete("sch") == ["schedule"]
    assert complete("schedule", "c") == ["create"]
    assert complete("schedule", "create", "n", "--tenant", "acme", "--cr") == ["--cron"]
    assert "--until" in complete("watch", "--")


def test_json_logs_make_every_kernel_line_json(tmp_path: Path) -> None:
    k = KernelProcess(tmp_path / "kernel", [*TEST_LIMITS, "--log-format", "json"])
    k.start()
    try:
        with k.client() as client:
            client.list_code("t")
    finally:
        k.stop()
    messages = [json.loads(line)["message"] for line in k.lines if line]
    assert any("listening on" in m for m in messages) and "tenantflow kernel stopping" in messages


@pytest.mark.parametrize("words", [["status"], ["code", "list"], ["schedule", "list"], ["list"]])
def test_read_commands_take_json(words: list[str]) -> None:
    assert "--json" in cli(*words, "--help").stdout


ROLLBACK = """
from tenantflow.workflow import WorkflowEntrypoint, NonRetryableError


def refund(ctx):
    raise NonRetryableError("the refund API is down")


class Order(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.do("charge", lambda: "ch_1", rollback=refund)
        raise ValueError("out of stock")
"""


def test_rollbacks_read_as_undos(kernel: KernelProcess, tenant: str) -> None:
    from tenantflow.kernel.cli import describe
    from tests.helpers import publish

    with kernel.client() as client:
        client.create(tenant, "Order", publish(client, tenant, ROLLBACK), id="o")
        client.wait(tenant, "o")
        lines = [describe(e)[14:] for e in client.watch(tenant, "o")]
    assert "↶ undo charge  attempt 1" in lines, lines
    assert any(line.startswith("✘ undo charge  attempt 1: NonRetryableError") for line in lines), lines
    assert any(
        line.startswith("↶ rollback started: run() raised (ValueError: out of stock)") for line in lines
    )
    assert "↶ rollback failed: undo 'charge' failed (NonRetryableError: the refund API is down)" in lines
    assert "▶ charge  attempt 1" in lines and lines.count("▶ charge  attempt 1") == 1
    status = on(kernel, tenant, "status", "o")
    assert "rollback failed (after run() raised): NonRetryableError: undo of step 'charge'" in status
    assert "undo charge" in status


def test_the_readme_serve_table_and_serve_help_agree() -> None:
    import re

    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = {o: a for a in sub.choices["serve"]._actions for o in a.option_strings if o.startswith("--")}
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    rows = readme[
        readme.index("| flag | default | meaning |") : readme.index("Health checking")
    ].splitlines()[2:]
    listed: set[str] = set()
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        if len(cells) < 3:
            continue
        flags = re.findall(r"`(--[a-z0-9-]+)", cells[0])
        listed.update(flags)
        shown = [d.strip().strip("`") for d in cells[1].split(",")]
        for flag, text in zip(flags, shown, strict=False) if len(flags) == len(shown) else ():
            default, number = actions[flag].default, re.match(r"-?[0-9.]+", text)
            derived = default == 0 and "(0: " in (actions[flag].help or "")  # 0 stands for a computed value
            if isinstance(default, int | float) and not isinstance(default, bool) and number and not derived:
                assert float(number.group()) == float(default), (flag, text, default)
    assert set(actions) - {"--help"} <= listed, sorted(set(actions) - listed - {"--help"})
