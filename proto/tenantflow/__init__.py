"""tenantflow: durable execution that follows the tenant.

Packages: ``tenantflow.kernel`` (the gRPC kernel), ``tenantflow.plugins`` (storage, sandboxes,
loaders), ``tenantflow.client`` (platform client), ``tenantflow.workflow`` (the tenant SDK) and
``tenantflow.v1`` (generated gRPC stubs).
"""

__version__ = "0.1.0"
