//! Live events (counts, state changes, order status, alerts) for `GET /api/v1/events`.
//!
//! A bounded broadcast: a slow listener misses events (and is told so) instead of
//! holding memory or slowing ingest.

use tokio::sync::broadcast;

/// Events kept for slow listeners before they lag.
const CAPACITY: usize = 1024;

#[derive(Clone, Debug)]
pub struct Events(broadcast::Sender<serde_json::Value>);

impl Default for Events {
    fn default() -> Self {
        Self(broadcast::channel(CAPACITY).0)
    }
}

impl Events {
    pub fn publish(&self, event: serde_json::Value) {
        // No listener is fine.
        let _ = self.0.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<serde_json::Value> {
        self.0.subscribe()
    }
}
