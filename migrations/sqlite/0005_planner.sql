-- Planner features: order dispatch tracking, surge plans, an append-only audit log.

-- Each time an order is sent to its work center's device (MQTT set_order, Modbus target).
CREATE TABLE dispatches (
    id TEXT PRIMARY KEY,
    order_id TEXT NOT NULL,
    work_center TEXT NOT NULL,
    device TEXT NOT NULL,
    channel TEXT NOT NULL,          -- mqtt | modbus
    status TEXT NOT NULL,           -- sent | acknowledged | failed
    error TEXT,
    sent_ms BIGINT NOT NULL,
    acked_ms BIGINT
);
CREATE INDEX dispatches_order ON dispatches(order_id, status);

-- A promotion's capacity and material check, and what releasing it created.
CREATE TABLE surge_plans (
    id TEXT PRIMARY KEY,
    sku TEXT NOT NULL,
    quantity BIGINT NOT NULL,
    due_ms BIGINT NOT NULL,
    status TEXT NOT NULL,           -- proposed | released
    plan TEXT NOT NULL,             -- the plan as JSON
    created_by TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    released_ms BIGINT
);

-- The audit log is append-only: the database refuses to change or delete a line.
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;

-- OEE and order windows read a work center's counts by time (device time where given).
CREATE INDEX telemetry_wc_time ON telemetry(work_center, (COALESCE(ts_ms, received_ms)));
