-- Each pack's good and scrap units (the sums of its readings' `good` and `scrap`), so that
-- the live OEE takes a pack whose readings all fall within one second from these two
-- columns instead of unpacking its readings (see the PostgreSQL migration of this number).
ALTER TABLE telemetry_packs ADD COLUMN good BIGINT NOT NULL DEFAULT 0;
ALTER TABLE telemetry_packs ADD COLUMN scrap BIGINT NOT NULL DEFAULT 0;

UPDATE telemetry_packs SET
    good = (SELECT COALESCE(SUM(r.value->>5), 0) FROM jsonb_each(readings) AS r),
    scrap = (SELECT COALESCE(SUM(r.value->>6), 0) FROM jsonb_each(readings) AS r);
