-- Streamable HTTP sessions ended with DELETE. A session id is a sealed token
-- that carries everything needed to resume it, so ending one must be
-- remembered until the token would have expired anyway (`expires_at`, unix
-- milliseconds); rows past that are purged when new ones are written.
CREATE TABLE ended_sessions (
    id         TEXT PRIMARY KEY NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
