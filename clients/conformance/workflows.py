"""The tenants the suites run: one module of workflows (and hostile ones) every sandbox must run the
same way, and the small versioned workflow the loader suite releases."""

from __future__ import annotations

import textwrap

PYTHON_WORKFLOWS = textwrap.dedent("""
    import asyncio
    import json
    import os
    import socket
    import time

    from tenantflow.workflow import NonRetryableError, WorkflowEntrypoint

    NO_RETRY = {"limit": 0}


    class Steps(WorkflowEntrypoint):
        def run(self, event, step):
            doubled = step.do("double", lambda: event.payload["x"] * 2)
            return {"total": step.do("add", lambda: doubled + 1)}


    class Parallel(WorkflowEntrypoint):
        async def run(self, event, step):
            a, b = await asyncio.gather(step.do("a", lambda: 1), step.do("b", self.two))
            await step.sleep("nap", 0.1)
            return a + b

        async def two(self):
            await asyncio.sleep(0)
            return 2


    class Sleeper(WorkflowEntrypoint):
        def run(self, event, step):
            step.sleep("nap", 0.2)
            return "woke"


    class Retry(WorkflowEntrypoint):
        def run(self, event, step):
            def flaky(ctx):
                if ctx.attempt < 2:
                    raise RuntimeError("flaky")
                return ctx.attempt
            return step.do("flaky", flaky, retries={"limit": 2, "delay": 0})


    class Waiter(WorkflowEntrypoint):
        def run(self, event, step):
            return step.wait_for_event("approval", type="go", timeout=30)["payload"]


    class Fails(WorkflowEntrypoint):
        def run(self, event, step):
            def boom():
                raise NonRetryableError("boom")
            return step.do("boom", boom)


    def spin():
        while True:
            pass


    def bomb():
        hoard = []
        while True:
            hoard.append(bytearray(8 * 1024 * 1024))


    class Spin(WorkflowEntrypoint):
        def run(self, event, step):
            return step.do("spin", spin, retries=NO_RETRY)


    class Bomb(WorkflowEntrypoint):
        def run(self, event, step):
            return step.do("bomb", bomb, retries=NO_RETRY)


    class Crash(WorkflowEntrypoint):
        def run(self, event, step):
            return step.do("crash", lambda: os._exit(3), retries=NO_RETRY)


    def burn(seconds):
        start = time.process_time()
        while time.process_time() - start < seconds:
            pass
        return time.process_time() - start


    class Crunch(WorkflowEntrypoint):
        def run(self, event, step):
            seconds = event.payload["seconds"]
            return [step.do(f"crunch {i}", lambda: burn(seconds), retries=NO_RETRY) for i in range(2)]


    def attempt(action):
        try:
            return f"allowed: {action()!r}"[:200]
        except Exception as exc:
            return f"denied: {type(exc).__name__}: {exc}"


    class ReadFile(WorkflowEntrypoint):
        def run(self, event, step):
            def read():
                with open(event.payload["path"], "rb") as handle:
                    return handle.read(16)
            return step.do("read", lambda: attempt(read), retries=NO_RETRY)


    class WriteFile(WorkflowEntrypoint):
        def run(self, event, step):
            def write():
                with open(event.payload["path"], "w") as handle:
                    return handle.write(event.payload["text"])
            return step.do("write", lambda: attempt(write), retries=NO_RETRY)


    class Connect(WorkflowEntrypoint):
        def run(self, event, step):
            address = ("127.0.0.1", event.payload["port"])
            return step.do("connect", lambda: attempt(lambda: socket.create_connection(address, 2)),
                           retries=NO_RETRY)


    class Env(WorkflowEntrypoint):
        def run(self, event, step):
            return step.do("env", lambda: sorted(os.environ), retries=NO_RETRY)


    class SetGlobal(WorkflowEntrypoint):
        def run(self, event, step):
            json.tenantflow_secret = event.payload["x"]


    class ReadGlobal(WorkflowEntrypoint):
        def run(self, event, step):
            return getattr(json, "tenantflow_secret", None)
""").lstrip()


def versioned(output: str, sleep: float = 0.0, cls: str = "Flow") -> str:
    """A workflow module that optionally sleeps, then returns ``output`` (one version of the code)."""
    nap = f'        await step.sleep("nap", {sleep})\n' if sleep else ""
    return (
        "from tenantflow.workflow import WorkflowEntrypoint\n\n\n"
        f"class {cls}(WorkflowEntrypoint):\n"
        "    async def run(self, event, step):\n"
        f"{nap}"
        f'        return await step.do("out", lambda: {output!r})\n'
    )
