//! `mes bench`: end-to-end committed telemetry per second next to the raw broker rate,
//! measured in the same run on the same embedded broker.
//!
//! Baseline: one publisher → one subscriber that does nothing (QoS 1, automatic acks).
//! MES: the same publisher → the MES (parse, actor, group commit, ack after commit);
//! the clock stops when the last message is committed.

use crate::app::Handle;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bench_load::mqtt_options as options;

/// Publishes `n` messages round-robin over `devices` under `prefix`, each device's `seq`
/// counting from `first_seq`; returns when all are acked by the broker.
pub async fn publish(addr: &str, prefix: &str, devices: &[String], n: u64, first_seq: u64) -> anyhow::Result<()> {
    let load = crate::bench_load::Load::new(
        devices.to_vec(),
        prefix,
        first_seq,
        vec![crate::bench_load::Phase::flood("flood", n)],
    );
    crate::bench_load::publish(addr, load).await
}

/// Raw broker rate: messages per second received by a subscriber that does nothing.
pub async fn baseline(addr: &str, devices: &[String], n: u64) -> anyhow::Result<f64> {
    let (sub, mut el) = AsyncClient::new(options("bench-sub", addr)?, 1000);
    sub.subscribe("bench-raw/devices/+/telemetry", QoS::AtLeastOnce).await?;
    let got = Arc::new(AtomicU64::new(0));
    let g = got.clone();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    let subscriber = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(t) = ready_tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    g.fetch_add(1, Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let _ = tokio::time::timeout(Duration::from_secs(5), ready_rx).await;
    let started = Instant::now();
    publish(addr, "bench-raw", devices, n, 1).await?;
    // Every message is published and acknowledged by the broker: the rest reach the
    // subscriber, or stop coming (a broker that dropped what its subscriber lagged behind).
    let mut last = (got.load(Relaxed), Instant::now());
    while got.load(Relaxed) < n {
        let seen = got.load(Relaxed);
        if seen != last.0 {
            last = (seen, Instant::now());
        } else if last.1.elapsed() >= RAW_STALL {
            subscriber.abort();
            anyhow::bail!(
                "raw baseline: {seen} of {n} messages reached the subscriber and no more came for {} s; \
                 the embedded broker keeps the last ~200,000 messages of a topic filter and drops older \
                 ones a subscriber has not taken yet (docs/ARCHITECTURE.md, limits): run fewer --messages",
                RAW_STALL.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    subscriber.abort();
    Ok(got.load(Relaxed) as f64 / secs)
}

/// How long the raw baseline waits for its subscriber to make progress once everything is
/// published.
const RAW_STALL: Duration = Duration::from_secs(10);

/// Runs both measurements against the running MES; prints and returns (baseline, mes) rates.
pub async fn run(
    handle: &Handle,
    broker: &str,
    prefix: &str,
    devices: Vec<String>,
    n: u64,
) -> anyhow::Result<(f64, f64)> {
    eprintln!("[bench] baseline: {n} messages through the broker to a no-op subscriber...");
    let raw = baseline(broker, &devices, n).await?;
    eprintln!("[bench] baseline: {raw:.0} msg/s");
    eprintln!("[bench] MES: {n} telemetry messages over {} devices, timed until committed...", devices.len());
    let before = handle.metrics.committed_jobs.load(Relaxed);
    let started = Instant::now();
    publish(broker, prefix, &devices, n, 1).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while handle.metrics.committed_jobs.load(Relaxed) - before < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let committed = handle.metrics.committed_jobs.load(Relaxed) - before;
    let mes = committed as f64 / secs;
    let commits = handle.metrics.commits.load(Relaxed).max(1);
    println!("\nbenchmark: {n} messages, {} devices, database {}", devices.len(), handle.store.backend_name());
    println!("  raw broker (publisher -> no-op subscriber): {raw:>10.0} msg/s");
    println!("  MES end to end (committed, acked after commit): {mes:>10.0} msg/s");
    println!("  ratio MES / raw broker: {:.2}", mes / raw);
    println!(
        "  committed {committed} in {secs:.2} s; mean batch {:.0} readings per commit",
        committed as f64 / commits as f64
    );
    settlement(handle, secs, commits).await?;
    reservations(handle, 64, 50, None).await?;
    Ok((raw, mes))
}

/// Rows the MES wrote for settlement during the run (telemetry, stock movements, journal),
/// next to raw inserts of as many rows, in transactions of the same mean size, into a
/// scratch table of the same database. Returns (MES rows/s, raw rows/s).
pub async fn settlement(handle: &Handle, secs: f64, commits: u64) -> anyhow::Result<(f64, f64)> {
    use sqlx::Row;
    let pool = &handle.store.pool;
    let count = |table: &'static str| async move {
        let sql = match table {
            "telemetry" => "SELECT COUNT(*) AS n FROM telemetry",
            "stock_movements" => "SELECT COUNT(*) AS n FROM stock_movements",
            _ => "SELECT COUNT(*) AS n FROM journal",
        };
        sqlx::query(sql).fetch_one(pool).await.and_then(|r| r.try_get::<i64, _>("n"))
    };
    let rows = (count("telemetry").await? + count("stock_movements").await? + count("journal").await?).max(1);
    let mes_rate = rows as f64 / secs;
    let per_tx = (rows as u64 / commits.max(1)).max(1) as usize;
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_raw (a BIGINT NOT NULL, b TEXT NOT NULL, c BIGINT NOT NULL, d TEXT)")
        .execute(pool)
        .await?;
    let started = Instant::now();
    let mut left = rows as usize;
    let mut i: i64 = 0;
    while left > 0 {
        let n = left.min(per_tx);
        let mut sql = String::from("INSERT INTO bench_raw (a, b, c, d) VALUES ");
        for k in 0..n {
            if k > 0 {
                sql.push(',');
            }
            sql.push_str(match handle.store.backend {
                crate::db::Backend::Sqlite => "(?,?,?,?)",
                crate::db::Backend::Postgres => "",
            });
            if handle.store.backend == crate::db::Backend::Postgres {
                let b = k * 4;
                sql.push_str(&format!("(${},${},${},${})", b + 1, b + 2, b + 3, b + 4));
            }
        }
        let mut tx = pool.begin().await?;
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for _ in 0..n {
            i += 1;
            q = q.bind(i).bind("press-01:1:1..1:2").bind(i * 3).bind(Some("PO-BENCH"));
        }
        q.execute(&mut *tx).await?;
        tx.commit().await?;
        left -= n;
    }
    let raw_rate = rows as f64 / started.elapsed().as_secs_f64();
    sqlx::query("DROP TABLE bench_raw").execute(pool).await?;
    println!("\nsettlement rows (telemetry + stock movements + journal), {rows} rows, {per_tx} per transaction:");
    println!("  raw inserts of as many rows:        {raw_rate:>10.0} rows/s");
    println!("  MES, settled inside the ingest run: {mes_rate:>10.0} rows/s");
    println!("  ratio MES / raw inserts: {:.2}", mes_rate / raw_rate);
    Ok((mes_rate, raw_rate))
}

/// Figures of one reservations round.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Reservations {
    pub clients: usize,
    pub per_client: usize,
    pub floor_per_s: f64,
    pub per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Requests answered 201.
    pub granted: u64,
}

/// Concurrent clients reserving one unit of BASE-BOXED at a time through the HTTP API,
/// next to the same clients calling `/healthz` (the HTTP floor). `available`: units left
/// to promise in FG-BOXED before the round (default: ten million, more than asked).
pub async fn reservations(
    handle: &Handle,
    clients: usize,
    per_client: usize,
    available: Option<i64>,
) -> anyhow::Result<Reservations> {
    // Stock to promise: the bench database is scratch.
    let sql = format!(
        "UPDATE buffers SET on_hand = reserved + {} WHERE id = 'FG-BOXED'",
        available.unwrap_or(10_000_000).max(0)
    );
    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&handle.store.pool).await?;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).pool_max_idle_per_host(clients).build()?;
    let base = format!("http://{}", handle.http_addr);
    let round = crate::now_ms();
    let run = |reserve: bool| {
        let client = client.clone();
        let base = base.clone();
        async move {
            let started = Instant::now();
            let mut tasks = Vec::new();
            for c in 0..clients {
                let client = client.clone();
                let base = base.clone();
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(per_client);
                    for i in 0..per_client {
                        let t = Instant::now();
                        let ok = if reserve {
                            let body = serde_json::json!({"sku": "BASE-BOXED", "quantity": 1, "ref": format!("bench-{round}-{c}-{i}")});
                            client.post(format!("{base}/api/v1/reservations")).json(&body).send().await.map(|r| r.status().as_u16() == 201)
                        } else {
                            client.get(format!("{base}/healthz")).send().await.map(|r| r.status().is_success())
                        };
                        if matches!(ok, Ok(true)) {
                            lat.push(t.elapsed().as_secs_f64() * 1000.0);
                        }
                    }
                    lat
                }));
            }
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.unwrap_or_default());
            }
            (all, started.elapsed().as_secs_f64())
        }
    };
    let (floor, floor_secs) = run(false).await;
    let (mut lat, secs) = run(true).await;
    lat.sort_by(f64::total_cmp);
    let p =
        |q: f64| lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0.0);
    let rate = lat.len() as f64 / secs;
    let floor_rate = floor.len() as f64 / floor_secs;
    println!("\nreservations, {clients} concurrent clients × {per_client}, database {}:", handle.store.backend_name());
    println!("  GET /healthz (HTTP floor):  {floor_rate:>8.0} req/s");
    println!(
        "  POST /reservations (201):   {rate:>8.0} req/s, p50 {:.1} ms, p99 {:.1} ms ({} ok)",
        p(0.5),
        p(0.99),
        lat.len()
    );
    println!("  ratio reservations / floor: {:.2}", rate / floor_rate);
    Ok(Reservations {
        clients,
        per_client,
        floor_per_s: floor_rate,
        per_s: rate,
        p50_ms: p(0.5),
        p99_ms: p(0.99),
        granted: lat.len() as u64,
    })
}
