-- API keys: only the SHA-256 of the secret is stored.
CREATE TABLE api_keys (
    id                    TEXT PRIMARY KEY NOT NULL,   -- 'key_' + 16 hex
    hash                  TEXT NOT NULL UNIQUE,        -- SHA-256 of the key, hex
    prefix                TEXT NOT NULL,
    name                  TEXT NOT NULL,
    tenant                TEXT NOT NULL,
    role                  TEXT NOT NULL,
    scopes                TEXT NOT NULL,               -- JSON array of strings
    created_at            INTEGER NOT NULL,            -- unix milliseconds
    created_by            TEXT NOT NULL,
    expires_at            INTEGER,
    revoked_at            INTEGER,
    rate_limit_per_minute INTEGER,
    last_used_at          INTEGER
);
CREATE INDEX api_keys_tenant ON api_keys (tenant);

-- Refresh tokens (hash only), grouped in rotation families.
CREATE TABLE refresh_tokens (
    id         TEXT PRIMARY KEY NOT NULL,
    hash       TEXT NOT NULL UNIQUE,                   -- SHA-256 of the token, hex
    family     TEXT NOT NULL,
    key_id     TEXT NOT NULL,
    tenant     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at    INTEGER,
    revoked_at INTEGER
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family);
CREATE INDEX refresh_tokens_key_id ON refresh_tokens (key_id);

-- Append-only audit log; ids give the order and the paging cursor.
CREATE TABLE audit_log (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at         INTEGER NOT NULL,                       -- unix milliseconds
    tenant     TEXT NOT NULL,
    actor      TEXT NOT NULL,
    actor_kind TEXT NOT NULL,
    action     TEXT NOT NULL,
    target     TEXT NOT NULL,
    args_hash  TEXT,
    outcome    TEXT NOT NULL,
    latency_ms REAL,
    trace_id   TEXT,
    detail     TEXT NOT NULL                           -- JSON
);
CREATE INDEX audit_log_tenant_id ON audit_log (tenant, id);
CREATE INDEX audit_log_at ON audit_log (at);

-- Who opened each MCP session.
CREATE TABLE session_owners (
    session_id TEXT PRIMARY KEY NOT NULL,
    tenant     TEXT NOT NULL,
    subject    TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
