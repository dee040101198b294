-- A device's last device time is kept with its cursor. The work-center actor needs, after
-- a restart or a takeover, the device time of the device's newest counted reading that
-- carried one (running time, and the conversion priced from it, continue from there). It
-- was read from the device's newest packs through an index on `(device, last_boot,
-- last_seq)`, and that index cost every commit one insertion per device, on a leaf page of
-- that device's own: with 64 devices in a commit, 64 of the pages it wrote. The writer now
-- moves `last_ts_ms` with the cursor in the same statement, and the index goes.
ALTER TABLE device_cursors ADD COLUMN last_ts_ms BIGINT;

-- What the old read found: the newest reading with a device time among the device's 16
-- newest packs, else in its whole history.
UPDATE device_cursors SET last_ts_ms = COALESCE(
    (SELECT t.ts_ms FROM telemetry t
     WHERE t.id IN (SELECT p.id FROM telemetry_packs p WHERE p.device = device_cursors.device
                    ORDER BY p.last_boot DESC, p.last_seq DESC LIMIT 16)
       AND t.ts_ms IS NOT NULL
     ORDER BY t.boot DESC, t.seq DESC LIMIT 1),
    (SELECT t.ts_ms FROM telemetry t
     WHERE t.id IN (SELECT p.id FROM telemetry_packs p WHERE p.device = device_cursors.device)
       AND t.ts_ms IS NOT NULL
     ORDER BY t.boot DESC, t.seq DESC LIMIT 1));

DROP INDEX IF EXISTS telemetry_packs_device;
