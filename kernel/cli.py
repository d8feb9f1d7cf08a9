"""``tenantflow``: run the kernel (``serve``) and drive it (publish, create, status, list, watch ...)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tenantflow.kernel.cliargs import RUNTIMES, STATUSES, completion_script, json_arg
from tenantflow.kernel.clidata import add_parsers as add_data_parsers
from tenantflow.kernel.cliegress import add_egress_parser
from tenantflow.kernel.cliview import as_json, describe, print_instance, print_schedule, status, table
from tenantflow.kernel.devcli import add_dev_parser
from tenantflow.kernel.serve import COUNT_OR_ZERO, DEFAULT_ADDRESS, add_serve_parser

__all__ = ["describe", "main", "parser", "table"]


class CommandError(Exception):
    """An ordinary mistake on the command line: printed as ``error: ...``, exit status 1."""


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


_status = status


def _files(names: Sequence[str]) -> dict[str, bytes]:
    """The files to publish: each file by its name, each directory's .py files by their path in it."""
    files: dict[str, bytes] = {}
    for name in names:
        path = Path(name)
        if not path.exists():
            raise CommandError(f"publish: no such file or directory: {name}")
        if path.is_dir():
            found = sorted(path.rglob("*.py"))
            if not found:
                raise CommandError(f"publish: {name} holds no .py file")
            for file in found:
                files[file.relative_to(path).as_posix()] = file.read_bytes()
        else:
            files[path.name] = path.read_bytes()
    return files


def _cmd_publish(args: argparse.Namespace) -> None:
    files = _files(args.files)
    with _client(args) as client:
        version = client.publish(args.tenant, args.name, files, runtime=args.runtime, strict=args.strict)
    if args.json:
        print(as_json(version))
        return
    print(
        table([[version.ref, version.runtime, ", ".join(version.workflows)]], ["ref", "runtime", "workflows"])
    )
    if version.warnings:
        print(
            f"\n{len(version.warnings)} warning(s): see README, 'Determinism hazards'; --strict refuses hazards"
        )
        print(
            table(
                [[f"{w.file}:{w.line}", w.kind, w.message] for w in version.warnings],
                ["where", "kind", "warning"],
            )
        )


def _cmd_create(args: argparse.Namespace) -> None:
    with _client(args) as client:
        inst = client.create(args.tenant, args.workflow, args.code, params=args.params, id=args.id or "",
                             concurrency_key=args.concurrency_key, concurrency_limit=args.concurrency_limit)  # fmt: skip
    if args.json:
        print(as_json(inst))
        return
    print(table([[inst.id, _status(inst.status), inst.code]], ["id", "status", "pinned code"]))


def _cmd_schedule(args: argparse.Namespace) -> None:
    with _client(args) as client:
        action = args.schedule_command
        if action == "create":
            shown = client.create_schedule(
                args.tenant, args.name, args.cron, args.workflow, args.code, args.params, time_zone=args.time_zone,
                overlap=args.overlap, catchup=args.catchup, catchup_window=args.catchup_window, paused=args.paused,
            )  # fmt: skip
        elif action == "list":
            found = list(client.iter_schedules(args.tenant))
            if args.json:
                print(as_json(found))
                return
            rows = [[s.name, s.cron, s.time_zone or "UTC", s.workflow, "paused" if s.paused else s.next_fire,
                     s.last_instance_id or "-", s.fires] for s in found]  # fmt: skip
            print(
                table(rows, ["name", "cron", "time zone", "workflow", "next fire", "last instance", "fires"])
            )
            return
        elif action == "delete":
            client.delete_schedule(args.tenant, args.name)
            print(table([[args.name, "deleted (its instances are kept)"]], ["schedule", "status"]))
            return
        else:  # get | pause | resume
            method = {
                "get": client.get_schedule,
                "pause": client.pause_schedule,
                "resume": client.resume_schedule,
            }
            shown = method[action](args.tenant, args.name)
    if getattr(args, "json", False):
        print(as_json(shown))
    else:
        print_schedule(shown)


def _cmd_status(args: argparse.Namespace) -> None:
    with _client(args) as client:
        inst = client.get(args.tenant, args.id)
    if args.json:
        print(as_json(inst))
    else:
        print_instance(inst, wide=args.wide)


def _cmd_list(args: argparse.Namespace) -> None:
    with _client(args) as client:
        page = client.list(args.tenant, status=args.status or 0, page_size=args.limit,
                           page_token=args.page_token or "", workflow=args.workflow or "",
                           created_after=args.created_after or "", created_before=args.created_before or "",
                           include_count=args.count)  # fmt: skip
    if args.json:
        print(as_json(page))
        return
    rows = [[i.id, i.workflow, _status(i.status), i.created_at, i.code] for i in page.instances]
    print(table(rows, ["id", "workflow", "status", "created", "code"]))
    if args.count:
        print(f"\n{page.total_count} instance(s) match")
    if page.next_page_token:
        print(f"\nmore: --page-token {page.next_page_token}")


def _cmd_code_list(args: argparse.Namespace) -> None:
    with _client(args) as client:
        page = client.list_code(args.tenant, args.name or "", page_size=args.limit,
                                page_token=args.page_token or "")  # fmt: skip
    if args.json:
        print(as_json(page))
        return
    rows = [[v.name, v.ref.rpartition("@")[2][:19], v.published_at, v.runtime, ", ".join(v.workflows)]
            for v in page.versions]  # fmt: skip
    print(table(rows, ["name", "digest", "published", "runtime", "workflows"]))
    if page.next_page_token:
        print(f"\nmore: --page-token {page.next_page_token}")


def _cmd_tenants(args: argparse.Namespace) -> None:
    with _client(args) as client:
        page = client.list_tenants(args.prefix or "", page_size=args.limit, page_token=args.page_token or "")
    if args.json:
        print(as_json(page))
        return
    rows = [[t.tenant, t.instances, t.live, t.schedules, t.code_versions] for t in page.tenants]
    print(table(rows, ["tenant", "instances", "live", "schedules", "code versions"]))
    if page.next_page_token:
        print(f"\nmore: --page-token {page.next_page_token}")


def _cmd_send_event(args: argparse.Namespace) -> None:
    with _client(args) as client:
        seq = client.send_event(args.tenant, args.id, args.type, args.payload)
    print(f"event {args.type!r} delivered to {args.id} (inbox position {seq})")


def _cmd_watch(args: argparse.Namespace) -> None:
    from tenantflow.client import Status

    until = int(Status.of(args.until)) if args.until else None
    with _client(args) as client:
        if args.no_follow:
            events = list(client.export_history(args.tenant, args.id).timeline)
        else:
            events = client.watch(args.tenant, args.id)
        for event in events:
            print(json.dumps(json.loads(as_json(event))) if args.json else describe(event), flush=True)
            if until is not None and event.kind == "status" and event.status == until:
                break
        inst = client.get(args.tenant, args.id)
    if args.json:
        print(json.dumps(json.loads(as_json(inst))))
    else:
        print_instance(inst, wide=args.wide)


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
                inst = client.restart(args.tenant, args.id, from_step=args.from_step or "",
                                      keep_consumed_events=args.keep_consumed_events)  # fmt: skip
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
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_parser(sub)
    t = sub.add_parser("token", help="make a bearer token and its --auth-tokens entry")
    t.add_argument("--name", required=True, help="who holds it, e.g. 'platform-backend'")
    t.add_argument(
        "--tenants", required=True, help="comma-separated tenants or globs it may act for ('*': all)"
    )
    t.set_defaults(func=_cmd_token)
    c = sub.add_parser(
        "completion", help='print a shell completion script: eval "$(tenantflow completion bash)"'
    )
    c.add_argument("shell", choices=["bash", "zsh"], help="the shell to complete in")
    c.set_defaults(func=lambda args: print(completion_script(p, args.shell)))

    def client_parser(
        name: str, help: str, within: Any = None, *, json_output: bool = False, tenant: bool = True
    ) -> argparse.ArgumentParser:
        c = (within or sub).add_parser(name, help=help, description=help)
        c.add_argument(
            "--address",
            default=os.environ.get("TENANTFLOW_ADDRESS", DEFAULT_ADDRESS),
            help=f"HOST:PORT of the kernel (default $TENANTFLOW_ADDRESS or {DEFAULT_ADDRESS})",
        )
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
        if tenant:
            c.add_argument("--tenant", required=True, help="the tenant to act for")
        if json_output:
            c.add_argument(
                "--json", action="store_true", help="print the answer as JSON (the API's field names)"
            )
        return c

    def instance_id(c: argparse.ArgumentParser) -> None:
        c.add_argument("id", help="the instance's id")

    c = client_parser("publish", "publish tenant code (files or directories of .py files)", json_output=True)
    c.add_argument(
        "--name", required=True, help="the code's name; its versions are artifact://TENANT/NAME@sha256:..."
    )
    c.add_argument(
        "--runtime",
        default="python",
        metavar="RUNTIME",
        help=f"the sandbox to run it in: {RUNTIMES} (default python)",
    )
    c.add_argument(
        "files", nargs="+", help=".py files, or directories whose .py files are published by their path"
    )
    c.add_argument(
        "--strict", action="store_true", help="refuse code with determinism hazards instead of warning"
    )
    c.set_defaults(func=_cmd_publish)
    code = sub.add_parser("code", help="a tenant's published code")
    codes = code.add_subparsers(dest="code_command", required=True, metavar="COMMAND")
    c = client_parser("list", "list a tenant's published versions, newest first", codes, json_output=True)
    c.add_argument("--name", help="only the versions of this name")
    c.add_argument(
        "--limit", type=COUNT_OR_ZERO, default=50, help="versions per page, at most 1000 (default 50)"
    )
    c.add_argument("--page-token", help="the page to show, as the previous page printed it")
    c.set_defaults(func=_cmd_code_list)
    c = client_parser("create", "create an instance", json_output=True)
    c.add_argument("--workflow", required=True, help="the workflow class to run")
    c.add_argument(
        "--code", required=True, help="a code ref: artifact://TENANT/NAME[@sha256:...] or git+...; pinned now"
    )
    c.add_argument("--id", help="the instance's id (default: a generated one); creating it again is a no-op")
    c.add_argument(
        "--params", type=json_arg(), help='the event payload, as JSON, e.g. \'{"repo": "acme/web"}\''
    )
    c.add_argument(
        "--concurrency-limit",
        type=COUNT_OR_ZERO,
        default=0,
        help="at most this many instances of the workflow (and key) run at once; the rest queue",
    )
    c.add_argument("--concurrency-key", default="", help="e.g. a customer id; needs --concurrency-limit")
    c.set_defaults(func=_cmd_create)
    schedule = sub.add_parser("schedule", help="cron schedules that create instances")
    schedules = schedule.add_subparsers(dest="schedule_command", required=True, metavar="COMMAND")
    c = client_parser("create", "create a schedule", schedules, json_output=True)
    c.add_argument("name", help="the schedule's name; each fire creates the instance NAME@FIRE-TIME")
    c.add_argument(
        "--cron",
        required=True,
        help="5 fields (minute hour day month weekday), or 6 with seconds last: '0 9 * * 1-5' is 09:00 on "
        "weekdays, '* * * * * */10' every 10 seconds; create prints the next three fires",
    )
    c.add_argument("--time-zone", default="", help="IANA name, e.g. Europe/Paris (default UTC)")
    c.add_argument("--workflow", required=True, help="the workflow class each fire runs")
    c.add_argument("--code", required=True, help="a code ref; an unpinned one is pinned at each fire")
    c.add_argument("--params", type=json_arg(), help="each fire's event payload, as JSON")
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
    c = client_parser("list", "list a tenant's schedules", schedules, json_output=True)
    c.set_defaults(func=_cmd_schedule)
    for action in ("get", "pause", "resume", "delete"):
        c = client_parser(action, f"{action} a schedule", schedules, json_output=action != "delete")
        c.add_argument("name", help="the schedule's name")
        c.set_defaults(func=_cmd_schedule)
    c = client_parser("status", "show an instance, its steps and where it failed", json_output=True)
    instance_id(c)
    c.add_argument("--wide", action="store_true", help="do not cut long outputs to fit the table")
    c.set_defaults(func=_cmd_status)
    c = client_parser("list", "list a tenant's instances, oldest first", json_output=True)
    c.add_argument("--status", choices=STATUSES, help="only instances with this status")
    c.add_argument("--workflow", help="only instances of this workflow class")
    c.add_argument(
        "--created-after", metavar="TIME", help="only instances created at or after this RFC 3339 time"
    )
    c.add_argument(
        "--created-before", metavar="TIME", help="only instances created before this RFC 3339 time"
    )
    c.add_argument("--count", action="store_true", help="also count every instance the filters match")
    c.add_argument(
        "--limit", type=COUNT_OR_ZERO, default=50, help="instances per page, at most 1000 (default 50)"
    )
    c.add_argument("--page-token", help="the page to show, as the previous page printed it")
    c.set_defaults(func=_cmd_list)
    c = client_parser(
        "tenants", "list the tenants this token may see (the kernel runs with --list-tenants)", json_output=True,
        tenant=False,
    )  # fmt: skip
    c.add_argument("--prefix", help="only tenants whose name starts with it")
    c.add_argument(
        "--limit", type=COUNT_OR_ZERO, default=50, help="tenants per page, at most 1000 (default 50)"
    )
    c.add_argument("--page-token", help="the page to show, as the previous page printed it")
    c.set_defaults(func=_cmd_tenants)
    add_data_parsers(sub, client_parser, _client)
    add_egress_parser(sub, client_parser, _client)
    c = client_parser("send-event", "send an event to an instance")
    instance_id(c)
    c.add_argument("type", help="the event type a step waits for, e.g. deploy-approval")
    c.add_argument("--payload", type=json_arg(), help="the event's payload, as JSON")
    c.set_defaults(func=_cmd_send_event)
    c = client_parser("watch", "follow an instance's steps live until it ends", json_output=True)
    instance_id(c)
    c.add_argument("--until", choices=STATUSES, metavar="STATUS",
                   help=f"stop following once it reaches this status: {', '.join(STATUSES)}")  # fmt: skip
    c.add_argument("--no-follow", action="store_true", help="print the timeline so far and stop")
    c.add_argument("--wide", action="store_true", help="do not cut long outputs in the closing table")
    c.set_defaults(func=_cmd_watch)
    history = sub.add_parser("history", help="an instance's history, for replay against new code")
    c = client_parser(
        "export", "write an instance's journal, inbox and timeline as JSON (for tenantflow dev replay)",
        history.add_subparsers(dest="history_command", required=True),
    )  # fmt: skip
    instance_id(c)
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
        instance_id(c)
        if action == "restart":
            c.add_argument("--from-step", help="rerun from this step instead of from the start")
            c.add_argument(
                "--keep-consumed-events",
                action="store_true",
                help="give the events the rerun steps consumed back to its inbox (default: they are spent)",
            )
        if action == "terminate":
            c.add_argument("--rollback", action="store_true", help="run the undos of completed steps first")
            c.add_argument(
                "--keep-children",
                action="store_true",
                help="leave its live children running (default: terminate them)",
            )
        c.set_defaults(func=_control(action))
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tenantflow")
    except PackageNotFoundError:
        return "(not installed)"


def _rpc_error(args: argparse.Namespace, exc: Any) -> str:
    """What to print for a failed call; an unreachable kernel says where it looked and what to do."""
    import grpc

    if exc.code == grpc.StatusCode.UNAVAILABLE and hasattr(args, "address"):
        return (
            f"error: no kernel answered at {args.address} ({exc.message.splitlines()[0] if exc.message else 'unavailable'}): "
            "start one with `tenantflow serve`, or point --address (or $TENANTFLOW_ADDRESS) at yours"
        )
    return f"error: {exc}"


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
        print(_rpc_error(args, exc), file=sys.stderr)
        raise SystemExit(1) from None
    except (CommandError, ValueError) as exc:  # ValueError: the client refused an argument
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as exc:  # a file that cannot be read (--tls-ca, publish)
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
