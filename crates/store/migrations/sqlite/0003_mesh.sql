-- Agent mesh: tasks, agents and task payload blobs.

-- Tasks. `seq` (the rowid) is assigned on first insert as the largest seq
-- plus one, so it orders tasks by creation and is the paging cursor; upserts
-- go through the unique `id`. Not AUTOINCREMENT: that would burn a number on
-- every upsert that turns into an update. Instead the purge never deletes
-- the row with the largest seq, so no seq is ever handed out twice.
CREATE TABLE tasks (
    seq             INTEGER PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE,      -- 't-...'
    tenant          TEXT NOT NULL,
    state           TEXT NOT NULL,             -- pending | assigned | accepted | in_progress | completed | failed | cancelled | timeout
    task_type       TEXT NOT NULL,
    agent_id        TEXT,
    idempotency_key TEXT,
    created_at      INTEGER NOT NULL,          -- unix milliseconds
    updated_at      INTEGER NOT NULL,
    doc             TEXT NOT NULL              -- JSON: the whole task
);
CREATE INDEX tasks_tenant_seq ON tasks (tenant, seq);
-- Filters by state, and the retention purge (terminal states, oldest first)
-- without reading the finished tasks it keeps.
CREATE INDEX tasks_state_updated ON tasks (state, updated_at);
CREATE INDEX tasks_agent_id ON tasks (agent_id) WHERE agent_id IS NOT NULL;
-- An idempotency key names one task per tenant; tasks without one are many.
CREATE UNIQUE INDEX tasks_tenant_idempotency ON tasks (tenant, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- The open tasks loaded at start-up, in seq order, without scanning the
-- finished ones. The WHERE must stay textually equivalent to the query's in
-- sqlite_mesh.rs (OPEN_TASK_FILTER) for SQLite to use this index.
CREATE INDEX tasks_open_seq ON tasks (seq)
    WHERE state NOT IN ('completed', 'failed', 'cancelled', 'timeout');

-- Registered agents: registration and stats (`doc`) and the pushed
-- configuration with its version.
CREATE TABLE agents (
    id             TEXT PRIMARY KEY NOT NULL,
    tenant         TEXT NOT NULL,
    agent_type     TEXT NOT NULL,
    doc            TEXT NOT NULL,              -- JSON
    config         TEXT NOT NULL,              -- JSON
    config_version INTEGER NOT NULL,
    last_seen_at   INTEGER NOT NULL,           -- unix milliseconds
    updated_at     INTEGER NOT NULL
);
CREATE INDEX agents_tenant ON agents (tenant, id);

-- Binary payloads referenced by tasks.
CREATE TABLE blobs (
    id           TEXT PRIMARY KEY NOT NULL,
    tenant       TEXT NOT NULL,
    content_type TEXT NOT NULL,
    sha256       TEXT NOT NULL,                -- hex
    size         INTEGER NOT NULL,             -- bytes
    data         BLOB NOT NULL,
    created_at   INTEGER NOT NULL              -- unix milliseconds
);
