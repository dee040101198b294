//! `mes bench-cluster`: aggregate committed telemetry per second with 1, 2 and 3 nodes
//! sharing one PostgreSQL database and one broker, next to the raw broker rate measured in
//! the same run; then the failover time: from SIGKILL of the node owning a work center to
//! the first commit of that work center's telemetry by its new owner.
//!
//! Everything runs on this machine: the nodes are child `mes serve` processes, the broker
//! is the embedded one (in this process) unless `--mqtt` names one, and every node count
//! gets a fresh database.

use crate::bench_http::{free_port, Kill};
use crate::db::Store;
use anyhow::Context;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::json;
use sqlx::Row;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Work centers of the benchmark plant (each its own MQTT device).
const WORK_CENTERS: usize = 30;

pub struct Options {
    pub nodes: Vec<usize>,
    pub messages: u64,
    /// PostgreSQL admin URL: a database per node count is created under it.
    pub database: String,
    /// An external broker (`mqtt://host:port`); `None`: the embedded broker.
    pub mqtt: Option<String>,
    pub lease_ms: u64,
}

struct Cluster {
    nodes: Vec<(String, Kill)>,
    store: Store,
}

async fn fresh_database(admin: &str, name: &str) -> anyhow::Result<String> {
    let admin_store = Store::connect(admin, 2).await.context("connecting to the PostgreSQL admin URL")?;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name}"))).execute(&admin_store.pool).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&admin_store.pool).await?;
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(admin);
    Ok(format!("{base}/{name}"))
}

/// Starts `n` nodes on a fresh database and waits until the work centers are spread.
async fn start(opts: &Options, broker: &str, n: usize, prefix: &str) -> anyhow::Result<Cluster> {
    let exe = std::env::current_exe()?;
    let dir = std::path::PathBuf::from(format!("mes-data/bench-cluster/{n}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let plant = dir.join("plant.toml");
    std::fs::write(&plant, crate::bench_scale::plant(WORK_CENTERS))?;
    let db = fresh_database(&opts.database, &format!("mes_bench_cluster_{n}")).await?;
    let mut nodes = Vec::new();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    // 0 nodes: one plain `mes serve` without `[cluster]` (the single-node reference).
    for i in 1..=n.max(1) {
        let cluster = if n == 0 {
            String::new()
        } else {
            format!("[cluster]\nnode_id = \"n{i}\"\nlease_timeout = \"{}ms\"\n", opts.lease_ms)
        };
        let http = free_port()?;
        let config = dir.join(format!("n{i}.toml"));
        std::fs::write(
            &config,
            format!(
                "[http]\nlisten = \"127.0.0.1:{http}\"\n[database]\nurl = \"{db}\"\nmax_connections = 8\n[mqtt]\nurl = \"{broker}\"\n\
                 client_id = \"mes-{prefix}\"\ntopic_prefix = \"{prefix}\"\n[plant]\nfile = \"{}\"\n{cluster}",
                plant.display(),
            ),
        )?;
        let log = std::fs::File::create(dir.join(format!("n{i}.log")))?;
        let child = Command::new(&exe)
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        nodes.push((format!("n{i}"), Kill(child)));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = client.get(format!("http://127.0.0.1:{http}/readyz")).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "node n{i} not ready in 60 s (see {})", dir.display());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let store = Store::connect(&db, 2).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    if n > 0 {
        loop {
            let per = owners(&store).await?;
            let total: i64 = per.iter().map(|(_, c)| c).sum();
            if total == WORK_CENTERS as i64
                && per.len() == n
                && per.iter().all(|(_, c)| *c >= (WORK_CENTERS / n) as i64)
            {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "work centers not spread over {n} nodes in 60 s: {per:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(Cluster { nodes, store })
}

impl Cluster {
    /// SIGTERM to every node still running, each awaited (graceful leave, up to 15 s).
    fn stop(mut self) {
        for (_, k) in &mut self.nodes {
            if let Ok(None) = k.0.try_wait() {
                let _ = Command::new("kill").args(["-TERM", &k.0.id().to_string()]).status();
                let deadline = Instant::now() + Duration::from_secs(15);
                while matches!(k.0.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

/// Live leases per node.
async fn owners(store: &Store) -> anyhow::Result<Vec<(String, i64)>> {
    let (now, _, leases) = store.cluster_status().await?;
    let mut per: std::collections::BTreeMap<String, i64> = Default::default();
    for l in leases.iter().filter(|l| l.expires_ms > now) {
        if let Some(n) = &l.node_id {
            *per.entry(n.clone()).or_default() += 1;
        }
    }
    Ok(per.into_iter().collect())
}

/// Measured messages committed (the probes have `seq` 0).
async fn committed(store: &Store) -> anyhow::Result<i64> {
    Ok(sqlx::query("SELECT COUNT(*) AS n FROM telemetry WHERE seq > 0").fetch_one(&store.pool).await?.try_get("n")?)
}

/// A brand-new MQTT session receives only what is published after it has subscribed:
/// probe every device (`seq` 0) until each probe is committed, so that every work center's
/// session is up before the clock starts.
async fn probe(c: &Cluster, broker_addr: &str, prefix: &str) -> anyhow::Result<()> {
    let (host, port) = broker_addr.rsplit_once(':').context("broker address")?;
    let (client, mut el) =
        AsyncClient::new(MqttOptions::new(format!("bench-probe-{prefix}"), host, port.parse()?), 100);
    let poller = tokio::spawn(async move {
        loop {
            if el.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for d in devices() {
            let body = json!({"boot": 1, "seq": 0, "good": 0, "scrap": 0, "state": "running"}).to_string();
            client.publish(format!("{prefix}/devices/{d}/telemetry"), QoS::AtLeastOnce, false, body).await?;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let n: i64 = sqlx::query("SELECT COUNT(DISTINCT device) AS n FROM telemetry WHERE seq = 0")
            .fetch_one(&c.store.pool)
            .await?
            .try_get("n")?;
        if n == WORK_CENTERS as i64 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "only {n} of {WORK_CENTERS} sessions answered in 60 s");
    }
    poller.abort();
    Ok(())
}

fn devices() -> Vec<String> {
    (0..WORK_CENTERS).map(|i| format!("dev-{i:05}")).collect()
}

/// Committed messages per second with the cluster up: publish, then wait for the commits.
async fn throughput(c: &Cluster, broker_addr: &str, prefix: &str, n: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    crate::bench::publish(broker_addr, prefix, &devices(), n, 1).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done = committed(&c.store).await?;
        if done >= n as i64 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "only {done} of {n} committed after 600 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Kill the owner of the first work center while its device publishes 100 messages a
/// second; returns (kill → lease taken over, kill → first commit by the new owner).
async fn failover(c: &mut Cluster, broker_addr: &str, prefix: &str, first_seq: u64) -> anyhow::Result<(f64, f64)> {
    let (host, port) = broker_addr.rsplit_once(':').context("broker address")?;
    let mut o = MqttOptions::new(format!("bench-failover-{prefix}"), host, port.parse()?);
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(o, 1000);
    let poller = tokio::spawn(async move {
        loop {
            if el.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let seq = Arc::new(AtomicU64::new(first_seq));
    let s = seq.clone();
    let topic = format!("{prefix}/devices/dev-00000/telemetry");
    let publisher = tokio::spawn(async move {
        loop {
            let n = s.fetch_add(1, Relaxed);
            let body = json!({"boot": 1, "seq": n, "good": n * 2, "scrap": 0, "state": "running"}).to_string();
            if client.publish(topic.clone(), QoS::AtLeastOnce, false, body).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, _, leases) = c.store.cluster_status().await?;
    let victim = leases
        .iter()
        .find(|l| l.work_center == "WC-00000")
        .and_then(|l| l.node_id.clone())
        .context("WC-00000 has no owner")?;
    let at_kill = seq.load(Relaxed);
    let killed = Instant::now();
    if let Some((_, k)) = c.nodes.iter_mut().find(|(id, _)| *id == victim) {
        let _ = k.0.kill();
    }
    let mut taken = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    let first_commit = loop {
        if taken.is_none() {
            let (now, _, leases) = c.store.cluster_status().await?;
            if leases.iter().any(|l| {
                l.work_center == "WC-00000" && l.expires_ms > now && l.node_id.as_deref().is_some_and(|n| n != victim)
            }) {
                taken = Some(killed.elapsed().as_secs_f64());
            }
        }
        let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM telemetry WHERE device = 'dev-00000' AND seq > $1")
            .bind(at_kill as i64)
            .fetch_one(&c.store.pool)
            .await?
            .try_get("n")?;
        if n > 0 && taken.is_some() {
            break killed.elapsed().as_secs_f64();
        }
        anyhow::ensure!(Instant::now() < deadline, "no commit for dev-00000 within 120 s of the kill");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    publisher.abort();
    poller.abort();
    Ok((taken.unwrap_or(first_commit), first_commit))
}

/// Runs the whole benchmark; returns the Markdown table (also written under target/bench).
pub async fn run(opts: Options) -> anyhow::Result<String> {
    let mut rows = Vec::new();
    let mut fail = None;
    let last = opts.nodes.iter().copied().max().unwrap_or(1);
    for &n in &opts.nodes {
        // A fresh embedded broker for every node count (the sessions of the previous
        // count stay in the old one), its raw rate measured right before.
        let broker = match &opts.mqtt {
            Some(u) => u.clone(),
            None => {
                let port = free_port()?;
                crate::broker::start(format!("127.0.0.1:{port}").parse()?, 64 * 1024, &[])
                    .map_err(anyhow::Error::msg)?;
                format!("mqtt://127.0.0.1:{port}")
            }
        };
        let addr = broker.trim_start_matches("mqtt://").to_string();
        eprintln!("bench-cluster: raw broker baseline, {} messages …", opts.messages);
        let raw = crate::bench::baseline(&addr, &devices(), opts.messages).await?;
        eprintln!("bench-cluster: raw broker {raw:.0} msg/s");
        let prefix = format!("bc{n}x{}", std::process::id());
        eprintln!("bench-cluster: {n} node(s): starting and spreading {WORK_CENTERS} work centers …");
        let mut c = start(&opts, &broker, n, &prefix).await?;
        probe(&c, &addr, &prefix).await?;
        eprintln!("bench-cluster: {n} node(s): {} messages …", opts.messages);
        let rate = throughput(&c, &addr, &prefix, opts.messages).await?;
        eprintln!("bench-cluster: {n} node(s): {rate:.0} committed msg/s ({:.2} × raw broker)", rate / raw);
        rows.push((n, raw, rate));
        if n == last && n > 1 {
            eprintln!("bench-cluster: failover: SIGKILL of the node owning WC-00000 …");
            let f = failover(&mut c, &addr, &prefix, opts.messages + 1).await?;
            eprintln!(
                "bench-cluster: failover: lease taken over {:.2} s, first commit {:.2} s after the kill",
                f.0, f.1
            );
            fail = Some((n, f));
        }
        c.stop();
    }
    let one = rows.iter().find(|(n, _, _)| *n == 1).map(|r| r.2);
    let mut md = String::from(
        "| nodes | messages | raw broker msg/s | committed msg/s (all nodes) | ratio to raw broker | ratio to 1 node |\n|---:|---:|---:|---:|---:|---:|\n",
    );
    for (n, raw, rate) in &rows {
        let label = if *n == 0 { "1, no `[cluster]`".to_string() } else { n.to_string() };
        md.push_str(&format!(
            "| {label} | {} | {raw:.0} | {rate:.0} | {:.2} | {} |\n",
            opts.messages,
            rate / raw,
            one.map_or("–".into(), |o| format!("{:.2}", rate / o))
        ));
    }
    if let Some((n, (taken, first))) = fail {
        md.push_str(&format!(
            "\nFailover with {n} nodes, lease timeout {} ms: lease taken over {taken:.2} s after SIGKILL, first commit by the new owner {first:.2} s after it.\n",
            opts.lease_ms
        ));
    }
    std::fs::create_dir_all("target/bench")?;
    std::fs::write("target/bench/cluster.md", &md)?;
    let doc = json!({
        "messages": opts.messages, "lease_ms": opts.lease_ms,
        "nodes": rows.iter().map(|(n, raw, r)| json!({"nodes": n, "cluster": *n > 0, "raw_broker_msg_s": raw, "committed_msg_s": r, "ratio_raw": r / raw})).collect::<Vec<_>>(),
        "failover": fail.map(|(n, (t, f))| json!({"nodes": n, "lease_taken_s": t, "first_commit_s": f})),
    });
    std::fs::write("target/bench/cluster.json", serde_json::to_string_pretty(&doc)?)?;
    Ok(md)
}
