-- Shared CRDT state documents of the agent mesh, and the node's identity.

-- One row per (tenant, document). `state` is the CRDT state as canonical
-- JSON (meshgate-core's crdt::Document::to_json), opaque to the store;
-- `hash` is its digest, `version` rises on every write.
CREATE TABLE state_docs (
    tenant     TEXT NOT NULL,
    name       TEXT NOT NULL,
    state      TEXT NOT NULL,
    hash       TEXT NOT NULL,
    version    INTEGER NOT NULL,
    size       INTEGER NOT NULL,              -- bytes of `state`
    updated_at INTEGER NOT NULL,              -- unix milliseconds
    PRIMARY KEY (tenant, name)
) WITHOUT ROWID;

-- Small facts about this database's gateway: `node_id`, the replica id the
-- gateway writes CRDT documents under, chosen once and kept for good.
CREATE TABLE node_meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
) WITHOUT ROWID;
