//! Spawning the MES and playing devices.

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The demo line with every device on MQTT.
pub const TEST_LINE: &str = include_str!("../../plants/line-mqtt.toml");

/// The contract's example plant (SHEET → WIDGET at PRESS-1), with `device` as PRESS-1's
/// device, e.g. `{ mqtt = { id = "press-01" } }`.
pub fn widget_plant(device: &str) -> String {
    format!(
        r#"
[[materials]]
sku = "SHEET"
unit = "ea"
standard_cost = "1.20"
[[materials]]
sku = "WIDGET"
unit = "ea"
standard_cost = "5.00"
[[boms]]
sku = "WIDGET"
components = [{{ sku = "SHEET", quantity = "2" }}]
[[buffers]]
id = "RM"
sku = "SHEET"
capacity = 100000
initial = 50000
[[buffers]]
id = "FG"
sku = "WIDGET"
capacity = 100000
initial = 0
[[work_centers]]
id = "PRESS-1"
name = "Press 1"
ideal_cycle_s = 1.0
conversion_rate_per_hour = "60.00"
inputs = ["RM"]
output = "FG"
device = {device}
"#
    )
}

/// The `seq`th reading of boot 1 of a device that reports `good` and `scrap` more units with
/// every reading, as its work-center actor would hand it to the writer.
pub fn counted_delta(work_center: &str, device: &str, seq: u64, good: u64, scrap: u64) -> mes_actors::Delta {
    mes_actors::Delta {
        work_center: work_center.into(),
        device: device.into(),
        boot: 1,
        seq,
        ts_ms: None,
        good,
        scrap,
        order: None,
        state: mes_actors::MachineState::Running,
        state_changed: false,
        reason: None,
        restarted: false,
        running_ms: 0,
        cursor: mes_actors::counter::Cursor { boot: 1, seq, good: good * seq, scrap: scrap * seq },
        prev_boot: None,
    }
}

/// A counted reading's job for the writer, its commit notified on `done`.
pub fn counted_job(delta: mes_actors::Delta, done: tokio::sync::oneshot::Sender<()>) -> mes::db::writer::Job {
    use mes::db::writer::{Completion, Job, Work};
    Job {
        work: Work::Counted(Box::new(delta)),
        received_ms: 0,
        done: Completion::Notify(done),
        slot: None,
        raw: None,
        metrics: Default::default(),
        lease: None,
    }
}

/// A port free on loopback now and never handed out before in this process: the
/// product's own (`mes::free_port`), so the tests and the bench code they call share one
/// record of the ports given.
pub fn free_port() -> u16 {
    mes::free_port().expect("free port")
}

fn unique() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{:x}{}{}", t & 0xffff_ffff, std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

pub fn temp_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("mes-it-{}", unique()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

pub fn external_broker() -> Option<String> {
    std::env::var("MES_TEST_MQTT_URL").ok().filter(|s| !s.is_empty())
}

/// A fresh database URL: a new PostgreSQL database, or a SQLite file in `dir`.
pub async fn fresh_database(dir: &std::path::Path) -> String {
    match std::env::var("MES_TEST_DATABASE_URL").ok().filter(|s| !s.is_empty()) {
        Some(admin) => {
            use sqlx::Executor;
            let name = format!("mes_it_{}", unique());
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect(&admin)
                .await
                .expect("connect to PostgreSQL admin URL");
            pool.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).await.expect("create test database");
            let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
            format!("{base}/{name}")
        }
        None => format!("sqlite://{}/mes.db", dir.display()),
    }
}

#[derive(Default)]
pub struct MesOptions {
    pub extra_config: String,
    /// Plant file text; default [`TEST_LINE`].
    pub plant: Option<String>,
    /// An external broker for this MES only (`mqtt://127.0.0.1:PORT`), e.g. a private
    /// Mosquitto; default: `MES_TEST_MQTT_URL`, else the embedded broker.
    pub mqtt_url: Option<String>,
}

/// A running `mes serve` child process.
pub struct Mes {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub config: PathBuf,
    /// The database URL in its config.
    pub database: String,
    pub http: String,
    pub mqtt_host: String,
    pub mqtt_port: u16,
    pub prefix: String,
    pub client: reqwest::Client,
}

impl Mes {
    /// Writes a config for a fresh database and free ports, starts the MES, waits until ready.
    pub async fn start(opts: MesOptions) -> Mes {
        let dir = temp_dir();
        let db = fresh_database(&dir).await;
        let http_port = free_port();
        let prefix = format!("t{}", unique());
        let (mqtt_section, host, port) = match opts.mqtt_url.clone().or_else(external_broker) {
            Some(url) => {
                let hp = url.trim_start_matches("mqtt://");
                let (h, p) = hp.rsplit_once(':').expect("host:port");
                (format!("url = \"{url}\""), h.to_string(), p.parse().expect("port"))
            }
            None => {
                let p = free_port();
                (
                    format!("url = \"mqtt://127.0.0.1:{p}\"\nembedded_broker = \"127.0.0.1:{p}\""),
                    "127.0.0.1".to_string(),
                    p,
                )
            }
        };
        // Default: the test line (the demo line with every device on MQTT).
        let text = opts.plant.clone().unwrap_or_else(|| TEST_LINE.to_string());
        let path = dir.join("plant.toml");
        std::fs::write(&path, text).expect("write plant");
        let plant_line = format!("[plant]\nfile = \"{}\"\n", path.display());
        let config = dir.join("mes.toml");
        let text = format!(
            "[http]\nlisten = \"127.0.0.1:{http_port}\"\n[database]\nurl = \"{db}\"\n[mqtt]\n{mqtt_section}\nclient_id = \"mes-{prefix}\"\ntopic_prefix = \"{prefix}\"\n{plant_line}{}\n",
            opts.extra_config
        );
        std::fs::write(&config, text).expect("write config");
        let mut mes = Mes {
            child: None,
            dir,
            config,
            database: db,
            http: format!("http://127.0.0.1:{http_port}"),
            mqtt_host: host,
            mqtt_port: port,
            prefix,
            client: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("http client"),
        };
        mes.spawn().await;
        mes
    }

    /// Starts (or restarts) the process and waits for `/readyz`.
    pub async fn spawn(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("mes.log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_mes"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", std::env::var("MES_TEST_RUST_LOG").unwrap_or_else(|_| "info,rumqttd=off".into()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn mes");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.client.get(format!("{}/readyz", self.http)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("mes exited early with {status}; log:\n{}", self.log());
                }
            }
            assert!(Instant::now() < deadline, "mes not ready in 30 s; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mes.log")).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// SIGTERM; returns the exit status and how long it took.
    pub fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        let mut c = self.child.take().expect("running");
        let started = Instant::now();
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return (s, started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(20) {
                let _ = c.kill();
                panic!("mes did not exit within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.client.get(format!("{}{path}", self.http)).send().await.expect("GET");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: Value, headers: &[(&str, &str)]) -> (u16, Value) {
        let mut req = self.client.post(format!("{}{path}", self.http)).json(&body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = req.send().await.expect("POST");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn metric(&self, name: &str) -> u64 {
        let text = self
            .client
            .get(format!("{}/metrics", self.http))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse::<f64>().ok())
            })
            .map(|v| v as u64)
            .unwrap_or_else(|| panic!("metric {name} missing"))
    }

    pub async fn totals(&self, wc: &str) -> (i64, i64) {
        let (s, v) = self.get(&format!("/api/v1/work-centers/{wc}")).await;
        assert_eq!(s, 200, "{v}");
        (v["good_total"].as_i64().expect("good_total"), v["scrap_total"].as_i64().expect("scrap_total"))
    }

    /// Waits (bounded) until `wc` shows `want`, then returns what it shows.
    pub async fn wait_totals(&self, wc: &str, want: (i64, i64)) -> (i64, i64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.totals(wc).await;
            if got == want || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_metric(&self, name: &str, want: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.metric(name).await;
            if got >= want || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn device(&self, name: &str) -> Device {
        Device::connect(&self.mqtt_host, self.mqtt_port, &self.prefix, name)
    }
}

impl Drop for Mes {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() || std::env::var_os("MES_TEST_KEEP").is_some() {
            // Kept for the post-mortem (config, log, database) on failure or MES_TEST_KEEP.
            eprintln!("kept {} (MES_TEST_KEEP or a failed test)", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A device publishing telemetry over a real MQTT connection, counting broker acks.
pub struct Device {
    pub client: AsyncClient,
    pub prefix: String,
    pub published: u64,
    acked: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Device {
    pub fn connect(host: &str, port: u16, prefix: &str, name: &str) -> Device {
        let mut o = MqttOptions::new(format!("dev-{name}-{}", unique()), host, port);
        o.set_keep_alive(Duration::from_secs(10))
            .set_clean_session(false)
            .set_inflight(200)
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut el) = AsyncClient::new(o, 1000);
        let acked = Arc::new(AtomicU64::new(0));
        let a = acked.clone();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        a.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Device { client, prefix: prefix.to_string(), published: 0, acked, task }
    }

    pub async fn publish_raw(&mut self, device: &str, payload: impl Into<Vec<u8>>) {
        let topic = format!("{}/devices/{device}/telemetry", self.prefix);
        self.client.publish(topic, QoS::AtLeastOnce, false, payload.into()).await.expect("publish");
        self.published += 1;
    }

    /// Publishes at QoS 0: nothing acknowledges it, and no broker window bounds a flood of it.
    pub async fn publish_at_most_once(&mut self, device: &str, payload: impl Into<Vec<u8>>) {
        let topic = format!("{}/devices/{device}/telemetry", self.prefix);
        self.client.publish(topic, QoS::AtMostOnce, false, payload.into()).await.expect("publish");
    }

    pub async fn reading(&mut self, device: &str, boot: u64, seq: u64, good: u64, scrap: u64, extra: Value) {
        let mut v = serde_json::json!({"boot": boot, "seq": seq, "good": good, "scrap": scrap, "state": "running"});
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            for (k, x) in e {
                o.insert(k.clone(), x.clone());
            }
        }
        self.publish_raw(device, v.to_string()).await;
    }

    /// Waits (bounded) until the broker acknowledged everything published.
    pub async fn flush(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.acked.load(Ordering::SeqCst) < self.published {
            assert!(
                Instant::now() < deadline,
                "broker acked {} of {}",
                self.acked.load(Ordering::SeqCst),
                self.published
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Deterministic shuffling for reproducible out-of-order traffic.
pub struct Lcg(pub u64);
impl Lcg {
    pub fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n.max(1)
    }
}

impl Mes {
    /// Runs `mes <args> --config <this MES's config>` to completion: (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_mes"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .output()
            .expect("run mes");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// Every sample of a time series: `(ms since the epoch, value)`, by series
/// (`name{label="value",…}` with labels sorted).
pub type Series = std::collections::BTreeMap<String, Vec<(i64, f64)>>;

/// A VictoriaMetrics server (it speaks the InfluxDB 2 write API) on a free loopback port
/// with its own data directory; stopped, hung or restarted on the same port and data.
pub struct TimeSeriesServer {
    child: Option<Child>,
    dir: PathBuf,
    pub port: u16,
    client: reqwest::Client,
}

impl TimeSeriesServer {
    /// Whether `victoria-metrics` is installed.
    pub fn available() -> bool {
        Command::new("victoria-metrics").arg("-version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
    }

    pub async fn start() -> TimeSeriesServer {
        let mut s = TimeSeriesServer {
            child: None,
            dir: temp_dir(),
            port: free_port(),
            client: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("http client"),
        };
        s.spawn().await;
        s
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and data; waits until it answers `/health`.
    pub async fn spawn(&mut self) {
        let child = Command::new("victoria-metrics")
            .arg(format!("-storageDataPath={}", self.dir.join("data").display()))
            .arg(format!("-httpListenAddr=127.0.0.1:{}", self.port))
            // Keep everything, and keep one sample per series and millisecond (the last
            // written): a point re-sent by a backfill overwrites, as in InfluxDB.
            .args(["-retentionPeriod=100y", "-dedup.minScrapeInterval=1ms", "-loggerLevel=ERROR"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn victoria-metrics");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.client.get(format!("{}/health", self.url())).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "victoria-metrics not ready in 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").args([sig, &c.id().to_string()]).status();
        }
    }

    /// SIGSTOP: the server hangs (connections are accepted by the kernel, nothing answers).
    pub fn hang(&self) {
        self.signal("-STOP");
    }

    /// SIGKILL (also of a hung server).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Every stored sample of every series whose name matches `regex`.
    pub async fn export(&self, regex: &str) -> Series {
        let _ = self.client.get(format!("{}/internal/force_flush", self.url())).send().await;
        let text = self
            .client
            .get(format!("{}/api/v1/export", self.url()))
            .query(&[("match[]", format!("{{__name__=~\"{regex}\"}}"))])
            .send()
            .await
            .expect("export")
            .text()
            .await
            .expect("export body");
        let mut out = Series::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line).expect("export line is JSON");
            let metric = v["metric"].as_object().expect("metric");
            let name = metric.get("__name__").and_then(Value::as_str).unwrap_or("").to_string();
            let labels: std::collections::BTreeMap<&str, &str> = metric
                .iter()
                .filter(|(k, _)| k.as_str() != "__name__")
                .map(|(k, v)| (k.as_str(), v.as_str().unwrap_or("")))
                .collect();
            let key = format!(
                "{name}{{{}}}",
                labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect::<Vec<_>>().join(",")
            );
            let values = v["values"].as_array().expect("values");
            let times = v["timestamps"].as_array().expect("timestamps");
            let samples = out.entry(key).or_default();
            for (t, x) in times.iter().zip(values) {
                samples.push((t.as_i64().expect("timestamp"), x.as_f64().expect("value")));
            }
        }
        for samples in out.values_mut() {
            samples.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        }
        out
    }
}

impl Drop for TimeSeriesServer {
    fn drop(&mut self) {
        self.signal("-CONT");
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An outside tool a test drives (a Python peer, schemathesis): the program named by
/// `env` if set, else `default`, if running it with `probe` succeeds. Missing: `None` with
/// `skip_note` printed, or a failed test when the variable `require` is set (as `.ci/run`
/// sets it).
pub fn optional_tool(env: &str, default: &str, probe: &[&str], require: &str, skip_note: &str) -> Option<String> {
    let program = std::env::var(env).ok().filter(|s| !s.is_empty()).unwrap_or_else(|| default.to_string());
    let ok = Command::new(&program)
        .args(probe)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(program);
    }
    if std::env::var(require).is_ok_and(|v| !v.is_empty()) {
        panic!("{require} is set but `{program}` is not usable ({skip_note})");
    }
    eprintln!("skipped: {skip_note}");
    None
}
