"""A SaaS tenant's customer onboarding flow, written by the tenant (or its AI agent).

Create the account, send a welcome mail from a child workflow of the same tenant, hibernate for a
while (no process held), then nudge the customer unless they activated meanwhile. Written as a
plain, synchronous ``run``.
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
        kit = step.create("welcome kit", "WelcomeKit", params={"email": customer})  # a child instance
        step.wait_for_instance("welcome sent", kit, timeout="1 hour")
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


class WelcomeKit(WorkflowEntrypoint):
    """Started by Onboarding with ``step.create``: runs in the same tenant, on the same pinned code."""

    def run(self, event, step):
        return step.do(
            "welcome mail", lambda: print(f"mail to {event.payload['email']}: welcome aboard!") or "sent"
        )
