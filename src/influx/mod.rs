//! Time series out: committed telemetry, counts, state changes and per-minute OEE to an
//! InfluxDB 2 write API (`/api/v2/write`, with the `influxdb2` crate), as derived data.
//!
//! The database of record stays the SQL store; everything exported can be rebuilt from it
//! (`mes export-timeseries`, [`backfill`]). The exporter never slows ingest: after each
//! commit the writer hands the committed rows to a [`Tap`], which only moves them into a
//! bounded queue under a short lock (no await, no I/O). When the queue is full the oldest
//! points are dropped and counted. A task of its own batches the queue by size and age,
//! writes each batch under a timeout, retries failures with capped exponential backoff,
//! drops a batch InfluxDB rejects (4xx, logged with its reason, never retried), and
//! computes each touched minute's rollup from the database once it has settled.

pub mod backfill;
pub mod bench;
pub mod line;
pub mod rollup;

use crate::config::{parse_duration, InfluxConfig};
use crate::db::Store;
use crate::metrics::Metrics;
use line::{Minute, ReadingRef};
use mes_actors::Delta;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// First delay after a failed write; doubles up to `influx.retry_max`.
const RETRY_MIN: Duration = Duration::from_millis(100);
/// Most minutes waiting for their rollup; beyond it a minute is left to a backfill.
const MAX_DIRTY: usize = 100_000;
/// Most minutes rolled up per round (each is a few indexed queries).
const ROLLUPS_PER_ROUND: usize = 2_000;
/// At shutdown, what is queued gets this long to reach the server.
const FINAL_FLUSH: Duration = Duration::from_millis(800);
/// Longest InfluxDB error text kept in a log line.
const MAX_REASON: usize = 300;

/// `[influx]` with its durations parsed.
#[derive(Debug, Clone)]
pub struct Settings {
    pub url: String,
    pub org: String,
    pub bucket: String,
    pub token: String,
    pub batch_size: usize,
    pub flush_interval: Duration,
    pub queue: usize,
    pub timeout: Duration,
    pub retry_max: Duration,
    pub rollup_delay: Duration,
}

impl Settings {
    pub fn from_config(c: &InfluxConfig) -> Result<Settings, String> {
        let d = |key: &str, v: &str| {
            parse_duration(v)
                .filter(|d| !d.is_zero())
                .ok_or_else(|| format!("influx.{key}: `{v}` is not a duration like 5s"))
        };
        Ok(Settings {
            url: c.url.clone(),
            org: c.org.clone(),
            bucket: c.bucket.clone(),
            token: c.token.clone(),
            batch_size: c.batch_size,
            flush_interval: d("flush_interval", &c.flush_interval)?,
            queue: c.queue,
            timeout: d("timeout", &c.timeout)?,
            retry_max: d("retry_max", &c.retry_max)?,
            rollup_delay: d("rollup_delay", &c.rollup_delay)?,
        })
    }
}

/// The exporter's counters, rendered in `/metrics`.
#[derive(Default)]
pub struct InfluxMetrics {
    pub exported: AtomicU64,
    pub dropped: AtomicU64,
    pub rejected: AtomicU64,
    pub write_errors: AtomicU64,
    pub retries: AtomicU64,
    pub queued: AtomicI64,
}

impl InfluxMetrics {
    pub fn render(&self, out: &mut String) {
        for (name, help, v) in [
            ("mes_influx_points_exported_total", "Time-series points written to InfluxDB.", &self.exported),
            (
                "mes_influx_points_dropped_total",
                "Time-series points dropped (queue full, or unsent at shutdown); a backfill re-sends them.",
                &self.dropped,
            ),
            (
                "mes_influx_points_rejected_total",
                "Time-series points InfluxDB rejected (4xx); not retried.",
                &self.rejected,
            ),
            ("mes_influx_write_errors_total", "Failed time-series write requests.", &self.write_errors),
            ("mes_influx_write_retries_total", "Time-series write requests retried after a failure.", &self.retries),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Relaxed));
        }
        let name = "mes_influx_queue_points";
        let _ = writeln!(
            out,
            "# HELP {name} Time-series points waiting to be written.\n# TYPE {name} gauge\n{name} {}",
            self.queued.load(Relaxed)
        );
    }
}

/// One committed telemetry row, handed over by the writer after its commit.
#[derive(Debug)]
pub struct Committed {
    pub delta: Box<Delta>,
    pub metrics: BTreeMap<String, f64>,
    pub received_ms: i64,
}

impl Committed {
    fn time_ms(&self) -> i64 {
        self.delta.ts_ms.unwrap_or(self.received_ms)
    }

    fn points(&self) -> usize {
        line::reading_points(&self.metrics) + usize::from(self.delta.state_changed)
    }

    fn encode(&self, out: &mut String) -> usize {
        let d = &self.delta;
        let time_ms = self.time_ms();
        let r = ReadingRef {
            work_center: &d.work_center,
            device: &d.device,
            order: d.order.as_deref(),
            seq: d.seq,
            time_ms,
            good: d.good,
            scrap: d.scrap,
            state: d.state,
            metrics: &self.metrics,
        };
        let mut n = line::reading(out, &r);
        if d.state_changed {
            // The same time the writer stores in `state_changes`.
            line::state(out, &d.work_center, d.state, d.reason.as_deref(), time_ms);
            n += 1;
        }
        n
    }
}

enum Item {
    Reading(Committed),
    Minute(Minute),
}

impl Item {
    fn points(&self) -> usize {
        match self {
            Item::Reading(c) => c.points(),
            Item::Minute(_) => 1,
        }
    }

    fn encode(&self, out: &mut String) -> usize {
        match self {
            Item::Reading(c) => c.encode(out),
            Item::Minute(m) => {
                m.write(out);
                1
            }
        }
    }
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Item>,
    points: usize,
    /// When the oldest waiting item arrived (for the age-based flush).
    since: Option<Instant>,
    /// Minutes of readings dropped here, still to be rolled up.
    dropped_minutes: Vec<(String, i64)>,
}

struct Shared {
    queue: Mutex<Queue>,
    notify: Notify,
    metrics: Arc<Metrics>,
    paused: AtomicBool,
    cap: usize,
    batch: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while holding the lock; should it ever, the queue is still sound.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends; drops the oldest points beyond the bound. Never waits.
    fn push(&self, items: Vec<Item>) {
        if items.is_empty() {
            return;
        }
        let mut dropped = 0;
        let mut q = self.lock();
        for it in items {
            q.points += it.points();
            q.items.push_back(it);
        }
        if q.since.is_none() {
            q.since = Some(Instant::now());
        }
        while q.points > self.cap {
            let Some(old) = q.items.pop_front() else { break };
            let n = old.points();
            q.points -= n;
            dropped += n;
            if let Item::Reading(c) = &old {
                if q.dropped_minutes.len() < MAX_DIRTY {
                    let key = (c.delta.work_center.clone(), Minute::start_of(c.time_ms()));
                    q.dropped_minutes.push(key);
                }
            }
        }
        let (points, ready) = (q.points, q.points >= self.batch);
        drop(q);
        let m = &self.metrics.influx;
        m.queued.store(points as i64, Relaxed);
        if dropped > 0 {
            m.dropped.fetch_add(dropped as u64, Relaxed);
        }
        if ready {
            self.notify.notify_one();
        }
    }

    fn queued(&self) -> usize {
        self.lock().points
    }
}

/// The writer's handle on the exporter: [`Tap::committed`] never waits.
#[derive(Clone)]
pub struct Tap {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tap")
    }
}

impl Tap {
    /// Queues committed rows for export (a short lock; drops the oldest when full).
    pub fn committed(&self, rows: Vec<Committed>) {
        if rows.is_empty() || self.shared.paused.load(Relaxed) {
            return;
        }
        self.shared.push(rows.into_iter().map(Item::Reading).collect());
    }

    /// While paused, committed rows are not exported (`mes bench` measures ingest with the
    /// exporter on and off in one run this way).
    pub fn set_paused(&self, paused: bool) {
        self.shared.paused.store(paused, Relaxed);
    }

    /// Points waiting to be written.
    pub fn queued(&self) -> usize {
        self.shared.queued()
    }
}

/// Why a write did not succeed.
#[derive(Debug)]
pub enum WriteError {
    /// InfluxDB refused the data (4xx other than 408/429): retrying cannot help.
    Rejected { status: u16, reason: String },
    /// Timeout, connection error, 5xx, 408 or 429: worth retrying.
    Failed(String),
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::Rejected { status, reason } => write!(f, "rejected with HTTP {status}: {reason}"),
            WriteError::Failed(e) => f.write_str(e),
        }
    }
}

fn clip(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(MAX_REASON) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// The write side of the `influxdb2` client, each request under a timeout.
pub struct Sink {
    client: influxdb2::Client,
    org: String,
    bucket: String,
    timeout: Duration,
}

impl Sink {
    pub fn new(s: &Settings) -> Result<Sink, String> {
        // The client builder panics on a URL it cannot parse: check first.
        reqwest::Url::parse(&s.url).map_err(|e| format!("influx.url `{}`: {e}", s.url))?;
        let client = influxdb2::ClientBuilder::new(s.url.as_str(), s.org.as_str(), s.token.as_str())
            .build()
            .map_err(|e| format!("InfluxDB client: {e}"))?;
        Ok(Sink { client, org: s.org.clone(), bucket: s.bucket.clone(), timeout: s.timeout })
    }

    /// Writes a line-protocol body (nanosecond timestamps), waiting at most `timeout`
    /// (capped at the configured one).
    pub async fn write(&self, body: String, timeout: Duration) -> Result<(), WriteError> {
        let timeout = timeout.min(self.timeout);
        let sent = tokio::time::timeout(timeout, self.client.write_line_protocol(&self.org, &self.bucket, body)).await;
        match sent {
            Err(_) => Err(WriteError::Failed(format!("timed out after {} ms", timeout.as_millis()))),
            Ok(Ok(())) => Ok(()),
            Ok(Err(influxdb2::RequestError::Http { status, text })) => {
                let code = status.as_u16();
                if status.is_client_error() && code != 408 && code != 429 {
                    Err(WriteError::Rejected { status: code, reason: clip(&text) })
                } else {
                    Err(WriteError::Failed(format!("HTTP {code}: {}", clip(&text))))
                }
            }
            Ok(Err(e)) => Err(WriteError::Failed(clip(&e.to_string()))),
        }
    }
}

/// A running exporter: its tap for the writer, and how to stop it.
pub struct Exporter {
    pub tap: Tap,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Exporter {
    /// Starts the exporter task (needs a Tokio runtime).
    pub fn start(cfg: &InfluxConfig, store: Store, metrics: Arc<Metrics>) -> Result<Exporter, String> {
        let settings = Settings::from_config(cfg)?;
        let sink = Sink::new(&settings)?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            notify: Notify::new(),
            metrics,
            paused: AtomicBool::new(false),
            cap: settings.queue.max(1),
            batch: settings.batch_size.max(1),
        });
        let (stop, stop_rx) = watch::channel(false);
        tracing::info!(url = %settings.url, bucket = %settings.bucket, "exporting time series to InfluxDB");
        let worker = Worker {
            shared: shared.clone(),
            sink,
            store,
            backoff: RETRY_MIN,
            settings,
            dirty: HashMap::new(),
            dirty_len: 0,
        };
        let task = tokio::spawn(worker.run(stop_rx));
        Ok(Exporter { tap: Tap { shared }, stop, task })
    }

    /// Stops after a last flush (bounded by about a second); what is left is counted as
    /// dropped, for a backfill to re-send.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(FINAL_FLUSH + Duration::from_millis(400), self.task).await.is_err() {
            tracing::warn!("time-series exporter did not stop in time");
        }
    }
}

struct Worker {
    shared: Arc<Shared>,
    sink: Sink,
    store: Store,
    settings: Settings,
    backoff: Duration,
    /// Minutes touched by exported readings, by work center: when last touched.
    dirty: HashMap<String, BTreeMap<i64, Instant>>,
    dirty_len: usize,
}

impl Worker {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let every = (self.settings.flush_interval / 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shared.notify.notified() => {}
                _ = tick.tick() => {}
                _ = stop.changed() => {}
            }
            if stopping(&stop) {
                break;
            }
            self.roll_up(false).await;
            while let Some(items) = self.take(false) {
                self.deliver(items, &mut stop).await;
                if stopping(&stop) {
                    break;
                }
            }
        }
        self.finish().await;
    }

    /// The next batch: full, or older than `flush_interval` (any, when `all`).
    fn take(&mut self, all: bool) -> Option<Vec<Item>> {
        let mut q = self.shared.lock();
        let aged = q.since.is_some_and(|t| t.elapsed() >= self.settings.flush_interval);
        if q.points == 0 || !(all || aged || q.points >= self.shared.batch) {
            return None;
        }
        let mut items = Vec::new();
        let mut n = 0;
        while n < self.shared.batch {
            let Some(it) = q.items.pop_front() else { break };
            n += it.points();
            items.push(it);
        }
        q.points -= n;
        q.since = if q.items.is_empty() { None } else { Some(Instant::now()) };
        let dropped = std::mem::take(&mut q.dropped_minutes);
        let left = q.points;
        drop(q);
        self.shared.metrics.influx.queued.store(left as i64, Relaxed);
        let now = Instant::now();
        for (wc, minute) in dropped {
            self.touch(&wc, minute, now);
        }
        for it in &items {
            if let Item::Reading(c) = it {
                self.touch(&c.delta.work_center, Minute::start_of(c.time_ms()), now);
            }
        }
        Some(items)
    }

    fn touch(&mut self, wc: &str, minute: i64, now: Instant) {
        if let Some(m) = self.dirty.get_mut(wc) {
            if let Some(t) = m.get_mut(&minute) {
                *t = now;
                return;
            }
        }
        if self.dirty_len >= MAX_DIRTY {
            // Left to a backfill; counted like any point that did not go out.
            self.shared.metrics.influx.dropped.fetch_add(1, Relaxed);
            return;
        }
        self.dirty.entry(wc.to_string()).or_default().insert(minute, now);
        self.dirty_len += 1;
    }

    /// Queues the rollup of every minute untouched for `rollup_delay` (every one, when `all`).
    async fn roll_up(&mut self, all: bool) {
        let now = Instant::now();
        let delay = self.settings.rollup_delay;
        let mut due = Vec::new();
        for (wc, minutes) in &mut self.dirty {
            minutes.retain(|minute, touched| {
                let ready = due.len() < ROLLUPS_PER_ROUND && (all || now.duration_since(*touched) >= delay);
                if ready {
                    due.push((wc.clone(), *minute));
                }
                !ready
            });
        }
        self.dirty.retain(|_, m| !m.is_empty());
        self.dirty_len -= due.len();
        let mut items = Vec::with_capacity(due.len());
        for (wc, minute) in due {
            match rollup::minute(&self.store, &wc, minute).await {
                Ok(Some(m)) => items.push(Item::Minute(m)),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(work_center = %wc, minute, error = %e, "minute rollup failed; will retry");
                    self.touch(&wc, minute, Instant::now());
                }
            }
        }
        self.shared.push(items);
    }

    /// Writes one batch, retrying failures with capped backoff while the queue has room;
    /// once it is full this batch (the oldest points) is dropped instead.
    async fn deliver(&mut self, items: Vec<Item>, stop: &mut watch::Receiver<bool>) {
        let mut body = String::with_capacity(items.len() * 192);
        let mut points = 0;
        for it in &items {
            points += it.encode(&mut body);
        }
        drop(items);
        let m = &self.shared.metrics.influx;
        loop {
            match self.sink.write(body.clone(), self.settings.timeout).await {
                Ok(()) => {
                    m.exported.fetch_add(points as u64, Relaxed);
                    self.backoff = RETRY_MIN;
                    return;
                }
                Err(WriteError::Rejected { status, reason }) => {
                    m.write_errors.fetch_add(1, Relaxed);
                    m.rejected.fetch_add(points as u64, Relaxed);
                    tracing::error!(status, points, %reason, "InfluxDB rejected a batch of time-series points; dropped, not retried");
                    return;
                }
                Err(WriteError::Failed(e)) => {
                    m.write_errors.fetch_add(1, Relaxed);
                    let delay = self.backoff;
                    self.backoff = (self.backoff * 2).min(self.settings.retry_max);
                    if self.shared.queued() >= self.shared.cap || stopping(stop) {
                        m.dropped.fetch_add(points as u64, Relaxed);
                        tracing::warn!(error = %e, points, "time-series write failed and the queue is full; dropped the oldest batch (a backfill re-sends it)");
                        wait(stop, delay).await;
                        return;
                    }
                    tracing::warn!(error = %e, points, retry_in_ms = delay.as_millis() as u64, "time-series write failed; retrying");
                    if wait(stop, delay).await {
                        m.dropped.fetch_add(points as u64, Relaxed);
                        return;
                    }
                    m.retries.fetch_add(1, Relaxed);
                }
            }
        }
    }

    /// At shutdown: roll up every touched minute and send what is queued, within
    /// [`FINAL_FLUSH`]; what does not make it is counted as dropped.
    async fn finish(mut self) {
        let deadline = Instant::now() + FINAL_FLUSH;
        if tokio::time::timeout(FINAL_FLUSH / 2, self.roll_up(true)).await.is_err() {
            tracing::warn!("minute rollups at shutdown took too long; a backfill completes them");
        }
        let shared = self.shared.clone();
        let m = &shared.metrics.influx;
        while let Some(items) = self.take(true) {
            let mut body = String::new();
            let points: usize = items.iter().map(|it| it.encode(&mut body)).sum();
            let left = deadline.saturating_duration_since(Instant::now());
            let sent = if left.is_zero() {
                Err(WriteError::Failed("no time left".into()))
            } else {
                self.sink.write(body, left).await
            };
            match sent {
                Ok(()) => {
                    m.exported.fetch_add(points as u64, Relaxed);
                }
                Err(e) => {
                    m.write_errors.fetch_add(1, Relaxed);
                    let rest = self.shared.queued();
                    m.dropped.fetch_add((points + rest) as u64, Relaxed);
                    tracing::warn!(error = %e, points = points + rest, "time-series points not sent at shutdown (a backfill re-sends them)");
                    break;
                }
            }
        }
        m.queued.store(0, Relaxed);
        tracing::info!(
            exported = m.exported.load(Relaxed),
            dropped = m.dropped.load(Relaxed),
            rejected = m.rejected.load(Relaxed),
            "time-series exporter stopped"
        );
    }
}

fn stopping(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

/// Sleeps for `d`; true when asked to stop meanwhile.
async fn wait(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    if stopping(stop) {
        return true;
    }
    tokio::select! {
        _ = stop.changed() => true,
        _ = tokio::time::sleep(d) => stopping(stop),
    }
}
