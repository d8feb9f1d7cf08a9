"""A repository's CI/CD pipeline, as a tenant of a CI service would write it.

checkout -> lint, test and build in parallel -> wait for a deploy approval -> deploy.
The test step is flaky on purpose: it fails its first attempt and is retried. The deploy step reads
the tenant's DEPLOY_TOKEN secret (set by the CI service: `tenantflow secrets put`) and records the
deploy in the tenant's key-value store, in the same commit as the step.
"""

import asyncio
import hashlib
import os
import time

from tenantflow.workflow import NonRetryableError, WorkflowEntrypoint


def checkout(repo: str, ref: str) -> dict:
    time.sleep(0.2)
    sha = hashlib.sha1(f"{repo}@{ref}".encode()).hexdigest()
    print(f"checked out {repo}@{ref} -> {sha[:12]}")
    return {"repo": repo, "sha": sha}


def lint(ctx) -> str:
    """Lint the very code this run is pinned to, in the instance's own writable copy of it
    (ctx.workspace(): on a kernel started with --workspace-root; elsewhere a stand-in result)."""
    try:
        workspace = ctx.workspace()
    except RuntimeError as exc:  # e.g. tenantflow.testing, or a kernel without --workspace-root
        print(f"no workspace ({exc}): lint skipped")
        return "0 problems (not linted)"
    problems = []
    # os, not pathlib: the python-wasm runtime's standard library has no pathlib
    files = sorted(
        os.path.join(d, f) for d, _, names in os.walk(workspace) for f in names if f.endswith(".py")
    )
    for path in files:
        with open(path) as source:
            for n, line in enumerate(source.read().splitlines(), 1):
                if len(line) > 120 or line != line.rstrip() or "\t" in line:
                    problems.append(f"{os.path.relpath(path, workspace)}:{n}")
    with open(os.path.join(workspace, "lint-report.txt"), "w") as report:  # the instance's own copy
        report.write("\n".join(problems) + "\n")
    print(f"linted {len(files)} files in {workspace}: {len(problems)} problems")
    return f"{len(problems)} problems in {len(files)} files"


def test(ctx) -> dict:
    time.sleep(0.4)
    if ctx.attempt == 1:
        raise ConnectionError("test database not ready (flaky)")
    return {"passed": 128, "failed": 0, "attempt": ctx.attempt}


def build(sha: str) -> str:
    time.sleep(0.5)
    return f"registry.example/app:{sha[:12]}"


class Pipeline(WorkflowEntrypoint):
    async def run(self, event, step):
        src = await step.do(
            "checkout", lambda: checkout(event.payload["repo"], event.payload.get("ref", "main"))
        )
        lint_report, tests, image = await asyncio.gather(
            step.do("lint", lint),
            step.do("test", test, retries={"limit": 3, "delay": "1 second", "backoff": "exponential"}),
            step.do("build", lambda: build(src["sha"])),
        )
        approval = await step.wait_for_event("approval", type="deploy-approval", timeout="24 hours")
        if not approval["payload"].get("approved"):
            raise NonRetryableError(f"deploy rejected by {approval['payload'].get('by', 'someone')}")

        def deploy(ctx) -> str:
            token = ctx.secrets.get("DEPLOY_TOKEN")  # the kernel logs it as *** if printed
            if token is None:  # e.g. `tenantflow dev run` without --secret DEPLOY_TOKEN=...
                print(f"no DEPLOY_TOKEN secret: a dry run of deploying {image}")
            else:
                print(f"deploying {image} to production with token {token}")
            time.sleep(0.3)
            ctx.kv.put(f"deploys/{event.payload['repo']}", {"image": image, "by": approval["payload"]["by"]})
            ctx.kv.put("deploys/count", ctx.kv.get("deploys/count", 0) + 1)
            return "https://app.example"

        url = await step.do(
            "deploy", deploy, retries={"limit": 3, "delay": "10 seconds", "backoff": "exponential"}
        )
        return {
            "image": image,
            "tests": tests,
            "lint": lint_report,
            "url": url,
            "approved_by": approval["payload"]["by"],
        }
