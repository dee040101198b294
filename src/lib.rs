//! The MES server: configuration, start-up wiring, adapters, storage and the HTTP API.
//!
//! See `docs/ARCHITECTURE.md` for the bird's-eye view. The domain lives in the
//! `mes-actors` crate; this crate moves bytes in and out of it.

pub mod app;
pub mod bench;
pub mod bench_cluster;
pub mod bench_floor;
pub mod bench_http;
pub mod bench_load;
pub mod bench_modbus;
pub mod bench_scale;
pub mod bench_suite;
pub mod broker;
pub mod cluster;
pub mod config;
pub mod dashboard;
pub mod db;
pub mod demo;
pub mod erp;
pub mod events;
pub mod http;
pub mod influx;
pub mod ingest;
pub mod live;
pub mod metrics;
pub mod oee_live;
pub mod openapi;
pub mod plant;
pub mod settlement;
pub mod time;

/// Milliseconds since the Unix epoch, from the wall clock.
pub fn now_ms() -> i64 {
    use mes_actors::Clock;
    mes_actors::SystemClock.now_ms()
}
