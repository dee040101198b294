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

/// A port free on loopback now and not handed out before by this process (the kernel may
/// offer a port again as soon as its probe is closed: two taken in a row could be equal).
pub fn free_port() -> anyhow::Result<u16> {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    for _ in 0..1_000 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if GIVEN.lock().map_err(|_| anyhow::anyhow!("port registry poisoned"))?.insert(port) {
            return Ok(port);
        }
    }
    anyhow::bail!("no fresh free port on 127.0.0.1 in 1,000 tries")
}

/// Milliseconds since the Unix epoch, from the wall clock.
pub fn now_ms() -> i64 {
    use mes_actors::Clock;
    mes_actors::SystemClock.now_ms()
}
