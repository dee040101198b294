-- Telemetry packed: the readings a commit counts for one device are stored together, one
-- row per device and commit, instead of one row per reading. Under a flood a commit holds
-- some forty readings per device, and a row per reading (with its key and time indexes)
-- was most of the commit's time in the database. Nothing is dropped: every reading keeps
-- every field, and the `telemetry` view below unpacks them for whoever reads them.
--
-- The idempotency record of telemetry is the device cursor (`device_cursors`): the writer
-- stores a device's readings only if the first of them lies beyond the committed cursor,
-- and moves the cursor in the same transaction (src/db/writer.rs, `steps`).
CREATE TABLE telemetry_packs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    work_center TEXT NOT NULL,
    -- The readings' times (device time, else receive time): lowest and highest.
    t_min BIGINT NOT NULL,
    t_max BIGINT NOT NULL,
    -- (boot, seq) of the newest reading: a device's latest packs come first by it.
    last_boot BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    n BIGINT NOT NULL CHECK (n > 0),
    -- JSON array, one array per reading, in commit order:
    -- [boot, seq, order_id, ts_ms, received_ms, good, scrap, state, metrics]
    readings TEXT NOT NULL
);
-- Windows of a work center's output by time (OEE, counts, rollups, export).
CREATE INDEX telemetry_packs_wc_time ON telemetry_packs(work_center, t_max);
-- A work center's packs in commit order (export, paging by id).
CREATE INDEX telemetry_packs_wc ON telemetry_packs(work_center, id);
-- A device's newest readings (the restart baseline of running time).
CREATE INDEX telemetry_packs_device ON telemetry_packs(device, last_boot, last_seq);

-- The rows stored so far, each a pack of one reading (ids kept, so ids grow as before).
INSERT INTO telemetry_packs (id, device, work_center, t_min, t_max, last_boot, last_seq, n, readings)
SELECT id, device, work_center, COALESCE(ts_ms, received_ms), COALESCE(ts_ms, received_ms), boot, seq, 1,
       json_array(json_array(boot, seq, order_id, ts_ms, received_ms, good, scrap, state, json(metrics)))
FROM telemetry ORDER BY id;

DROP INDEX telemetry_wc_time;
DROP TABLE telemetry;

-- One row per reading, as the table was: `id` is its pack's (readings of one pack share
-- it; ids grow with commit order), `pos` its place in the pack, `pack_t_min`/`pack_t_max`
-- the pack's time bounds, which let a query by time skip packs without unpacking them.
-- (`jsonb_each`: a reading's `value` stays binary JSON, each field a lookup; `json_each`
-- would hand it back as text, parsed again for every field.)
CREATE VIEW telemetry AS
SELECT p.id AS id, p.device AS device, r.value->>0 AS boot, r.value->>1 AS seq, p.work_center AS work_center,
       r.value->>2 AS order_id, r.value->>3 AS ts_ms, r.value->>4 AS received_ms, r.value->>5 AS good,
       r.value->>6 AS scrap, r.value->>7 AS state, r.value->>8 AS metrics,
       p.t_min AS pack_t_min, p.t_max AS pack_t_max, r.key AS pos
FROM telemetry_packs p, jsonb_each(p.readings) r;

-- `commit_checks` (0009) keeps its constraint's name, `telemetry_rows_all_new`; what inserts
-- into it is now the check that each device's first reading of a commit lies beyond the
-- committed cursor (src/db/writer.rs, `guard_cursors`).
