"""A SaaS tenant's customer onboarding flow, written by the tenant (or its AI agent).

Create the account, send a welcome mail, hibernate for a while (no process held), then nudge the
customer unless they activated meanwhile. Written as a plain, synchronous ``run``.
"""

import hashlib
import time

from tenantflow.workflow import EventTimeoutError, WorkflowEntrypoint


class Onboarding(WorkflowEntrypoint):
    def run(self, event, step):
        customer = event.payload["email"]
        account = step.do(
            "create account",
            lambda: {"account_id": "acct_" + hashlib.sha1(customer.encode()).hexdigest()[:8]},
        )
        step.do("welcome mail", lambda: print(f"mail to {customer}: welcome aboard!") or "sent")
        step.sleep("give them time", event.payload.get("grace", "3 days"))
        try:
            activation = step.wait_for_event(
                "activation", type="activated", timeout=event.payload.get("wait", "1 day")
            )
            return {**account, "activated": True, "plan": activation["payload"].get("plan")}
        except EventTimeoutError:
            step.do(
                "nudge mail",
                lambda: print(f"mail to {customer}: need a hand getting started?") or time.time(),
            )
            return {**account, "activated": False}
