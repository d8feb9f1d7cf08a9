"""``tenantflow kv`` and ``tenantflow secrets``: a tenant's key-value store and secrets from the
command line. A secret's value is read from standard input, never from an argument (which shell
history and ``ps`` would show)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from tenantflow.kernel.cliview import as_json, table

ClientParser = Callable[..., argparse.ArgumentParser]
Connect = Callable[[argparse.Namespace], Any]
SHOWN = 60  # characters of a value a table shows


def _cut(text: str, wide: bool) -> str:
    return text if wide or len(text) <= SHOWN else text[: SHOWN - 3] + "..."


def add_parsers(sub: Any, client_parser: ClientParser, connect: Connect) -> None:
    """Add ``kv`` and ``secrets`` to the CLI's subcommands."""
    kv = sub.add_parser("kv", help="a tenant's key-value store (what its steps keep with ctx.kv)")
    kvs = kv.add_subparsers(dest="kv_command", required=True, metavar="COMMAND")
    c = client_parser("get", "print the value stored under a key", kvs, json_output=True)
    c.add_argument("key", help="the key: 1-512 bytes of UTF-8, e.g. builds/last")
    c.set_defaults(func=lambda args: _kv_get(args, connect))
    c = client_parser("put", "store a JSON value under a key", kvs)
    c.add_argument("key", help="the key: 1-512 bytes of UTF-8, e.g. builds/last")
    c.add_argument("value", help="the value, as JSON (a string needs its quotes: '\"text\"')")
    c.set_defaults(func=lambda args: _kv_put(args, connect))
    c = client_parser("delete", "delete a key", kvs)
    c.add_argument("key", help="the key: 1-512 bytes of UTF-8, e.g. builds/last")
    c.set_defaults(func=lambda args: _kv_delete(args, connect))
    c = client_parser(
        "list", "list keys in key order, with the tenant's usage and quota", kvs, json_output=True
    )
    c.add_argument("--prefix", default="", help="only keys starting with it")
    c.add_argument("--limit", type=int, default=50, help="keys per page, at most 1000 (default 50)")
    c.add_argument("--page-token", default="", help="the page to show, as the previous page printed it")
    c.add_argument("--wide", action="store_true", help="do not cut long values")
    c.set_defaults(func=lambda args: _kv_list(args, connect))

    secrets = sub.add_parser("secrets", help="a tenant's secrets (what its steps read as ctx.secrets)")
    ss = secrets.add_subparsers(dest="secrets_command", required=True, metavar="COMMAND")
    c = client_parser("put", "set a secret; its value is read from standard input", ss)
    c.add_argument("name", help="1-64 of A-Z, 0-9 and '_', starting with a letter")
    c.set_defaults(func=lambda args: _secret_put(args, connect))
    c = client_parser("delete", "delete a secret", ss)
    c.add_argument("name", help="the secret's name, as `secrets list` shows it")
    c.set_defaults(func=lambda args: _secret_delete(args, connect))
    c = client_parser("list", "list a tenant's secrets: names and times, never values", ss, json_output=True)
    c.set_defaults(func=lambda args: _secret_list(args, connect))
    c = ss.add_parser("new-key", help="print a new key for a --secrets-key file (keep it secret)")
    c.set_defaults(func=lambda args: _new_key())
    c = ss.add_parser(
        "rotate",
        help="re-seal every tenant's secrets under the first key of a --secrets-key file (offline: "
        "opens the storage itself)",
    )
    c.add_argument("--storage", required=True, help="the kernel's storage URL (as given to serve)")
    c.add_argument(
        "--secrets-key", required=True, metavar="FILE", help="the new key first, the old ones below"
    )
    c.add_argument("--data-dir", default="", help="the kernel's data directory (for relative storage paths)")
    c.set_defaults(func=_rotate)


def _kv_get(args: argparse.Namespace, connect: Connect) -> None:
    with connect(args) as client:
        entry = client.kv_get(args.tenant, args.key)
    if args.json:
        print(as_json(entry))
        return
    print(table([[entry.key, entry.value_json, entry.updated_at]], ["key", "value", "updated"]))


def _kv_put(args: argparse.Namespace, connect: Connect) -> None:
    try:
        value = json.loads(args.value)
    except ValueError as exc:
        raise ValueError(f"the value is not JSON ({exc}); a string needs its quotes: '\"text\"'") from None
    with connect(args) as client:
        entry = client.kv_put(args.tenant, args.key, value)
    print(table([[entry.key, _cut(entry.value_json, False), entry.updated_at]], ["key", "value", "updated"]))


def _kv_delete(args: argparse.Namespace, connect: Connect) -> None:
    with connect(args) as client:
        client.kv_delete(args.tenant, args.key)
    print(table([[args.key, "deleted"]], ["key", "status"]))


def _kv_list(args: argparse.Namespace, connect: Connect) -> None:
    with connect(args) as client:
        page = client.kv_list(args.tenant, args.prefix, page_size=args.limit, page_token=args.page_token)
    if args.json:
        print(as_json(page))
        return
    rows = [[e.key, _cut(e.value_json, args.wide), e.updated_at] for e in page.entries]
    print(table(rows, ["key", "value", "updated"]) if rows else "no keys")
    u = page.usage
    print(
        f"\nusage: {u.keys} keys of {u.max_keys or 'unlimited'}, {u.bytes} bytes of {u.max_bytes or 'unlimited'}"
    )
    if page.next_page_token:
        print(f"more: --page-token {page.next_page_token}")


def _secret_put(args: argparse.Namespace, connect: Connect) -> None:
    if sys.stdin.isatty():
        print(f"value of {args.name} (then Enter; not echoed):", file=sys.stderr)
        import getpass

        value = getpass.getpass("")
    else:
        value = sys.stdin.read()
        value = value[:-1] if value.endswith("\n") else value
    with connect(args) as client:
        secret = client.put_secret(args.tenant, args.name, value)
    print(table([[secret.name, secret.updated_at]], ["secret", "updated"]))


def _secret_delete(args: argparse.Namespace, connect: Connect) -> None:
    with connect(args) as client:
        client.delete_secret(args.tenant, args.name)
    print(table([[args.name, "deleted"]], ["secret", "status"]))


def _secret_list(args: argparse.Namespace, connect: Connect) -> None:
    with connect(args) as client:
        found = client.list_secrets(args.tenant)
    if args.json:
        print(json.dumps([{"name": s.name, "updated_at": s.updated_at} for s in found], indent=2))
        return
    print(table([[s.name, s.updated_at] for s in found], ["secret", "updated"]) if found else "no secrets")


def _new_key() -> None:
    from tenantflow.kernel.secretbox import new_key

    print(new_key())


def _rotate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from tenantflow.kernel.config import KernelConfig, default_data_dir
    from tenantflow.kernel.plugins import Plugins
    from tenantflow.kernel.secretbox import SecretBox, SecretKeyError, read_keys
    from tenantflow.kernel.tenantdata import rotate

    try:
        box = SecretBox(read_keys(args.secrets_key), args.secrets_key)
    except SecretKeyError as exc:
        raise ValueError(str(exc)) from None
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    storage = Plugins().storage(args.storage, KernelConfig(data_dir=data_dir, storage_url=args.storage))
    try:
        done, current = rotate(storage, box)
    except SecretKeyError as exc:
        raise ValueError(f"{exc}; nothing after it was re-sealed") from None
    finally:
        storage.close()
    print(f"re-sealed {done} secrets under the first key; {current} already were")
