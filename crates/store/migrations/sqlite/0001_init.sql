-- Upstream MCP server definitions (from the config file or, later, the API).
CREATE TABLE upstreams (
    name        TEXT PRIMARY KEY NOT NULL,
    source      TEXT NOT NULL,            -- 'config' | 'api'
    definition  TEXT NOT NULL,            -- JSON of the upstream's configuration
    created_at  INTEGER NOT NULL,         -- unix milliseconds
    updated_at  INTEGER NOT NULL
);

-- MCP client sessions: enough to resume one after a restart.
CREATE TABLE sessions (
    id               TEXT PRIMARY KEY NOT NULL,
    transport        TEXT NOT NULL,       -- 'streamable_http' | 'sse'
    protocol_version TEXT NOT NULL,
    client_name      TEXT NOT NULL,
    client_version   TEXT NOT NULL,
    state            TEXT NOT NULL,       -- JSON: the client's initialize parameters
    created_at       INTEGER NOT NULL,
    last_seen_at     INTEGER NOT NULL
);
CREATE INDEX sessions_last_seen ON sessions (last_seen_at);
