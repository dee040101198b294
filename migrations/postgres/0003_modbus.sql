-- The last raw counter registers read from each Modbus device, committed with the
-- reading they produced: after a restart they are the baseline, so what the device
-- counted meanwhile is counted.
CREATE TABLE modbus_raw (
    device TEXT PRIMARY KEY,
    good BIGINT NOT NULL,
    scrap BIGINT NOT NULL,
    boot BIGINT,
    updated_ms BIGINT NOT NULL
);
