//! The ERP sender: delivers outbox documents to `[erp] webhook_url`.
//!
//! Oldest first, one order's documents in order (a failing document holds back the later
//! documents of its order, not other orders'), each POST under a timeout with the
//! document id as `Idempotency-Key`, retried with capped exponential backoff. Nothing is
//! dropped; ingest never waits on the ERP.

use crate::db::queries::outbox_row;
use crate::db::Store;
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::sync::watch;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(200);
const BACKOFF_MIN_MS: i64 = 250;
const BACKOFF_MAX_MS: i64 = 60_000;
/// Most documents looked at per pass.
const PASS_LIMIT: i64 = 100;

/// Backoff before attempt `attempts + 1`.
pub fn backoff_ms(attempts: i64) -> i64 {
    let shift = attempts.clamp(0, 20) as u32;
    (BACKOFF_MIN_MS.saturating_mul(1i64 << shift)).min(BACKOFF_MAX_MS)
}

pub async fn run(store: Store, url: String, mut shutdown: watch::Receiver<bool>) {
    let client = match reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "ERP sender cannot start");
            return;
        }
    };
    loop {
        if let Err(e) = pass(&store, &client, &url).await {
            tracing::warn!(error = %e, "ERP sender pass failed");
        }
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

async fn pass(store: &Store, client: &reqwest::Client, url: &str) -> Result<(), crate::db::DbError> {
    let rows = sqlx::query(
        "SELECT id, doc_id, kind, order_id, payload, status, attempts, last_error, next_attempt_ms FROM outbox
         WHERE status <> 'sent' ORDER BY id LIMIT $1",
    )
    .bind(PASS_LIMIT)
    .fetch_all(&store.pool)
    .await?;
    let now = crate::now_ms();
    let mut held: BTreeSet<String> = BTreeSet::new();
    for r in &rows {
        let doc = outbox_row(r)?;
        let order = doc.order_id.clone().unwrap_or_default();
        if held.contains(&order) {
            continue;
        }
        if doc.next_attempt_ms > now {
            held.insert(order);
            continue;
        }
        let result = client
            .post(url)
            .header("Idempotency-Key", &doc.id)
            .header("content-type", "application/json")
            .body(doc.payload.clone())
            .send()
            .await;
        let error = match result {
            Ok(resp) if resp.status().is_success() => None,
            Ok(resp) => Some(format!("HTTP {}", resp.status().as_u16())),
            Err(e) if e.is_timeout() => Some("timed out".to_string()),
            Err(e) => Some(format!("request failed: {e}")),
        };
        match error {
            None => {
                sqlx::query(
                    "UPDATE outbox SET status = 'sent', attempts = attempts + 1, last_error = NULL WHERE id = $1",
                )
                .bind(doc.seq)
                .execute(&store.pool)
                .await?;
                tracing::info!(doc = %doc.id, kind = %doc.kind, order = %order, "ERP document delivered");
            }
            Some(err) => {
                let next = crate::now_ms() + backoff_ms(doc.attempts);
                sqlx::query(
                    "UPDATE outbox SET status = 'failing', attempts = attempts + 1, last_error = $1, next_attempt_ms = $2 WHERE id = $3",
                )
                .bind(&err)
                .bind(next)
                .bind(doc.seq)
                .execute(&store.pool)
                .await?;
                tracing::warn!(doc = %doc.id, error = %err, attempts = doc.attempts + 1, "ERP delivery failed; will retry");
                held.insert(order);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::backoff_ms;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff_ms(0), 250);
        assert_eq!(backoff_ms(1), 500);
        assert_eq!(backoff_ms(4), 4_000);
        assert_eq!(backoff_ms(30), 60_000);
    }
}
