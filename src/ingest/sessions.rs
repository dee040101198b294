//! How a single node spreads its MQTT intake over several persistent sessions.
//!
//! The MES acknowledges a message only after its commit, and a broker keeps only a small
//! window of unacknowledged messages per session (rumqttd 100, Mosquitto 20 by default):
//! one session's throughput is that window divided by the time from delivery to commit.
//! So the plant's MQTT devices are split over `mqtt.sessions` partition sessions by a
//! stable hash of the device id (each device always in the same session, so its messages
//! stay in order and its queue survives restarts), client ids `{client_id}-in-{i}of{n}`.
//!
//! The main session `{client_id}-main` keeps what one session did before: commands,
//! Sparkplug B, and the wildcard `{prefix}/devices/+/telemetry`, so that a device the
//! plant does not name still becomes a dead letter. Messages of a device whose partition
//! session is subscribed right now are acknowledged there without work; while a partition
//! session is down, the main session ingests its devices' messages itself and
//! deduplication absorbs the second copy.
//!
//! Every session id used is recorded in the database (`mqtt_sessions`). At start, a
//! recorded session the configuration no longer uses (the number changed, or the single
//! `{client_id}` session of earlier versions) is drained: connected without a clean start,
//! its subscriptions dropped, what the broker kept for it ingested, and only once all of
//! that is committed is it removed from the broker and the table.

use super::mqtt::{self, DrainReport, Kind, Session};
use super::Pipeline;
use crate::config::{IngestConfig, MqttConfig};
use crate::db::Store;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch};

/// Longest a retired session is drained before it is left for the next start.
const DRAIN_MAX: Duration = Duration::from_secs(120);

/// The partition of a device among `n` (FNV-1a over the id: the same on every build and
/// platform, unlike the standard library's hasher).
pub fn partition_of(device: &str, n: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in device.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % n.max(1) as u64) as usize
}

/// Which partition session has each of the plant's MQTT devices, and whether it is
/// subscribed right now.
pub struct Partitions {
    of_device: HashMap<String, usize>,
    subscribed: Vec<Arc<AtomicBool>>,
}

impl Partitions {
    /// Whether `topic` is a device topic that a subscribed partition session receives.
    pub fn covers(&self, prefix: &str, topic: &str) -> bool {
        super::parse::device_from_topic(prefix, topic)
            .ok()
            .and_then(|d| self.of_device.get(d))
            .is_some_and(|&i| self.subscribed[i].load(Relaxed))
    }

    /// Waits (bounded) until every partition session with devices is subscribed. The main
    /// session starts after that: a message it then receives was published after every
    /// partition had subscribed, so the partition has its own copy whenever the main
    /// session passes one on.
    pub async fn wait_subscribed(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.of_device.values().all(|&i| self.subscribed[i].load(Relaxed)) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The sessions of a single node.
pub struct Layout {
    pub main: Session,
    pub routes: Arc<Partitions>,
    /// One per partition that has devices.
    pub partitions: Vec<Session>,
}

impl Layout {
    /// Every client id in this layout.
    pub fn ids(&self) -> Vec<String> {
        std::iter::once(&self.main).chain(&self.partitions).map(|s| s.client_id.clone()).collect()
    }
}

pub fn main_id(cfg: &MqttConfig) -> String {
    format!("{}-main", cfg.client_id)
}

pub fn partition_id(cfg: &MqttConfig, i: usize, n: usize) -> String {
    format!("{}-in-{i}of{n}", cfg.client_id)
}

fn device_topic(cfg: &MqttConfig, device: &str) -> String {
    format!("{}/devices/{device}/telemetry", cfg.topic_prefix)
}

/// Splits `devices` (the plant's MQTT device ids) over `cfg.sessions` partitions.
pub fn layout(cfg: &MqttConfig, devices: &[String]) -> Layout {
    let n = usize::from(cfg.sessions.max(1));
    let mut filters: Vec<Vec<String>> = vec![Vec::new(); n];
    let mut of_device = HashMap::new();
    for d in devices {
        let i = partition_of(d, n);
        if of_device.insert(d.clone(), i).is_none() {
            filters[i].push(device_topic(cfg, d));
        }
    }
    let subscribed: Vec<Arc<AtomicBool>> = (0..n).map(|_| Arc::new(AtomicBool::new(false))).collect();
    let partitions = filters
        .into_iter()
        .enumerate()
        .filter(|(_, f)| !f.is_empty())
        .map(|(i, filters)| Session {
            client_id: partition_id(cfg, i, n),
            filters,
            guard: None,
            kind: Kind::Partition(subscribed[i].clone()),
        })
        .collect();
    let routes = Arc::new(Partitions { of_device, subscribed });
    let main = Session {
        client_id: main_id(cfg),
        filters: vec![format!("{}/devices/+/telemetry", cfg.topic_prefix)],
        guard: None,
        kind: Kind::Main(routes.clone()),
    };
    Layout { main, routes, partitions }
}

/// Records the layout's sessions and returns the recorded ones it no longer uses (with the
/// session of earlier versions, `{client_id}`, when nothing was recorded yet).
pub async fn record(store: &Store, cfg: &MqttConfig, layout: &Layout) -> Result<Vec<String>, String> {
    let known = store.mqtt_sessions().await.map_err(|e| e.to_string())?;
    let current = layout.ids();
    let mut retired: Vec<String> = known.iter().filter(|id| !current.contains(id)).cloned().collect();
    if known.is_empty() && !current.contains(&cfg.client_id) {
        retired.push(cfg.client_id.clone());
    }
    store
        .mqtt_sessions_add(&[retired.as_slice(), &current].concat(), crate::now_ms())
        .await
        .map_err(|e| e.to_string())?;
    Ok(retired)
}

/// Drains the retired sessions one after another (in the background: ingest runs on the
/// current sessions meanwhile; a device's older messages arriving late are handled by the
/// counters' rules, like any message out of order).
#[allow(clippy::too_many_arguments)]
pub async fn retire(
    cfg: MqttConfig,
    ingest: IngestConfig,
    store: Store,
    retired: Vec<String>,
    devices: Vec<String>,
    pipeline: Pipeline,
    shutdown: watch::Receiver<bool>,
) {
    // What a retired session may still be subscribed to: the old wildcard and every device
    // topic (dropping a filter it never had is harmless).
    let mut unsubscribe = vec![format!("{}/devices/+/telemetry", cfg.topic_prefix)];
    unsubscribe.extend(devices.iter().map(|d| device_topic(&cfg, d)));
    for id in retired {
        if *shutdown.borrow() {
            return;
        }
        let (tx, rx) = oneshot::channel::<DrainReport>();
        let (stop_tx, stop_rx) = watch::channel(false);
        let session =
            Session { client_id: id.clone(), filters: unsubscribe.clone(), guard: None, kind: Kind::Drain(tx) };
        let task = match mqtt::start(&cfg, &ingest, session, pipeline.clone(), stop_rx, None) {
            Ok((_, task)) => task,
            Err(e) => {
                tracing::warn!(session = %id, error = %e, "cannot drain a retired MQTT session");
                continue;
            }
        };
        let mut shut = shutdown.clone();
        let report = tokio::select! {
            r = rx => r.ok(),
            _ = tokio::time::sleep(DRAIN_MAX) => None,
            _ = shut.changed() => None,
        };
        let _ = stop_tx.send(true);
        let _ = task.await;
        match report {
            Some(r) if r.complete => {
                if let Err(e) = mqtt::forget(&cfg, &id).await {
                    tracing::warn!(session = %id, error = %e, "retired MQTT session drained but not removed; retried at the next start");
                    continue;
                }
                if let Err(e) = store.mqtt_sessions_remove(&id).await {
                    tracing::warn!(session = %id, error = %e, "cannot forget a retired MQTT session");
                    continue;
                }
                tracing::info!(session = %id, present = r.present, messages = r.received, "retired MQTT session drained and removed");
            }
            other => {
                tracing::warn!(session = %id, report = ?other, "retired MQTT session not fully drained; kept for the next start")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_spread() {
        // Fixed values: a change of the hash would move devices between sessions.
        assert_eq!(partition_of("press-01", 8), partition_of("press-01", 8));
        assert_eq!(partition_of("", 8), (0xcbf2_9ce4_8422_2325u64 % 8) as usize);
        assert_eq!(partition_of("a", 1), 0);
        let mut counts = [0usize; 8];
        for i in 0..8000 {
            counts[partition_of(&format!("dev-{i}"), 8)] += 1;
        }
        assert!(counts.iter().all(|&c| (800..1200).contains(&c)), "{counts:?}");
    }

    #[test]
    fn layout_covers_every_device_once_and_only_subscribed_partitions_pass() {
        let cfg = MqttConfig { sessions: 3, ..MqttConfig::embedded() };
        let devices: Vec<String> = (0..20).map(|i| format!("d{i}")).collect();
        let l = layout(&cfg, &devices);
        let mut topics: Vec<String> = l.partitions.iter().flat_map(|s| s.filters.clone()).collect();
        topics.sort();
        let mut want: Vec<String> = devices.iter().map(|d| format!("mes/devices/{d}/telemetry")).collect();
        want.sort();
        assert_eq!(topics, want);
        assert_eq!(l.main.client_id, "mes-main");
        assert_eq!(l.main.filters, vec!["mes/devices/+/telemetry".to_string()]);
        let Kind::Main(parts) = &l.main.kind else { panic!("main session kind") };
        assert!(!parts.covers("mes", "mes/devices/d1/telemetry"), "nothing subscribed yet");
        let i = partition_of("d1", 3);
        let Some(Kind::Partition(flag)) =
            l.partitions.iter().find(|s| s.client_id == format!("mes-in-{i}of3")).map(|s| &s.kind)
        else {
            panic!("partition of d1")
        };
        flag.store(true, Relaxed);
        assert!(parts.covers("mes", "mes/devices/d1/telemetry"));
        assert!(!parts.covers("mes", "mes/devices/unknown/telemetry"));
        assert!(!parts.covers("mes", "other/devices/d1/telemetry"));
    }

    #[tokio::test]
    async fn record_names_the_sessions_no_longer_used() {
        let dir = std::env::temp_dir().join(format!("mes-sessions-{}-{}", std::process::id(), crate::now_ms()));
        std::fs::create_dir_all(&dir).expect("dir");
        let store = Store::connect(&format!("sqlite://{}/s.db", dir.display()), 2).await.expect("store");
        store.migrate().await.expect("migrate");
        let devices: Vec<String> = (0..20).map(|i| format!("d{i}")).collect();
        let four = MqttConfig { sessions: 4, ..MqttConfig::embedded() };
        // Nothing recorded: the single session of earlier versions is drained.
        assert_eq!(record(&store, &four, &layout(&four, &devices)).await.expect("record"), vec!["mes".to_string()]);
        // Until it is removed, it stays retired; the same layout retires nothing else.
        assert_eq!(record(&store, &four, &layout(&four, &devices)).await.expect("record"), vec!["mes".to_string()]);
        store.mqtt_sessions_remove("mes").await.expect("remove");
        assert!(record(&store, &four, &layout(&four, &devices)).await.expect("record").is_empty());
        // Two sessions instead of four: the four partitions retire, the main one stays.
        let two = MqttConfig { sessions: 2, ..MqttConfig::embedded() };
        let mut retired = record(&store, &two, &layout(&two, &devices)).await.expect("record");
        retired.sort();
        assert_eq!(retired, vec!["mes-in-0of4", "mes-in-1of4", "mes-in-2of4", "mes-in-3of4"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
