-- Core schema (SQLite). Quantities are integers in base units; money in 1/10000 units;
-- times are milliseconds since the Unix epoch.

CREATE TABLE materials (
    sku TEXT PRIMARY KEY,
    unit TEXT NOT NULL,
    standard_cost BIGINT NOT NULL
);

CREATE TABLE bom_lines (
    sku TEXT NOT NULL REFERENCES materials(sku),
    component TEXT NOT NULL REFERENCES materials(sku),
    quantity BIGINT NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (sku, component)
);

CREATE TABLE buffers (
    id TEXT PRIMARY KEY,
    sku TEXT NOT NULL REFERENCES materials(sku),
    capacity BIGINT NOT NULL,
    on_hand BIGINT NOT NULL,
    reserved BIGINT NOT NULL DEFAULT 0,
    -- Production may consume below zero (the parts physically exist; it raises a
    -- shortage), so the no-oversell rule lives in the reservation's conditional update.
    CHECK (reserved >= 0)
);

CREATE TABLE work_centers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    device_id TEXT NOT NULL UNIQUE,
    device_kind TEXT NOT NULL,
    output_buffer TEXT NOT NULL REFERENCES buffers(id),
    ideal_cycle_ms BIGINT NOT NULL,
    conversion_rate BIGINT NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'stopped',
    reason TEXT,
    current_order TEXT,
    good_total BIGINT NOT NULL DEFAULT 0,
    scrap_total BIGINT NOT NULL DEFAULT 0,
    last_seen_ms BIGINT,
    updated_ms BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE work_center_inputs (
    work_center TEXT NOT NULL REFERENCES work_centers(id),
    buffer TEXT NOT NULL REFERENCES buffers(id),
    PRIMARY KEY (work_center, buffer)
);

-- The high-water mark of what has been counted per device; moves only forward.
CREATE TABLE device_cursors (
    device TEXT PRIMARY KEY,
    boot BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    good BIGINT NOT NULL,
    scrap BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);

CREATE TABLE orders (
    id TEXT PRIMARY KEY,
    sku TEXT NOT NULL REFERENCES materials(sku),
    quantity BIGINT NOT NULL CHECK (quantity > 0),
    work_center TEXT REFERENCES work_centers(id),
    status TEXT NOT NULL,
    good BIGINT NOT NULL DEFAULT 0,
    scrap BIGINT NOT NULL DEFAULT 0,
    due TEXT,
    priority BIGINT NOT NULL DEFAULT 0,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE INDEX orders_status ON orders(status);

-- One row per counted reading: the idempotency record of telemetry and the source
-- every movement traces back to.
CREATE TABLE telemetry (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    boot BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    work_center TEXT NOT NULL,
    order_id TEXT,
    ts_ms BIGINT,
    received_ms BIGINT NOT NULL,
    good BIGINT NOT NULL,
    scrap BIGINT NOT NULL,
    state TEXT NOT NULL,
    UNIQUE (device, boot, seq)
);

CREATE TABLE state_changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    work_center TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    ts_ms BIGINT NOT NULL
);
CREATE INDEX state_changes_wc ON state_changes(work_center, ts_ms);

CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_ms BIGINT NOT NULL,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    payload TEXT NOT NULL
);

-- First result of every request that carried an Idempotency-Key.
CREATE TABLE idempotency (
    key TEXT PRIMARY KEY,
    scope TEXT NOT NULL,
    status BIGINT NOT NULL,
    body TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);

CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_ms BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL
);
