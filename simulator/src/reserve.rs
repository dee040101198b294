//! Promo demand at the MES: each sales order the model places becomes a reservation of
//! finished goods (`POST /api/v1/reservations`, CONTRACT §6), made over HTTP the way a
//! planner or a web shop would. Requests go out one at a time from a task of their own, in
//! the order placed, so a slow MES never holds up the line (beyond a bounded queue).

use crate::model::SalesOrder;
use crate::truth::MesDemandTruth;
use std::time::Duration;
use tokio::sync::mpsc;

/// Sales orders waiting to be sent; beyond that the simulation waits.
const QUEUE: usize = 256;
/// Longest wait for one answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Failed requests reported one by one on stderr; the rest are only counted.
const REPORTED_FAILURES: u64 = 5;

pub struct Reserver {
    tx: mpsc::Sender<SalesOrder>,
    task: tokio::task::JoinHandle<MesDemandTruth>,
}

impl Reserver {
    /// Sends reservations to the MES at `base` (e.g. `http://127.0.0.1:8080`), with a
    /// bearer `token` if given; reservation refs are `{refs}-{n}`.
    pub fn start(base: &str, token: Option<String>, refs: String) -> anyhow::Result<Reserver> {
        let client = reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build()?;
        let url = format!("{}/api/v1/reservations", base.trim_end_matches('/'));
        let (tx, mut rx) = mpsc::channel::<SalesOrder>(QUEUE);
        let task = tokio::spawn(async move {
            let mut t = MesDemandTruth::default();
            while let Some(o) = rx.recv().await {
                let body = serde_json::json!({"sku": o.sku, "quantity": o.quantity, "ref": format!("{refs}-{}", o.n)});
                let mut req = client.post(&url).json(&body);
                if let Some(token) = &token {
                    req = req.bearer_auth(token);
                }
                let failure = match req.send().await {
                    Ok(r) if r.status().as_u16() == 201 => {
                        t.granted_requests += 1;
                        t.granted += o.quantity;
                        None
                    }
                    Ok(r) if r.status().as_u16() == 409 => {
                        t.refused_requests += 1;
                        None
                    }
                    Ok(r) => {
                        let status = r.status();
                        let text = r.text().await.unwrap_or_default();
                        Some(format!("{status}: {}", text.chars().take(200).collect::<String>()))
                    }
                    Err(e) => Some(e.to_string()),
                };
                if let Some(why) = failure {
                    t.failed_requests += 1;
                    if t.failed_requests <= REPORTED_FAILURES {
                        eprintln!("[line-sim] warning: reservation {} of {} {} failed: {why}", o.n, o.quantity, o.sku);
                    }
                }
            }
            t
        });
        Ok(Reserver { tx, task })
    }

    /// Queues a sales order (waits while the queue is full).
    pub async fn send(&self, order: SalesOrder) {
        if self.tx.send(order).await.is_err() {
            eprintln!("[line-sim] warning: the reservation task stopped");
        }
    }

    /// Waits (at most `limit`) until every queued reservation was answered; the MES's
    /// answers.
    pub async fn finish(self, limit: Duration) -> MesDemandTruth {
        drop(self.tx);
        match tokio::time::timeout(limit, self.task).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                eprintln!("[line-sim] warning: the reservation task failed: {e}");
                MesDemandTruth::default()
            }
            Err(_) => {
                eprintln!("[line-sim] warning: reservations still unanswered after {limit:?}");
                MesDemandTruth::default()
            }
        }
    }
}
