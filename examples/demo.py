"""`make demo`: a kernel on embedded SQLite, two tenants' own code, both runs watched live.

1. starts `tenantflow serve` on a fresh SQLite file (a real gRPC server on a loopback port),
2. publishes tenant "acme-ci"'s CI pipeline and tenant "bloom"'s onboarding flow, and sets the
   deploy token acme-ci's pipeline reads as a secret (sealed at rest with the kernel's key file),
3. creates an instance of each and streams their steps as they happen (the onboarding flow starts
   a child workflow of its own tenant with step.create and waits for it),
4. sends the deploy approval the pipeline waits for,
5. shows both complete, and what the pipeline's deploy step kept in acme-ci's key-value store
   (committed with the step), then stops the kernel.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tenantflow.client import Client
from tenantflow.client._client import status_name
from tenantflow.kernel.cli import describe, table
from tenantflow.kernel.secretbox import new_key
from tenantflow.v1 import tenantflow_pb2 as pb

HERE = Path(__file__).parent
COLORS = {"acme-ci": "\033[36m", "bloom": "\033[35m"}
RESET = "\033[0m" if sys.stdout.isatty() else ""
print_lock = threading.Lock()


def say(text: str) -> None:
    with print_lock:
        print(text, flush=True)


def start_kernel(data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    key = data_dir / "secrets.key"  # the operator's: it seals every tenant's secrets at rest
    key.write_text(new_key() + "\n")
    key.chmod(0o600)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tenantflow.kernel.cli",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(data_dir),
            "--secrets-key",
            str(key),
            "--workspace-root",  # the CI tenant lints its pinned code in a workspace of its own
            str(data_dir.with_name(data_dir.name + "-workspaces")),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "listening on" in line:
            say(f"▶ {line.strip()}")
            address = line.split("listening on ")[1].split()[0]
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
            return proc, address
    raise SystemExit("the kernel did not start")


def watch(client: Client, tenant: str, id: str) -> None:
    color = COLORS.get(tenant, "") if RESET else ""
    for event in client.watch(tenant, id):
        say(f"{color}[{tenant:>7}]{RESET} {describe(event)}")


def main() -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="tenantflow-demo-"))
    proc, address = start_kernel(data_dir)
    done = False
    try:
        with Client(address) as client:
            ci = client.publish(
                "acme-ci", "pipeline", {"pipeline.py": (HERE / "ci_pipeline" / "pipeline.py").read_text()}
            )
            bloom = client.publish(
                "bloom", "onboarding", {"onboarding.py": (HERE / "onboarding" / "onboarding.py").read_text()}
            )
            say(table([["acme-ci", ci.ref, ", ".join(ci.workflows)], ["bloom", bloom.ref, ", ".join(bloom.workflows)]],
                      ["tenant", "published code (pinned)", "workflows"]))  # fmt: skip
            secret = client.put_secret("acme-ci", "DEPLOY_TOKEN", f"demo-{secrets.token_hex(8)}")
            say(
                f"\nset acme-ci's secret {secret.name} (the API never answers a value; its deploy step reads it)"
            )
            run = client.create(
                "acme-ci", "Pipeline", ci.ref, params={"repo": "acme/web", "ref": "main"}, id="build-1042"
            )
            onboard = client.create(
                "bloom",
                "Onboarding",
                bloom.ref,
                params={"email": "ada@example.com", "grace": "2 seconds", "wait": "2 seconds"},
            )
            say(f"\ncreated acme-ci/{run.id} and bloom/{onboard.id}; watching both live:\n")
            watchers = [
                threading.Thread(target=watch, args=(client, "acme-ci", run.id)),
                threading.Thread(target=watch, args=(client, "bloom", onboard.id)),
            ]
            for w in watchers:
                w.start()
            client.wait("acme-ci", run.id, statuses=frozenset({pb.STATUS_WAITING}), timeout=60)
            while not any(s.name == "approval" for s in client.get("acme-ci", run.id).steps):
                time.sleep(0.1)
            time.sleep(1.0)
            say(
                "\n>>> the pipeline hibernates (no process held) until someone approves; sending the approval\n"
            )
            client.send_event(
                "acme-ci", run.id, "deploy-approval", {"approved": True, "by": "release-manager"}
            )
            for w in watchers:
                w.join(120)
            rows = []
            for tenant, id in (("acme-ci", run.id), ("bloom", onboard.id)):
                inst = client.get(tenant, id)
                steps = ", ".join(f"{s.name}×{s.attempts}" if s.attempts > 1 else s.name for s in inst.steps)
                rows.append([tenant, id, status_name(inst.status), steps, inst.output_json[:70]])
                for child in client.children(tenant, id):  # started by the workflow with step.create
                    steps = ", ".join(s.name for s in child.steps)
                    rows.append(
                        [tenant, f"└ {child.id[:24]}…", status_name(child.status), steps, child.output_json]
                    )
            say("\n" + table(rows, ["tenant", "instance", "status", "steps (×attempts)", "output"]))
            failed = [r for r in rows if r[2] != "complete"]
            if failed:
                raise SystemExit(f"demo failed: {failed}")
            kept = client.kv_list("acme-ci", "deploys/")
            say("\nwhat acme-ci's deploy step kept (ctx.kv, committed with the step):\n" + table(
                [[e.key, e.value_json] for e in kept.entries], ["key", "value"]))  # fmt: skip
            say("\nboth tenants' workflows completed")
            done = True
    finally:
        proc.terminate()
        proc.wait(15)
        if done:  # the kernel's storage (and its workspaces) were only for the demo
            shutil.rmtree(data_dir, ignore_errors=True)
            shutil.rmtree(data_dir.with_name(data_dir.name + "-workspaces"), ignore_errors=True)
        else:
            say(f"the demo kernel's data is left in {data_dir} (its storage: tenantflow.sqlite3)")


if __name__ == "__main__":
    main()
