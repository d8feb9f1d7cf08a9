"""The kernel's error hierarchy; ``kernel/server.py`` maps each class to exactly one gRPC code."""

from __future__ import annotations


class TenantflowError(Exception):
    """Base of every error the kernel reports to a caller."""


class InvalidArgument(TenantflowError):
    """The request is malformed: bad JSON, bad id, unknown workflow class, code that does not compile."""


class NotFound(TenantflowError):
    """No such instance, code ref or step (within the caller's tenant)."""


class AlreadyExists(TenantflowError):
    """An instance with this id already exists in the tenant."""


class FailedPrecondition(TenantflowError):
    """The instance is not in a state that allows the operation (e.g. resuming a running instance)."""


class ResourceExhausted(TenantflowError):
    """A size or rate limit was hit; the message says which and what to do."""


class Conflict(TenantflowError):
    """A guarded write lost a race (lease lost, instance restarted or terminated meanwhile)."""


class Unavailable(TenantflowError):
    """The kernel is shutting down or a backend is unreachable; try again later."""


class Unauthenticated(TenantflowError):
    """The kernel requires a token and the call carried none, or one it does not know."""


class PermissionDenied(TenantflowError):
    """The caller's token may not act for the tenant the request names."""


def excerpt(value: str, limit: int = 64) -> str:
    """``repr(value)``, shortened for an error message: a caller's 10 MB string must not come back
    as a 10 MB status message."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


class Unimplemented(TenantflowError):
    """The API has this call or option, and this kernel does not do it yet: nothing was changed."""
