"""What a request may contain: the shapes of tenants, ids, names, refs and files, checked before
any work, each refusal an ``InvalidArgument`` (or ``ResourceExhausted``) a person can act on."""

from __future__ import annotations

import re
from collections.abc import Mapping

from tenantflow.kernel.errors import InvalidArgument, ResourceExhausted, excerpt

# Matched with fullmatch: "$" alone would also accept a trailing newline.
# '@' only in ids the kernel makes (a schedule's fires, "<schedule>@<time>") or step.create's.
ID = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9_@-]{0,99}")
TENANT = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,99}")
WORKFLOW = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
CODE_NAME = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,99}")
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
MAX_REF = 2048  # characters of a code ref
MAX_NAME = 256  # characters of a step name or event type (as the tenant SDK allows)
MAX_FILES = 1000  # files in one Publish
MAX_PATH_BYTES = 1024  # of one file name; each part at most 255 (NAME_MAX)
MAX_CONCURRENCY_LIMIT = 100_000


def check_tenant(tenant: str) -> None:
    if not TENANT.fullmatch(tenant or ""):
        raise InvalidArgument(
            f"bad tenant {excerpt(tenant)}: 1-100 of letters, digits, '_', '-', '.' (not starting with - or .)"
        )


def check_id(id: str) -> None:
    if not ID.fullmatch(id or ""):
        raise InvalidArgument(
            f"bad instance id {excerpt(id)}: 1-100 of letters, digits, '_' and '-', not starting with '-'"
        )


def check_workflow(workflow: str) -> None:
    if not WORKFLOW.fullmatch(workflow or ""):
        raise InvalidArgument(
            f"bad workflow {excerpt(workflow)}: the name of the entrypoint class, e.g. 'Pipeline'"
        )


def check_concurrency(key: str, limit: int) -> None:
    """A limit of 0 (none) or 1..MAX_CONCURRENCY_LIMIT; a key only with a limit."""
    if not 0 <= limit <= MAX_CONCURRENCY_LIMIT:
        raise InvalidArgument(
            f"concurrency_limit must be 0 (no limit) to {MAX_CONCURRENCY_LIMIT}, got {limit}"
        )
    if key and (len(key) > MAX_NAME or CONTROL.search(key)):
        raise InvalidArgument(
            f"bad concurrency_key {excerpt(key)}: at most {MAX_NAME} characters, no control characters"
        )
    if key and not limit:
        raise InvalidArgument(
            "concurrency_key needs a concurrency_limit: set how many instances of this workflow and key "
            "may run at once (e.g. 1)"
        )


def check_ref(ref: str) -> None:
    """Shape only; the loader of its scheme decides the rest."""
    if len(ref) > MAX_REF or CONTROL.search(ref):
        raise InvalidArgument(
            f"bad code ref {excerpt(ref)}: at most {MAX_REF} characters, no control characters; "
            "pass a ref returned by Code.Publish, e.g. artifact://<tenant>/<name>"
        )


def check_name(text: str, what: str) -> None:
    """An event type: 1-256 characters, no control characters."""
    if not text or len(text) > MAX_NAME or CONTROL.search(text):
        raise InvalidArgument(
            f"bad {what} {excerpt(text)}: 1-{MAX_NAME} characters, no control characters (NUL, newline...)"
        )


def check_files(files: Mapping[str, bytes]) -> None:
    """File names a sandbox can write anywhere: relative, '/'-separated, no '.' or '..' parts, no control
    characters, within the file system's name limits."""
    if not files:
        raise InvalidArgument("no files: publish at least one .py module")
    if len(files) > MAX_FILES:
        raise ResourceExhausted(
            f"{len(files)} files; the limit is {MAX_FILES} per Publish: publish only the workflow modules"
        )
    for path in files:
        size = len(path.encode())
        parts = path.split("/")
        why = (
            "control characters (NUL, newline...) are not allowed" if CONTROL.search(path)
            else f"it is {size} bytes; the limit is {MAX_PATH_BYTES}" if size > MAX_PATH_BYTES
            else "a part is longer than 255 bytes" if any(len(p.encode()) > 255 for p in parts)
            else "use '/' to separate directories" if "\\" in path
            else "use relative paths like 'pipeline.py' or 'pkg/util.py'"
            if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts)
            else ""
        )  # fmt: skip
        if why:
            raise InvalidArgument(f"bad file name {excerpt(path)}: {why}")
