"""kernel/egress.py: what a rule means (exact names, *.suffix, addresses and blocks, ports), how the
kernel's own resolution decides (a name answering loopback is refused unless a rule names the
address), and ``tenantflow egress set|get`` against a real kernel."""

from __future__ import annotations

import asyncio
import json

import pytest

from tenantflow.kernel.egress import Refused, Rule, addresses, parse_rule, parse_rules
from tenantflow.kernel.errors import InvalidArgument
from tests.conftest import KernelProcess
from tests.kernel.test_cli_people import on


def _allowed(rules: list[Rule], host: str, port: int) -> list[str] | str:
    try:
        return asyncio.run(addresses(rules, host, port))
    except Refused as exc:
        return str(exc)


def test_rules_are_normalised_or_refused_naming_the_problem() -> None:
    assert parse_rule("API.Example.COM.", [443, 80, 443]) == Rule("api.example.com", (80, 443))
    assert (
        parse_rule("10.1.2.3", [22]).host == "10.1.2.3"
        and parse_rule("10.1.0.0/16", [1]).host == "10.1.0.0/16"
    )
    assert parse_rule("::1", [8080]).host == "::1"
    for host, ports, says in (
        ("", [1], "host is empty"),
        ("*.", [1], "is not a host name"),
        ("a b", [1], "is not a host name"),
        ("x" * 254, [1], "is not a host name"),
        ("ok.example", [], "no ports"),
        ("ok.example", [70000], "port 70000 is not in 1-65535"),
        ("ok.example", list(range(1, 40)), "at most 32"),
    ):
        with pytest.raises(InvalidArgument, match=says):
            parse_rule(host, ports)
    with pytest.raises(InvalidArgument, match="at most 256"):
        parse_rules([("a.example", [1])] * 257)


def test_names_suffixes_and_ports_match_as_documented() -> None:
    rules = parse_rules([("*.example.com", [443]), ("10.0.0.0/8", [5432]), ("127.0.0.1", [8080])])
    assert "example.com port 443 is not on" in str(
        _allowed(rules, "example.com", 443)
    )  # not the suffix itself
    assert "api.example.com port 80 is not on" in str(_allowed(rules, "api.example.com", 80))
    assert _allowed(rules, "10.9.8.7", 5432) == ["10.9.8.7"]  # private, but named by a block
    assert "10.9.8.7 port 22 is not on" in str(_allowed(rules, "10.9.8.7", 22))
    assert "11.0.0.1 port 5432 is not on" in str(_allowed(rules, "11.0.0.1", 5432))
    assert _allowed(rules, "127.0.0.1", 8080) == ["127.0.0.1"]


def test_a_name_is_resolved_by_the_kernel_and_loopback_needs_a_literal_rule() -> None:
    by_name = parse_rules([("localhost", [8080])])
    refused = _allowed(by_name, "localhost", 8080)
    assert (
        isinstance(refused, str)
        and "localhost resolves to" in refused
        and "outside the public internet" in refused
    )
    both = parse_rules([("localhost", [8080]), ("127.0.0.0/8", [8080]), ("::1", [8080])])
    assert "127.0.0.1" in _allowed(both, "LOCALHOST.", 8080)


def test_the_cli_sets_and_shows_a_tenants_list(kernel: KernelProcess, tenant: str) -> None:
    out = on(kernel, tenant, "egress set", "api.example.com:443", "*.internal.example:80,443", "[::1]:8080")
    assert "api.example.com" in out and "80,443" in out
    shown = json.loads(on(kernel, tenant, "egress get", "--json"))
    assert shown["rules"] == [{"host": "api.example.com", "ports": [443]},
                              {"host": "*.internal.example", "ports": [80, 443]}, {"host": "::1", "ports": [8080]}]  # fmt: skip
    assert "is not HOST:PORT" in on(kernel, tenant, "egress set", "api.example.com", code=2)
    assert "has no egress rules" in on(kernel, tenant, "egress set")
