"""The platform client: a typed Python client over the ``tenantflow.v1`` gRPC API.

```python
from tenantflow.client import Client
with Client("127.0.0.1:7450") as tf:
    ref = tf.publish("acme", "pipeline", {"pipeline.py": source}).ref
    inst = tf.create("acme", "Pipeline", ref, params={"repo": "acme/web"})
    done = tf.wait("acme", inst.id)
```
"""

from tenantflow.client._client import TERMINAL, Client, Status, TenantflowRpcError

__all__ = ["TERMINAL", "Client", "Status", "TenantflowRpcError"]
