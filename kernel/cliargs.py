"""Argument types and help formatting shared by the ``tenantflow`` commands: values checked with a
message naming the flag, and defaults shown in ``--help``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

STATUSES = (
    "queued",
    "running",
    "paused",
    "errored",
    "terminated",
    "complete",
    "waiting",
    "waiting_for_pause",
)
RUNTIMES = "python (subprocess sandbox), python-wasm, wasm; the kernel's error names those it has installed"


class DefaultsShown(argparse.HelpFormatter):
    """Help that ends every flag's text with its default, unless the text already says it (or there
    is none to say)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or default == []
            or not action.option_strings
            or action.nargs == 0
        ):
            return text
        return f"{text} (default: %(default)s)"


def json_arg() -> Callable[[str], Any]:
    """An argparse type: the value parsed as JSON, or an error saying where it broke (argparse names
    the flag)."""

    def parse(text: str) -> Any:
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(
                f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno} of {text!r}"
                ' (quote strings, e.g. \'{"repo": "acme/web"}\')'
            ) from None

    parse.__name__ = "JSON"
    return parse


def _commands(p: argparse.ArgumentParser, prefix: str = "") -> dict[str, list[str]]:
    """Every command path ("schedule create") of ``p`` -> what may follow it (sub-commands, flags)."""
    found: dict[str, list[str]] = {}
    words: list[str] = []
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                words.append(name)
                found.update(_commands(child, f"{prefix} {name}".strip()))
        else:
            words += [o for o in action.option_strings if o.startswith("--")]
            if action.choices and not action.option_strings:
                words += [str(c) for c in action.choices]
    found[prefix] = words
    return found


def completion_script(p: argparse.ArgumentParser, shell: str) -> str:
    """A bash (or zsh, through bashcompinit) completion script for ``p``'s commands and flags, made
    from the parser itself so it never lists a flag that is not there."""
    cases = "\n".join(
        f'        "{path}") words="{" ".join(sorted(set(words)))}" ;;'
        for path, words in sorted(_commands(p).items())
    )
    script = f"""_tenantflow() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" path="" w words=""
    for w in "${{COMP_WORDS[@]:1:COMP_CWORD-1}}"; do
        case "$w" in -*) ;; *) path="${{path:+$path }}$w" ;; esac
    done
    while :; do
        case "$path" in
{cases}
        *) if [ "$path" = "${{path% *}}" ]; then path=""; else path="${{path% *}}"; fi; continue ;;
        esac
        break
    done
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -o default -F _tenantflow tenantflow
"""
    if shell == "zsh":
        script = "autoload -U +X bashcompinit && bashcompinit\n" + script
    return script
