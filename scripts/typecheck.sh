#!/usr/bin/env bash
# mypy (strict) over our packages. The source dirs map onto `tenantflow.*` (see pyproject
# package-dir), which mypy cannot follow, so we check a symlinked view of the package tree.
set -euo pipefail
cd "$(dirname "$0")/.."
view=build/typecheck/tenantflow
rm -rf build/typecheck && mkdir -p "$view"
# mypy does not descend into symlinked directories: mirror the tree with symlinked files
cp "$PWD/proto/tenantflow/__init__.py" "$view/__init__.py"
cp -rs "$PWD/proto/tenantflow/v1" "$view/v1"
cp -rs "$PWD/kernel" "$view/kernel"
cp -rs "$PWD/plugins" "$view/plugins"
cp -rs "$PWD/clients/python" "$view/client"
cp -rs "$PWD/clients/workflow" "$view/workflow"
cp -rs "$PWD/clients/testing" "$view/testing"
cp -rs "$PWD/clients/conformance" "$view/conformance"
find "$view" -name __pycache__ -prune -exec rm -rf {} +
MYPYPATH=build/typecheck "${MYPY:-.venv/bin/mypy}" -p tenantflow.kernel -p tenantflow.plugins \
  -p tenantflow.client -p tenantflow.workflow -p tenantflow.testing -p tenantflow.conformance "$@"
# the out-of-tree example plugin, against the package as its authors get it
MYPYPATH=build/typecheck:examples/plugins/http_bundles/src "${MYPY:-.venv/bin/mypy}" -p tenantflow_http_bundles "$@"
