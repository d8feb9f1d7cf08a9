"""The guest side of a warm runner, in a forked child of its own (it resets its interpreter's
modules): what a wake-up bound on shared modules is put back, with CPython's dict version tags and
without them (the full comparison other interpreters get)."""

from __future__ import annotations

import os

import pytest

from tenantflow.plugins.sandbox_subprocess import warm_guest


def _in_child(tagged: bool) -> int:
    """Exit status of a child that snapshots, changes shared modules as tenant code could, resets."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            import json
            import sys
            import textwrap

            warm_guest._TAGGED = tagged
            warm_guest.snapshot()
            baseline = warm_guest.Baseline(64)
            original_load, original_textwrap = json.load, sys.modules["textwrap"]
            json.tf_stash = "left"  # type: ignore[attr-defined]
            json.load = len  # type: ignore[assignment]
            os.environ["TF_STASH"] = "left"
            sys.path.append("/nowhere")
            del sys.modules["textwrap"]
            sys.modules["textwrap"] = type(sys)("textwrap")  # re-imported as something else
            sys.modules["tf_tenant_module"] = type(sys)("tf_tenant_module")
            baseline.reset({})
            restored = (
                not hasattr(json, "tf_stash")
                and json.load is original_load
                and "TF_STASH" not in os.environ
                and "/nowhere" not in sys.path
                and sys.modules["textwrap"] is original_textwrap
                and textwrap is original_textwrap
                and "tf_tenant_module" not in sys.modules
            )
            code = 0 if restored else 3
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.parametrize("tagged", [True, False])
def test_a_reset_puts_back_what_a_wake_up_bound_on_shared_modules(tagged: bool) -> None:
    if tagged and not warm_guest._tags_work():
        pytest.skip("this interpreter has no dict version tag (the full comparison is tested)")
    assert _in_child(tagged) == 0
