//! Live events (counts, state changes, order status, alerts) for `GET /api/v1/events`.
//!
//! A bounded broadcast: a slow listener misses events (and is told so) instead of
//! holding memory or slowing ingest.
//!
//! In a cluster each node publishes the events of what it owns and what it is asked, so a
//! client connected to one node would miss the rest. There every event is tagged with its
//! node's id and also relayed to the other nodes through the shared PostgreSQL database
//! (`NOTIFY` on [`CHANNEL`], several events per notification); each node broadcasts what
//! the others relayed to its own listeners. The relay is best effort, like the stream
//! itself: events are derived from committed facts, which the API reads from the database.
//! A full relay queue or a failed `NOTIFY` drops events (counted in
//! `mes_events_relay_dropped_total`), and what is notified while a node's listening
//! connection is down does not reach that node.

use crate::db::Store;
use crate::metrics::Metrics;
use serde_json::Value;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, watch};

/// Events kept for slow listeners before they lag.
const CAPACITY: usize = 1024;
/// Events waiting to be relayed to the other nodes of a cluster.
const RELAY_QUEUE: usize = 4096;
/// The PostgreSQL notification channel the nodes of a cluster relay events on.
pub const CHANNEL: &str = "mes_events";
/// Bytes of one notification's payload: PostgreSQL takes up to 8,000.
const NOTIFY_MAX_BYTES: usize = 7_500;
/// A relay step (a `NOTIFY`, a listener's connect) that takes longer fails.
const RELAY_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait between a failed relay step and the next attempt.
const RELAY_BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct Events {
    tx: broadcast::Sender<Value>,
    relay: Option<Relay>,
}

/// The outgoing side of a cluster node's relay.
#[derive(Clone)]
struct Relay {
    node: Arc<str>,
    out: mpsc::Sender<Value>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("node", &self.node).finish_non_exhaustive()
    }
}

impl Default for Events {
    fn default() -> Self {
        Self { tx: broadcast::channel(CAPACITY).0, relay: None }
    }
}

/// What [`Events::clustered`] leaves to start once the node's database and shutdown signal
/// exist: the queue of events to relay.
pub struct RelayQueue {
    node: Arc<str>,
    rx: mpsc::Receiver<Value>,
    tx: broadcast::Sender<Value>,
    metrics: Arc<Metrics>,
}

impl Events {
    /// The events of cluster node `node`: tagged with it and relayed (see the module's
    /// documentation) once [`RelayQueue::start`] runs.
    pub fn clustered(node: &str, metrics: Arc<Metrics>) -> (Self, RelayQueue) {
        let tx = broadcast::channel(CAPACITY).0;
        let (out, rx) = mpsc::channel(RELAY_QUEUE);
        let node: Arc<str> = Arc::from(node);
        let relay = Relay { node: node.clone(), out, metrics: metrics.clone() };
        (Self { tx: tx.clone(), relay: Some(relay) }, RelayQueue { node, rx, tx, metrics })
    }

    pub fn publish(&self, mut event: Value) {
        if let Some(r) = &self.relay {
            if let Value::Object(m) = &mut event {
                m.insert("node".into(), Value::String(r.node.to_string()));
            }
            if r.out.try_send(event.clone()).is_err() {
                r.metrics.events_relay_dropped.fetch_add(1, Relaxed);
            }
        }
        // No listener is fine.
        let _ = self.tx.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Value> {
        self.tx.subscribe()
    }
}

impl RelayQueue {
    /// Starts relaying: this node's events out through `store` (PostgreSQL), the other
    /// nodes' in from a listening connection to `url`, until `shutdown`.
    pub fn start(self, store: Store, url: String, shutdown: watch::Receiver<bool>) {
        let RelayQueue { node, rx, tx, metrics } = self;
        tokio::spawn(relay_out(store, node.clone(), rx, metrics.clone(), shutdown.clone()));
        tokio::spawn(relay_in(url, node, tx, metrics, shutdown));
    }
}

/// Packs queued events into notifications of at most [`NOTIFY_MAX_BYTES`]:
/// `{"node": …, "events": [ … ]}`. A `first` event too large for a notification alone
/// packs nothing (count 0: the caller drops and counts it); `next` carries the event that
/// did not fit into the next payload.
fn pack(node: &str, first: String, rx: &mut mpsc::Receiver<Value>, next: &mut Option<String>) -> (String, usize) {
    let mut payload = format!("{{\"node\":{},\"events\":[", Value::String(node.to_string()));
    if payload.len() + first.len() + 2 > NOTIFY_MAX_BYTES {
        payload.push_str("]}");
        return (payload, 0);
    }
    payload.push_str(&first);
    let mut count = 1;
    while let Ok(e) = rx.try_recv() {
        let e = e.to_string();
        if payload.len() + e.len() + 3 > NOTIFY_MAX_BYTES {
            *next = Some(e);
            break;
        }
        payload.push(',');
        payload.push_str(&e);
        count += 1;
    }
    payload.push_str("]}");
    (payload, count)
}

async fn relay_out(
    store: Store,
    node: Arc<str>,
    mut rx: mpsc::Receiver<Value>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut next: Option<String> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        let first = match next.take() {
            Some(e) => e,
            None => tokio::select! {
                _ = shutdown.changed() => return,
                e = rx.recv() => match e {
                    Some(e) => e.to_string(),
                    None => return,
                },
            },
        };
        let size = first.len();
        let (payload, count) = pack(&node, first, &mut rx, &mut next);
        if count == 0 {
            tracing::warn!(bytes = size, "event too large for a notification; not relayed");
            metrics.events_relay_dropped.fetch_add(1, Relaxed);
            continue;
        }
        let notified = sqlx::query("SELECT pg_notify($1, $2)").bind(CHANNEL).bind(payload).execute(&store.pool);
        match tokio::time::timeout(RELAY_TIMEOUT, notified).await {
            Ok(Ok(_)) => {
                metrics.events_relayed.fetch_add(count as u64, Relaxed);
                backoff = Duration::from_millis(100);
            }
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer in {RELAY_TIMEOUT:?}"),
                };
                tracing::warn!(events = count, error = %why, "events not relayed to the other nodes");
                metrics.events_relay_dropped.fetch_add(count as u64, Relaxed);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RELAY_BACKOFF_MAX);
            }
        }
    }
}

async fn relay_in(
    url: String,
    node: Arc<str>,
    tx: broadcast::Sender<Value>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let connected = async {
            let mut l = sqlx::postgres::PgListener::connect(&url).await?;
            l.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = match tokio::time::timeout(RELAY_TIMEOUT, connected).await {
            Ok(Ok(l)) => {
                backoff = Duration::from_millis(100);
                l
            }
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer in {RELAY_TIMEOUT:?}"),
                };
                tracing::warn!(error = %why, "cannot listen for the other nodes' events; retrying");
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(RELAY_BACKOFF_MAX);
                continue;
            }
        };
        loop {
            let n = tokio::select! {
                _ = shutdown.changed() => return,
                n = listener.recv() => n,
            };
            match n {
                Ok(n) => {
                    for e in remote_events(&node, n.payload()) {
                        metrics.events_remote.fetch_add(1, Relaxed);
                        let _ = tx.send(e);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lost the listening connection for the other nodes' events");
                    break;
                }
            }
        }
    }
}

/// The events of a notification relayed by another node (none of this node's own, none
/// of a payload that is not the relay's).
fn remote_events(own: &str, payload: &str) -> Vec<Value> {
    #[derive(serde::Deserialize)]
    struct Relayed {
        node: String,
        events: Vec<Value>,
    }
    match serde_json::from_str::<Relayed>(payload) {
        Ok(r) if r.node != own => r.events,
        Ok(_) => Vec::new(),
        Err(e) => {
            tracing::warn!(error = %e, "a notification on the events channel is not a relay's; ignored");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn events_are_packed_under_the_payload_limit_in_order_and_nothing_is_lost_between_payloads() {
        let (tx, mut rx) = mpsc::channel(RELAY_QUEUE);
        let big = "x".repeat(1_000);
        for i in 0..20 {
            tx.try_send(json!({"type": "counts", "i": i, "pad": big})).expect("queued");
        }
        let mut next = None;
        let mut seen = Vec::new();
        let mut first = rx.try_recv().expect("first").to_string();
        loop {
            let (payload, count) = pack("n1", first, &mut rx, &mut next);
            assert!(payload.len() <= NOTIFY_MAX_BYTES, "{}", payload.len());
            let events = remote_events("other", &payload);
            assert_eq!(events.len(), count);
            seen.extend(events.iter().map(|e| e["i"].as_i64().expect("i")));
            match next.take() {
                Some(e) => first = e,
                None => break,
            }
        }
        assert_eq!(seen, (0..20).collect::<Vec<i64>>());
    }

    #[test]
    fn a_nodes_own_relay_and_foreign_payloads_bring_nothing() {
        let payload = r#"{"node":"a","events":[{"type":"counts","node":"a"}]}"#;
        assert_eq!(remote_events("a", payload), Vec::<Value>::new());
        assert_eq!(remote_events("b", payload), vec![json!({"type": "counts", "node": "a"})]);
        assert_eq!(remote_events("b", "hello"), Vec::<Value>::new());
    }

    #[tokio::test]
    async fn an_event_too_large_for_a_notification_is_left_out() {
        let (_tx, mut rx) = mpsc::channel::<Value>(1);
        let mut next = None;
        let (payload, count) = pack("n1", "y".repeat(NOTIFY_MAX_BYTES), &mut rx, &mut next);
        assert_eq!((payload.as_str(), count), (r#"{"node":"n1","events":[]}"#, 0));
    }

    #[tokio::test]
    async fn a_cluster_nodes_events_carry_its_id_and_are_queued_for_the_others() {
        let (events, mut queue) = Events::clustered("n1", Arc::new(Metrics::default()));
        let mut local = events.subscribe();
        events.publish(json!({"type": "order_created", "order": "PO-1"}));
        let tagged = json!({"type": "order_created", "order": "PO-1", "node": "n1"});
        assert_eq!(local.try_recv().expect("local"), tagged);
        assert_eq!(queue.rx.try_recv().expect("queued"), tagged);
    }
}
