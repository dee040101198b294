-- Every MQTT session the MES has used for telemetry (`src/ingest/sessions.rs`). A session
-- the current configuration no longer uses (`mqtt.sessions` changed) is drained of what the
-- broker kept for it and removed at the next start, so that no queued message is lost.
CREATE TABLE mqtt_sessions (
    client_id TEXT PRIMARY KEY,
    first_used_ms BIGINT NOT NULL
);
