"""python-wasm's cache of tenant modules' compiled code: compiled once, never from tenant code."""

from __future__ import annotations

from tenantflow.plugins.sandbox_wasm.python_wasm import CodeCache, PythonWasmSandbox
from tests.helpers import source
from tests.plugins.sandbox_wasm.conftest import job, run

GENUINE = source("""
    import base64, json, marshal
    from wit_world import notify

    EVIL = (
        "from tenantflow.workflow import WorkflowEntrypoint\\n"
        "class W(WorkflowEntrypoint):\\n"
        "    def run(self, event, step):\\n"
        "        return 'poisoned'\\n"
    )
    forged = base64.b64encode(marshal.dumps(compile(EVIL, "wf.py", "exec"))).decode()
    notify(json.dumps({"op": "compiled", "code": {"wf.py": forged}}))  # tenant code: too late

    from tenantflow.workflow import WorkflowEntrypoint

    class W(WorkflowEntrypoint):
        def run(self, event, step):
            return step.do("which", lambda: "genuine " + str(event.payload))

    class Fails(WorkflowEntrypoint):
        def run(self, event, step):
            return step.do("fail", lambda: 1 / 0)
""")


def _keys(code: str) -> dict[str, str]:
    return {"wf.py": CodeCache.key("wf.py", code)}


def test_the_second_run_of_a_source_uses_the_code_the_runner_compiled(python_wasm: PythonWasmSandbox) -> None:
    code = GENUINE + "# test_the_second_run_of_a_source_uses_the_code_the_runner_compiled\n"
    assert python_wasm.codes.get(_keys(code)) is None
    for n in range(3):
        exit_, host, _ = run(python_wasm, job({"wf.py": code.encode()}, "wf", "W", payload=n))
        assert not exit_.crashed and host.calls[-1] == {"op": "finish", "ok": True, "value": f"genuine {n}"}
        assert (
            python_wasm.codes.get(_keys(code)) is not None
        )  # reported by the first run, before its tenant code
        forged = [m for m in host.notes if m.get("op") == "compiled"]
        assert len(forged) == 1  # the tenant's own message went to the host, as any other


def test_tracebacks_from_cached_code_still_name_the_tenants_lines(python_wasm: PythonWasmSandbox) -> None:
    code = GENUINE + "# test_tracebacks_from_cached_code_still_name_the_tenants_lines\n"
    for _ in range(2):  # compiled, then from the cache
        _, host, _ = run(python_wasm, job({"wf.py": code.encode()}, "wf", "Fails"))
        (result,) = [m for m in host.calls if m["op"] == "result"]
        assert result["error"]["name"] == "ZeroDivisionError"
        assert 'File "wf.py", line 21, in <lambda>' in result["error"]["traceback"], result["error"][
            "traceback"
        ]


def test_the_cache_keeps_what_it_asked_for_within_its_bound() -> None:
    cache = CodeCache(max_chars=10)
    a, b = {"a.py": CodeCache.key("a.py", "x = 1")}, {"b.py": CodeCache.key("b.py", "y = 2")}
    cache.put(a, {"code": {"a.py": "AAAAAA", "other.py": "ignored"}})
    assert cache.get(a) == {"a.py": "AAAAAA"}
    assert cache.get({"other.py": CodeCache.key("other.py", "")}) is None
    cache.put(b, {"code": {"b.py": "BBBBBB"}})  # 12 chars > 10: the least recently used goes
    assert cache.get(a) is None and cache.get(b) == {"b.py": "BBBBBB"}
    cache.put(a, {"code": "not a mapping"})
    assert cache.get(a) is None
