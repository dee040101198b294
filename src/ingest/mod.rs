//! Adapters: protocol bytes in, [`mes_actors::Reading`]s (or dead letters) out.
//!
//! After decoding, every protocol takes the same path: the device's work-center actor
//! applies the reading (pure dedupe and deltas), the writer commits the outcome, and only
//! then is the source acknowledged.

pub mod mqtt;
pub mod parse;

use crate::db::writer::{Completion, Job, Work};
use crate::metrics::Metrics;
use actix::Addr;
use mes_actors::actor::{Apply, WorkCenterActor};
use mes_actors::{Outcome, Reading};
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Routes a device's readings to its work center's actor.
#[derive(Clone, Default)]
pub struct Router {
    by_device: HashMap<String, Addr<WorkCenterActor>>,
    by_wc: HashMap<String, Addr<WorkCenterActor>>,
}

impl Router {
    pub fn insert(&mut self, wc: &str, device: &str, addr: Addr<WorkCenterActor>) {
        self.by_device.insert(device.to_string(), addr.clone());
        self.by_wc.insert(wc.to_string(), addr);
    }

    pub fn device(&self, device: &str) -> Option<&Addr<WorkCenterActor>> {
        self.by_device.get(device)
    }

    pub fn work_center(&self, wc: &str) -> Option<&Addr<WorkCenterActor>> {
        self.by_wc.get(wc)
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

/// The protocol-independent half of ingest, shared by every adapter.
#[derive(Clone)]
pub struct Pipeline {
    pub router: Arc<Router>,
    pub writer: mpsc::Sender<Job>,
    pub metrics: Arc<Metrics>,
    /// Bounds the inputs received but not yet committed.
    pub in_flight: Arc<Semaphore>,
}

impl Pipeline {
    pub fn new(
        router: Arc<Router>,
        writer: mpsc::Sender<Job>,
        metrics: Arc<Metrics>,
        max_in_flight: usize,
    ) -> Self {
        Self {
            router,
            writer,
            metrics,
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
        }
    }

    /// Waits for room for one more input in flight (back-pressure on the source).
    pub async fn admit(&self) -> Option<InFlight> {
        let permit = self.in_flight.clone().acquire_owned().await.ok()?;
        self.metrics.in_flight.fetch_add(1, Relaxed);
        Some(InFlight {
            _permit: permit,
            metrics: self.metrics.clone(),
        })
    }

    /// Applies a reading through its work center and queues the outcome for commit.
    /// Returns once the job is queued; `done` fires after its commit.
    pub async fn submit_reading(
        &self,
        reading: Reading,
        topic: &str,
        received_ms: i64,
        done: Completion,
        slot: InFlight,
    ) {
        let Some(addr) = self.router.device(&reading.device).cloned() else {
            let reason = format!("unknown device `{}`", reading.device);
            let payload = format!("{reading:?}");
            self.submit_dead_letter(topic.to_string(), reason, payload, received_ms, done, slot)
                .await;
            return;
        };
        let device = reading.device.clone();
        let outcome = match addr.send(Apply(reading)).await {
            Ok(o) => o,
            Err(e) => {
                // Not acknowledged: the source redelivers it (and dedupe makes that safe).
                tracing::error!(%device, error = %e, "work center actor unavailable; input left unacknowledged");
                return;
            }
        };
        let work = match outcome {
            Outcome::Duplicate => {
                self.metrics.telemetry_duplicates.fetch_add(1, Relaxed);
                Work::Duplicate
            }
            Outcome::Counted(d) => {
                self.metrics.telemetry_counted.fetch_add(1, Relaxed);
                Work::Counted(d)
            }
        };
        self.queue(Job {
            work,
            received_ms,
            done,
            slot: Some(slot),
        })
        .await;
    }

    pub async fn submit_dead_letter(
        &self,
        topic: String,
        reason: String,
        payload: String,
        received_ms: i64,
        done: Completion,
        slot: InFlight,
    ) {
        self.metrics.dead_letters.fetch_add(1, Relaxed);
        tracing::warn!(%topic, %reason, "dead letter");
        let job = Job {
            work: Work::DeadLetter {
                topic,
                reason,
                payload,
            },
            received_ms,
            done,
            slot: Some(slot),
        };
        self.queue(job).await;
    }

    async fn queue(&self, job: Job) {
        self.metrics.writer_queue.store(
            (self.writer.max_capacity() - self.writer.capacity()) as i64,
            Relaxed,
        );
        if self.writer.send(job).await.is_err() {
            tracing::error!("writer stopped; input will be redelivered by its source");
        }
    }
}
