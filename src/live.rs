//! Live state actors: one per material buffer and one per open production order.
//!
//! They follow committed facts (the writer notifies them after each commit; planner
//! commands after theirs) and turn them into edge-triggered events: shortage and
//! buffer-full alerts raised and cleared once per crossing, order milestones and status
//! changes. They run on their own arbiter thread. Notifications are derived data: a full
//! mailbox drops one (counted in `mes_live_dropped_total`) and the next notification carries
//! the absolute values again, so nothing is lost for good.

use crate::events::Events;
use crate::metrics::Metrics;
use actix::prelude::*;
use mes_actors::actor::{Balance, BufferActor, OrderActor, Progress, Sink};
use mes_actors::buffer::{AlertChange, BufferState};
use mes_actors::order::{OrderProgress, OrderStatus, ProgressEvent};
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

pub struct Live {
    arbiter: ArbiterHandle,
    buffers: HashMap<String, Addr<BufferActor>>,
    orders: Mutex<HashMap<String, Addr<OrderActor>>>,
    events: Events,
    metrics: Arc<Metrics>,
}

impl Live {
    /// Starts the actors for `buffers` (id, sku, capacity, on hand) and `orders`
    /// (id, quantity, good, scrap, status), as rebuilt from the database.
    pub fn start(
        buffers: Vec<(String, String, i64, i64)>,
        orders: Vec<(String, i64, i64, i64, OrderStatus)>,
        events: Events,
        metrics: Arc<Metrics>,
    ) -> Arc<Live> {
        let arbiter = Arbiter::new().handle();
        let mut map = HashMap::new();
        for (id, sku, capacity, on_hand) in buffers {
            let state = BufferState::new(id.clone(), sku, capacity, on_hand);
            let sink = buffer_sink(events.clone(), metrics.clone());
            map.insert(id, BufferActor::start_in_arbiter(&arbiter, move |_| BufferActor::new(state, sink)));
        }
        let live = Arc::new(Live { arbiter, buffers: map, orders: Mutex::new(HashMap::new()), events, metrics });
        for (id, quantity, good, scrap, status) in orders {
            live.order_actor(&id, quantity, good, scrap, status);
        }
        live
    }

    fn dropped(&self) {
        self.metrics.live_dropped.fetch_add(1, Relaxed);
    }

    /// A committed buffer balance.
    pub fn balance(&self, buffer: &str, on_hand: i64) {
        if let Some(a) = self.buffers.get(buffer) {
            if a.try_send(Balance(on_hand)).is_err() {
                self.dropped();
            }
        }
    }

    fn order_actor(
        &self,
        id: &str,
        quantity: i64,
        good: i64,
        scrap: i64,
        status: OrderStatus,
    ) -> Option<Addr<OrderActor>> {
        let mut orders = self.orders.lock().ok()?;
        if let Some(a) = orders.get(id).filter(|a| a.connected()) {
            return Some(a.clone());
        }
        if matches!(status, OrderStatus::Closed | OrderStatus::Cancelled) {
            orders.remove(id);
            return None;
        }
        let state = OrderProgress::new(id, quantity.max(0) as u64, good.max(0) as u64, scrap.max(0) as u64, status);
        let sink = order_sink(self.events.clone());
        let addr = OrderActor::start_in_arbiter(&self.arbiter, move |_| OrderActor::new(state, sink));
        orders.insert(id.to_string(), addr.clone());
        Some(addr)
    }

    /// Committed totals and status of an order.
    pub fn order(&self, id: &str, quantity: i64, good: i64, scrap: i64, status: OrderStatus) {
        let known = self.orders.lock().ok().and_then(|o| o.get(id).filter(|a| a.connected()).cloned());
        let addr = match known {
            Some(a) => a,
            None => match self.order_actor(id, quantity, good, scrap, status) {
                Some(a) => a,
                None => return,
            },
        };
        let msg = Progress { good: good.max(0) as u64, scrap: scrap.max(0) as u64, status };
        if addr.try_send(msg).is_err() {
            self.dropped();
        }
        if matches!(status, OrderStatus::Closed | OrderStatus::Cancelled) {
            if let Ok(mut o) = self.orders.lock() {
                o.remove(id);
            }
        }
    }

    /// Open orders followed right now.
    pub fn open_orders(&self) -> usize {
        self.orders.lock().map(|o| o.len()).unwrap_or(0)
    }
}

fn buffer_sink(events: Events, metrics: Arc<Metrics>) -> Sink<AlertChange> {
    Box::new(move |buffer, change| match change {
        AlertChange::Raised(kind, by) => {
            metrics.alerts.fetch_add(1, Relaxed);
            tracing::warn!(buffer, alert = kind.as_str(), by, "buffer alert raised");
            events.publish(
                json!({"type": "alert", "alert": kind.as_str(), "state": "raised", "buffer": buffer, "by": by}),
            );
        }
        AlertChange::Cleared(kind) => {
            tracing::info!(buffer, alert = kind.as_str(), "buffer alert cleared");
            events.publish(json!({"type": "alert", "alert": kind.as_str(), "state": "cleared", "buffer": buffer}));
        }
    })
}

fn order_sink(events: Events) -> Sink<ProgressEvent> {
    Box::new(move |order, ev| match ev {
        ProgressEvent::Milestone(pct) => {
            events.publish(json!({"type": "order_progress", "order": order, "percent": pct}));
        }
        ProgressEvent::Status(from, to) => {
            tracing::info!(order, from = from.as_str(), to = to.as_str(), "order status");
            events.publish(json!({"type": "order_status", "order": order, "from": from.as_str(), "to": to.as_str()}));
        }
    })
}
