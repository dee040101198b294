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
///
/// Drawn below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`), from which
/// outgoing connections take their local ports: a server restarted on its port (a database,
/// a broker, the MES itself in the recovery tests) could otherwise find it taken by a
/// client connection made while it was down ("Address already in use").
pub fn free_port() -> anyhow::Result<u16> {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    static DRAWS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()))
        .unwrap_or(32_768);
    const LOWEST: u16 = 10_000;
    let give = |port: u16| -> anyhow::Result<bool> {
        Ok(GIVEN.lock().map_err(|_| anyhow::anyhow!("port registry poisoned"))?.insert(port))
    };
    if ephemeral_low > LOWEST + 1_000 {
        let span = u64::from(ephemeral_low - LOWEST);
        let seed = u64::from(std::process::id()) << 32 ^ now_ms() as u64;
        for _ in 0..1_000 {
            // splitmix64 over a per-process counter: processes started together draw apart.
            let mut z = seed.wrapping_add(
                DRAWS.fetch_add(1, std::sync::atomic::Ordering::Relaxed).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            );
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let port = LOWEST + (z % span) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() && give(port)? {
                return Ok(port);
            }
        }
    }
    for _ in 0..1_000 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if give(port)? {
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
