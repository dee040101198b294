//! `mes bench --exporter`: committed ingest with the time-series exporter on and off in
//! the same run (same MES, same database, alternating rounds), the live export rate, and
//! the backfill's export rate. Without `--influx-url` a local VictoriaMetrics (which
//! speaks the InfluxDB 2 write API) is started at nice 19 on a free port and stopped
//! afterwards.

use super::{backfill, Settings};
use crate::app::Handle;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// A `victoria-metrics` child process with its own data directory; killed on drop.
pub struct LocalVm {
    child: Child,
    dir: PathBuf,
    pub url: String,
}

impl LocalVm {
    /// Starts `victoria-metrics` from PATH (at nice 19) on `port`, storing under `dir`;
    /// waits until it answers (at most 10 s).
    pub fn start(dir: &Path, port: u16) -> anyhow::Result<LocalVm> {
        std::fs::create_dir_all(dir)?;
        // At nice 19: it stands in for a server on another machine, so it takes no CPU the
        // MES wants (on the same two cores at equal priority it costs ingest ~5 %).
        let child = Command::new("nice")
            .args(["-n", "19", "victoria-metrics"])
            .arg(format!("-storageDataPath={}", dir.display()))
            .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
            .args(["-retentionPeriod=100y", "-dedup.minScrapeInterval=1ms", "-loggerLevel=ERROR"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting victoria-metrics (is it installed?): {e}"))?;
        let vm = LocalVm { child, dir: dir.to_path_buf(), url: format!("http://127.0.0.1:{port}") };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "victoria-metrics did not listen on {port} within 10 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(vm)
    }
}

impl Drop for LocalVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Publishes `n` readings and waits until they are committed; returns msg/s.
async fn ingest(
    handle: &Handle,
    broker: &str,
    prefix: &str,
    devices: &[String],
    n: u64,
    seq: u64,
) -> anyhow::Result<f64> {
    let before = handle.metrics.committed_jobs.load(Relaxed);
    let started = Instant::now();
    crate::bench::publish(broker, prefix, devices, n, seq).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while handle.metrics.committed_jobs.load(Relaxed) - before < n {
        anyhow::ensure!(Instant::now() < deadline, "ingest did not commit {n} readings in 600 s");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Rounds of (exporter off, exporter on), `n` readings each; prints the rates and
/// returns the medians (msg/s off, msg/s on, live points/s) and the backfill's points/s.
pub async fn run(
    handle: &Handle,
    settings: &Settings,
    broker: &str,
    prefix: &str,
    devices: Vec<String>,
    n: u64,
    rounds: u32,
) -> anyhow::Result<(f64, f64, f64, f64)> {
    let tap = handle.influx.clone().ok_or_else(|| anyhow::anyhow!("the exporter is not configured"))?;
    let m = &handle.metrics.influx;
    let per_device = n / devices.len().max(1) as u64 + 1;
    let mut seq = 1;
    let (mut off, mut on, mut live) = (Vec::new(), Vec::new(), Vec::new());
    let started_at = crate::now_ms();
    // Warm-up (the first round is slower: page cache, connection pools).
    tap.set_paused(true);
    ingest(handle, broker, prefix, &devices, n / 4, seq).await?;
    seq += n / 4 / devices.len().max(1) as u64 + 1;
    // Rounds alternate the order (off-on, on-off, ...): the database grows during the run,
    // and a fixed order would put one side always on the bigger database.
    for round in 1..=rounds {
        let order = if round % 2 == 1 { [false, true] } else { [true, false] };
        let (mut r_off, mut r_on, mut r_live, mut points) = (0.0, 0.0, 0.0, 0);
        for exporting in order {
            tap.set_paused(!exporting);
            let exported = m.exported.load(Relaxed);
            let t = Instant::now();
            let rate = ingest(handle, broker, prefix, &devices, n, seq).await?;
            seq += per_device;
            if !exporting {
                r_off = rate;
                continue;
            }
            r_on = rate;
            // The live export rate: from the start of the measurement until its points are
            // written (two per reading: device metrics and counts).
            let deadline = Instant::now() + Duration::from_secs(120);
            while m.exported.load(Relaxed) - exported < 2 * n && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            points = m.exported.load(Relaxed) - exported;
            r_live = points as f64 / t.elapsed().as_secs_f64();
        }
        eprintln!("[bench] round {round}: exporter off {r_off:.0} msg/s, on {r_on:.0} msg/s; {points} points exported live at {r_live:.0} points/s");
        off.push(r_off);
        on.push(r_on);
        live.push(r_live);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let (off, on, live) = (median(&mut off), median(&mut on), median(&mut live));
    // The backfill re-sends everything from the database (readings, states, minutes).
    tap.set_paused(true);
    let t = Instant::now();
    let report =
        backfill::run(settings, &handle.store, started_at - 86_400_000 * 30, crate::now_ms() + 86_400_000 * 30)
            .await
            .map_err(anyhow::Error::msg)?;
    let backfill_rate = report.points as f64 / t.elapsed().as_secs_f64();
    println!(
        "\nexporter benchmark: {n} messages per measurement, {rounds} rounds, {} devices, database {}",
        devices.len(),
        handle.store.backend_name()
    );
    println!("  ingest, exporter off (median):   {off:>10.0} msg/s");
    println!("  ingest, exporter on (median):    {on:>10.0} msg/s");
    println!("  ratio on / off:                  {:>10.2}", on / off);
    println!("  live export (median, round start to its points written): {live:>10.0} points/s");
    println!(
        "  backfill (mes export-timeseries): {backfill_rate:>10.0} points/s ({} points, {} requests)",
        report.points, report.requests
    );
    println!(
        "  exporter counters: exported {}, dropped {}, rejected {}, write errors {}",
        m.exported.load(Relaxed),
        m.dropped.load(Relaxed),
        m.rejected.load(Relaxed),
        m.write_errors.load(Relaxed)
    );
    Ok((off, on, live, backfill_rate))
}
