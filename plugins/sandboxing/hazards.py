"""Determinism hazards in a workflow's ``run``, found statically (the code is parsed, never run).

Code in ``run`` outside steps re-runs on every wake-up, so it must decide the same way each time.
This flags, in the body of each workflow class's ``run`` (not inside the functions and lambdas it
hands to steps, which run once and are recorded):

- ``clock``: reading the time (``time.time()``, ``datetime.now()``, ...);
- ``random``: random numbers (``random``, ``secrets``, ``os.urandom``);
- ``uuid``: new ids (``uuid.uuid1/uuid4``);
- ``io``: files, network or processes (``open``, ``socket``, ``urllib``, ``requests``, ``subprocess``...);
- ``event_mutation``: changing ``event`` (assigning to, deleting from or mutating ``event.payload``);
- ``dynamic_step_name``: a step name built from one of the above.

It reads names as the module imports them (``import time``, ``from datetime import datetime``,
``import random as r``); a hazard reached through a helper function of the tenant's is not seen.
Runs in the publish checker's limited child, like the rest of :mod:`.pysource`.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

# qualified call -> hazard kind; a prefix ending in "." covers the whole module
CALLS: dict[str, str] = {
    "time.time": "clock", "time.time_ns": "clock", "time.monotonic": "clock", "time.monotonic_ns": "clock",
    "time.perf_counter": "clock", "time.perf_counter_ns": "clock", "time.localtime": "clock",
    "time.gmtime": "clock", "time.ctime": "clock", "time.strftime": "clock",
    "datetime.datetime.now": "clock", "datetime.datetime.utcnow": "clock", "datetime.datetime.today": "clock",
    "datetime.date.today": "clock",
    "random.": "random", "secrets.": "random", "os.urandom": "random", "os.getrandom": "random",
    "uuid.uuid1": "uuid", "uuid.uuid4": "uuid",
    "open": "io", "io.open": "io", "os.system": "io", "os.popen": "io", "os.listdir": "io", "os.scandir": "io",
    "os.getenv": "io", "os.environ.get": "io", "subprocess.": "io", "socket.": "io", "urllib.": "io",
    "http.client.": "io", "requests.": "io", "httpx.": "io", "aiohttp.": "io", "shutil.": "io",
    "pathlib.Path.read_text": "io", "pathlib.Path.read_bytes": "io", "pathlib.Path.write_text": "io",
    "pathlib.Path.write_bytes": "io", "pathlib.Path.open": "io", "input": "io",
}  # fmt: skip
WHAT = {
    "clock": "reads the clock",
    "random": "draws random numbers",
    "uuid": "makes a new uuid",
    "io": "does I/O (files, network, processes or the environment)",
}
STEP_CALLS = {"do", "sleep", "sleep_until", "wait_for_event", "create", "wait_for_instance"}
MUTATORS = {"append", "extend", "insert", "pop", "popitem", "remove", "clear", "update", "setdefault", "sort",
            "reverse", "add", "discard"}  # fmt: skip


@dataclass(frozen=True)
class Hazard:
    file: str
    line: int
    kind: str
    message: str


def _imports(tree: ast.Module) -> dict[str, str]:
    """Local name -> what it stands for, from the module's imports."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = (
                    alias.name if alias.asname else alias.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := _dotted(node.value)) is not None:
        return f"{base}.{node.attr}"
    if isinstance(node, ast.Call):  # Path(...).read_text(): the call's callee stands in
        return _dotted(node.func)
    return None


def _qualified(func: ast.expr, imports: dict[str, str]) -> str | None:
    dotted = _dotted(func)
    if dotted is None:
        return None
    head, _, rest = dotted.partition(".")
    base = imports.get(head, head)
    return f"{base}.{rest}" if rest else base


def _kind(name: str) -> str | None:
    if name in CALLS:
        return CALLS[name]
    for prefix, kind in CALLS.items():
        if prefix.endswith(".") and name.startswith(prefix):
            return kind
    return None


class _RunVisitor(ast.NodeVisitor):
    """Walks one ``run`` body, skipping the functions and lambdas defined in it (step callbacks)."""

    def __init__(self, path: str, imports: dict[str, str], event: str, step: str) -> None:
        self.path, self.imports, self.event, self.step = path, imports, event, step
        self.found: list[Hazard] = []

    def _add(self, node: ast.AST, kind: str, message: str) -> None:
        self.found.append(Hazard(self.path, getattr(node, "lineno", 0), kind, message))

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:  # a callback: runs once, in a step
        return None

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Lambda(self, node: ast.Lambda) -> None:
        return None

    def _hazard_in(self, node: ast.AST) -> str | None:
        """The first hazard called anywhere in ``node`` (lambdas and defs excepted)."""
        probe = _RunVisitor(self.path, self.imports, self.event, self.step)
        probe.visit(node)
        calls = [h for h in probe.found if h.kind in WHAT]
        return calls[0].kind if calls else None

    def visit_Call(self, node: ast.Call) -> None:
        name = _qualified(node.func, self.imports)
        if name is not None and (kind := _kind(name)) is not None:
            self._add(node, kind, f"run() {WHAT[kind]} outside a step ({name}()): the value differs on "
                      "every replay; do it inside step.do and use the recorded result")  # fmt: skip
        func = node.func
        if (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and func.value.id == self.step
        ):
            if func.attr in STEP_CALLS and node.args and (kind := self._hazard_in(node.args[0])) is not None:
                self._add(node, "dynamic_step_name", f"the name of this step.{func.attr} is built from a value that "
                          f"changes on every replay ({kind}), so the recorded step is never found again: name "
                          "steps with fixed text, or with values from step results or the event")  # fmt: skip
        if isinstance(func, ast.Attribute) and func.attr in MUTATORS and self._is_event(func.value):
            self._add(node, "event_mutation", f"run() changes event with .{func.attr}(): the event is replayed as "
                      "created on every wake-up; copy what you need into a variable of your own")  # fmt: skip
        self.generic_visit(node)

    def _is_event(self, node: ast.expr) -> bool:
        while isinstance(node, ast.Attribute | ast.Subscript):
            node = node.value
        return isinstance(node, ast.Name) and node.id == self.event

    def _targets(self, targets: list[ast.expr], node: ast.stmt) -> None:
        for target in targets:
            if isinstance(target, ast.Attribute | ast.Subscript) and self._is_event(target):
                self._add(node, "event_mutation", "run() assigns into event: the event is replayed as created on "
                          "every wake-up; copy what you need into a variable of your own")  # fmt: skip

    def visit_Assign(self, node: ast.Assign) -> None:
        self._targets(node.targets, node)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self._targets([node.target], node)
        self.generic_visit(node)

    def visit_Delete(self, node: ast.Delete) -> None:
        self._targets(node.targets, node)
        self.generic_visit(node)


def find(path: str, tree: ast.Module, workflows: set[str]) -> list[Hazard]:
    """The hazards in the ``run`` of each class in ``workflows`` defined in ``tree``."""
    imports = _imports(tree)
    found: list[Hazard] = []
    for node in tree.body:
        if not (isinstance(node, ast.ClassDef) and node.name in workflows):
            continue
        for item in node.body:
            if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name == "run":
                params = [a.arg for a in item.args.args]
                event = params[1] if len(params) > 1 else "event"
                step = params[2] if len(params) > 2 else "step"
                visitor = _RunVisitor(path, imports, event, step)
                for statement in item.body:
                    visitor.visit(statement)
                found += visitor.found
    return found
