"""Build the API reference of the platform client, the tenant SDK and the conformance harnesses
plugins implement from their docstrings (pdoc), and fail when a public name has none, so the
reference cannot rot: ``python scripts/docs.py OUT``."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pdoc
import pdoc.doc

MODULES = ("tenantflow.client", "tenantflow.workflow", "tenantflow.conformance.harness")


def undocumented(module: pdoc.doc.Module) -> list[str]:
    """The public names of ``module`` (and their public members) without a docstring of their own."""
    missing = []
    public = getattr(module.obj, "__all__", [n for n in module.members if not n.startswith("_")])
    for name in public:
        member = module.members[name]
        if isinstance(member, pdoc.doc.Variable):
            continue
        if not member.docstring.strip():
            missing.append(member.qualname)
        if isinstance(member, pdoc.doc.Class):
            for inner in member.own_members:
                if inner.name.startswith("_") or not isinstance(inner, pdoc.doc.Function):
                    continue
                if not inner.docstring.strip():
                    missing.append(inner.qualname)
    return [f"{module.name}.{name}" for name in missing]


def main(out: Path) -> int:
    # Client.list shadows the builtin in the class's namespace, where pdoc evaluates annotations.
    warnings.filterwarnings("ignore", message="Error parsing type annotation")
    pdoc.render.configure(docformat="restructuredtext", footer_text="tenantflow")
    missing = [name for m in MODULES for name in undocumented(pdoc.doc.Module.from_name(m))]
    if missing:
        print("these public names have no docstring:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 1
    pdoc.pdoc(*MODULES, output_directory=out)
    print(f"API reference of {', '.join(MODULES)} in {out}/index.html")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "build/docs")))
