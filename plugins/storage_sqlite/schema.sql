PRAGMA journal_mode = WAL;

CREATE TABLE IF NOT EXISTS artifacts (
    tenant TEXT NOT NULL, name TEXT NOT NULL, digest TEXT NOT NULL, runtime TEXT NOT NULL,
    files TEXT NOT NULL, workflows TEXT NOT NULL, created_at REAL NOT NULL,
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    UNIQUE (tenant, name, digest)
);
-- Code.List: a tenant's versions newest first, of every name or of one
CREATE INDEX IF NOT EXISTS artifacts_listed ON artifacts (tenant, seq);
CREATE INDEX IF NOT EXISTS artifacts_listed_by_name ON artifacts (tenant, name, seq);

CREATE TABLE IF NOT EXISTS instances (
    rowid INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL, id TEXT NOT NULL, workflow TEXT NOT NULL, code TEXT NOT NULL,
    runtime TEXT NOT NULL, module TEXT NOT NULL, params_json TEXT NOT NULL,
    status INTEGER NOT NULL, output_json TEXT NOT NULL DEFAULT '',
    error_name TEXT NOT NULL DEFAULT '', error_message TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL, updated_at REAL NOT NULL, run_at REAL,
    generation INTEGER NOT NULL DEFAULT 0, lease_owner TEXT, lease_until REAL,
    parent TEXT NOT NULL DEFAULT '',  -- added by engine.py to databases made before it
    UNIQUE (tenant, id)
);
CREATE INDEX IF NOT EXISTS instances_due ON instances (run_at) WHERE run_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS instances_by_status ON instances (tenant, status, rowid);
CREATE INDEX IF NOT EXISTS instances_by_workflow ON instances (tenant, workflow, rowid);
CREATE INDEX IF NOT EXISTS instances_leased ON instances (tenant) WHERE lease_owner IS NOT NULL;
-- retention: terminal statuses (ERRORED 4, TERMINATED 5, COMPLETE 6) by age
CREATE INDEX IF NOT EXISTS instances_ended ON instances (updated_at) WHERE status IN (4, 5, 6);

CREATE TABLE IF NOT EXISTS steps (
    tenant TEXT NOT NULL, id TEXT NOT NULL, key TEXT NOT NULL, seq INTEGER NOT NULL,
    name TEXT NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL, attempts INTEGER NOT NULL,
    output_json TEXT NOT NULL, error_name TEXT NOT NULL, error_message TEXT NOT NULL,
    wake_at REAL, event_type TEXT NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (tenant, id, key)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS events (
    tenant TEXT NOT NULL, id TEXT NOT NULL, seq INTEGER NOT NULL, type TEXT NOT NULL,
    payload_json TEXT NOT NULL, created_at REAL NOT NULL, consumed_by TEXT NOT NULL DEFAULT '',
    bytes INTEGER NOT NULL DEFAULT 0,  -- type + payload (UTF-8); added by engine.py to older databases
    PRIMARY KEY (tenant, id, seq)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS history (
    tenant TEXT NOT NULL, id TEXT NOT NULL, seq INTEGER NOT NULL, at REAL NOT NULL,
    kind TEXT NOT NULL, status INTEGER NOT NULL, step TEXT NOT NULL, attempt INTEGER NOT NULL,
    message TEXT NOT NULL, data_json TEXT NOT NULL,
    PRIMARY KEY (tenant, id, seq)
) WITHOUT ROWID;

-- Concurrency limits: instances.conc_key and conc_limit, and the index instances_limited_leased,
-- are added by engine.py (_migrate), so databases made before them get them too.
-- Inbox caps and waits: events.bytes and the indexes events_unread (a wait's event, the inbox's
-- count and bytes) and steps_waiting (whether an event wakes the instance), likewise.
-- Tenant tracebacks: instances.error_traceback and steps.error_traceback, likewise.

CREATE TABLE IF NOT EXISTS schedules (
    tenant TEXT NOT NULL, name TEXT NOT NULL,
    body TEXT NOT NULL,  -- the ScheduleRecord as JSON; the columns below repeat what is queried
    next_fire REAL,      -- NULL while paused
    lease_until REAL, version INTEGER NOT NULL,
    PRIMARY KEY (tenant, name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS schedules_due ON schedules (next_fire) WHERE next_fire IS NOT NULL;

-- A tenant's own key-value store (ctx.kv, the KV service) and its usage, kept by the writes.
-- version: kv_usage.clock when the key was last written (a step's read set is checked against it).
CREATE TABLE IF NOT EXISTS kv (
    tenant TEXT NOT NULL, key TEXT NOT NULL, value_json TEXT NOT NULL, updated_at REAL NOT NULL,
    version INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (tenant, key)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS kv_usage (
    tenant TEXT NOT NULL PRIMARY KEY, keys INTEGER NOT NULL, bytes INTEGER NOT NULL,
    clock INTEGER NOT NULL DEFAULT 1  -- the tenant's last commit of keys (their versions)
) WITHOUT ROWID;

-- Tenants' secrets, sealed by the kernel (AES-256-GCM): storage never holds a value in clear.
CREATE TABLE IF NOT EXISTS secrets (
    tenant TEXT NOT NULL, name TEXT NOT NULL, sealed BLOB NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (tenant, name)
) WITHOUT ROWID;

-- Tenants' egress allow-lists (kernel/egress.py): the rules as JSON, set through Egress.Set.
CREATE TABLE IF NOT EXISTS egress (
    tenant TEXT PRIMARY KEY, rules_json TEXT NOT NULL, updated_at REAL NOT NULL
) WITHOUT ROWID;
