"""The tenantflow kernel: gRPC services over four contracts (create, dispatch, step, timer).

Plugins implement hooks from :mod:`tenantflow.kernel.hookspecs` with :data:`hookimpl`.
"""

from tenantflow.kernel.hookspecs import hookimpl

__all__ = ["hookimpl"]
