//! `mes bench <scenario>`: the benchmark suite's front end (docs/BENCHMARKS.md).
//!
//! Each scenario starts what it needs on loopback (free ports, fresh databases), prints
//! its progress on stderr, and writes `target/bench/<scenario>.md` (table rows with the
//! ratio to the baseline measured in the same run) and `target/bench/<scenario>.json`.

use crate::app::Handle;
use crate::bench_floor::Keep;
use crate::bench_http::{free_port, Kill};
use crate::bench_load::{self, Load, Phase, PhaseFigures};
use crate::config::Config;
use anyhow::Context;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const SCENARIOS: &[&str] =
    &["ingest", "surge", "settlement", "modbus", "reservations", "scale", "http", "node-red"];

/// Options shared by the scenarios (each uses the ones it needs).
#[derive(Clone, Debug)]
pub struct Options {
    /// Messages of a flood (ingest, settlement, node-red's MES and raw runs).
    pub messages: u64,
    /// One database URL instead of the scenario's default(s).
    pub database: Option<String>,
    /// Length of a paced phase or measurement, seconds.
    pub seconds: u64,
    /// Stations of the surge scenario's line (each reporting once a second at 1×).
    pub stations: usize,
    /// Messages sent to the Node-RED flow.
    pub peer_messages: u64,
    /// ingest: also measure the contract floors (`--no-floors` skips them).
    pub floors: bool,
    /// ingest: every work center runs a released order ([`release_orders`]).
    pub orders: bool,
    /// ingest: rounds of raw-broker flood then MES flood; the median round is reported.
    pub rounds: u32,
    /// ingest: copies of the demo line side by side ([`lines_plant`]).
    pub lines: usize,
}

/// Where PostgreSQL is looked for when a scenario measures it (`MES_BENCH_POSTGRES`).
fn postgres_base() -> String {
    std::env::var("MES_BENCH_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// A fresh, empty PostgreSQL database `name`; its URL.
async fn fresh_postgres(name: &str) -> anyhow::Result<String> {
    let base = postgres_base();
    let admin = crate::db::Store::connect(&format!("{base}/postgres"), 2).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
        .execute(&admin.pool)
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&admin.pool).await?;
    admin.pool.close().await;
    Ok(format!("{base}/{name}"))
}

/// A fresh SQLite file under mes-data/; its URL.
fn fresh_sqlite(name: &str) -> anyhow::Result<String> {
    std::fs::create_dir_all("mes-data")?;
    let path = format!("mes-data/{name}.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{path}{suffix}"));
    }
    Ok(format!("sqlite://{path}"))
}

fn db_label(url: &str) -> &'static str {
    if url.starts_with("sqlite:") {
        "SQLite"
    } else {
        "PostgreSQL"
    }
}

/// The in-process MES of `mes bench`: embedded broker on a free port, the demo line with
/// every device on MQTT. Returns the config, the broker address, the devices and the
/// topic prefix.
fn in_process(database: String, client: &str) -> anyhow::Result<(Config, String, Vec<String>, String)> {
    in_process_lines(database, client, 1)
}

/// The demo line with every device on MQTT (`plants/line-mqtt.toml`) `lines` times side by
/// side: one copy as it is, and each further copy `k` with its own buffers, work centers
/// and devices (ids suffixed `-L{k}` / `-l{k}`, the materials and bills shared), so that a
/// message means the same work on any copy.
pub fn lines_plant(lines: usize) -> anyhow::Result<String> {
    let mut plant: toml::Table = toml::from_str(crate::plant::MQTT_LINE)?;
    let copy = |key: &str, k: usize, plant: &toml::Table| -> Vec<toml::Value> {
        let Some(items) = plant.get(key).and_then(toml::Value::as_array) else { return Vec::new() };
        let suffix = |v: &mut toml::Value| {
            if let Some(s) = v.as_str() {
                *v = toml::Value::String(format!("{s}-L{k}"));
            }
        };
        items
            .iter()
            .map(|item| {
                let mut item = item.clone();
                if let Some(t) = item.as_table_mut() {
                    for field in ["id", "output"] {
                        if let Some(v) = t.get_mut(field) {
                            suffix(v);
                        }
                    }
                    if let Some(inputs) = t.get_mut("inputs").and_then(toml::Value::as_array_mut) {
                        inputs.iter_mut().for_each(suffix);
                    }
                    let device = t.get_mut("device").and_then(|d| d.get_mut("mqtt")).and_then(|m| m.get_mut("id"));
                    if let Some(id) = device {
                        if let Some(s) = id.as_str() {
                            *id = toml::Value::String(format!("{s}-l{k}"));
                        }
                    }
                }
                item
            })
            .collect()
    };
    for key in ["buffers", "work_centers"] {
        let mut all = Vec::new();
        for k in 1..=lines.max(1) {
            match k {
                1 => all.extend(plant.get(key).and_then(toml::Value::as_array).cloned().unwrap_or_default()),
                _ => all.extend(copy(key, k, &plant)),
            }
        }
        plant.insert(key.to_string(), toml::Value::Array(all));
    }
    Ok(toml::to_string(&plant)?)
}

fn in_process_lines(
    database: String,
    client: &str,
    lines: usize,
) -> anyhow::Result<(Config, String, Vec<String>, String)> {
    let mut cfg = Config::load(None)?;
    let broker_port = free_port()?;
    cfg.http.listen = format!("127.0.0.1:{}", free_port()?);
    cfg.mqtt.url = format!("mqtt://127.0.0.1:{broker_port}");
    cfg.mqtt.embedded_broker = Some(format!("127.0.0.1:{broker_port}"));
    cfg.mqtt.client_id = client.into();
    cfg.database.url = database;
    std::fs::create_dir_all("mes-data")?;
    let plant_path = PathBuf::from(format!("mes-data/{client}-plant.toml"));
    match lines {
        0 | 1 => std::fs::write(&plant_path, crate::plant::MQTT_LINE)?,
        _ => std::fs::write(&plant_path, lines_plant(lines)?)?,
    }
    cfg.plant.file = Some(plant_path.clone());
    let plant = crate::plant::Plant::load(Some(&plant_path))?;
    let devices = plant.work_centers.iter().map(|w| w.device_id()).collect();
    let prefix = cfg.mqtt.topic_prefix.clone();
    Ok((cfg, format!("127.0.0.1:{broker_port}"), devices, prefix))
}

/// Runs one scenario.
pub async fn run(scenario: &str, o: Options) -> anyhow::Result<()> {
    match scenario {
        "ingest" => ingest(&o).await,
        "surge" => surge(&o).await,
        "settlement" => settlement(&o).await,
        "reservations" => reservations(&o).await,
        "modbus" => modbus(&o).await,
        "node-red" => node_red(&o).await,
        "scale" => {
            let md = crate::bench_scale::run(10_000, 100_000).await?;
            println!("{md}");
            Ok(())
        }
        "http" => {
            let md = crate::bench_http::run(32, o.seconds.clamp(1, 600)).await?;
            println!("{md}");
            Ok(())
        }
        other => anyhow::bail!("unknown scenario `{other}`; one of: {}", SCENARIOS.join(", ")),
    }
}

fn ms(v: f64) -> String {
    format!("{v:.1}")
}

// ---------------------------------------------------------------- ingest

/// One database: raw broker flood, MES flood, MES paced at half its flood rate.
#[derive(serde::Serialize)]
struct IngestFigures {
    database: &'static str,
    raw_per_s: f64,
    /// The contract floor of the MES's design (`bench_floor`, a row per reading), timed by
    /// the observer as the MES is.
    floor: PhaseFigures,
    /// The three floors timed by their own counters.
    floors: FloorRates,
    flood: PhaseFigures,
    /// Every round's (raw broker msg/s, MES committed msg/s), in the order taken; `raw_per_s`
    /// and `flood` are of the round with the median ratio.
    rounds: Vec<(f64, f64)>,
    half: PhaseFigures,
    /// The group-commit writer during the flood.
    writer: WriterFigures,
    /// The group-commit writer during the paced phase at half rate.
    writer_half: WriterFigures,
}

/// What the single writer did during a phase: how many commits, how large, how long, and
/// the share of the phase it spent committing (near 100 %: the writer is the bottleneck).
#[derive(serde::Serialize, Default)]
struct WriterFigures {
    commits: u64,
    jobs: u64,
    commit_us: u64,
    jobs_per_commit: f64,
    ms_per_commit: f64,
    busy_share: f64,
    /// Mean time from the MES's receipt of a message to its commit (`mes_receive_to_commit_seconds`).
    ms_receive_to_commit: f64,
    #[serde(skip)]
    receive_us: u64,
    #[serde(skip)]
    secs: f64,
}

impl WriterFigures {
    fn now(handle: &Handle, secs: f64) -> Self {
        let m = &handle.metrics;
        Self {
            commits: m.commits.load(std::sync::atomic::Ordering::Relaxed),
            jobs: m.committed_jobs.load(std::sync::atomic::Ordering::Relaxed),
            commit_us: m.commit_latency.sum_us(),
            receive_us: m.receive_to_commit.sum_us(),
            secs,
            ..Default::default()
        }
    }

    fn since(self, before: &Self) -> Self {
        let (commits, jobs) = (self.commits - before.commits, self.jobs - before.jobs);
        let commit_us = self.commit_us - before.commit_us;
        Self {
            commits,
            jobs,
            commit_us,
            jobs_per_commit: jobs as f64 / commits.max(1) as f64,
            ms_per_commit: commit_us as f64 / 1000.0 / commits.max(1) as f64,
            busy_share: commit_us as f64 / 1e6 / self.secs.max(f64::MIN_POSITIVE),
            ms_receive_to_commit: (self.receive_us - before.receive_us) as f64 / 1000.0 / jobs.max(1) as f64,
            receive_us: self.receive_us - before.receive_us,
            secs: self.secs,
        }
    }
}

async fn ingest_one(url: String, o: &Options) -> anyhow::Result<IngestFigures> {
    let label = db_label(&url);
    let (cfg, broker, devices, prefix) = in_process_lines(url.clone(), "mes-bench-ingest", o.lines)?;
    let (n, secs, with_floors, with_orders) = (o.messages, o.seconds.max(1) as f64, o.floors, o.orders);
    let rounds = o.rounds.max(1);
    crate::app::run_with(cfg, move |handle: Handle| async move {
        if with_orders {
            let released = release_orders(&handle).await?;
            eprintln!("[ingest {label}] {released} production orders released, one per work center");
        }
        // The observer's own connections, not the MES's pool.
        let obs = crate::db::Store::connect(&url, 2).await?;
        let (floor, floors) = if with_floors {
            eprintln!("[ingest {label}] contract floor: {n} messages stored and acknowledged, nothing more ...");
            let floor = floor_flood(&broker, &url, &devices, n, &format!("floor {label}")).await?;
            eprintln!("[ingest {label}] contract floor: {:.0} msg/s", floor.committed_per_s);
            (floor, floor_rates(&broker, &url, &devices, n, label).await?)
        } else {
            Default::default()
        };
        // Raw broker and MES in turn, `rounds` times: (raw, flood, writer) of each.
        let mut taken = Vec::new();
        let mut next_seq = 1;
        for round in 1..=rounds {
            let of = if rounds > 1 { format!(" (round {round} of {rounds})") } else { String::new() };
            eprintln!("[ingest {label}] raw broker{of}: {n} messages to a no-op subscriber ...");
            let raw = crate::bench::baseline(&broker, &devices, n).await?;
            eprintln!("[ingest {label}] raw broker{of}: {raw:.0} msg/s");
            let load = Load::new(devices.clone(), &prefix, next_seq, vec![Phase::flood("flood", n)]);
            let before = WriterFigures::now(&handle, 0.0);
            let (mut f, _) = bench_load::run(&broker, &obs.pool, load.clone(), &format!("ingest {label}"), None).await?;
            next_seq = load.next_seq();
            let flood = f.remove(0);
            let secs_flood = flood.messages as f64 / flood.committed_per_s.max(f64::MIN_POSITIVE);
            let writer = WriterFigures::now(&handle, secs_flood).since(&before);
            eprintln!(
                "[ingest {label}] MES{of}: {:.0} msg/s ({:.2} of raw); writer: {} commits, {:.0} inputs each, {:.2} ms each, busy {:.0} % of the flood",
                flood.committed_per_s,
                flood.committed_per_s / raw.max(f64::MIN_POSITIVE),
                writer.commits,
                writer.jobs_per_commit,
                writer.ms_per_commit,
                writer.busy_share * 100.0
            );
            taken.push((raw, flood, writer));
        }
        let rounds: Vec<(f64, f64)> = taken.iter().map(|(raw, f, _)| (*raw, f.committed_per_s)).collect();
        let (raw, flood, writer) = median_round(taken).context("no round taken")?;
        let half_rate = flood.committed_per_s / 2.0;
        eprintln!("[ingest {label}] paced at half of {:.0} msg/s for {secs} s ...", flood.committed_per_s);
        let paced = Load::new(devices, &prefix, next_seq, vec![Phase::paced("half", half_rate, secs)]);
        let before = WriterFigures::now(&handle, 0.0);
        let (mut h, _) = bench_load::run(&broker, &obs.pool, paced, &format!("ingest {label}"), None).await?;
        let writer_half = WriterFigures::now(&handle, secs).since(&before);
        eprintln!(
            "[ingest {label}] writer at half rate: {} commits, {:.0} inputs each, {:.2} ms each, busy {:.0} %; receipt to commit {:.1} ms on average",
            writer_half.commits,
            writer_half.jobs_per_commit,
            writer_half.ms_per_commit,
            writer_half.busy_share * 100.0,
            writer_half.ms_receive_to_commit
        );
        Ok(IngestFigures {
            database: label,
            raw_per_s: raw,
            floor,
            floors,
            flood,
            rounds,
            half: h.remove(0),
            writer,
            writer_half,
        })
    })
    .await
}

/// Of rounds of (raw broker msg/s, MES flood, writer), the one whose MES / raw ratio is the
/// median (the upper one of an even count); `None` without rounds.
fn median_round(mut rounds: Vec<(f64, PhaseFigures, WriterFigures)>) -> Option<(f64, PhaseFigures, WriterFigures)> {
    let ratio = |r: &(f64, PhaseFigures, WriterFigures)| r.1.committed_per_s / r.0.max(f64::MIN_POSITIVE);
    rounds.sort_by(|a, b| ratio(a).total_cmp(&ratio(b)));
    let mid = rounds.len() / 2;
    rounds.into_iter().nth(mid)
}

/// Gives every work center of the bench line a released production order (quantity large
/// enough never to complete), made its current order, so that each reading of the flood is
/// counted, costed and settled against an order as on a line in production: through the
/// planner API, as a planner would. Returns how many.
async fn release_orders(handle: &Handle) -> anyhow::Result<usize> {
    let plant = crate::plant::Plant::parse(crate::plant::MQTT_LINE, "line-mqtt", None)?;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let base = format!("http://{}/api/v1/orders", handle.http_addr);
    for (i, w) in plant.work_centers.iter().enumerate() {
        let sku = plant
            .buffers
            .iter()
            .find(|b| b.id == w.output)
            .map(|b| b.sku.clone())
            .with_context(|| format!("work center {}: no output buffer", w.id))?;
        let id = format!("BENCH-{i}");
        let order = json!({"id": id, "sku": sku, "quantity": 1_000_000_000, "work_center": w.id});
        let r = client.post(&base).json(&order).send().await?;
        anyhow::ensure!(r.status().is_success(), "creating order {id}: HTTP {}", r.status());
        let r = client.post(format!("{base}/{id}/release")).send().await?;
        anyhow::ensure!(r.status().is_success(), "releasing order {id}: HTTP {}", r.status());
    }
    Ok(plant.work_centers.len())
}

/// The floors' best rates (msg/s) over two rounds, each round every [`Keep`] in turn.
#[derive(serde::Serialize, Default)]
struct FloorRates {
    rows: f64,
    cursors: f64,
    nothing: f64,
}

/// Floods of `n` messages through each floor, timed from the first publish to the floor's
/// count of committed messages reaching `n` (no observer: its reads would compete with the
/// floor for the same cores); two rounds, the best of each kept.
async fn floor_rates(broker: &str, url: &str, devices: &[String], n: u64, label: &str) -> anyhow::Result<FloorRates> {
    let store = crate::bench_floor::store_beside(url).await?;
    let mut best = FloorRates::default();
    let mut first_seq = 1;
    for round in 1..=2 {
        for keep in [Keep::Rows, Keep::Cursors, Keep::Nothing] {
            let floor = crate::bench_floor::start(broker, store.clone(), devices, "bench-floors", keep).await?;
            let started = Instant::now();
            crate::bench::publish(broker, "bench-floors", devices, n, first_seq).await?;
            first_seq += n;
            let deadline = started + Duration::from_secs(300);
            while floor.stored() < n {
                anyhow::ensure!(Instant::now() < deadline, "floor {keep:?}: {} of {n} in 300 s", floor.stored());
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let rate = n as f64 / started.elapsed().as_secs_f64();
            drop(floor);
            eprintln!("[ingest {label}] floor {keep:?}, round {round}: {rate:.0} msg/s");
            let slot = match keep {
                Keep::Rows => &mut best.rows,
                Keep::Cursors => &mut best.cursors,
                Keep::Nothing => &mut best.nothing,
            };
            *slot = slot.max(rate);
            // The dropped floor's connections close before the next one subscribes.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    store.pool.close().await;
    Ok(best)
}

/// A flood of `n` messages through the contract floor (`bench_floor`), its store beside the
/// database at `url`, timed by the same publisher and observer as the MES.
async fn floor_flood(broker: &str, url: &str, devices: &[String], n: u64, label: &str) -> anyhow::Result<PhaseFigures> {
    let store = crate::bench_floor::store_beside(url).await?;
    let run = crate::bench_floor::start(broker, store.clone(), devices, "bench-floor", Keep::Rows).await?;
    let load = Load::new(devices.to_vec(), "bench-floor", 1, vec![Phase::flood("floor", n)]);
    let (mut f, _) = bench_load::run(broker, &store.pool, load, label, None).await?;
    drop(run);
    store.pool.close().await;
    Ok(f.remove(0))
}

async fn ingest(o: &Options) -> anyhow::Result<()> {
    let mut urls = Vec::new();
    match &o.database {
        Some(url) => urls.push(url.clone()),
        None => {
            urls.push(fresh_sqlite("bench-ingest")?);
            match fresh_postgres("mes_bench_ingest").await {
                Ok(url) => urls.push(url),
                Err(e) => eprintln!("[ingest] PostgreSQL skipped ({}): {e:#}", postgres_base()),
            }
        }
    }
    let mut rows = Vec::new();
    for url in urls {
        rows.push(ingest_one(url, o).await?);
    }
    let mut md = String::from(
        "| database | messages | raw broker msg/s | contract floor msg/s | floor / raw | MES committed msg/s | ratio | MES / floor | p50 / p99 (flood) | inputs per commit | writer busy | half rate msg/s | committed msg/s | p50 / p99 ms at half rate | of which publish → receipt | receipt → commit (mean) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---|---:|\n",
    );
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {:.2} | {:.0} | {:.2} | {:.2} | {} / {} ms | {:.0} | {:.0} % | {:.0} | {:.0} | {} / {} | {} / {} | {:.1} |\n",
            r.database,
            r.flood.messages,
            r.raw_per_s,
            r.floor.committed_per_s,
            r.floor.committed_per_s / r.raw_per_s.max(f64::MIN_POSITIVE),
            r.flood.committed_per_s,
            r.flood.committed_per_s / r.raw_per_s.max(f64::MIN_POSITIVE),
            r.flood.committed_per_s / r.floor.committed_per_s.max(f64::MIN_POSITIVE),
            ms(r.flood.p50_ms),
            ms(r.flood.p99_ms),
            r.writer.jobs_per_commit,
            r.writer.busy_share * 100.0,
            r.half.published_per_s,
            r.half.committed_per_s,
            ms(r.half.p50_ms),
            ms(r.half.p99_ms),
            ms(r.half.p50_to_receipt_ms),
            ms(r.half.p99_to_receipt_ms),
            r.writer_half.ms_receive_to_commit,
        ));
    }
    for r in rows.iter().filter(|r| r.rounds.len() > 1) {
        let each: Vec<String> = r
            .rounds
            .iter()
            .map(|(raw, mes)| format!("{mes:.0} / {raw:.0} = {:.2}", mes / raw.max(f64::MIN_POSITIVE)))
            .collect();
        md.push_str(&format!(
            "\n{}: {} rounds of raw broker then MES, MES / raw in the order taken: {}; the row above is the median round.\n",
            r.database,
            r.rounds.len(),
            each.join(", ")
        ));
    }
    md.push_str(
        "\nThe contract floors, each timed by its own count of committed messages (best of two rounds):\n\n\
         | database | raw broker msg/s | parse + ack, nothing stored | / raw | a cursor per device | / raw | a row per reading | / raw |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &rows {
        let raw = r.raw_per_s.max(f64::MIN_POSITIVE);
        let f = &r.floors;
        md.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} |\n",
            r.database,
            r.raw_per_s,
            f.nothing,
            f.nothing / raw,
            f.cursors,
            f.cursors / raw,
            f.rows,
            f.rows / raw
        ));
    }
    println!("{md}");
    bench_load::write_results("ingest", &md, &json!({"scenario": "ingest", "runs": rows}))
}

// ---------------------------------------------------------------- settlement

async fn settlement(o: &Options) -> anyhow::Result<()> {
    let url = match &o.database {
        Some(u) => u.clone(),
        None => fresh_sqlite("bench-settlement")?,
    };
    let label = db_label(&url);
    let (cfg, broker, devices, prefix) = in_process(url.clone(), "mes-bench-settlement")?;
    let n = o.messages;
    let (f, mes, raw, per_tx) = crate::app::run_with(cfg, move |handle: Handle| async move {
        let obs = crate::db::Store::connect(&url, 2).await?;
        let load = Load::new(devices, &prefix, 1, vec![Phase::flood("flood", n)]);
        let (mut f, _) = bench_load::run(&broker, &obs.pool, load, "settlement", None).await?;
        let f = f.remove(0);
        let secs = f.messages as f64 / f.committed_per_s.max(f64::MIN_POSITIVE);
        let commits = handle.metrics.commits.load(std::sync::atomic::Ordering::Relaxed);
        let (mes, raw) = crate::bench::settlement(&handle, secs, commits).await?;
        let per_tx = (mes * secs) / commits.max(1) as f64;
        Ok((f, mes, raw, per_tx))
    })
    .await?;
    let md = format!(
        "| database | readings | rows | rows per tx | raw inserts rows/s | MES rows/s | ratio |\n|---|---:|---:|---:|---:|---:|---:|\n\
         | {label} | {} | {:.0} | {per_tx:.0} | {raw:.0} | {mes:.0} | {:.2} |\n",
        f.committed,
        mes * f.messages as f64 / f.committed_per_s.max(f64::MIN_POSITIVE),
        mes / raw.max(f64::MIN_POSITIVE)
    );
    println!("{md}");
    bench_load::write_results(
        "settlement",
        &md,
        &json!({"scenario": "settlement", "database": label, "ingest": f, "mes_rows_per_s": mes, "raw_rows_per_s": raw,
                "rows_per_tx": per_tx}),
    )
}

// ---------------------------------------------------------------- reservations

async fn reservations(o: &Options) -> anyhow::Result<()> {
    let url = match &o.database {
        Some(u) => u.clone(),
        None => match fresh_postgres("mes_bench_reservations").await {
            Ok(u) => u,
            Err(e) => {
                eprintln!("[reservations] PostgreSQL unreachable ({e:#}); measuring SQLite");
                fresh_sqlite("bench-reservations")?
            }
        },
    };
    let label = db_label(&url);
    let (cfg, _, _, _) = in_process(url, "mes-bench-reservations")?;
    let (clients, per_client) = (64, 50);
    let (plenty, scarce, on_hand, reserved) = crate::app::run_with(cfg, move |handle: Handle| async move {
        eprintln!("[reservations {label}] {clients} clients × {per_client}, stock for all ...");
        let plenty = crate::bench::reservations(&handle, clients, per_client, None).await?;
        // Scarce: a quarter of the requests can be granted; exactly that many must be.
        let left = (clients * per_client / 4) as i64;
        eprintln!("[reservations {label}] {clients} clients × {per_client}, stock for {left} ...");
        let scarce = crate::bench::reservations(&handle, clients, per_client, Some(left)).await?;
        let client = reqwest::Client::new();
        let inv: serde_json::Value =
            client.get(format!("http://{}/api/v1/inventory/BASE-BOXED", handle.http_addr)).send().await?.json().await?;
        let on_hand = inv["on_hand"].as_i64().unwrap_or(0);
        let reserved = inv["reserved"].as_i64().unwrap_or(0);
        anyhow::ensure!(scarce.granted as i64 == left, "scarce round granted {} of {left}", scarce.granted);
        Ok((plenty, scarce, on_hand, reserved))
    })
    .await?;
    let oversold = (reserved - on_hand).max(0);
    let md = format!(
        "| database | clients × requests | healthz req/s | reservations/s | ratio | p50 ms | p99 ms | granted when stock for a quarter | oversold |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|\n\
         | {label} | {clients} × {per_client} | {:.0} | {:.0} | {:.3} | {} | {} | {} of {} | {oversold} |\n",
        plenty.floor_per_s,
        plenty.per_s,
        plenty.per_s / plenty.floor_per_s.max(f64::MIN_POSITIVE),
        ms(plenty.p50_ms),
        ms(plenty.p99_ms),
        scarce.granted,
        clients * per_client,
    );
    println!("{md}");
    bench_load::write_results(
        "reservations",
        &md,
        &json!({"scenario": "reservations", "database": label, "plenty": plenty, "scarce": scarce,
                "on_hand": on_hand, "reserved": reserved, "oversold": oversold}),
    )
}

// ---------------------------------------------------------------- modbus

async fn modbus(o: &Options) -> anyhow::Result<()> {
    let (devices, poll_ms) = (500, 200);
    let url = match &o.database {
        Some(u) => u.clone(),
        None => fresh_sqlite("bench-modbus")?,
    };
    let (mut cfg, _, _, _) = in_process(url, "mes-bench-modbus")?;
    eprintln!("[modbus] {devices} simulated presses, polled every {poll_ms} ms, {} s per measurement ...", o.seconds);
    let (addrs, servers) = crate::bench_modbus::start_devices(devices).await?;
    let plant_path = PathBuf::from("mes-data/bench-modbus-plant.toml");
    std::fs::write(&plant_path, crate::bench_modbus::plant(&addrs, poll_ms))?;
    cfg.plant.file = Some(plant_path);
    let seconds = o.seconds.max(1);
    let r = crate::app::run_with(cfg, move |handle: Handle| async move {
        crate::bench_modbus::run(&handle, &addrs, poll_ms, seconds).await
    })
    .await;
    for s in servers {
        s.abort();
    }
    let f = r?;
    let bound = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("≤ {v:.0} ms"));
    let md = format!(
        "| devices | poll | target polls/s | MES polls/s | MES points per CPU-s | raw points per CPU-s | ratio | poll→commit p50 / p99 | errors |\n\
         |---:|---:|---:|---:|---:|---:|---:|---|---:|\n\
         | {} | {} ms | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {} / {} | {} |\n",
        f.devices,
        f.poll_ms,
        f.target_polls_per_s,
        f.mes_polls_per_s,
        f.mes_points_per_cpu_s,
        f.raw_points_per_cpu_s,
        f.ratio,
        bound(f.p50_ms),
        bound(f.p99_ms),
        f.errors
    );
    println!("{md}");
    bench_load::write_results("modbus", &md, &json!({"scenario": "modbus", "figures": f}))
}

// ---------------------------------------------------------------- surge

/// Starts `mes serve` with `config` in a child process and waits for `/readyz`.
async fn serve_child(exe: &Path, dir: &Path, http: u16) -> anyhow::Result<Kill> {
    let log = std::fs::File::create(dir.join("mes.log"))?;
    let child = Kill(
        Command::new(exe)
            .args(["serve", "--config"])
            .arg(dir.join("mes.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start mes serve")?,
    );
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = client.get(format!("http://127.0.0.1:{http}/readyz")).send().await {
            if r.status().is_success() {
                return Ok(child);
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "mes serve not ready in 120 s (see {}/mes.log)", dir.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn surge(o: &Options) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("own executable")?;
    let stations = o.stations.max(1);
    let normal = stations as f64; // one message per station per second
    let secs = o.seconds.max(1) as f64;
    let dir = PathBuf::from("mes-data/bench-surge");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("plant.toml"), crate::bench_scale::plant(stations))?;
    let (http, mqtt) = (free_port()?, free_port()?);
    let db = format!("sqlite://{}/mes.db", dir.display());
    std::fs::write(
        dir.join("mes.toml"),
        format!(
            "[http]\nlisten = \"127.0.0.1:{http}\"\n[database]\nurl = \"{db}\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:{mqtt}\"\n\
             client_id = \"mes-bench-surge\"\nembedded_broker = \"127.0.0.1:{mqtt}\"\n[plant]\nfile = \"{}/plant.toml\"\n",
            dir.display()
        ),
    )?;
    eprintln!("[surge] mes serve (SQLite, embedded broker), {stations} stations, normal rate {normal:.0} msg/s ...");
    let child = serve_child(&exe, &dir, http).await?;
    let pid = child.0.id();
    let observer = crate::db::Store::connect(&db, 2).await?;
    let devices: Vec<String> = (0..stations).map(|i| format!("dev-{i:05}")).collect();
    let prefix = Config::load(None)?.mqtt.topic_prefix;
    let phases = vec![
        Phase::paced("1×", normal, secs / 2.0),
        Phase::paced("10×", normal * 10.0, secs),
        Phase::paced("30×", normal * 30.0, secs),
        Phase::paced("1× after", normal, secs),
    ];
    let load = Load::new(devices, &prefix, 1, phases);
    let (f, samples) =
        bench_load::run(&format!("127.0.0.1:{mqtt}"), &observer.pool, load.clone(), "surge", Some(pid)).await?;
    let hwm = bench_load::proc_kib(pid, "VmHWM").unwrap_or(0) as f64 / 1024.0;
    let rss_end = bench_load::proc_kib(pid, "VmRSS").unwrap_or(0) as f64 / 1024.0;
    drop(child);
    // When the backlog of the 30× phase was gone (≤ one normal second of messages).
    let p30_end = load.bounds[3];
    let drained_at = samples
        .iter()
        .filter(|s| s.published >= p30_end)
        .find(|s| s.published.saturating_sub(s.committed) as f64 <= normal)
        .map(|s| s.at_us);
    let end_30 = samples.iter().find(|s| s.published >= p30_end).map(|s| s.at_us);
    let drain_s = match (drained_at, end_30) {
        (Some(d), Some(e)) => Some(d.saturating_sub(e) as f64 / 1e6),
        _ => None,
    };
    let mut md = String::from(
        "| phase | target msg/s | published msg/s | committed msg/s | committed / published | max backlog | backlog at end | p50 ms | p99 ms | max ms | peak RSS MiB |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for (p, x) in f.iter().enumerate() {
        let target = load.phases[p].rate.unwrap_or(0.0);
        md.push_str(&format!(
            "| {} | {target:.0} | {:.0} | {:.0} | {:.2} | {} | {} | {} | {} | {} | {:.1} |\n",
            x.name,
            x.published_per_s,
            x.committed_per_s,
            x.committed_per_s / x.published_per_s.max(f64::MIN_POSITIVE),
            x.max_backlog,
            x.backlog_at_end,
            ms(x.p50_ms),
            ms(x.p99_ms),
            ms(x.max_ms),
            x.peak_rss_mib
        ));
    }
    let committed: u64 = f.iter().map(|x| x.committed).sum();
    md.push_str(&format!(
        "\n{stations} stations, normal {normal:.0} msg/s; {committed} of {} messages committed; \
         peak RSS (VmHWM) of mes serve {hwm:.1} MiB, {rss_end:.1} MiB at the end; \
         30× backlog drained {} after the 30× phase ended.\n",
        load.total(),
        drain_s.map_or("not".to_string(), |d| format!("{d:.2} s"))
    ));
    println!("{md}");
    bench_load::write_results(
        "surge",
        &md,
        &json!({"scenario": "surge", "stations": stations, "normal_per_s": normal, "phases": f,
                "messages": load.total(), "committed": committed, "vm_hwm_mib": hwm, "rss_end_mib": rss_end,
                "drain_after_30x_s": drain_s}),
    )
}

// ---------------------------------------------------------------- node-red

const NODE_RED_TABLE: &str = "CREATE TABLE telemetry (id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL, \
     boot BIGINT NOT NULL, seq BIGINT NOT NULL, good BIGINT NOT NULL, scrap BIGINT NOT NULL, state TEXT NOT NULL, \
     ts TEXT, received_ms BIGINT NOT NULL, UNIQUE (device, boot, seq))";

/// The Node-RED table's rows as packs of one reading, as the bench observer follows them
/// (`telemetry_packs`, migration 0012).
const NODE_RED_PACKS: &str = "CREATE VIEW telemetry_packs AS SELECT id, device, \
     json_array(json_array(boot, seq, NULL, NULL, received_ms, good, scrap, state, NULL)) AS readings FROM telemetry";

/// Node-RED on the broker at `broker_port`: installed, started, subscribed (a probe
/// message reached its table). Returns the process and the database it writes.
async fn start_node_red(broker: &str, prefix: &str) -> anyhow::Result<(Kill, crate::db::Store)> {
    let script = Path::new("scripts/bench-node-red.sh");
    anyhow::ensure!(script.exists(), "scripts/bench-node-red.sh not found: run from the repository root");
    eprintln!("[node-red] installing node-red@4 and node-red-node-sqlite (npm, once) ...");
    let ok = Command::new("bash").arg(script).arg("install").status()?.success();
    anyhow::ensure!(ok, "installing Node-RED failed");
    let dir = std::env::current_dir()?.join("mes-data/bench-node-red");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let db_path = dir.join("telemetry.db");
    let store = crate::db::Store::connect(&format!("sqlite://{}", db_path.display()), 2).await?;
    sqlx::query(NODE_RED_TABLE).execute(&store.pool).await?;
    sqlx::query(NODE_RED_PACKS).execute(&store.pool).await?;
    let port = broker.rsplit_once(':').map(|(_, p)| p).unwrap_or("1883").to_string();
    let http = free_port()?;
    let log = std::fs::File::create(dir.join("node-red.log"))?;
    let child = Kill(
        Command::new("bash")
            .arg(script)
            .arg("run")
            .arg(&dir)
            .arg(&port)
            .arg(http.to_string())
            .arg(&db_path)
            .arg(format!("{prefix}/devices/+/telemetry"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start Node-RED")?,
    );
    // Subscribed once a probe reaches the table (probe rows are not counted).
    let (client, mut el) = rumqttc::AsyncClient::new(bench_load::mqtt_options("bench-probe", broker)?, 100);
    let poller = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seq = 0u64;
    loop {
        seq += 1;
        client
            .publish(
                format!("{prefix}/devices/probe/telemetry"),
                rumqttc::QoS::AtLeastOnce,
                false,
                bench_load::payload(seq),
            )
            .await?;
        tokio::time::sleep(Duration::from_millis(250)).await;
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM telemetry").fetch_one(&store.pool).await?;
        if n > 0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "Node-RED did not subscribe in 120 s (see {}/node-red.log)",
            dir.display()
        );
    }
    poller.abort();
    Ok((child, store))
}

async fn node_red(o: &Options) -> anyhow::Result<()> {
    let url = fresh_sqlite("bench-node-red-mes")?;
    let (cfg, broker, devices, prefix) = in_process(url.clone(), "mes-bench-node-red")?;
    let (n, peer_n) = (o.messages, o.peer_messages.max(1));
    let (raw, floor, mes, nr, nr_hwm) = crate::app::run_with(cfg, move |_handle: Handle| async move {
        let obs = crate::db::Store::connect(&url, 2).await?;
        eprintln!("[node-red] raw broker: {n} messages to a no-op subscriber ...");
        let raw = crate::bench::baseline(&broker, &devices, n).await?;
        eprintln!("[node-red] raw broker: {raw:.0} msg/s");
        eprintln!("[node-red] contract floor: {n} messages stored and acknowledged, nothing more ...");
        let floor = floor_flood(&broker, &url, &devices, n, "contract floor").await?;
        eprintln!("[node-red] contract floor: {:.0} msg/s", floor.committed_per_s);
        let load = Load::new(devices.clone(), &prefix, 1, vec![Phase::flood("MES", n)]);
        let (mut f, _) = bench_load::run(&broker, &obs.pool, load, "MES", None).await?;
        let mes = f.remove(0);
        let (child, store) = start_node_red(&broker, "nodered").await?;
        let pid = child.0.id();
        let load = Load::new(devices, "nodered", 1, vec![Phase::flood("Node-RED", peer_n)]);
        let (mut f, _) = bench_load::run(&broker, &store.pool, load, "Node-RED", Some(pid)).await?;
        let hwm = bench_load::proc_kib(pid, "VmHWM").unwrap_or(0) as f64 / 1024.0;
        drop(child);
        Ok((raw, floor, mes, f.remove(0), hwm))
    })
    .await?;
    let per = |a: &PhaseFigures, b: &PhaseFigures| a.committed_per_s / b.committed_per_s.max(f64::MIN_POSITIVE);
    let md = format!(
        "| system | messages | committed | committed msg/s | ratio to raw broker | MES / system | p50 ms | p99 ms |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n\
         | raw broker (no-op subscriber) | {n} | — | {raw:.0} | 1.00 | {:.2} | | |\n\
         | contract floor (acks after commit, one row per reading) | {} | {} | {:.0} | {:.2} | {:.2} | {} | {} |\n\
         | MES (SQLite, settled) | {} | {} | {:.0} | {:.2} | 1.00 | {} | {} |\n\
         | Node-RED 4 (mqtt in → json → sqlite) | {} | {} | {:.0} | {:.2} | {:.1} | {} | {} |\n\
         \nContract floor / Node-RED {:.1}. Node-RED peak RSS (VmHWM) {nr_hwm:.0} MiB.\n",
        mes.committed_per_s / raw.max(f64::MIN_POSITIVE),
        floor.messages,
        floor.committed,
        floor.committed_per_s,
        floor.committed_per_s / raw.max(f64::MIN_POSITIVE),
        per(&mes, &floor),
        ms(floor.p50_ms),
        ms(floor.p99_ms),
        mes.messages,
        mes.committed,
        mes.committed_per_s,
        mes.committed_per_s / raw.max(f64::MIN_POSITIVE),
        ms(mes.p50_ms),
        ms(mes.p99_ms),
        nr.messages,
        nr.committed,
        nr.committed_per_s,
        nr.committed_per_s / raw.max(f64::MIN_POSITIVE),
        mes.committed_per_s / nr.committed_per_s.max(f64::MIN_POSITIVE),
        ms(nr.p50_ms),
        ms(nr.p99_ms),
        per(&floor, &nr),
    );
    println!("{md}");
    bench_load::write_results(
        "node-red",
        &md,
        &json!({"scenario": "node-red", "raw_per_s": raw, "contract_floor": floor, "mes": mes, "node_red": nr,
                "node_red_vm_hwm_mib": nr_hwm, "ratio_mes_to_node_red": per(&mes, &nr),
                "ratio_floor_to_node_red": per(&floor, &nr)}),
    )
}

#[cfg(test)]
mod tests {
    use super::{lines_plant, median_round, PhaseFigures, WriterFigures};
    use crate::plant::Plant;

    fn round(raw: f64, mes: f64, name: &str) -> (f64, PhaseFigures, WriterFigures) {
        let flood = PhaseFigures { name: name.into(), committed_per_s: mes, ..Default::default() };
        (raw, flood, WriterFigures::default())
    }

    /// The median is by ratio, not by either rate: the round whose MES / raw is in the
    /// middle, with its own raw rate and figures; of two, the higher.
    #[test]
    fn the_median_round_is_the_one_of_the_median_ratio() {
        let rounds = vec![round(200.0, 100.0, "a"), round(100.0, 30.0, "b"), round(150.0, 60.0, "c")];
        let (raw, flood, _) = median_round(rounds).expect("a round");
        assert_eq!((raw, flood.name.as_str()), (150.0, "c"), "ratios 0.5, 0.3, 0.4: the median is 0.4");
        let two = vec![round(100.0, 30.0, "low"), round(100.0, 60.0, "high")];
        assert_eq!(median_round(two).map(|r| r.1.name), Some("high".to_string()));
        assert!(median_round(Vec::new()).is_none());
    }

    /// Three lines: the demo line as it is, then two copies with their own buffers, work
    /// centers and devices, wired as the first (each copy's flow stays within the copy),
    /// sharing the materials and bills; the plant file they make loads as any other.
    #[test]
    fn lines_repeat_the_demo_line_with_their_own_ids() {
        let one = Plant::parse(crate::plant::MQTT_LINE, "demo", None).expect("demo line");
        let plant = Plant::parse(&lines_plant(3).expect("plant"), "lines", None).expect("three lines load");
        assert_eq!(plant.materials.len(), one.materials.len());
        assert_eq!(plant.boms.len(), one.boms.len());
        assert_eq!(plant.buffers.len(), 3 * one.buffers.len());
        assert_eq!(plant.work_centers.len(), 3 * one.work_centers.len());
        let first = &one.work_centers[0];
        assert_eq!(&plant.work_centers[0].id, &first.id);
        assert_eq!(plant.work_centers[0].device_id(), first.device_id());
        let copy = &plant.work_centers[2 * one.work_centers.len()];
        assert_eq!(copy.id, format!("{}-L3", first.id));
        assert_eq!(copy.device_id(), format!("{}-l3", first.device_id()));
        assert_eq!(copy.output, format!("{}-L3", first.output));
        assert_eq!(copy.inputs, first.inputs.iter().map(|b| format!("{b}-L3")).collect::<Vec<_>>());
        let devices: std::collections::BTreeSet<String> = plant.work_centers.iter().map(|w| w.device_id()).collect();
        assert_eq!(devices.len(), plant.work_centers.len(), "a device per work center");
        assert_eq!(
            lines_plant(1).map(|p| Plant::parse(&p, "one", None).map(|p| p.work_centers.len()).ok()).ok().flatten(),
            Some(4)
        );
    }
}
