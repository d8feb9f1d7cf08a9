"""The plugin contracts' conformance suites, shipped with tenantflow so that every storage engine,
sandbox and code loader, built in or not, passes the same tests.

Opt-in: ``pytest -p tenantflow.conformance.plugin --pyargs tenantflow.conformance
--tenantflow-storage NAME --tenantflow-runtime NAME --tenantflow-loader SCHEME``. A plugin gives the
suites a harness (:mod:`tenantflow.conformance.harness`) through the ``tenantflow_conformance``
hook. See README, "Testing a plugin".
"""
