"""``tenantflow egress set|get``: where a tenant's steps may connect, from the command line."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from tenantflow.kernel.cliview import table

ClientParser = Callable[..., argparse.ArgumentParser]
Connect = Callable[[argparse.Namespace], Any]


def parse_rule(text: str) -> tuple[str, list[int]]:
    """``HOST:PORT[,PORT...]`` (``[v6]:PORT`` for an IPv6 address or block) as a rule."""
    host, sep, ports = text.rpartition(":")
    try:
        numbers = [int(p) for p in ports.split(",")] if sep else []
    except ValueError:
        numbers = []
    if not host or not numbers:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not HOST:PORT[,PORT...] (e.g. api.example.com:443, *.example.com:80,443, "
            "10.0.0.0/8:5432, [::1]:8080)"
        )
    return host.removeprefix("[").removesuffix("]"), numbers


def add_egress_parser(sub: Any, client_parser: ClientParser, connect: Connect) -> None:
    """Add ``egress`` to the CLI's subcommands."""
    egress = sub.add_parser("egress", help="where a tenant's steps may connect (its egress allow-list)")
    es = egress.add_subparsers(dest="egress_command", required=True, metavar="COMMAND")
    c = client_parser("set", "replace the tenant's allow-list (no rules: its steps reach nothing)", es)
    c.add_argument(
        "rules", nargs="*", type=parse_rule, metavar="HOST:PORTS",
        help="api.example.com:443, *.example.com:80,443, 203.0.113.7:22 or 10.0.0.0/8:5432",
    )  # fmt: skip
    c.set_defaults(func=lambda args: _set(args, connect))
    c = client_parser("get", "show the tenant's allow-list", es, json_output=True)
    c.set_defaults(func=lambda args: _get(args, connect))


def _show(args: argparse.Namespace, policy: Any) -> None:
    rules = [{"host": r.host, "ports": list(r.ports)} for r in policy.rules]
    if getattr(args, "json", False):
        print(
            json.dumps({"tenant": policy.tenant, "rules": rules, "updated_at": policy.updated_at}, indent=2)
        )
        return
    if not rules:
        print(f"tenant {policy.tenant!r} has no egress rules: its steps reach nothing")
        return
    print(table([[r["host"], ",".join(map(str, r["ports"]))] for r in rules], ["host", "ports"]))
    print(f"\nset {policy.updated_at}")


def _set(args: argparse.Namespace, connect: Connect) -> None:
    with connect(args) as client:
        _show(args, client.set_egress(args.tenant, args.rules))


def _get(args: argparse.Namespace, connect: Connect) -> None:
    with connect(args) as client:
        _show(args, client.get_egress(args.tenant))
