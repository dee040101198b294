-- Scale-out: several `mes serve` nodes share one database (docs/SCALING.md).

-- One row per node that ever joined; `heartbeat_ms` is the database's clock.
CREATE TABLE cluster_nodes (
    node_id TEXT PRIMARY KEY,
    http_addr TEXT NOT NULL,
    started_ms BIGINT NOT NULL,
    heartbeat_ms BIGINT NOT NULL,
    lease_ms BIGINT NOT NULL,
    left_ms BIGINT
);

-- Ownership of a work center (its device intake, actors and queue). `token` grows by one
-- at every change of owner: the fencing token every commit of the owner is checked against.
CREATE TABLE leases (
    work_center TEXT PRIMARY KEY,
    node_id TEXT,
    token BIGINT NOT NULL DEFAULT 0,
    expires_ms BIGINT NOT NULL DEFAULT 0,
    acquired_ms BIGINT
);
CREATE INDEX leases_node ON leases(node_id);
