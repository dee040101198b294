//! The reliability suite's scenario driver (issue 9): seeds, a private Mosquitto, a
//! witness of what the broker accepted, the line simulator as a child process, samplers of
//! memory and API latency, the invariants I1–I6 checked in one function, and the results
//! table the suite writes (`<target>/reliability/results.md`).
//!
//! Every scenario takes a seed; the same seed gives the same simulated line, the same
//! fault points and the same kill times (wall-clock effects such as how far the MES got
//! before a kill differ, which is the point: the invariants must hold whatever they are).

use crate::harness::{free_port, temp_dir, Lcg, Mes};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// Seeds and modes

/// Whether `MES_CI_NIGHTLY=1` (the long versions of the scenarios).
pub fn nightly() -> bool {
    std::env::var("MES_CI_NIGHTLY").is_ok_and(|v| v == "1")
}

/// A number from the environment, else `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

/// The seeds a scenario runs with: `MES_RELIABILITY_SEEDS` (comma separated) if set; else
/// `defaults`, widened to `MES_RELIABILITY_RUNS` seeds (the defaults first, then
/// `defaults[0] + 1000 × k`).
pub fn seeds(defaults: &[u64]) -> Vec<u64> {
    if let Ok(list) = std::env::var("MES_RELIABILITY_SEEDS") {
        let seeds: Vec<u64> = list.split(',').filter_map(|s| s.trim().parse().ok()).collect();
        if !seeds.is_empty() {
            return seeds;
        }
    }
    let runs = env_u64("MES_RELIABILITY_RUNS", defaults.len() as u64) as usize;
    let base = defaults.first().copied().unwrap_or(1);
    let mut out: Vec<u64> = defaults.iter().copied().take(runs).collect();
    let mut k = 1;
    while out.len() < runs {
        let s = base + 1000 * k;
        if !out.contains(&s) {
            out.push(s);
        }
        k += 1;
    }
    out
}

/// A seeded source of fault points (kill times, outage lengths).
pub struct Dice(Lcg);
impl Dice {
    pub fn new(seed: u64) -> Dice {
        Dice(Lcg(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5EED))
    }
    /// Milliseconds in `lo..hi`.
    pub fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.0.below((hi - lo).max(1) as usize) as u64)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.0.below(n as usize) as u64
    }
}

pub fn database_label() -> &'static str {
    if std::env::var("MES_TEST_DATABASE_URL").is_ok_and(|s| !s.is_empty()) {
        "PostgreSQL"
    } else {
        "SQLite"
    }
}

// ---------------------------------------------------------------------------------------
// A private Mosquitto

const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// A Mosquitto of this test alone, on a free loopback port, with persistence (sessions and
/// queued messages survive its restart), a queue limit no run reaches (a QoS 1 message is
/// never dropped for a subscriber that falls behind) and 1000 messages in flight per client.
///
/// The limit is a large number, not `0` ("no maximum"): with `max_queued_messages 0`,
/// Mosquitto 2.0.11 once let ~2,000 messages queued for the MES's session vanish while the
/// MES reconnected after a broker restart (the witness got every one; the MES's cursor then
/// jumped a device boot and its tail went uncounted). Mosquitto's issue tracker reports
/// this class of problem with `0` (eclipse-mosquitto/mosquitto#1956, #2349).
pub struct Mosquitto {
    child: Option<Child>,
    dir: PathBuf,
    pub port: u16,
}

impl Mosquitto {
    pub fn available() -> bool {
        Path::new(MOSQUITTO).is_file()
    }

    pub async fn start() -> Mosquitto {
        let dir = temp_dir();
        let port = free_port();
        let conf = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\n\
             autosave_interval 1\nmax_queued_messages 10000000\nmax_inflight_messages 1000\nuser root\n\
             log_dest stderr\nlog_type error\nlog_type warning\n",
            dir.display()
        );
        std::fs::write(dir.join("mosquitto.conf"), conf).expect("write mosquitto.conf");
        let mut m = Mosquitto { child: None, dir, port };
        m.spawn().await;
        m
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and persistence file; waits until it accepts.
    pub async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("mosquitto.log"))
            .expect("mosquitto log");
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            assert!(Instant::now() < deadline, "mosquitto not listening on {} in 20 s", self.port);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM (Mosquitto writes its persistence file and exits); SIGKILL after 10 s.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let started = Instant::now();
            while !matches!(c.try_wait(), Ok(Some(_))) {
                if started.elapsed() > Duration::from_secs(10) {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------
// The witness: every telemetry message the broker accepted

/// `(device, boot, seq)` of one telemetry message.
pub type Key = (String, u64, u64);

/// A QoS 1 subscriber with a persistent session on the telemetry topics: it receives every
/// message the broker acknowledged to a device, in the broker's order.
pub struct Witness {
    seen: Arc<Mutex<Vec<Key>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Witness {
    pub async fn connect(port: u16, prefix: &str) -> Witness {
        let mut o = MqttOptions::new(format!("witness-{prefix}"), "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(15))
            .set_clean_session(false)
            .set_inflight(1000)
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut el) = AsyncClient::new(o, 100);
        client.subscribe(format!("{prefix}/devices/+/telemetry"), QoS::AtLeastOnce).await.expect("subscribe");
        let seen = Arc::new(Mutex::new(Vec::new()));
        // Wait for the SUBACK, so nothing published after this returns is missed.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout(Duration::from_secs(1), el.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
                Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
                _ => {}
            }
            assert!(Instant::now() < deadline, "witness: no SUBACK in 10 s");
        }
        let prefix = prefix.to_string();
        let s = seen.clone();
        let task = tokio::spawn(async move {
            let _client = client; // the event loop stops when every client handle is gone
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let device = p
                            .topic
                            .strip_prefix(prefix.as_str())
                            .and_then(|t| t.strip_prefix("/devices/"))
                            .and_then(|t| t.strip_suffix("/telemetry"))
                            .unwrap_or("")
                            .to_string();
                        let v: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        if let (Some(boot), Some(seq)) = (v["boot"].as_u64(), v["seq"].as_u64()) {
                            if let Ok(mut g) = s.lock() {
                                g.push((device, boot, seq));
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Witness { seen, task }
    }

    pub fn len(&self) -> usize {
        self.seen.lock().map(|g| g.len()).unwrap_or(0)
    }

    /// Waits (bounded) until at least `n` messages were seen.
    pub async fn wait_for(&self, n: u64, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        while (self.len() as u64) < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.len()
    }

    pub fn keys(&self) -> Vec<Key> {
        self.seen.lock().map(|g| g.clone()).unwrap_or_default()
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------
// The line simulator as a child process

/// One `line-sim` run in the background.
pub struct Sim {
    child: Child,
    pub truth: PathBuf,
    log: PathBuf,
    pub started: Instant,
}

impl Sim {
    pub fn spawn(mes: &Mes, broker: &str, scenario: &str, seed: u64, speed: &str, duration: &str, tag: &str) -> Sim {
        let truth = mes.dir.join(format!("truth-{tag}.json"));
        let log = mes.dir.join(format!("line-sim-{tag}.log"));
        let err = std::fs::File::create(&log).expect("line-sim log");
        let child = Command::new(crate::simulator::line_sim())
            .arg("--plant")
            .arg(mes.dir.join("plant.toml"))
            .args(["--mqtt", broker, "--topic-prefix", &mes.prefix, "--scenario", scenario])
            .args(["--seed", &seed.to_string(), "--speed", speed, "--duration", duration])
            .arg("--truth")
            .arg(&truth)
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn line-sim");
        Sim { child, truth, log, started: Instant::now() }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) for the end of the run; returns the truth and the number of
    /// publishes the broker acknowledged.
    pub async fn finish(self, limit: Duration) -> (Value, u64) {
        let (truth, acked, _) = self.finish_with_log(limit).await;
        (truth, acked)
    }

    /// [`Sim::finish`], and the simulator's log.
    pub async fn finish_with_log(mut self, limit: Duration) -> (Value, u64, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("line-sim still running after {limit:?}; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let log = self.log();
        assert!(status.success(), "line-sim failed ({status}):\n{log}");
        let truth: Value =
            serde_json::from_str(&std::fs::read_to_string(&self.truth).expect("truth file")).expect("truth is JSON");
        // "[line-sim] N messages published (M acknowledged, …"
        let acked = log
            .lines()
            .rev()
            .find_map(|l| l.split_once(" messages published (").map(|(_, r)| r))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no message count in the line-sim log:\n{log}"));
        (truth, acked, log)
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// What the MES must show at the end

/// The expected final state: per work center (good, scrap), per buffer the on-hand level.
#[derive(Debug, Default, Clone)]
pub struct Expected {
    pub work_centers: BTreeMap<String, (i64, i64)>,
    pub buffers: BTreeMap<String, i64>,
}

impl Expected {
    /// Adds one simulator run's truth. Each run starts from the plant's initial levels, so
    /// a run's effect on a buffer is its final level minus the initial one.
    pub fn add_truth(&mut self, truth: &Value, initial: &BTreeMap<String, i64>) {
        for (wc, t) in truth["work_centers"].as_object().expect("work_centers") {
            let e = self.work_centers.entry(wc.clone()).or_default();
            e.0 += t["good"].as_i64().expect("good");
            e.1 += t["scrap"].as_i64().expect("scrap");
        }
        for (b, level) in truth["buffers"].as_object().expect("buffers") {
            let start = initial.get(b).copied().unwrap_or(0);
            *self.buffers.entry(b.clone()).or_insert(start) += level.as_i64().expect("level") - start;
        }
    }
}

/// Each buffer's `initial` from a plant file.
pub fn initial_levels(plant: &str) -> BTreeMap<String, i64> {
    let v: toml::Value = toml::from_str(plant).expect("plant TOML");
    v.get("buffers")
        .and_then(|b| b.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|b| Some((b.get("id")?.as_str()?.to_string(), b.get("initial")?.as_integer()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (bounded) until every work center shows the expected totals; returns how long
/// the backlog took to drain.
pub async fn wait_drained(mes: &Mes, want: &Expected, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let mut done = true;
        for (wc, w) in &want.work_centers {
            if mes.totals(wc).await != *w {
                done = false;
                break;
            }
        }
        if done || started.elapsed() > limit {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Samplers

/// Samples, while a run goes on: the MES's resident memory, the API's latency, and
/// reserved ≤ on hand (I4) on every buffer.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    pub peak_rss_kib: u64,
    pub latencies_ms: Vec<u64>,
    pub i4_violations: Vec<String>,
    pub inventory_samples: u64,
    /// Buffers seen below zero during the run, with their lowest level: a consumer's
    /// reading committed before its supplier's (devices report independently).
    pub negative: BTreeMap<String, i64>,
}

impl Samples {
    pub fn latency_max_ms(&self) -> u64 {
        self.latencies_ms.iter().copied().max().unwrap_or(0)
    }
    pub fn latency_p50_ms(&self) -> u64 {
        let mut v = self.latencies_ms.clone();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    }
}

pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|r| r.split_whitespace().next()?.parse().ok())
}

/// Checks reserved ≤ on hand on every buffer holding reservations, in one
/// `/api/v1/inventory` answer; notes the lowest level of a buffer seen below zero.
fn check_i4(inventory: &Value, out: &mut Vec<String>, negative: &mut BTreeMap<String, i64>) {
    for sku in inventory.as_array().into_iter().flatten() {
        for b in sku["buffers"].as_array().into_iter().flatten() {
            let (on_hand, reserved) = (b["on_hand"].as_i64().unwrap_or(0), b["reserved"].as_i64().unwrap_or(0));
            let id = b["buffer"].as_str().unwrap_or("").to_string();
            if reserved < 0 || (reserved > 0 && reserved > on_hand) {
                out.push(format!("{id}: reserved {reserved} > on hand {on_hand}"));
            }
            if on_hand < 0 {
                let e = negative.entry(id).or_insert(0);
                *e = (*e).min(on_hand);
            }
        }
    }
}

/// A background sampler; `stop` returns what it saw.
pub struct Sampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Samples>,
}

impl Sampler {
    /// `pid` is read again from `pid_of` at each sample (the MES may be restarted).
    pub fn start(http: String, pid_of: Arc<Mutex<Option<u32>>>) -> Sampler {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client");
            let mut out = Samples::default();
            let mut tick = 0u64;
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                if let Some(pid) = pid_of.lock().ok().and_then(|g| *g) {
                    if let Some(kib) = rss_kib(pid) {
                        out.peak_rss_kib = out.peak_rss_kib.max(kib);
                    }
                }
                if tick.is_multiple_of(2) {
                    let t = Instant::now();
                    if let Ok(r) = client.get(format!("{http}/api/v1/work-centers")).send().await {
                        if r.status().is_success() && r.bytes().await.is_ok() {
                            out.latencies_ms.push(t.elapsed().as_millis() as u64);
                        }
                    }
                    if let Ok(r) = client.get(format!("{http}/api/v1/inventory")).send().await {
                        if let Ok(v) = r.json::<Value>().await {
                            check_i4(&v, &mut out.i4_violations, &mut out.negative);
                            out.inventory_samples += 1;
                        }
                    }
                }
                tick += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            out
        });
        Sampler { stop, task }
    }

    pub async fn stop(self) -> Samples {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.task.await.expect("sampler")
    }
}

// ---------------------------------------------------------------------------------------
// The invariants

pub const ALL: [&str; 6] = ["I1", "I2", "I3", "I4", "I5", "I6"];

/// What the invariant check found.
#[derive(Debug, Default)]
pub struct Verdict {
    pub checked: Vec<&'static str>,
    pub failures: Vec<String>,
    /// Messages new in the broker's order to the witness that the MES received after a
    /// newer reading of the same boot and acknowledged as stale (their counts are in the
    /// newer reading); see I3.
    pub superseded: usize,
    /// Buffers the samples saw below zero, with their lowest level.
    pub negative: BTreeMap<String, i64>,
}

fn samples_negative(v: &Verdict) -> String {
    if v.negative.is_empty() {
        return String::new();
    }
    let list: Vec<String> = v.negative.iter().map(|(b, n)| format!("{b} {n}")).collect();
    format!("briefly below zero: {}", list.join(", "))
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
    fn fail(&mut self, inv: &str, msg: impl Into<String>) {
        let m = msg.into();
        if self.failures.len() < 40 {
            self.failures.push(format!("{inv}: {m}"));
        }
    }
}

fn database_url(mes: &Mes) -> String {
    let text = std::fs::read_to_string(&mes.config).expect("config");
    text.lines()
        .filter_map(|l| l.strip_prefix("url = \""))
        .filter_map(|l| l.strip_suffix('"'))
        .find(|u| u.starts_with("sqlite:") || u.starts_with("postgres:"))
        .expect("database url in config")
        .to_string()
}

/// Checks I1–I6 against the expected state (from the simulator's truth or a script),
/// the witness's log of every message the broker accepted, the HTTP API and the database
/// of record. `samples` adds the I4 samples taken during the run.
///
/// - I1: every work center's totals (API) and every buffer's level equal the truth.
/// - I2: nothing counted twice: one telemetry row per (device, boot, seq); per work
///   center the rows' deltas sum to the API's totals; no stock movement or journal line
///   booked twice for the same source; each buffer's movements sum to its change.
/// - I3: every message the broker accepted is committed: for each witnessed message that
///   was new when it reached the witness (not a duplicate, not older than one seen before)
///   there is its telemetry row, a dead letter (held for review, rejected), or a stored
///   newer reading of the same device and boot (the MES got it after that one and acked it
///   as stale: counters are cumulative, so the newer row carries its counts; counted in
///   `superseded`); and every row is a witnessed message.
/// - I4: reserved ≤ on hand on every buffer holding reservations, at the end and in
///   every sample. (A buffer without reservations may dip below zero for a moment when a
///   consumer's reading is committed before its supplier's; reported, not a violation.)
/// - I5: the trial balance balances (API), and so does the journal.
/// - I6: every stock movement and journal line has a source that exists: the telemetry
///   rows at both ends of its range, the reservation, or the closed order.
pub async fn check_invariants(
    mes: &Mes,
    want: &Expected,
    initial: &BTreeMap<String, i64>,
    witnessed: &[Key],
    samples: &Samples,
) -> Verdict {
    let mut v =
        Verdict { checked: ALL.to_vec(), failures: Vec::new(), superseded: 0, negative: samples.negative.clone() };

    // I1 (API)
    let mut api_totals = BTreeMap::new();
    for (wc, w) in &want.work_centers {
        let got = mes.totals(wc).await;
        api_totals.insert(wc.clone(), got);
        if got != *w {
            v.fail("I1", format!("{wc} shows {got:?}, truth {w:?}"));
        }
    }
    let (_, buffers) = mes.get("/api/v1/buffers").await;
    let levels: BTreeMap<String, i64> = buffers
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| Some((b["id"].as_str()?.to_string(), b["on_hand"].as_i64()?)))
        .collect();
    for (b, want_level) in &want.buffers {
        if levels.get(b) != Some(want_level) {
            v.fail("I1", format!("buffer {b} holds {:?}, truth {want_level}", levels.get(b)));
        }
    }

    // The database of record.
    sqlx::any::install_default_drivers();
    let pool = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(&database_url(mes))
        .await
        .expect("connect to the MES database");
    use sqlx::Row;
    let rows = sqlx::query("SELECT device, boot, seq, work_center, good, scrap FROM telemetry")
        .fetch_all(&pool)
        .await
        .expect("telemetry");
    let mut keys: HashSet<Key> = HashSet::with_capacity(rows.len());
    let mut sums: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for r in &rows {
        let key: Key = (
            r.try_get::<String, _>("device").unwrap_or_default(),
            r.try_get::<i64, _>("boot").unwrap_or(-1) as u64,
            r.try_get::<i64, _>("seq").unwrap_or(-1) as u64,
        );
        if !keys.insert(key.clone()) {
            v.fail("I2", format!("telemetry {key:?} stored twice"));
        }
        let e = sums.entry(r.try_get::<String, _>("work_center").unwrap_or_default()).or_default();
        e.0 += r.try_get::<i64, _>("good").unwrap_or(0);
        e.1 += r.try_get::<i64, _>("scrap").unwrap_or(0);
    }
    for (wc, got) in &api_totals {
        let stored = sums.get(wc).copied().unwrap_or_default();
        if stored != *got {
            v.fail("I2", format!("{wc}: telemetry rows add up to {stored:?}, totals say {got:?}"));
        }
    }
    let moves = sqlx::query("SELECT buffer, kind, order_id, qty, source_kind, source_id FROM stock_movements")
        .fetch_all(&pool)
        .await
        .expect("stock movements");
    let journal = sqlx::query("SELECT kind, debit, credit, order_id, amount, source_kind, source_id FROM journal")
        .fetch_all(&pool)
        .await
        .expect("journal");
    let reservations: HashSet<String> = sqlx::query("SELECT id FROM reservations")
        .fetch_all(&pool)
        .await
        .expect("reservations")
        .iter()
        .filter_map(|r| r.try_get::<String, _>("id").ok())
        .collect();
    let orders: HashSet<String> = sqlx::query("SELECT id FROM orders")
        .fetch_all(&pool)
        .await
        .expect("orders")
        .iter()
        .filter_map(|r| r.try_get::<String, _>("id").ok())
        .collect();
    // Readings kept as dead letters (held for review, or rejected) are committed too.
    let mut dead: HashSet<Key> = HashSet::new();
    for r in sqlx::query("SELECT topic, payload FROM dead_letters").fetch_all(&pool).await.expect("dead letters") {
        let topic = r.try_get::<String, _>("topic").unwrap_or_default();
        let device = topic
            .strip_prefix("held/")
            .or_else(|| topic.strip_suffix("/telemetry").and_then(|t| t.rsplit('/').next()))
            .unwrap_or("")
            .to_string();
        let p: Value = serde_json::from_str(&r.try_get::<String, _>("payload").unwrap_or_default()).unwrap_or_default();
        if let (Some(boot), Some(seq)) = (p["boot"].as_u64(), p["seq"].as_u64()) {
            dead.insert((device, boot, seq));
        }
    }
    pool.close().await;

    let s = |r: &sqlx::any::AnyRow, c: &str| r.try_get::<Option<String>, _>(c).ok().flatten().unwrap_or_default();
    // I2 (books) and I6
    let mut per_buffer: BTreeMap<String, i64> = BTreeMap::new();
    let mut seen_moves = HashSet::new();
    let source_ok = |kind: &str, id: &str| -> bool {
        match kind {
            "telemetry" => telemetry_range(id).is_some_and(|(a, b)| keys.contains(&a) && keys.contains(&b)),
            "reservation" => reservations.contains(id),
            "order_close" => orders.contains(id),
            // A buffer's opening balance, booked when the plant file created it.
            "plant" => initial.contains_key(id),
            _ => false,
        }
    };
    let mut opening: BTreeMap<String, i64> = BTreeMap::new();
    for r in &moves {
        let (buffer, kind, order, sk, si) =
            (s(r, "buffer"), s(r, "kind"), s(r, "order_id"), s(r, "source_kind"), s(r, "source_id"));
        let qty = r.try_get::<i64, _>("qty").unwrap_or(0);
        *per_buffer.entry(buffer.clone()).or_default() += qty;
        if kind == "opening" {
            *opening.entry(buffer.clone()).or_default() += qty;
        }
        if !seen_moves.insert((buffer.clone(), kind.clone(), order, sk.clone(), si.clone())) {
            v.fail("I2", format!("stock movement {kind} on {buffer} booked twice for {sk} {si}"));
        }
        if !source_ok(&sk, &si) {
            v.fail("I6", format!("stock movement {kind} on {buffer}: source {sk} `{si}` not found"));
        }
    }
    for (b, level) in &levels {
        let moved = per_buffer.get(b).copied().unwrap_or(0);
        let start = initial.get(b).copied().unwrap_or(0);
        // The opening movement carries the initial balance; then the movements alone sum
        // to the level.
        match opening.get(b) {
            Some(&o) if o != start => v.fail("I2", format!("buffer {b}: opening movement {o} ≠ initial {start}")),
            Some(_) if moved != *level => v.fail("I2", format!("buffer {b}: movements {moved} ≠ on hand {level}")),
            None if start + moved != *level => {
                v.fail("I2", format!("buffer {b}: initial {start} + movements {moved} ≠ on hand {level}"))
            }
            _ => {}
        }
    }
    let mut seen_lines = HashSet::new();
    let (mut debits, mut credits) = (0i64, 0i64);
    for r in &journal {
        let (kind, sk, si) = (s(r, "kind"), s(r, "source_kind"), s(r, "source_id"));
        let amount = r.try_get::<i64, _>("amount").unwrap_or(0);
        debits += amount;
        credits += amount;
        let line = (kind.clone(), s(r, "debit"), s(r, "credit"), s(r, "order_id"), sk.clone(), si.clone());
        if !seen_lines.insert(line) {
            v.fail("I2", format!("journal {kind} booked twice for {sk} {si}"));
        }
        if !source_ok(&sk, &si) {
            v.fail("I6", format!("journal {kind}: source {sk} `{si}` not found"));
        }
    }

    // I3: per device in the broker's order, a message is new when it is past every
    // message seen before it; every new one must be stored, and nothing else may be.
    let mut newest: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    let mut expected_rows: HashSet<&Key> = HashSet::new();
    let witnessed_set: HashSet<&Key> = witnessed.iter().collect();
    for k in witnessed {
        let n = newest.entry(k.0.as_str()).or_insert((0, 0));
        if (k.1, k.2) > *n {
            *n = (k.1, k.2);
            expected_rows.insert(k);
        }
    }
    // Newest stored seq per (device, boot): counters are cumulative within a boot, so a
    // stored newer reading of the same boot carries everything an older one did.
    let mut newest_stored: BTreeMap<(&str, u64), u64> = BTreeMap::new();
    for k in &keys {
        let e = newest_stored.entry((k.0.as_str(), k.1)).or_insert(0);
        *e = (*e).max(k.2);
    }
    let not_stored: Vec<&&Key> = expected_rows.iter().filter(|k| !keys.contains(**k) && !dead.contains(**k)).collect();
    let mut missing: Vec<&&Key> = not_stored
        .iter()
        .copied()
        .filter(|k| newest_stored.get(&(k.0.as_str(), k.1)).is_none_or(|n| *n < k.2))
        .collect();
    v.superseded = not_stored.len() - missing.len();
    missing.sort();
    if !missing.is_empty() {
        // Per device and boot: the runs of missing seqs, to tell a lost stretch from strays.
        let mut runs: BTreeMap<(&str, u64), Vec<(u64, u64)>> = BTreeMap::new();
        for k in &missing {
            let r = runs.entry((k.0.as_str(), k.1)).or_default();
            match r.last_mut() {
                Some(last) if last.1 + 1 == k.2 => last.1 = k.2,
                _ => r.push((k.2, k.2)),
            }
        }
        let detail: Vec<String> = runs
            .iter()
            .map(|((d, b), r)| {
                let r: Vec<String> = r.iter().take(8).map(|(a, z)| format!("{a}..{z}")).collect();
                format!("{d} boot {b}: seq {}", r.join(","))
            })
            .collect();
        v.fail(
            "I3",
            format!(
                "{} accepted messages not committed, first {:?} ({})",
                missing.len(),
                missing[0],
                detail.join("; ")
            ),
        );
    }
    let unseen = keys.iter().filter(|k| !witnessed_set.contains(k)).count();
    if unseen > 0 {
        v.fail("I3", format!("{unseen} telemetry rows the broker never carried"));
    }

    // I4
    let (_, inv) = mes.get("/api/v1/inventory").await;
    let mut i4 = samples.i4_violations.clone();
    check_i4(&inv, &mut i4, &mut BTreeMap::new());
    for m in i4.iter().take(5) {
        v.fail("I4", m.clone());
    }

    // I5
    let (_, tb) = mes.get("/api/v1/trial-balance").await;
    if tb["total_debits"] != tb["total_credits"] || tb["total_debits"].is_null() {
        v.fail("I5", format!("trial balance {} ≠ {}", tb["total_debits"], tb["total_credits"]));
    }
    if debits != credits {
        v.fail("I5", format!("journal debits {debits} ≠ credits {credits}"));
    }
    v
}

/// `device:boot:seq..boot:seq` into the keys at both ends.
fn telemetry_range(id: &str) -> Option<(Key, Key)> {
    let (head, last) = id.rsplit_once("..")?;
    let mut h = head.rsplitn(3, ':');
    let (seq, boot, device) = (h.next()?.parse().ok()?, h.next()?.parse().ok()?, h.next()?);
    let (lb, ls) = last.split_once(':')?;
    Some(((device.to_string(), boot, seq), (device.to_string(), lb.parse().ok()?, ls.parse().ok()?)))
}

// ---------------------------------------------------------------------------------------
// The results table

/// One scenario run (one seed) on one database.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub scenario: String,
    pub database: &'static str,
    /// `None`: a fixed script without a seed.
    pub seed: Option<u64>,
    pub checked: Vec<&'static str>,
    pub passed: bool,
    /// Measurements worth a column: `peak RSS 80 MiB`, `drain 2.1 s`, ….
    pub notes: Vec<String>,
}

static RESULTS_LOCK: Mutex<()> = Mutex::new(());

pub fn results_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    // <target>/debug/deps/integration-… → <target>
    let target = exe.ancestors().nth(3).map(Path::to_path_buf).unwrap_or_else(std::env::temp_dir);
    target.join("reliability")
}

/// Appends runs to `<target>/reliability/results.json` (rows of the same scenario and
/// database merged) and writes the table `results.md` from it.
pub fn record(runs: &[RunResult]) {
    let _guard = RESULTS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = results_dir();
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("results.json");
    let mut rows: Vec<Value> =
        std::fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    for r in runs {
        let db = r.database;
        let i = match rows.iter().position(|x| x["scenario"] == r.scenario.as_str() && x["database"] == db) {
            Some(i) => i,
            None => {
                rows.push(serde_json::json!({"scenario": r.scenario, "database": db, "runs": 0, "failed": 0,
                    "invariants": [], "seeds": [], "notes": []}));
                rows.len() - 1
            }
        };
        let row = &mut rows[i];
        row["runs"] = (row["runs"].as_u64().unwrap_or(0) + 1).into();
        if !r.passed {
            row["failed"] = (row["failed"].as_u64().unwrap_or(0) + 1).into();
        }
        let mut inv: BTreeSet<String> =
            row["invariants"].as_array().into_iter().flatten().filter_map(|x| x.as_str().map(String::from)).collect();
        inv.extend(r.checked.iter().map(|s| s.to_string()));
        row["invariants"] = inv.into_iter().collect::<Vec<_>>().into();
        if let Some(a) = row["seeds"].as_array_mut() {
            a.push(r.seed.map(Value::from).unwrap_or_else(|| "scripted".into()));
        }
        // The latest run's measurements.
        row["notes"] = r.notes.clone().into();
    }
    rows.sort_by(|a, b| {
        (a["scenario"].as_str(), a["database"].as_str()).cmp(&(b["scenario"].as_str(), b["database"].as_str()))
    });
    let _ = std::fs::write(&path, serde_json::to_string_pretty(&rows).unwrap_or_default());
    let mut md = String::from(
        "| Scenario | Database | Runs | Invariants checked | Result | Seeds | Measured (latest run) |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        let list = |k: &str| -> String {
            r[k].as_array()
                .into_iter()
                .flatten()
                .map(|x| x.as_str().map(String::from).unwrap_or_else(|| x.to_string()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (runs, failed) = (r["runs"].as_u64().unwrap_or(0), r["failed"].as_u64().unwrap_or(0));
        let result = if failed == 0 { format!("pass ({runs}/{runs})") } else { format!("FAIL ({failed} of {runs})") };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r["scenario"].as_str().unwrap_or(""),
            r["database"].as_str().unwrap_or(""),
            runs,
            list("invariants"),
            result,
            list("seeds"),
            list("notes").replace(", ", "; ")
        ));
    }
    let _ = std::fs::write(dir.join("results.md"), md);
}

/// Records the run, then fails the test with every violation if there was one. A failed
/// run's evidence (the MES's directory: database file, logs, truth files; and the
/// witness's log) is kept under `<target>/reliability/failed/`.
pub fn conclude(scenario: &str, seed: u64, verdict: &Verdict, notes: Vec<String>, mes: &Mes, witnessed: &[Key]) {
    let mut notes = notes;
    if !samples_negative(verdict).is_empty() {
        notes.push(samples_negative(verdict));
    }
    if verdict.superseded > 0 {
        notes.push(format!("{} messages received after a newer one (acked as stale)", verdict.superseded));
    }
    record(&[RunResult {
        scenario: scenario.to_string(),
        database: database_label(),
        seed: Some(seed),
        checked: verdict.checked.clone(),
        passed: verdict.passed(),
        notes,
    }]);
    if verdict.passed() {
        return;
    }
    let slug: String = scenario.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    let keep = results_dir().join("failed").join(format!("{slug}-{seed}-{}-{}", database_label(), std::process::id()));
    let _ = std::fs::create_dir_all(&keep);
    for e in std::fs::read_dir(&mes.dir).into_iter().flatten().flatten() {
        if e.path().is_file() {
            let _ = std::fs::copy(e.path(), keep.join(e.file_name()));
        }
    }
    let lines: Vec<String> = witnessed.iter().map(|(d, b, s)| format!("{d} {b} {s}")).collect();
    let _ = std::fs::write(keep.join("witness.txt"), lines.join("\n"));
    let log = mes.log();
    let tail: Vec<&str> = log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
    panic!(
        "{scenario}, seed {seed} ({}): invariants violated:\n  {}\nevidence kept in {}\nMES log (tail):\n{}",
        database_label(),
        verdict.failures.join("\n  "),
        keep.display(),
        tail.join("\n")
    );
}
