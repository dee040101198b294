-- Device metrics of each counted reading (the `metrics` object of MQTT telemetry, the
-- non-counter points of polled devices) as a JSON object of numbers, NULL when there are
-- none. Written in the same transaction as the telemetry row, so the time series sent to
-- InfluxDB can be rebuilt from the database (`mes export-timeseries`).
ALTER TABLE telemetry ADD COLUMN metrics TEXT;

-- Per-minute rollups and `mes export-timeseries` read a work center's rows by time
-- (device time, else receive time) through `telemetry_wc_time`, created in 0005.
