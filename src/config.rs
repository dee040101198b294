//! Layered configuration: embedded defaults, then an optional TOML file, then
//! `MES_<SECTION>__<KEY>` environment variables. Unknown keys and bad values stop start-up
//! with a message naming the key.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Address of the in-process broker when nothing else is configured.
pub const DEFAULT_EMBEDDED_BROKER: &str = "127.0.0.1:11883";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {origin}: {message}")]
    Invalid { origin: String, message: String },
    #[error("config key `{key}`: {message}")]
    Key { key: String, message: String },
}

fn key_err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Key { key: key.to_string(), message: message.into() }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub http: HttpConfig,
    pub database: DatabaseConfig,
    pub mqtt: MqttConfig,
    pub plant: PlantConfig,
    pub influx: Option<InfluxConfig>,
    pub erp: Option<ErpConfig>,
    pub auth: AuthConfig,
    pub cluster: Option<ClusterConfig>,
    pub ingest: IngestConfig,
    pub log: LogConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http: HttpConfig::default(),
            database: DatabaseConfig::default(),
            mqtt: MqttConfig::embedded(),
            plant: PlantConfig::default(),
            influx: None,
            erp: None,
            auth: AuthConfig::default(),
            cluster: None,
            ingest: IngestConfig::default(),
            log: LogConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self { listen: "127.0.0.1:8080".into() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub url: String,
    /// Connections in the read pool (the writer has its own).
    pub max_connections: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self { url: "sqlite://mes-data/mes.db".into(), max_connections: 8 }
    }
}

/// MQTT settings. When the file has an `[mqtt]` section without `embedded_broker`, the MES
/// uses the external broker at `url`; with no `[mqtt]` section at all it starts its own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    #[serde(default = "default_mqtt_url")]
    pub url: String,
    #[serde(default = "default_client_id")]
    pub client_id: String,
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    #[serde(default)]
    pub embedded_broker: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// Keep-alive in seconds.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u64,
    /// Telemetry sessions of a single node: the plant's MQTT devices are split over this
    /// many persistent sessions by a stable hash of their id (`ingest::sessions`), because a
    /// broker keeps only a small window of unacknowledged messages per session (rumqttd
    /// 100, Mosquitto `max_inflight_messages`, 20 by default) and the MES acknowledges after
    /// the commit. Changing it moves devices between sessions; the retired sessions are
    /// drained at the next start.
    #[serde(default = "default_sessions")]
    pub sessions: u16,
}

fn default_mqtt_url() -> String {
    format!("mqtt://{DEFAULT_EMBEDDED_BROKER}")
}
fn default_client_id() -> String {
    "mes".into()
}
fn default_prefix() -> String {
    "mes".into()
}
fn default_keep_alive() -> u64 {
    15
}
/// Default `mqtt.sessions`. A session moves at most its broker window per commit, and a
/// hash puts few devices unevenly into few sessions (the MQTT line's 4 devices took 3 of 4,
/// one session carrying half the traffic): with 16 a small plant's devices mostly get a
/// session each, and a large plant gets 16 windows (docs/BENCHMARKS.md, session 11).
pub const DEFAULT_SESSIONS: u16 = 16;

fn default_sessions() -> u16 {
    DEFAULT_SESSIONS
}

impl MqttConfig {
    pub fn embedded() -> Self {
        Self {
            url: default_mqtt_url(),
            client_id: default_client_id(),
            topic_prefix: default_prefix(),
            embedded_broker: Some(DEFAULT_EMBEDDED_BROKER.into()),
            username: None,
            password: None,
            keep_alive_s: default_keep_alive(),
            sessions: default_sessions(),
        }
    }

    /// `(host, port)` of `url`.
    pub fn host_port(&self) -> Result<(String, u16), ConfigError> {
        let rest = self
            .url
            .strip_prefix("mqtt://")
            .or_else(|| self.url.strip_prefix("tcp://"))
            .ok_or_else(|| key_err("mqtt.url", format!("`{}` must start with mqtt://", self.url)))?;
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => {
                let port = p.parse::<u16>().map_err(|_| key_err("mqtt.url", format!("bad port in `{}`", self.url)))?;
                (h.to_string(), port)
            }
            None => (rest.to_string(), 1883),
        };
        if host.is_empty() {
            return Err(key_err("mqtt.url", format!("no host in `{}`", self.url)));
        }
        Ok((host, port))
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlantConfig {
    /// Path of the plant file; `None` means the demo plant shipped in the binary.
    pub file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InfluxConfig {
    pub url: String,
    pub org: String,
    pub bucket: String,
    pub token: String,
    /// Most points per write request.
    #[serde(default = "default_influx_batch")]
    pub batch_size: usize,
    /// A smaller batch is sent once its oldest point has waited this long.
    #[serde(default = "default_influx_flush")]
    pub flush_interval: String,
    /// Most points waiting to be written; beyond it the oldest are dropped (and counted).
    #[serde(default = "default_influx_queue")]
    pub queue: usize,
    /// Timeout of one write request.
    #[serde(default = "default_influx_timeout")]
    pub timeout: String,
    /// Longest wait between retries of a failed write (the backoff doubles from 100 ms).
    #[serde(default = "default_influx_retry_max")]
    pub retry_max: String,
    /// A minute's rollup (counts, running time, OEE) is computed once no reading has
    /// touched it for this long.
    #[serde(default = "default_influx_rollup_delay")]
    pub rollup_delay: String,
}

fn default_influx_batch() -> usize {
    5000
}
fn default_influx_flush() -> String {
    "1s".into()
}
fn default_influx_queue() -> usize {
    200_000
}
fn default_influx_timeout() -> String {
    "5s".into()
}
fn default_influx_retry_max() -> String {
    "10s".into()
}
fn default_influx_rollup_delay() -> String {
    "5s".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErpConfig {
    pub webhook_url: String,
    /// An ERP progress document each time an order's good output passes this many more
    /// units (0: completion, close and goods-issue documents only).
    #[serde(default = "default_progress_every")]
    pub progress_every_units: i64,
}

fn default_progress_every() -> i64 {
    1000
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub tokens: Vec<TokenConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub name: String,
    pub role: Role,
    pub token: Option<String>,
    pub token_sha256: Option<String>,
}

/// Roles in increasing power: each may do what the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Planner,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Planner => "planner",
            Role::Admin => "admin",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub node_id: String,
    #[serde(default = "default_lease")]
    pub lease_timeout: String,
}

fn default_lease() -> String {
    "10s".into()
}

/// Bounds of the ingest pipeline (our extension of the contract's config).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Most readings committed in one transaction.
    pub batch_max: usize,
    /// Most readings received but not yet committed and acknowledged.
    pub max_in_flight: usize,
    /// Capacity of the writer's queue.
    pub queue: usize,
    /// Largest telemetry payload accepted, in bytes.
    pub max_payload: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self { batch_max: 2000, max_in_flight: 8192, queue: 8192, max_payload: 64 * 1024 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `RUST_LOG`-style filter; `RUST_LOG` wins when set.
    pub filter: String,
    /// JSON lines instead of text.
    pub json: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { filter: "info".into(), json: false }
    }
}

/// Parses `600s`, `90m`, `8h`, `250ms`, `2d`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.')?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

impl Config {
    /// Loads the file (if any), applies environment overrides and validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with_env(path, &env)
    }

    pub fn load_with_env(path: Option<&Path>, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let (mut table, origin) = match path {
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).map_err(|source| ConfigError::Read { path: p.to_path_buf(), source })?;
                let t: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
                    origin: p.display().to_string(),
                    message: toml_message(&e, &text),
                })?;
                // Check the file on its own first, so errors point at its own lines.
                if let Err(e) = toml::from_str::<Config>(&text) {
                    return Err(ConfigError::Invalid {
                        origin: p.display().to_string(),
                        message: toml_message(&e, &text),
                    });
                }
                (t, p.display().to_string())
            }
            None => (toml::Table::new(), "defaults".to_string()),
        };
        let had_mqtt = table.contains_key("mqtt");
        apply_env(&mut table, env)?;
        // Without an [mqtt] section in the file the embedded broker stays on, even when
        // the environment overrides single MQTT keys; `MES_MQTT__EMBEDDED_BROKER=""` turns it off.
        if !had_mqtt {
            if let Some(toml::Value::Table(m)) = table.get_mut("mqtt") {
                m.entry("embedded_broker").or_insert_with(|| toml::Value::String(DEFAULT_EMBEDDED_BROKER.into()));
            }
        }
        if let Some(toml::Value::Table(m)) = table.get_mut("mqtt") {
            if matches!(m.get("embedded_broker"), Some(toml::Value::String(s)) if s.is_empty() || s == "off") {
                m.remove("embedded_broker");
            }
        }
        let text = toml::to_string(&table)
            .map_err(|e| ConfigError::Invalid { origin: origin.clone(), message: e.to_string() })?;
        let mut cfg: Config = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            origin: format!("{origin} with MES_* environment overrides"),
            message: toml_message(&e, &text),
        })?;
        // Relative plant paths are relative to the config file.
        if let (Some(cfg_path), Some(plant)) = (path, cfg.plant.file.clone()) {
            if plant.is_relative() && !plant.exists() {
                if let Some(dir) = cfg_path.parent() {
                    cfg.plant.file = Some(dir.join(plant));
                }
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let listen: SocketAddr = self.http.listen.parse().map_err(|_| {
            key_err("http.listen", format!("`{}` is not an address like 127.0.0.1:8080", self.http.listen))
        })?;
        let url = &self.database.url;
        if !(url.starts_with("sqlite:") || url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(key_err("database.url", format!("`{url}` must start with sqlite: or postgres://")));
        }
        if self.database.max_connections == 0 {
            return Err(key_err("database.max_connections", "must be at least 1"));
        }
        self.mqtt.host_port()?;
        if let Some(b) = &self.mqtt.embedded_broker {
            b.parse::<SocketAddr>().map_err(|_| {
                key_err("mqtt.embedded_broker", format!("`{b}` is not an address like 127.0.0.1:11883"))
            })?;
        }
        let p = &self.mqtt.topic_prefix;
        if p.is_empty() || p.contains(['#', '+']) || p.starts_with('/') || p.ends_with('/') {
            return Err(key_err(
                "mqtt.topic_prefix",
                format!("`{p}` must be a plain topic level (no wildcards or edge slashes)"),
            ));
        }
        if self.mqtt.client_id.is_empty() {
            return Err(key_err("mqtt.client_id", "must not be empty"));
        }
        if self.mqtt.keep_alive_s < 5 {
            return Err(key_err("mqtt.keep_alive_s", "must be at least 5"));
        }
        if !(1..=64).contains(&self.mqtt.sessions) {
            return Err(key_err("mqtt.sessions", format!("{} is not between 1 and 64", self.mqtt.sessions)));
        }
        for (i, t) in self.auth.tokens.iter().enumerate() {
            let key = format!("auth.tokens[{i}]");
            match (&t.token, &t.token_sha256) {
                (Some(tok), None) if tok.len() >= 8 => {}
                (Some(_), None) => return Err(key_err(&format!("{key}.token"), "must be at least 8 characters")),
                (None, Some(h)) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {}
                (None, Some(_)) => return Err(key_err(&format!("{key}.token_sha256"), "must be 64 hex digits")),
                _ => return Err(key_err(&key, "needs exactly one of `token` or `token_sha256`")),
            }
        }
        if self.auth.tokens.is_empty() && !listen.ip().is_loopback() {
            return Err(key_err(
                "http.listen",
                format!("`{listen}` is not a loopback address; listening beyond this machine needs [[auth.tokens]]"),
            ));
        }
        if let Some(c) = &self.cluster {
            if self.database.url.starts_with("sqlite:") {
                return Err(key_err(
                    "cluster",
                    "several nodes share one PostgreSQL database: set database.url to a postgres:// URL",
                ));
            }
            if c.node_id.is_empty()
                || c.node_id.len() > 64
                || !c.node_id.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
            {
                return Err(key_err(
                    "cluster.node_id",
                    format!("`{}` is not a node id (1–64 of A–Z a–z 0–9 - _ .)", c.node_id),
                ));
            }
            if parse_duration(&c.lease_timeout).is_some_and(|d| d < std::time::Duration::from_millis(500)) {
                return Err(key_err("cluster.lease_timeout", "must be at least 500ms"));
            }
            if parse_duration(&c.lease_timeout).is_none() {
                return Err(key_err(
                    "cluster.lease_timeout",
                    format!("`{}` is not a duration like 10s", c.lease_timeout),
                ));
            }
        }
        if let Some(e) = &self.erp {
            if !e.webhook_url.starts_with("http://") && !e.webhook_url.starts_with("https://") {
                return Err(key_err("erp.webhook_url", "must start with http:// or https://"));
            }
        }
        if let Some(i) = &self.influx {
            if !i.url.starts_with("http://") && !i.url.starts_with("https://") {
                return Err(key_err("influx.url", "must start with http:// or https://"));
            }
            if let Err(e) = reqwest::Url::parse(&i.url) {
                return Err(key_err("influx.url", format!("`{}` is not a URL: {e}", i.url)));
            }
            if i.batch_size == 0 || i.batch_size > 100_000 {
                return Err(key_err("influx.batch_size", "must be between 1 and 100000"));
            }
            if i.queue < i.batch_size {
                return Err(key_err("influx.queue", "must be at least influx.batch_size"));
            }
            for (key, v) in [
                ("influx.flush_interval", &i.flush_interval),
                ("influx.timeout", &i.timeout),
                ("influx.retry_max", &i.retry_max),
                ("influx.rollup_delay", &i.rollup_delay),
            ] {
                if parse_duration(v).is_none_or(|d| d.is_zero()) {
                    return Err(key_err(key, format!("`{v}` is not a duration like 5s")));
                }
            }
        }
        let ing = &self.ingest;
        if ing.batch_max == 0 || ing.batch_max > 50_000 {
            return Err(key_err("ingest.batch_max", "must be between 1 and 50000"));
        }
        if ing.max_in_flight == 0 || ing.queue == 0 {
            return Err(key_err("ingest.max_in_flight", "bounds must be at least 1"));
        }
        Ok(())
    }
}

/// A TOML error message with its line number and the offending line.
pub fn toml_message(e: &toml::de::Error, text: &str) -> String {
    match e.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            let line = text[..start].matches('\n').count() + 1;
            let src = text.lines().nth(line - 1).unwrap_or("").trim();
            format!("line {line}: {} (at `{src}`)", e.message().trim_end())
        }
        None => e.message().trim_end().to_string(),
    }
}

fn apply_env(table: &mut toml::Table, env: &[(String, String)]) -> Result<(), ConfigError> {
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix("MES_") else {
            continue;
        };
        let Some((section, key)) = rest.split_once("__") else {
            continue;
        };
        let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
        if section.is_empty() || key.is_empty() {
            continue;
        }
        // A value that parses as TOML (number, bool, array) keeps its type; else a string.
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .filter(|v| !matches!(v, toml::Value::Table(_)))
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
        let entry = table.entry(section.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match entry {
            toml::Value::Table(t) => {
                t.insert(key, value);
            }
            _ => {
                return Err(key_err(&section, format!("{name} overrides a key of `{section}`, which is not a section")))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    fn file(text: &str) -> tempfile_lite::Temp {
        let t = tempfile_lite::Temp::new("toml");
        let mut f = std::fs::File::create(&t.0).expect("create temp");
        f.write_all(text.as_bytes()).expect("write temp");
        t
    }

    mod tempfile_lite {
        pub struct Temp(pub std::path::PathBuf);
        impl Temp {
            pub fn new(ext: &str) -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Temp(std::env::temp_dir().join(format!("mes-cfg-{}-{n}.{ext}", std::process::id())))
            }
        }
        impl Drop for Temp {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn defaults_are_embedded() {
        let c = Config::load_with_env(None, &[]).expect("defaults load");
        assert_eq!(c.http.listen, "127.0.0.1:8080");
        assert_eq!(c.database.url, "sqlite://mes-data/mes.db");
        assert_eq!(c.mqtt.embedded_broker.as_deref(), Some("127.0.0.1:11883"));
        assert_eq!(c.mqtt.host_port().expect("url"), ("127.0.0.1".to_string(), 11883));
    }

    #[test]
    fn env_overrides_keep_types_and_embedded_broker() {
        let c = Config::load_with_env(
            None,
            &env(&[
                ("MES_DATABASE__URL", "postgres://postgres@127.0.0.1:5432/x"),
                ("MES_MQTT__CLIENT_ID", "mes-2"),
                ("MES_INGEST__BATCH_MAX", "10"),
            ]),
        )
        .expect("loads");
        assert_eq!(c.database.url, "postgres://postgres@127.0.0.1:5432/x");
        assert_eq!(c.mqtt.client_id, "mes-2");
        assert_eq!(c.ingest.batch_max, 10);
        assert!(c.mqtt.embedded_broker.is_some());
    }

    #[test]
    fn mqtt_section_without_embedded_means_external() {
        let f = file("[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\n");
        let c = Config::load_with_env(Some(&f.0), &[]).expect("loads");
        assert_eq!(c.mqtt.embedded_broker, None);
        assert_eq!(c.mqtt.host_port().expect("url").1, 1883);
    }

    #[test]
    fn unknown_key_is_named() {
        let f = file("[http]\nlisen = \"127.0.0.1:1\"\n");
        let e = Config::load_with_env(Some(&f.0), &[]).expect_err("must fail").to_string();
        assert!(e.contains("lisen"), "{e}");
        let e = Config::load_with_env(None, &env(&[("MES_DATABASE__URLL", "x")])).expect_err("must fail").to_string();
        assert!(e.contains("urll"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let e = Config::load_with_env(None, &env(&[("MES_HTTP__LISTEN", "nowhere")])).expect_err("fails").to_string();
        assert!(e.contains("http.listen"), "{e}");
        let e =
            Config::load_with_env(None, &env(&[("MES_DATABASE__URL", "mysql://x")])).expect_err("fails").to_string();
        assert!(e.contains("database.url"), "{e}");
        let e =
            Config::load_with_env(None, &env(&[("MES_HTTP__LISTEN", "0.0.0.0:8080")])).expect_err("fails").to_string();
        assert!(e.contains("auth.tokens"), "{e}");
        let f = file("[http]\nlisten = 5\n");
        let e = Config::load_with_env(Some(&f.0), &[]).expect_err("fails").to_string();
        assert!(e.contains("listen"), "{e}");
        let f = file("[http\nlisten = 5\n");
        let e = Config::load_with_env(Some(&f.0), &[]).expect_err("fails").to_string();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn influx_defaults_and_bad_values() {
        let base = [
            ("MES_INFLUX__URL", "http://127.0.0.1:8086"),
            ("MES_INFLUX__ORG", "mes"),
            ("MES_INFLUX__BUCKET", "mes"),
            ("MES_INFLUX__TOKEN", "t"),
        ];
        let c = Config::load_with_env(None, &env(&base)).expect("loads");
        let i = c.influx.expect("influx section");
        assert_eq!((i.batch_size, i.queue, i.timeout.as_str(), i.flush_interval.as_str()), (5000, 200_000, "5s", "1s"));
        for (k, v, key) in [
            ("MES_INFLUX__TIMEOUT", "soon", "influx.timeout"),
            ("MES_INFLUX__BATCH_SIZE", "0", "influx.batch_size"),
            ("MES_INFLUX__QUEUE", "10", "influx.queue"),
            ("MES_INFLUX__URL", "http://", "influx.url"),
        ] {
            let mut e = env(&base);
            e.push((k.to_string(), v.to_string()));
            let err = Config::load_with_env(None, &e).expect_err("fails").to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("600s"), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("90m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("8h"), Some(Duration::from_secs(28800)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("8x"), None);
        assert_eq!(parse_duration("s"), None);
    }
}
