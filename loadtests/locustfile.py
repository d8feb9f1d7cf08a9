"""Tenant density under load, over gRPC: pick a scenario by name with ``TENANTFLOW_SCENARIO``.

Scenarios (see scenarios.py): ``density`` (default), ``noisy``, ``soak``; several may be joined with
commas, or ``all``. ``make loadtest`` starts a kernel, runs this headless and writes a report folder
(loadtests/loadtest.py). Against a kernel you started yourself:

    .venv/bin/pip install -e '.[load]'
    TENANTFLOW_SCENARIO=noisy .venv/bin/locust -f loadtests/locustfile.py --headless -u 50 -r 10 -t 60s \\
        --host 127.0.0.1:7450
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # before any channel: gRPC must cooperate with locust's greenlets

sys.path.insert(0, str(Path(__file__).parent))

from scenarios import SCENARIOS  # noqa: E402


def _chosen() -> list[str]:
    raw = os.environ.get("TENANTFLOW_SCENARIO", "density").strip().lower()
    names = list(SCENARIOS) if raw == "all" else [n.strip() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise SystemExit(
            f"TENANTFLOW_SCENARIO={raw!r}: choose from {', '.join(SCENARIOS)} or all (comma-separated)"
        )
    return names


# locust runs the User classes it finds here: only the chosen scenarios' ones.
globals().update({user.__name__: user for name in _chosen() for user in SCENARIOS[name]})
