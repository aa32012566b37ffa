-- keyward schema, version 1. Written once for both backends: `BLOB` becomes `BYTEA` on
-- PostgreSQL. Times are unix seconds; flags are integers, so the same queries decode on both.

CREATE TABLE meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    -- Server-wide revision, bumped first in every write transaction.
    revision BIGINT NOT NULL,
    -- Head of the audit chain, so a deleted last entry is noticed.
    audit_head_seq BIGINT NOT NULL,
    audit_head_hash TEXT NOT NULL
);
INSERT INTO meta (id, revision, audit_head_seq, audit_head_hash)
    VALUES (1, 0, 0, '0000000000000000000000000000000000000000000000000000000000000000');

CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    -- 'pending' (token issued, not enrolled), 'active', 'evicted'
    state TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    enrolled_at BIGINT,
    evicted_at BIGINT,
    last_seen BIGINT,
    -- JSON array of {id, tags} as last reported by the agent
    inventory TEXT NOT NULL DEFAULT '[]',
    inventory_at BIGINT
);

CREATE TABLE join_tokens (
    token_hash TEXT PRIMARY KEY,
    node_id TEXT NOT NULL REFERENCES nodes(id),
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);

CREATE TABLE certificates (
    serial TEXT PRIMARY KEY,
    -- 'node/<id>' or 'operator/<name>'
    subject TEXT NOT NULL,
    node_id TEXT,
    issued_at BIGINT NOT NULL,
    not_after BIGINT NOT NULL,
    denied_at BIGINT
);
CREATE INDEX certificates_node ON certificates (node_id);

CREATE TABLE users (
    name TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL
);

CREATE TABLE groups (
    name TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL
);

CREATE TABLE group_members (
    group_name TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
    user_name TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    PRIMARY KEY (group_name, user_name)
);

-- Every key keyward knows: users' SSH keys, per-container access keys and host keys.
CREATE TABLE keys (
    id TEXT PRIMARY KEY,
    -- 'user', 'access', 'host'
    kind TEXT NOT NULL,
    user_name TEXT,
    container_id TEXT,
    fingerprint TEXT NOT NULL,
    public_key TEXT NOT NULL,
    -- 'active', 'revoked'
    state TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT,
    revoke_reason TEXT
);
CREATE INDEX keys_user ON keys (user_name);
CREATE INDEX keys_container ON keys (container_id);

CREATE TABLE containers (
    id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL REFERENCES nodes(id),
    name TEXT NOT NULL,
    -- 'active', 'destroying', 'destroyed', 'orphaned' (node evicted)
    state TEXT NOT NULL,
    image_ref TEXT NOT NULL,
    image_id TEXT NOT NULL,
    -- JSON RunSettings
    run_settings TEXT NOT NULL,
    generation BIGINT NOT NULL,
    applied_generation BIGINT NOT NULL DEFAULT 0,
    -- last outcome reported by the agent: 'pending', 'applied', 'failed', 'refused', 'wiped'
    status TEXT NOT NULL DEFAULT 'pending',
    status_generation BIGINT NOT NULL DEFAULT 0,
    status_reason TEXT,
    status_at BIGINT,
    access_key_id TEXT NOT NULL,
    host_key_id TEXT NOT NULL,
    -- OpenSSH private host key, encrypted under the key-encryption key
    host_key_enc BLOB NOT NULL,
    known_hosts TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    destroyed_at BIGINT
);
CREATE UNIQUE INDEX containers_live_name ON containers (node_id, name) WHERE state <> 'destroyed';
CREATE INDEX containers_node ON containers (node_id);

-- Groups whose users may log into a container.
CREATE TABLE container_groups (
    container_id TEXT NOT NULL REFERENCES containers(id),
    group_name TEXT NOT NULL,
    PRIMARY KEY (container_id, group_name)
);
CREATE INDEX container_groups_group ON container_groups (group_name);

-- Secret files an operator asked to inject, encrypted.
CREATE TABLE secret_files (
    container_id TEXT NOT NULL REFERENCES containers(id),
    path TEXT NOT NULL,
    mode BIGINT NOT NULL,
    uid BIGINT NOT NULL,
    gid BIGINT NOT NULL,
    content_enc BLOB NOT NULL,
    PRIMARY KEY (container_id, path)
);

-- Signed manifests, one per container and generation.
CREATE TABLE manifests (
    container_id TEXT NOT NULL REFERENCES containers(id),
    generation BIGINT NOT NULL,
    node_id TEXT NOT NULL,
    revision BIGINT NOT NULL,
    action TEXT NOT NULL,
    digest TEXT NOT NULL,
    -- SHA-256 over what the container would hold (image, run settings, files), to skip
    -- generations that would change nothing.
    content_digest TEXT NOT NULL,
    envelope BLOB NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (container_id, generation)
);
CREATE INDEX manifests_node_revision ON manifests (node_id, revision);

-- File contents of recent generations, encrypted; what agents fetch.
CREATE TABLE manifest_files (
    container_id TEXT NOT NULL,
    generation BIGINT NOT NULL,
    idx BIGINT NOT NULL,
    content_enc BLOB NOT NULL,
    PRIMARY KEY (container_id, generation, idx)
);

-- Which container held which key from which generation, and the generation that dropped it.
CREATE TABLE key_holders (
    key_id TEXT NOT NULL,
    container_id TEXT NOT NULL,
    from_generation BIGINT NOT NULL,
    until_generation BIGINT,
    PRIMARY KEY (key_id, container_id, from_generation)
);
CREATE INDEX key_holders_container ON key_holders (container_id);

CREATE TABLE rollouts (
    id TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    -- 'running', 'paused', 'completed'
    state TEXT NOT NULL,
    batch_size BIGINT NOT NULL,
    max_in_flight BIGINT NOT NULL,
    failure_threshold BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    -- Failures reported before this time no longer count toward the threshold.
    resumed_at BIGINT NOT NULL,
    finished_at BIGINT
);

CREATE TABLE rollout_items (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id),
    container_id TEXT NOT NULL,
    -- 'pending', 'released', 'applied', 'skipped'
    state TEXT NOT NULL,
    target_generation BIGINT,
    batch BIGINT,
    released_at BIGINT,
    finished_at BIGINT,
    reason TEXT,
    PRIMARY KEY (rollout_id, container_id)
);
CREATE INDEX rollout_items_container ON rollout_items (container_id, state);

-- Hash-chained audit log. hash = SHA-256 over the entry's fields and prev_hash.
CREATE TABLE audit (
    seq BIGINT PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    subject TEXT NOT NULL,
    details TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
