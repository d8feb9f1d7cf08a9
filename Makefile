# The documented entry points: `make demo` and `make test`. Everything else is a helper of those.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-stock lint typecheck unit conformance example-plugin proto-check runtimes node-deps bench loadtest figures clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,load,fdb,git,wasm,secrets]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP) lint typecheck proto-check runtimes node-deps unit conformance example-plugin docs

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check kernel plugins clients tests loadtests examples

typecheck: $(STAMP)
	MYPY=$(VENV)/bin/mypy bash scripts/typecheck.sh

proto-check: $(STAMP)
	PYTHON=$(PY) bash scripts/gen_proto.sh --check

# The python-wasm runner is built and compiled once per machine (cached in ~/.cache/tenantflow);
# doing it here keeps that one-off cost out of the tests' time-outs.
runtimes: $(STAMP)
	@echo "preparing the python-wasm runner (once per machine; ~20 s the first time)"
	$(PY) -c "from tenantflow.plugins.sandbox_wasm.python_wasm import PythonWasmSandbox as S; print('python-wasm runner ready: CPython', S(1).runner().python)"

# The Node.js client test's packages and the console browser test's Playwright (both skipped, with
# that reason, where Node.js is not installed; the browser test also where Chromium is not).
NODE_DIR := tests/clients/node
CONSOLE_DIR := tests/console
node-deps:
	@if command -v npm >/dev/null; then \
		[ $(NODE_DIR)/node_modules/.package-lock.json -nt $(NODE_DIR)/package-lock.json ] || \
		(cd $(NODE_DIR) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error); \
	else echo "npm not found: the Node.js client test will be skipped"; fi
	@if command -v npm >/dev/null; then \
		[ $(CONSOLE_DIR)/node_modules/.package-lock.json -nt $(CONSOLE_DIR)/package-lock.json ] || \
		(cd $(CONSOLE_DIR) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error); \
	else echo "npm not found: the console's browser test will be skipped"; fi

# The suite on every core (pytest-xdist), a test file per worker: most tests wait on a kernel or a
# sandbox process, so two workers on two cores take ~60% of the time of one. PYTEST_WORKERS=0: in-process.
PYTEST_WORKERS ?= 2
unit: $(STAMP)
	$(VENV)/bin/pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(TESTS)

# The plugin contracts' suites as they ship (tenantflow.conformance), run on the built-in plugins
# exactly as a plugin author runs them on theirs.
SUITES ?= --tenantflow-storage sqlite --tenantflow-storage kv+lmdb --tenantflow-storage fdb \
	--tenantflow-runtime python --tenantflow-runtime python-wasm --tenantflow-runtime wasm \
	--tenantflow-loader artifact --tenantflow-loader git+file
conformance: $(STAMP)
	$(VENV)/bin/pytest -q -p tenantflow.conformance.plugin --pyargs tenantflow.conformance $(SUITES)

# The out-of-tree example plugin, tested as its author would: a fresh venv where this checkout and the
# plugin are pip-installed (built, not editable; pip's cache keeps it quick), its own tests, then the
# shipped loader suite on it. Nothing else of the project is on that venv's path.
PLUGIN_VENV ?= build/venv-plugin
EXAMPLE_PLUGIN := examples/plugins/http_bundles
example-plugin:
	rm -rf $(PLUGIN_VENV)
	$(PYTHON) -m venv $(PLUGIN_VENV)
	$(PLUGIN_VENV)/bin/pip install --quiet --disable-pip-version-check . ./$(EXAMPLE_PLUGIN) pytest
	cd $(EXAMPLE_PLUGIN) && $(abspath $(PLUGIN_VENV))/bin/pytest -q -p no:cacheprovider
	cd $(EXAMPLE_PLUGIN) && $(abspath $(PLUGIN_VENV))/bin/pytest -q -p no:cacheprovider \
		-p tenantflow.conformance.plugin --pyargs tenantflow.conformance --tenantflow-loader https

# The configuration a stock machine has, tested too: a venv of a world-readable system Python (e.g.
# Debian's /usr/bin/python3), running every test whose outcome depends on the uid tenant code runs
# as and on what that uid may reach (the attacks, the sandbox's own tests, the sandbox conformance
# suite and each test that grants tenant code a directory).
STOCK_PYTHON ?= /usr/bin/python3
STOCK_VENV ?= build/venv-stock
UID_TESTS := tests/security tests/plugins/sandbox_subprocess \
	tests/kernel/test_durability.py tests/kernel/test_multinode.py tests/plugins/storage_fdb/test_kernel_on_lmdb.py
UID_SUITES := --tenantflow-runtime python --tenantflow-runtime python-wasm --tenantflow-runtime wasm
test-stock:
	$(MAKE) PYTHON=$(STOCK_PYTHON) VENV=$(STOCK_VENV) runtimes unit conformance TESTS="$(UID_TESTS)" SUITES="$(UID_SUITES)"

# The API reference of the client, the tenant SDK and the conformance harnesses, from their
# docstrings (fails on a missing one).
docs: $(STAMP)
	$(PY) scripts/docs.py build/docs

# P1-P5 of issue 23, each as a ratio to its goal or to raw SQLite in the same run (~4 min on 2 cores).
# The million-sleeper P5: nice -n 19 $(PY) loadtests/bench_wakeups.py --skip P4 claim --sleepers 1000000
bench: $(STAMP)
	$(PY) loadtests/bench_steps.py --sync FULL
	$(PY) loadtests/bench_wakeups.py

# A locust scenario against a kernel of its own (or ARGS='--host HOST:PORT'); writes a report folder
# with locust's HTML/CSV and PNG plots of the kernel. E.g. make loadtest ARGS='--scenario noisy -t 2m'
loadtest: $(STAMP)
	$(PY) loadtests/loadtest.py $(ARGS)

# The quick figures of README's "Figures" section (a few minutes; the million-instance run is separate).
figures: $(STAMP)
	$(PY) loadtests/bench_steps.py
	nice -n 19 $(PY) loadtests/bench_density.py --instances 10000 --tenants 1000 --wake 300 --wake-rate 10
	nice -n 19 $(PY) loadtests/loadtest.py --scenario all --users 30 --duration 60s --quiet

clean:
	rm -rf $(VENV) $(STOCK_VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache $(NODE_DIR)/node_modules $(CONSOLE_DIR)/node_modules
