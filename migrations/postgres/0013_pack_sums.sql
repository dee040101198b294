-- Each pack's good and scrap units (the sums of its readings' `good` and `scrap`), so that
-- the live OEE takes a pack whose readings all fall within one second from these two
-- columns instead of unpacking its readings. Unpacking every reading committed since the
-- last refresh took PostgreSQL 1.2 to 1.6 s of CPU every 5 s under a flood at half rate,
-- and the writer's commits waited behind it (docs/BENCHMARKS.md, session 15).
ALTER TABLE telemetry_packs ADD COLUMN good BIGINT NOT NULL DEFAULT 0;
ALTER TABLE telemetry_packs ADD COLUMN scrap BIGINT NOT NULL DEFAULT 0;

UPDATE telemetry_packs SET
    good = (SELECT COALESCE(SUM((r.value->>5)::bigint), 0) FROM json_array_elements(readings::json) AS r(value)),
    scrap = (SELECT COALESCE(SUM((r.value->>6)::bigint), 0) FROM json_array_elements(readings::json) AS r(value));
