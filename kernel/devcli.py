"""``tenantflow dev run`` and ``tenantflow dev replay``: a workflow file to a verdict, no kernel needed.

Both run the real engine and sandbox against a throwaway store (:mod:`tenantflow.kernel.devrun`):
``dev run`` skips durable time and answers waits with scripted events; ``dev replay`` replays an
exported history (``tenantflow history export``) on the file's code without side effects.
Exit status: 0 complete (run) or clean (replay); 1 errored or terminated (run) or diverged or
errored (replay); 2 when the run cannot go on or the input is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tenantflow.kernel.devrun import Outcome, ScriptedEvent

Describe = Callable[[Any], str]  # a WatchEvent as one line of a timeline (the CLI's watch format)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _params(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError as exc:
        _fail(f'--params is not JSON ({exc}); e.g. --params \'{{"repo": "acme/app"}}\'')
    return None


def _events(items: list[str]) -> list[ScriptedEvent]:
    from tenantflow.kernel.devrun import ScriptedEvent

    events = []
    for item in items:
        type, sep, payload = item.partition("=")
        if not sep or not type:
            _fail(f"--event {item!r}: expected TYPE=JSON, e.g. --event 'approval={{\"ok\": true}}'")
        try:
            events.append(ScriptedEvent(type, json.loads(payload)))
        except ValueError as exc:
            _fail(f"--event {item!r}: the payload after '=' is not JSON ({exc})")
    return events


def _secrets(items: list[str]) -> dict[str, str]:
    """``--secret NAME=VALUE``, or ``--secret NAME`` for the value of environment variable NAME."""
    found = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq:
            if name not in os.environ:
                _fail(f"--secret {name}: give NAME=VALUE, or set the environment variable {name}")
            value = os.environ[name]
        found[name] = value
    return found


def _files(path: str) -> dict[str, bytes]:
    from tenantflow.kernel.devrun import files_of

    try:
        return files_of(Path(path))
    except (OSError, ValueError) as exc:
        _fail(str(exc))
    return {}


def _summary(outcome: Outcome, took: float) -> int:
    from tenantflow.kernel.model import Status

    record = outcome.record
    skipped = (
        f"; {outcome.skipped_seconds:.0f} s of durable time skipped" if outcome.skipped_seconds >= 1 else ""
    )
    if outcome.stuck:
        print(f"stopped after {took:.2f} s: {outcome.stuck} (status {record.status.name.lower()}){skipped}")
        return 2
    print(f"{record.status.name.lower()} in {took:.2f} s{skipped}")
    if record.status == Status.COMPLETE:
        print(json.dumps(outcome.output, indent=2))
        return 0
    if record.error_name:
        print(f"{record.error_name}: {record.error_message}")
    return 1


async def _run(args: argparse.Namespace, describe: Describe) -> int:
    from tenantflow.kernel.devrun import LocalRun
    from tenantflow.kernel.model import HistoryEntry
    from tenantflow.kernel.server import watch_pb

    files, params, events = _files(args.path), _params(args.params), _events(args.event)
    started = time.monotonic()

    def show(entry: HistoryEntry) -> None:
        print(describe(watch_pb(entry)), flush=True)

    async with LocalRun(real_time=args.real_time, secrets=_secrets(args.secret)) as run:
        ref = await run.publish(files, runtime=args.runtime)
        record = await run.start(args.workflow, ref, params)
        outcome = await run.drive(record.id, events, on_entry=show, timeout=args.timeout)
    for event in outcome.undelivered:
        print(f"note: the scripted event of type {event.type!r} was never waited for", file=sys.stderr)
    return _summary(outcome, time.monotonic() - started)


async def _replay(args: argparse.Namespace) -> int:
    from tenantflow.kernel import historyfile
    from tenantflow.kernel.devrun import LocalRun

    files = _files(args.path)
    try:
        history = historyfile.parse(Path(args.history).read_text())
    except (OSError, ValueError) as exc:
        _fail(f"{args.history}: {exc}")
    async with LocalRun() as run:
        ref = await run.publish(files, runtime=args.runtime or history.record.runtime)
        report = await run.replay(history, ref)
    print(f"{report.verdict}: {report.message}")
    return 0 if report.clean else 1


def _main(coroutine: Callable[[], Any]) -> None:
    from tenantflow.kernel.errors import TenantflowError

    logging.getLogger("tenantflow").setLevel(logging.WARNING)  # the throwaway kernel's life is no news
    try:
        code = asyncio.run(coroutine())
    except TenantflowError as exc:  # e.g. the code does not define the workflow, or does not compile
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    raise SystemExit(code)


def add_dev_parser(sub: Any, describe: Describe) -> None:
    """Add ``dev run`` and ``dev replay`` to the CLI's subcommands."""
    dev = sub.add_parser("dev", help="run or replay a workflow file locally, with no kernel to start")
    commands = dev.add_subparsers(dest="dev_command", required=True)
    r = commands.add_parser(
        "run", help="run a workflow through the real engine and sandbox, skipping durable time"
    )
    r.add_argument("path", metavar="FILE_OR_DIR", help="the workflow's .py file, or a folder of them")
    r.add_argument("--workflow", required=True, help="the workflow class to run")
    r.add_argument("--params", default="null", help="the event payload, as JSON (default null)")
    r.add_argument(
        "--event", action="append", default=[], metavar="TYPE=JSON",
        help="an event delivered when the workflow first waits for TYPE (repeatable, in order)",
    )  # fmt: skip
    r.add_argument("--runtime", default="python", help="the sandbox to run in: python (default), python-wasm")
    r.add_argument(
        "--secret", action="append", default=[], metavar="NAME[=VALUE]",
        help="a secret the steps read as ctx.secrets[NAME] (without =VALUE: the environment variable NAME)",
    )  # fmt: skip
    r.add_argument(
        "--real-time",
        action="store_true",
        help="let sleeps, retry back-offs and time-outs take their real time",
    )
    r.add_argument("--timeout", type=float, default=600.0, help="give up after this many real seconds (600)")
    r.set_defaults(func=lambda args: _main(lambda: _run(args, describe)))
    p = commands.add_parser(
        "replay", help="replay an exported history on a workflow file, without side effects"
    )
    p.add_argument("path", metavar="FILE_OR_DIR", help="the new code: a .py file, or a folder of them")
    p.add_argument("history", metavar="HISTORY.json", help="from tenantflow history export")
    p.add_argument("--runtime", default="", help="the sandbox to replay in (default: the history's)")
    p.set_defaults(func=lambda args: _main(lambda: _replay(args)))
