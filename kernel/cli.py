"""``tenantflow``: run the kernel (``serve``) and drive it (publish, create, status, list, watch ...)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tenantflow.kernel.devcli import add_dev_parser
from tenantflow.kernel.serve import COUNT_OR_ZERO, DEFAULT_ADDRESS, add_serve_parser


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain-text table with aligned columns."""
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _short(text: str, width: int = 60) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _cmd_token(args: argparse.Namespace) -> None:
    from tenantflow.kernel.auth import new_token

    tenants = [t.strip() for t in args.tenants.split(",") if t.strip()]
    if not tenants:
        raise SystemExit("error: --tenants needs at least one tenant or glob")
    token, entry = new_token(args.name, tenants)
    print(table([[args.name, token]], ["name", "token (shown once; give it to its holder)"]))
    print('\nadd to the --auth-tokens file\'s "tokens" list:')
    print(json.dumps(entry))


# -- client commands --------------------------------------------------------------------------------
def _client(args: argparse.Namespace) -> Any:
    from tenantflow.client import Client

    ca = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    return Client(args.address, token=args.token or None, tls=args.tls, tls_ca=ca)


def _status(status: int) -> str:
    from tenantflow.client._client import status_name

    return status_name(status)


def _print_instance(inst: Any) -> None:
    print(table([
        ["tenant", inst.tenant], ["id", inst.id], ["workflow", inst.workflow], ["code", inst.code],
        ["status", _status(inst.status)], ["created", inst.created_at], ["updated", inst.updated_at],
        ["output", _short(inst.output_json or "-", 100)],
        ["error", f"{inst.error.name}: {_short(inst.error.message, 100)}" if inst.error.name else "-"],
        *([["parent", inst.parent_id]] if inst.parent_id else []),
        *([["concurrency", f"at most {inst.concurrency_limit} at once, key {inst.concurrency_key!r}"]]
          if inst.concurrency_limit else []),
        *([["children", _short(", ".join(inst.child_ids), 100)]] if inst.child_ids else []),
        *([["rollback", f"{inst.rollback.status} ({inst.rollback.reason})" + (
            f": {inst.rollback.error.name}: {_short(inst.rollback.error.message, 80)}" if inst.rollback.error.name else "")]]
          if inst.HasField("rollback") else []),
    ], ["field", "value"]))  # fmt: skip
    if inst.steps:
        print()
        rows = [[s.name + (f" #{s.occurrence}" if s.occurrence else ""), s.kind, s.status, s.attempts,
                 _short(s.output_json or (f"{s.error.name}: {s.error.message}" if s.error.name else "") or s.wake_at)]
                for s in inst.steps]  # fmt: skip
        print(table(rows, ["step", "kind", "status", "attempts", "output / error"]))


def _cmd_publish(args: argparse.Namespace) -> None:
    files: dict[str, bytes] = {}
    for name in args.files:
        path = Path(name)
        if path.is_dir():
            for file in sorted(path.rglob("*.py")):
                files[file.relative_to(path).as_posix()] = file.read_bytes()
        else:
            files[path.name] = path.read_bytes()
    with _client(args) as client:
        version = client.publish(args.tenant, args.name, files, runtime=args.runtime)
    print(
        table([[version.ref, version.runtime, ", ".join(version.workflows)]], ["ref", "runtime", "workflows"])
    )


def _cmd_create(args: argparse.Namespace) -> None:
    params = json.loads(args.params) if args.params else None
    with _client(args) as client:
        inst = client.create(args.tenant, args.workflow, args.code, params=params, id=args.id or "",
                             concurrency_key=args.concurrency_key, concurrency_limit=args.concurrency_limit)  # fmt: skip
    print(table([[inst.id, _status(inst.status), inst.code]], ["id", "status", "pinned code"]))


def _print_schedule(s: Any) -> None:
    from tenantflow.v1 import tenantflow_pb2 as pb

    print(table([
        ["tenant", s.tenant], ["name", s.name], ["cron", s.cron], ["time zone", s.time_zone or "UTC"],
        ["workflow", s.workflow], ["code", s.code], ["params", _short(s.params_json or "-", 100)],
        ["overlap", pb.OverlapPolicy.Name(s.overlap).removeprefix("OVERLAP_POLICY_").lower()],
        ["catch-up", pb.CatchupPolicy.Name(s.catchup).removeprefix("CATCHUP_POLICY_").lower()
         + f" (window {s.catchup_window_seconds} s)"],
        ["paused", "yes" if s.paused else "no"], ["next fire", s.next_fire or "-"],
        ["last fire", s.last_fire or "-"], ["last instance", s.last_instance_id or "-"],
        ["fires", s.fires], ["skipped", s.skipped_fires], ["last error", _short(s.last_error or "-", 100)],
    ], ["field", "value"]))  # fmt: skip


def _cmd_schedule(args: argparse.Namespace) -> None:
    with _client(args) as client:
        action = args.schedule_command
        if action == "create":
            params = json.loads(args.params) if args.params else None
            _print_schedule(client.create_schedule(
                args.tenant, args.name, args.cron, args.workflow, args.code, params, time_zone=args.time_zone,
                overlap=args.overlap, catchup=args.catchup, catchup_window=args.catchup_window, paused=args.paused,
            ))  # fmt: skip
        elif action == "list":
            rows = [[s.name, s.cron, s.time_zone or "UTC", s.workflow, "paused" if s.paused else s.next_fire,
                     s.last_instance_id or "-", s.fires] for s in client.iter_schedules(args.tenant)]  # fmt: skip
            print(
                table(rows, ["name", "cron", "time zone", "workflow", "next fire", "last instance", "fires"])
            )
        elif action == "delete":
            client.delete_schedule(args.tenant, args.name)
            print(table([[args.name, "deleted (its instances are kept)"]], ["schedule", "status"]))
        else:  # get | pause | resume
            method = {
                "get": client.get_schedule,
                "pause": client.pause_schedule,
                "resume": client.resume_schedule,
            }
            _print_schedule(method[action](args.tenant, args.name))


def _cmd_status(args: argparse.Namespace) -> None:
    with _client(args) as client:
        _print_instance(client.get(args.tenant, args.id))


def _cmd_list(args: argparse.Namespace) -> None:
    from tenantflow.v1 import tenantflow_pb2 as pb

    status = pb.Status.Value("STATUS_" + args.status.upper()) if args.status else 0
    with _client(args) as client:
        page = client.list(args.tenant, status=status, page_size=args.limit, page_token=args.page_token or "")
    rows = [[i.id, i.workflow, _status(i.status), i.created_at, i.code] for i in page.instances]
    print(table(rows, ["id", "workflow", "status", "created", "code"]))
    if page.next_page_token:
        print(f"\nmore: --page-token {page.next_page_token}")


def _cmd_send_event(args: argparse.Namespace) -> None:
    payload = json.loads(args.payload) if args.payload else None
    with _client(args) as client:
        seq = client.send_event(args.tenant, args.id, args.type, payload)
    print(f"event {args.type!r} delivered to {args.id} (inbox position {seq})")


def describe(event: Any) -> str:
    """One line of a watched timeline."""
    kind = event.kind
    if kind == "status":
        text = f"status → {_status(event.status)}" + (f" ({event.message})" if event.message else "")
    elif kind == "step_started":
        text = f"▶ {event.step}  attempt {event.attempt}"
    elif kind == "step_completed":
        text = f"✔ {event.step}" + (f"  {event.message}" if event.message else "")
    elif kind == "step_failed":
        text = (
            f"✘ {event.step}" + (f"  attempt {event.attempt}" if event.attempt else "") + f": {event.message}"
        )
    elif kind == "step_retrying":
        text = f"↻ {event.step}  {event.message}"
    elif kind in ("sleeping", "waiting"):
        text = f"⏸ {event.step}  {kind} {event.message}"
    elif kind == "log":
        text = f"│ {event.message}"
    elif kind in ("child_created", "child_ended"):
        text = f"⎇ {event.step + '  ' if event.step else ''}{event.message}"
    elif kind.startswith("rollback_"):
        text = f"↶ {kind.removeprefix('rollback_')}: {event.message}"
    else:
        text = f"{kind}: {event.message}"
    return f"{event.at[11:23]}  {text}"


def _cmd_watch(args: argparse.Namespace) -> None:
    with _client(args) as client:
        for event in client.watch(args.tenant, args.id):
            print(describe(event), flush=True)
        _print_instance(client.get(args.tenant, args.id))


def _cmd_upgrade(args: argparse.Namespace) -> None:
    if not args.instance and not args.workflow:
        raise SystemExit(
            "error: name the instances (--instance ID ...) or a workflow class (--workflow NAME)"
        )
    with _client(args) as client:
        outcomes = client.upgrade(args.tenant, args.to, args.instance, args.workflow, args.dry_run)
    rows = [[o.id, o.result, o.step, o.reason] for o in outcomes]
    print(table(rows, ["id", "result", "step", "reason"]) if rows else "no live instance matched")


def _cmd_history_export(args: argparse.Namespace) -> None:
    from google.protobuf import json_format

    with _client(args) as client:
        text = json_format.MessageToJson(client.export_history(args.tenant, args.id)) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
        print(f"wrote the history of {args.id} to {args.output}", file=sys.stderr)


def _control(action: str) -> Any:
    def run(args: argparse.Namespace) -> None:
        with _client(args) as client:
            if action == "restart":
                inst = client.restart(args.tenant, args.id, from_step=args.from_step or "")
            elif action == "terminate":
                inst = client.terminate(
                    args.tenant, args.id, rollback=args.rollback, keep_children=args.keep_children
                )
            elif action == "delete":
                client.delete(args.tenant, args.id)
                print(table([[args.id, "deleted"]], ["id", "status"]))
                return
            else:
                inst = getattr(client, action)(args.tenant, args.id)
        print(table([[inst.id, _status(inst.status)]], ["id", "status"]))

    return run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tenantflow", description="Durable execution of tenants' own workflow code."
    )
    sub = p.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    t = sub.add_parser("token", help="make a bearer token and its --auth-tokens entry")
    t.add_argument("--name", required=True, help="who holds it, e.g. 'platform-backend'")
    t.add_argument(
        "--tenants", required=True, help="comma-separated tenants or globs it may act for ('*': all)"
    )
    t.set_defaults(func=_cmd_token)

    def client_parser(name: str, help: str, within: Any = None) -> argparse.ArgumentParser:
        c = (within or sub).add_parser(name, help=help)
        c.add_argument("--address", default=os.environ.get("TENANTFLOW_ADDRESS", DEFAULT_ADDRESS))
        c.add_argument(
            "--token",
            default=os.environ.get("TENANTFLOW_TOKEN", ""),
            help="bearer token, for a kernel started with --auth-tokens (default $TENANTFLOW_TOKEN)",
        )
        c.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's roots")
        c.add_argument(
            "--tls-ca",
            default=os.environ.get("TENANTFLOW_TLS_CA", ""),
            help="connect with TLS, trusting this PEM CA file (default $TENANTFLOW_TLS_CA)",
        )
        c.add_argument("--tenant", required=True)
        return c

    c = client_parser("publish", "publish tenant code (files or directories of .py files)")
    c.add_argument("--name", required=True)
    c.add_argument("--runtime", default="python")
    c.add_argument("files", nargs="+")
    c.set_defaults(func=_cmd_publish)
    c = client_parser("create", "create an instance")
    c.add_argument("--workflow", required=True)
    c.add_argument("--code", required=True)
    c.add_argument("--id")
    c.add_argument("--params", help="JSON")
    c.add_argument(
        "--concurrency-limit",
        type=COUNT_OR_ZERO,
        default=0,
        help="at most this many instances of the workflow (and key) run at once; the rest queue",
    )
    c.add_argument("--concurrency-key", default="", help="e.g. a customer id; needs --concurrency-limit")
    c.set_defaults(func=_cmd_create)
    schedule = sub.add_parser("schedule", help="cron schedules that create instances")
    schedules = schedule.add_subparsers(dest="schedule_command", required=True)
    c = client_parser("create", "create a schedule", schedules)
    c.add_argument("name")
    c.add_argument(
        "--cron", required=True, help="5 fields, or 6 with seconds last: '0 9 * * 1-5', '*/10 * * * * *'"
    )
    c.add_argument("--time-zone", default="", help="IANA name, e.g. Europe/Paris (default UTC)")
    c.add_argument("--workflow", required=True)
    c.add_argument("--code", required=True)
    c.add_argument("--params", help="JSON")
    c.add_argument(
        "--overlap",
        choices=["skip", "allow"],
        default="skip",
        help="while the previous fire's instance is live: skip the fire (default) or start another",
    )
    c.add_argument(
        "--catchup",
        choices=["skip", "run_once"],
        default="skip",
        help="fires missed while no kernel ran: skip them (default) or run once",
    )
    c.add_argument(
        "--catchup-window",
        type=COUNT_OR_ZERO,
        default=0,
        help="seconds after which a fire counts as missed (default 60)",
    )
    c.add_argument("--paused", action="store_true", help="create it paused")
    c.set_defaults(func=_cmd_schedule)
    c = client_parser("list", "list a tenant's schedules", schedules)
    c.set_defaults(func=_cmd_schedule)
    for action in ("get", "pause", "resume", "delete"):
        c = client_parser(action, f"{action} a schedule", schedules)
        c.add_argument("name")
        c.set_defaults(func=_cmd_schedule)
    c = client_parser("status", "show an instance and its steps")
    c.add_argument("id")
    c.set_defaults(func=_cmd_status)
    c = client_parser("list", "list a tenant's instances")
    c.add_argument("--status", help="queued, running, paused, errored, terminated, complete, waiting ...")
    c.add_argument("--limit", type=int, default=50)
    c.add_argument("--page-token")
    c.set_defaults(func=_cmd_list)
    c = client_parser("send-event", "send an event to an instance")
    c.add_argument("id")
    c.add_argument("type")
    c.add_argument("--payload", help="JSON")
    c.set_defaults(func=_cmd_send_event)
    c = client_parser("watch", "follow an instance's steps live until it ends")
    c.add_argument("id")
    c.set_defaults(func=_cmd_watch)
    history = sub.add_parser("history", help="an instance's history, for replay against new code")
    c = client_parser(
        "export", "write an instance's journal, inbox and timeline as JSON (for tenantflow dev replay)",
        history.add_subparsers(dest="history_command", required=True),
    )  # fmt: skip
    c.add_argument("id")
    c.add_argument("--output", "-o", default="-", help="the file to write (default: standard output)")
    c.set_defaults(func=_cmd_history_export)
    c = client_parser("upgrade", "move live instances to new code, each only if its history replays on it")
    c.add_argument(
        "--to", required=True, metavar="REF", help="the code to move to (an unpinned ref is pinned)"
    )
    c.add_argument(
        "--instance", action="append", default=[], metavar="ID", help="an instance to move (repeatable)"
    )
    c.add_argument("--workflow", default="", help="move every live instance of this workflow class")
    c.add_argument("--dry-run", action="store_true", help="replay and report only; change nothing")
    c.set_defaults(func=_cmd_upgrade)
    add_dev_parser(sub, describe)
    for action in ("pause", "resume", "terminate", "restart", "delete"):
        c = client_parser(action, f"{action} an instance")
        c.add_argument("id")
        if action == "restart":
            c.add_argument("--from-step", help="rerun from this step instead of from the start")
        if action == "terminate":
            c.add_argument("--rollback", action="store_true", help="run the undos of completed steps first")
            c.add_argument(
                "--keep-children",
                action="store_true",
                help="leave its live children running (default: terminate them)",
            )
        c.set_defaults(func=_control(action))
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if hasattr(args, "node_id") and args.node_id is None:  # serve without --node-id
        from tenantflow.kernel.config import default_data_dir, default_node_id

        data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
        args.node_id = args.node_id or default_node_id(data_dir)
    from tenantflow.kernel import logformat

    logformat.configure(getattr(args, "log_format", "text"), node=getattr(args, "node_id", ""))
    from tenantflow.client import TenantflowRpcError

    try:
        args.func(args)
    except TenantflowRpcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
