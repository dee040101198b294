//! Load and observation shared by the `mes bench <scenario>` runs.
//!
//! The publisher plays a plan of phases (a flood: as fast as the broker takes them; or a
//! paced rate for a length of time) round-robin over devices, `seq` counting per device,
//! and notes when each message was handed to the MQTT client. The observer reads the
//! `telemetry` table of the database being written (the MES's, or a peer's) every 2 ms
//! and notes when each row first appears: message-to-commit latency is the difference,
//! to within the poll interval and the read itself. The same publisher, payloads and
//! observer serve the MES and its peers, so their figures compare.

use anyhow::Context;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::de::IgnoredAny;
use sqlx::Row;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One phase of a load plan.
#[derive(Clone, Debug)]
pub struct Phase {
    pub name: String,
    /// Messages per second; `None` floods (as fast as the client and broker take them).
    pub rate: Option<f64>,
    pub messages: u64,
}

impl Phase {
    pub fn flood(name: &str, messages: u64) -> Phase {
        Phase { name: name.into(), rate: None, messages }
    }
    pub fn paced(name: &str, rate: f64, secs: f64) -> Phase {
        Phase { name: name.into(), rate: Some(rate.max(1.0)), messages: (rate.max(1.0) * secs).round() as u64 }
    }
}

/// What the publisher and the observer share while a plan runs.
pub struct Load {
    pub devices: Vec<String>,
    pub prefix: String,
    /// Each device's first `seq` (a later run on the same database continues from the
    /// previous run's [`Load::next_seq`], so its messages are new, not duplicates).
    pub first_seq: u64,
    pub phases: Vec<Phase>,
    /// Index of the first message of each phase, and one past the last at the end.
    pub bounds: Vec<u64>,
    t0: Instant,
    /// The wall clock (ms since the epoch) at `t0`.
    t0_ms: i64,
    /// Per message: µs after `t0` when it was handed to the client (0: not yet).
    sent_us: Vec<AtomicU64>,
    /// Per message: µs after `t0` when its row was first seen (0: not yet).
    seen_us: Vec<AtomicU64>,
    /// Per message: ms after `t0` when the system under test received it, from the row's
    /// `received_ms` (0: not known).
    received_ms: Vec<AtomicU64>,
    pub published: AtomicU64,
    pub committed: AtomicU64,
    pub phase: AtomicUsize,
    /// µs after `t0` when each phase began publishing.
    phase_start_us: Vec<AtomicU64>,
}

impl Load {
    pub fn new(devices: Vec<String>, prefix: &str, first_seq: u64, phases: Vec<Phase>) -> Arc<Load> {
        let mut bounds = vec![0];
        for p in &phases {
            bounds.push(bounds.last().copied().unwrap_or(0) + p.messages);
        }
        let total = bounds.last().copied().unwrap_or(0) as usize;
        Arc::new(Load {
            devices,
            prefix: prefix.into(),
            first_seq: first_seq.max(1),
            phase_start_us: phases.iter().map(|_| AtomicU64::new(0)).collect(),
            phases,
            bounds,
            t0: Instant::now(),
            t0_ms: crate::now_ms(),
            sent_us: (0..total).map(|_| AtomicU64::new(0)).collect(),
            seen_us: (0..total).map(|_| AtomicU64::new(0)).collect(),
            received_ms: (0..total).map(|_| AtomicU64::new(0)).collect(),
            published: AtomicU64::new(0),
            committed: AtomicU64::new(0),
            phase: AtomicUsize::new(0),
        })
    }

    pub fn total(&self) -> u64 {
        self.sent_us.len() as u64
    }

    fn now_us(&self) -> u64 {
        (self.t0.elapsed().as_micros() as u64).max(1)
    }

    /// The `first_seq` for a run after this one on the same devices.
    pub fn next_seq(&self) -> u64 {
        let d = self.devices.len().max(1) as u64;
        self.first_seq + self.total().div_ceil(d)
    }

    /// Message index `i` → (device, seq).
    fn key(&self, i: u64) -> (&str, u64) {
        let d = self.devices.len().max(1) as u64;
        (self.devices[(i % d) as usize].as_str(), i / d + self.first_seq)
    }

    fn index(&self, device_pos: usize, seq: i64) -> Option<usize> {
        let d = self.devices.len().max(1) as i64;
        let i = (seq - self.first_seq as i64).checked_mul(d)?.checked_add(device_pos as i64)?;
        (i >= 0 && (i as usize) < self.sent_us.len()).then_some(i as usize)
    }
}

/// The contract's telemetry JSON (~150 B), as `mes bench` has always sent it.
pub fn payload(device_seq: u64) -> Vec<u8> {
    format!(
        r#"{{"boot":1,"seq":{device_seq},"good":{},"scrap":{},"state":"running","ts":"2026-11-11T00:00:00.000Z","metrics":{{"temp_c":71.5}}}}"#,
        device_seq * 2,
        device_seq / 50
    )
    .into_bytes()
}

/// A client id no other client of this process (nor, by the process id, of another
/// process on the machine) uses at the same time: `{prefix}-{pid}-{n}`. A broker closes an
/// older connection when a second one brings its id, so ids drawn from the clock alone
/// collided when two runs (concurrent tests) started in the same millisecond.
pub fn client_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Relaxed))
}

pub fn mqtt_options(id: &str, addr: &str) -> anyhow::Result<MqttOptions> {
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| anyhow::anyhow!("bad broker address {addr}"))?;
    let mut o = MqttOptions::new(id, host, port.parse()?);
    o.set_keep_alive(Duration::from_secs(30)).set_inflight(1000).set_clean_session(true);
    Ok(o)
}

/// Plays the plan against the broker at `addr` (QoS 1); returns once the broker has
/// acknowledged every message.
pub async fn publish(addr: &str, load: Arc<Load>) -> anyhow::Result<()> {
    let (client, mut el) = AsyncClient::new(mqtt_options(&client_id("bench-pub"), addr)?, 10_000);
    let acked = Arc::new(AtomicU64::new(0));
    let a = acked.clone();
    let poller = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    a.fetch_add(1, Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    for (p, phase) in load.phases.iter().enumerate() {
        load.phase.store(p, Relaxed);
        let start_us = load.now_us();
        load.phase_start_us[p].store(start_us, Relaxed);
        let (first, end) = (load.bounds[p], load.bounds[p + 1]);
        let started = Instant::now();
        let mut i = first;
        while i < end {
            // Paced: publish what the rate allows by now, then wait a millisecond.
            let due = match phase.rate {
                None => end,
                Some(rate) => (first + (started.elapsed().as_secs_f64() * rate) as u64 + 1).min(end),
            };
            while i < due {
                let (dev, seq) = load.key(i);
                let topic = format!("{}/devices/{dev}/telemetry", load.prefix);
                load.sent_us[i as usize].store(load.now_us(), Relaxed);
                client.publish(topic, QoS::AtLeastOnce, false, payload(seq)).await?;
                load.published.fetch_add(1, Relaxed);
                i += 1;
            }
            if i < end {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while acked.load(Relaxed) < load.total() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    poller.abort();
    Ok(())
}

/// One sample of the observer: time, published, committed, resident set of the watched
/// process.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub at_us: u64,
    pub published: u64,
    pub committed: u64,
    pub rss_kib: u64,
}

/// Resident set (`VmRSS`) or its peak (`VmHWM`) of a process, KiB.
pub fn proc_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|v| v.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    })
}

/// The highest pack id of `telemetry_packs` (0 when empty): taken before the
/// publisher starts, so that no row of the run is mistaken for an earlier one.
pub async fn last_id(pool: &sqlx::AnyPool) -> anyhow::Result<i64> {
    Ok(sqlx::query("SELECT COALESCE(MAX(id), 0) AS m FROM telemetry_packs")
        .fetch_one(pool)
        .await?
        .try_get::<i64, _>("m")?)
}

/// The new packs, at most 256 a poll (a few hundred readings under a flood; each pack at
/// most a commit's readings of one device). Bounded: on a PostgreSQL table not analyzed
/// yet (a fresh bench database) a large limit made the planner scan the whole table and
/// sort it, ~20 ms a poll at 180,000 rows, which it added to every latency it timed.
const OBSERVE_SQL: &str = "SELECT id, device, readings FROM telemetry_packs WHERE id > $1 ORDER BY id LIMIT 256";

/// A reading as a pack stores it (migration 0012); the observer reads its seq and receive
/// time.
type PackedReading = (i64, i64, IgnoredAny, IgnoredAny, i64, IgnoredAny, IgnoredAny, IgnoredAny, IgnoredAny);

/// Follows `telemetry_packs` in `pool`, from pack id `after_id` on, until every message of `load` is seen or
/// nothing new arrived for `stall` after publishing ended; prints progress on stderr.
/// `rss_of`: a process whose resident set is sampled every 100 ms.
pub async fn observe(
    pool: &sqlx::AnyPool,
    after_id: i64,
    load: Arc<Load>,
    label: &str,
    rss_of: Option<u32>,
    stall: Duration,
) -> anyhow::Result<Vec<Sample>> {
    let positions: HashMap<&str, usize> = load.devices.iter().enumerate().map(|(i, d)| (d.as_str(), i)).collect();
    // The new packs as stored, their readings decoded here: unpacking them in SQL (the
    // `telemetry` view) cost the observer a fifth of the samples of a flood (perf),
    // charged to the system under test while the raw baseline runs without an observer.
    let mut last_id = after_id;
    let mut samples = Vec::new();
    let mut last_print = Instant::now();
    let mut last_sample = 0u64;
    let mut idle_since = Instant::now();
    loop {
        // One statement text with the last id bound, but not kept prepared: PostgreSQL
        // plans a kept statement once for all values, and the plan it made while the table
        // was empty (the first polls) was a sequential scan and sort of every pack, kept
        // for the whole run (10.6 million rows read in ~2,000 polls of one flood). Unkept,
        // each poll is planned for its value: an index range scan of at most 256 rows.
        let rows = sqlx::query(OBSERVE_SQL).bind(last_id).persistent(false).fetch_all(pool).await?;
        let now = load.now_us();
        if !rows.is_empty() {
            idle_since = Instant::now();
        }
        for row in rows {
            last_id = last_id.max(row.try_get("id")?);
            let device: String = row.try_get("device")?;
            let readings: String = row.try_get("readings")?;
            let readings: Vec<PackedReading> =
                serde_json::from_str(&readings).with_context(|| format!("observer: a pack of `{device}`"))?;
            for (_, seq, _, _, received, ..) in readings {
                if let Some(i) = positions.get(device.as_str()).and_then(|p| load.index(*p, seq)) {
                    if load.seen_us[i].compare_exchange(0, now, Relaxed, Relaxed).is_ok() {
                        load.committed.fetch_add(1, Relaxed);
                        let after_t0 = received.saturating_sub(load.t0_ms).max(0) as u64;
                        load.received_ms[i].store(after_t0, Relaxed);
                    }
                }
            }
        }
        let (published, committed) = (load.published.load(Relaxed), load.committed.load(Relaxed));
        if now - last_sample >= 100_000 || committed == load.total() {
            last_sample = now;
            let rss_kib = rss_of.and_then(|pid| proc_kib(pid, "VmRSS")).unwrap_or(0);
            samples.push(Sample { at_us: now, published, committed, rss_kib });
        }
        if last_print.elapsed() >= Duration::from_millis(500) {
            last_print = Instant::now();
            let phase = load.phases.get(load.phase.load(Relaxed)).map(|p| p.name.as_str()).unwrap_or("");
            eprint!(
                "\r[{label}] {phase:<8} published {published:>9}  committed {committed:>9} / {}  backlog {:>7}   ",
                load.total(),
                published.saturating_sub(committed)
            );
        }
        if committed >= load.total() {
            break;
        }
        let idle = idle_since.elapsed();
        if (published >= load.total() && idle > stall) || idle > stall * 6 {
            eprint!(
                "\n[{label}] stopped waiting: {} of {} messages never committed",
                load.total() - committed,
                load.total()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    eprintln!();
    Ok(samples)
}

/// The figures of one phase.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PhaseFigures {
    pub name: String,
    pub messages: u64,
    pub committed: u64,
    /// Messages per second the publisher achieved.
    pub published_per_s: f64,
    /// Rows committed per second: for a flood, all of its messages over the time from
    /// its first publish to its last commit; for a paced phase, rows committed during
    /// the phase over its length.
    pub committed_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Of the message-to-commit latency, the part from the publish to the system's receipt
    /// of the message (its row's `received_ms`; to the millisecond): broker and socket.
    pub p50_to_receipt_ms: f64,
    pub p99_to_receipt_ms: f64,
    pub max_ms: f64,
    pub max_backlog: u64,
    pub backlog_at_end: u64,
    pub peak_rss_mib: f64,
}

fn quantile(sorted: &[u64], q: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1)))
        .map_or(0.0, |v| *v as f64 / 1000.0)
}

/// Per-phase figures from a finished run.
pub fn figures(load: &Load, samples: &[Sample]) -> Vec<PhaseFigures> {
    let mut out = Vec::new();
    for (p, phase) in load.phases.iter().enumerate() {
        let (first, end) = (load.bounds[p] as usize, load.bounds[p + 1] as usize);
        let start = load.phase_start_us[p].load(Relaxed);
        let stop = load.phase_start_us.get(p + 1).map(|s| s.load(Relaxed)).filter(|s| *s > 0);
        let mut lat = Vec::with_capacity(end - first);
        let mut to_receipt = Vec::with_capacity(end - first);
        let mut last_seen = 0;
        let mut last_sent = start;
        for i in first..end {
            let (sent, seen) = (load.sent_us[i].load(Relaxed), load.seen_us[i].load(Relaxed));
            last_sent = last_sent.max(sent);
            if seen > 0 && sent > 0 {
                lat.push(seen.saturating_sub(sent));
                last_seen = last_seen.max(seen);
                let received_us = load.received_ms[i].load(Relaxed) * 1000;
                if received_us > 0 {
                    to_receipt.push(received_us.saturating_sub(sent));
                }
            }
        }
        lat.sort_unstable();
        to_receipt.sort_unstable();
        let committed = lat.len() as u64;
        let publish_secs = (last_sent.saturating_sub(start)).max(1) as f64 / 1e6;
        let committed_per_s = match (phase.rate, stop) {
            (Some(_), Some(stop)) => {
                // Rows committed during the phase (of any phase), over its length.
                let at = |t: u64| samples.iter().take_while(|s| s.at_us <= t).last().map_or(0, |s| s.committed);
                (at(stop).saturating_sub(at(start))) as f64 / ((stop - start).max(1) as f64 / 1e6)
            }
            _ => committed as f64 / ((last_seen.saturating_sub(start)).max(1) as f64 / 1e6),
        };
        let window_end = stop.unwrap_or(u64::MAX);
        let in_phase: Vec<&Sample> = samples.iter().filter(|s| s.at_us >= start && s.at_us <= window_end).collect();
        out.push(PhaseFigures {
            name: phase.name.clone(),
            messages: phase.messages,
            committed,
            published_per_s: phase.messages as f64 / publish_secs,
            committed_per_s,
            p50_ms: quantile(&lat, 0.50),
            p99_ms: quantile(&lat, 0.99),
            p50_to_receipt_ms: quantile(&to_receipt, 0.50),
            p99_to_receipt_ms: quantile(&to_receipt, 0.99),
            max_ms: lat.last().map_or(0.0, |v| *v as f64 / 1000.0),
            max_backlog: in_phase.iter().map(|s| s.published.saturating_sub(s.committed)).max().unwrap_or(0),
            backlog_at_end: in_phase.last().map_or(0, |s| s.published.saturating_sub(s.committed)),
            peak_rss_mib: in_phase.iter().map(|s| s.rss_kib).max().unwrap_or(0) as f64 / 1024.0,
        });
    }
    out
}

/// Runs the plan: publisher and observer together; returns the per-phase figures.
pub async fn run(
    broker: &str,
    pool: &sqlx::AnyPool,
    load: Arc<Load>,
    label: &str,
    rss_of: Option<u32>,
) -> anyhow::Result<(Vec<PhaseFigures>, Vec<Sample>)> {
    let after_id = last_id(pool).await?;
    let publisher = tokio::spawn(publish_owned(broker.to_string(), load.clone()));
    let samples = observe(pool, after_id, load.clone(), label, rss_of, Duration::from_secs(20)).await?;
    publisher.await.map_err(|e| anyhow::anyhow!("publisher: {e}"))??;
    Ok((figures(&load, &samples), samples))
}

async fn publish_owned(broker: String, load: Arc<Load>) -> anyhow::Result<()> {
    publish(&broker, load).await
}

/// Writes `target/bench/<name>.md` and `.json`; returns the Markdown.
pub fn write_results(name: &str, md: &str, json: &serde_json::Value) -> anyhow::Result<()> {
    let out = std::path::PathBuf::from("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join(format!("{name}.md")), md)?;
    std::fs::write(out.join(format!("{name}.json")), serde_json::to_string_pretty(json)?)?;
    eprintln!("written to target/bench/{name}.md and target/bench/{name}.json");
    Ok(())
}
