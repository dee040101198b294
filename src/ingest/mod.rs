//! Adapters: protocol bytes in, [`mes_actors::Reading`]s (or dead letters) out.
//!
//! After decoding, every protocol takes the same path: the device's work-center actor
//! applies the reading (pure dedupe and deltas), the writer commits the outcome, and only
//! then is the source acknowledged.

pub mod modbus;
pub mod mqtt;
pub mod parse;
pub mod sessions;
pub mod sparkplug;

use crate::db::writer::{Completion, Job, Work};
use crate::metrics::Metrics;
use actix::Addr;
use mes_actors::actor::{WorkCenterActor, WorkCenterCell};
use mes_actors::counter::RawCounters;
use mes_actors::{Outcome, Reading};
use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
use std::sync::Arc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Routes a device's readings to its work center's actor. Work centers come and go while
/// the MES runs (a cluster node takes over or hands back a work center), so the routes sit
/// behind a lock; lookups clone the actor's address and let go at once.
#[derive(Default)]
pub struct Router {
    inner: std::sync::RwLock<Routes>,
}

#[derive(Default)]
struct Routes {
    by_device: HashMap<String, Route>,
    by_wc: HashMap<String, Route>,
}

/// A work center's actor, the state it shares with the ingest path, and the lease token
/// that state was built under (0 on a single node). Every job applied through the route
/// carries the token, and the writer commits it only while the node still holds that
/// lease (fencing, `crate::cluster`).
#[derive(Clone)]
pub struct Route {
    pub work_center: String,
    pub addr: Addr<WorkCenterActor>,
    pub cell: WorkCenterCell,
    pub token: i64,
}

impl Router {
    /// Starts the work center's actor and routes its device to it.
    pub fn insert(&self, wc: &str, device: &str, actor: WorkCenterActor) {
        self.insert_fenced(wc, device, actor, 0);
    }

    pub fn insert_fenced(&self, wc: &str, device: &str, actor: WorkCenterActor, token: i64) {
        let cell = actor.cell();
        let route = Route { work_center: wc.to_string(), addr: actix::Actor::start(actor), cell, token };
        if let Ok(mut r) = self.inner.write() {
            r.by_device.insert(device.to_string(), route.clone());
            r.by_wc.insert(wc.to_string(), route);
        }
    }

    /// Forgets a work center (its actor stops when the last address is dropped).
    pub fn remove(&self, wc: &str) {
        if let Ok(mut r) = self.inner.write() {
            r.by_wc.remove(wc);
            r.by_device.retain(|_, route| route.work_center != wc);
        }
    }

    pub fn route(&self, device: &str) -> Option<Route> {
        self.inner.read().ok().and_then(|r| r.by_device.get(device).cloned())
    }

    /// Whether the device has a work center (no clone of its route).
    pub fn knows(&self, device: &str) -> bool {
        self.inner.read().is_ok_and(|r| r.by_device.contains_key(device))
    }

    pub fn device(&self, device: &str) -> Option<Addr<WorkCenterActor>> {
        self.route(device).map(|r| r.addr)
    }

    pub fn work_center(&self, wc: &str) -> Option<Addr<WorkCenterActor>> {
        self.inner.read().ok().and_then(|r| r.by_wc.get(wc).map(|x| x.addr.clone()))
    }
}

/// One input received but not yet committed; dropping it frees its place.
pub struct InFlight {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics.in_flight.fetch_sub(1, Relaxed);
    }
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InFlight")
    }
}

/// A device time further ahead of the receive time than this is counted as clock skew.
pub const CLOCK_AHEAD_MS: i64 = 3_600_000;
/// A device time further behind than this (a week: devices may replay buffered history).
pub const CLOCK_BEHIND_MS: i64 = 7 * 86_400_000;

/// The protocol-independent half of ingest, shared by every adapter.
#[derive(Clone)]
pub struct Pipeline {
    pub router: Arc<Router>,
    pub writer: mpsc::Sender<Job>,
    pub metrics: Arc<Metrics>,
    /// Bounds the inputs received but not yet committed.
    pub in_flight: Arc<Semaphore>,
    /// How applied jobs reach the writer, in the order their actors applied them.
    handoff: Arc<Handoff>,
}

/// The way from the actors to the writer's queue. A job goes straight into the queue
/// while no job waits to be forwarded; otherwise (the queue was full) it waits in
/// `applied` behind the others, and a task passes them on in order. Either way a device's
/// jobs reach the writer in the order its actor applied them.
struct Handoff {
    writer: mpsc::Sender<Job>,
    /// Unbounded as a channel but bounded in fact: every job holds an [`InFlight`] permit,
    /// so it never holds more than `max_in_flight` jobs.
    applied: mpsc::UnboundedSender<Job>,
    /// Jobs handed to `applied` and not yet in the writer's queue (shared with the task
    /// that forwards them, which holds no sender of `applied`: it stops when the pipeline
    /// is dropped, and the writer with it).
    forwarding: Arc<AtomicUsize>,
}

impl Handoff {
    /// Queues an applied job for the writer, after every job queued before it. Called from
    /// the actor that applied it.
    fn send(&self, job: Job) {
        let job = if self.forwarding.load(Acquire) == 0 {
            match self.writer.try_send(job) {
                Ok(()) => return,
                Err(TrySendError::Full(job) | TrySendError::Closed(job)) => job,
            }
        } else {
            job
        };
        self.forwarding.fetch_add(1, AcqRel);
        if self.applied.send(job).is_err() {
            self.forwarding.fetch_sub(1, AcqRel);
            tracing::error!("ingest pipeline stopped; input left unacknowledged");
        }
    }
}

impl Pipeline {
    /// Must be called inside a Tokio runtime: it starts the task that forwards applied
    /// readings to the writer in apply order.
    pub fn new(router: Arc<Router>, writer: mpsc::Sender<Job>, metrics: Arc<Metrics>, max_in_flight: usize) -> Self {
        let (applied, mut rx) = mpsc::unbounded_channel::<Job>();
        let forwarding = Arc::new(AtomicUsize::new(0));
        let (to_writer, forwarded) = (writer.clone(), forwarding.clone());
        tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                if to_writer.send(job).await.is_err() {
                    tracing::error!("writer stopped; input will be redelivered by its source");
                    return;
                }
                forwarded.fetch_sub(1, AcqRel);
            }
        });
        let handoff = Arc::new(Handoff { writer: writer.clone(), applied, forwarding });
        Self { router, writer, metrics, in_flight: Arc::new(Semaphore::new(max_in_flight)), handoff }
    }

    /// Waits for room for one more input in flight (back-pressure on the source).
    pub async fn admit(&self) -> Option<InFlight> {
        let permit = self.in_flight.clone().acquire_owned().await.ok()?;
        self.metrics.in_flight.fetch_add(1, Relaxed);
        Some(InFlight { _permit: permit, metrics: self.metrics.clone() })
    }

    /// Applies a reading to its work center's state, in the order readings are offered, and
    /// queues the outcome for commit; `done` fires after the commit. Never waits: the
    /// source waited for its place in flight ([`Pipeline::admit`]), which bounds the jobs
    /// queued for the writer. Returns the completion back when the reading could not be
    /// applied (unknown device): the caller decides what that means for its source.
    pub fn submit_reading(
        &self,
        mut reading: Reading,
        received_ms: i64,
        done: Completion,
        slot: InFlight,
        raw: Option<(String, RawCounters)>,
    ) -> Option<Completion> {
        let Some(Route { cell, work_center, token, .. }) = self.router.route(&reading.device) else {
            return Some(done);
        };
        // Work center and order on every event of this reading's way in (the device, boot
        // and seq are on the adapter's span around this one).
        let span = tracing::debug_span!(
            "apply",
            work_center = %work_center,
            order = reading.order.as_deref().unwrap_or("")
        );
        let _entered = span.enter();
        let lease = Some((work_center, token));
        // Stored with the telemetry row and exported after its commit (`src/influx`).
        let device_metrics = std::mem::take(&mut reading.metrics);
        if let Some(ts) = reading.ts_ms {
            // A device clock far from ours: flagged (its counts are still exact; its times
            // drive running time and OEE, so an engineer should look).
            if ts > received_ms + CLOCK_AHEAD_MS || ts < received_ms - CLOCK_BEHIND_MS {
                self.metrics.clock_skew.fetch_add(1, Relaxed);
            }
        }
        // Applied here, under the work center's lock, and the outcome queued for the writer
        // before the lock is let go: a device's jobs must reach the writer in the order they
        // were applied (a commit that moved the device's cursor past a reading whose delta
        // is still waiting would make that reading look stale after a crash, and its units
        // lost), whichever session applies them.
        let metrics = &self.metrics;
        cell.apply_then(&reading, |o| {
            let work = match o {
                Outcome::Duplicate => {
                    metrics.telemetry_duplicates.fetch_add(1, Relaxed);
                    Work::Duplicate
                }
                Outcome::Counted(d) => {
                    metrics.telemetry_counted.fetch_add(1, Relaxed);
                    Work::Counted(d)
                }
                Outcome::Held(h) => {
                    metrics.readings_held.fetch_add(1, Relaxed);
                    tracing::warn!(device = %h.device, reason = %h.reason, "reading held for review");
                    Work::DeadLetter {
                        topic: format!("held/{}", h.device),
                        reason: h.reason,
                        payload: h.payload,
                        redelivered: false,
                    }
                }
            };
            let job = Job { work, received_ms, done, slot: Some(slot), raw, metrics: device_metrics, lease };
            self.handoff.send(job);
        });
        None
    }

    /// Whether a device is known (its readings have a work center).
    pub fn knows(&self, device: &str) -> bool {
        self.router.knows(device)
    }

    /// Queues an invalid input to be kept as a dead letter; `redelivered` inputs already
    /// kept are not kept twice.
    #[allow(clippy::too_many_arguments)]
    pub async fn submit_dead_letter(
        &self,
        topic: String,
        reason: String,
        payload: String,
        redelivered: bool,
        received_ms: i64,
        done: Completion,
        slot: InFlight,
    ) {
        // Kept as text: a NUL (which PostgreSQL refuses in text) becomes U+FFFD, so that no
        // input can make its own dead letter fail to commit.
        let clean = |s: String| if s.contains('\0') { s.replace('\0', "\u{FFFD}") } else { s };
        let (topic, reason, payload) = (clean(topic), clean(reason), clean(payload));
        tracing::warn!(%topic, %reason, "dead letter");
        let work = Work::DeadLetter { topic, reason, payload, redelivered };
        self.queue(Job {
            work,
            received_ms,
            done,
            slot: Some(slot),
            raw: None,
            metrics: Default::default(),
            lease: None,
        })
        .await;
    }

    async fn queue(&self, job: Job) {
        self.metrics.writer_queue.store((self.writer.max_capacity() - self.writer.capacity()) as i64, Relaxed);
        if self.writer.send(job).await.is_err() {
            tracing::error!("writer stopped; input will be redelivered by its source");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::writer::Work;

    fn job(tag: i64) -> Job {
        Job {
            work: Work::Duplicate,
            received_ms: tag,
            done: Completion::None,
            slot: None,
            raw: None,
            metrics: Default::default(),
            lease: None,
        }
    }

    /// A job goes straight into the writer's queue only while nothing waits to be forwarded:
    /// once one had to wait (the queue was full), the next ones queue behind it even when the
    /// writer's queue has room again, so their order is kept.
    #[test]
    fn jobs_queue_behind_those_waiting_to_be_forwarded() {
        let (writer, mut queue) = mpsc::channel::<Job>(1);
        let (applied, mut waiting) = mpsc::unbounded_channel::<Job>();
        let h = Handoff { writer, applied, forwarding: Default::default() };
        h.send(job(1));
        h.send(job(2));
        assert_eq!(h.forwarding.load(Relaxed), 1, "the queue was full: job 2 waits");
        assert_eq!(queue.try_recv().map(|j| j.received_ms).ok(), Some(1));
        h.send(job(3));
        assert!(queue.try_recv().is_err(), "job 3 must not pass job 2");
        assert_eq!(h.forwarding.load(Relaxed), 2);
        let order: Vec<i64> = std::iter::from_fn(|| waiting.try_recv().ok()).map(|j| j.received_ms).collect();
        assert_eq!(order, vec![2, 3]);
        // Once the forwarder has passed both on (what its loop counts after each send), the
        // writer's queue is taken directly again.
        h.forwarding.store(0, Relaxed);
        h.send(job(4));
        assert_eq!(queue.try_recv().map(|j| j.received_ms).ok(), Some(4));
        assert_eq!(h.forwarding.load(Relaxed), 0);
    }
}
