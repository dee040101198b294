//! The ERP outbox: settlement documents written in the same transaction as what they
//! report, delivered later by the sender with their id as `Idempotency-Key`.
//!
//! Documents are shaped after ISA-95 / B2MML `ProductionPerformance`: the order, the
//! material produced and consumed, and the cost so far.

use super::DbError;
use sqlx::{Any, Row, Transaction};

/// Enqueues a document about `order` (reads the order's committed state inside `tx`).
/// `kind` names the event and is part of the document id: `completion`, `close`,
/// `progress-3000`.
pub async fn enqueue(tx: &mut sqlx::AnyConnection, kind: &str, order: &str, now: i64) -> Result<(), DbError> {
    let doc_kind = kind.split('-').next().unwrap_or(kind);
    let Some(o) = sqlx::query("SELECT id, sku, quantity, work_center, status, good, scrap FROM orders WHERE id = $1")
        .bind(order)
        .fetch_optional(&mut *tx)
        .await?
    else {
        return Ok(());
    };
    let sku: String = o.try_get("sku")?;
    let good: i64 = o.try_get("good")?;
    let scrap: i64 = o.try_get("scrap")?;
    let consumed = sqlx::query("SELECT component, quantity FROM bom_lines WHERE sku = $1 ORDER BY component")
        .bind(&sku)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| {
            let c: String = r.try_get("component")?;
            let q: i64 = r.try_get("quantity")?;
            Ok(serde_json::json!({"MaterialDefinitionID": c, "Quantity": {"QuantityString": (q * (good + scrap)).to_string(), "UnitOfMeasure": "ea"}}))
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let cost = sqlx::query("SELECT material, conversion FROM order_costs WHERE order_id = $1")
        .bind(order)
        .fetch_optional(&mut *tx)
        .await?;
    let (material, conversion) = match cost {
        Some(r) => (r.try_get::<i64, _>("material")?, r.try_get::<i64, _>("conversion")?),
        None => (0, 0),
    };
    // Ids are deterministic (`PO-1-completion`, `PO-1-progress-3000`), so a replay or a
    // different batching can never create a second document for the same event.
    let doc_id = format!("{order}-{kind}");
    let payload = serde_json::json!({
        "ProductionPerformance": {
            "ID": doc_id,
            "Kind": doc_kind,
            "PublishedDate": crate::http::rfc3339(now),
            "ProductionResponse": {
                "ProductionRequestID": order,
                "Status": o.try_get::<String, _>("status")?,
                "SegmentResponse": {
                    "ProcessSegmentID": o.try_get::<Option<String>, _>("work_center")?,
                    "MaterialProducedActual": [
                        {"MaterialDefinitionID": sku, "Quantity": {"QuantityString": good.to_string(), "UnitOfMeasure": "ea"}},
                    ],
                    "MaterialScrapActual": {"MaterialDefinitionID": sku, "Quantity": {"QuantityString": scrap.to_string(), "UnitOfMeasure": "ea"}},
                    "MaterialConsumedActual": consumed,
                },
                "Cost": {
                    "Material": mes_actors::Money(material).to_string(),
                    "Conversion": mes_actors::Money(conversion).to_string(),
                },
            },
        }
    });
    insert(tx, &doc_id, doc_kind, Some(order), &payload, now).await
}

async fn insert(
    tx: &mut sqlx::AnyConnection,
    doc_id: &str,
    kind: &str,
    order: Option<&str>,
    payload: &serde_json::Value,
    now: i64,
) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO outbox (doc_id, kind, order_id, payload, created_ms) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (doc_id) DO NOTHING",
    )
    .bind(doc_id)
    .bind(kind)
    .bind(order)
    .bind(payload.to_string())
    .bind(now)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Enqueues the goods-issue document of a shipped reservation.
pub async fn enqueue_goods_issue(
    tx: &mut Transaction<'_, Any>,
    reservation: &str,
    reference: &str,
    sku: &str,
    quantity: i64,
    value: i64,
    now: i64,
) -> Result<(), DbError> {
    let doc_id = format!("GI-{reservation}");
    let payload = serde_json::json!({
        "MaterialActual": {
            "ID": doc_id,
            "Kind": "goods_issue",
            "PublishedDate": crate::http::rfc3339(now),
            "SalesOrderReference": reference,
            "MaterialDefinitionID": sku,
            "Quantity": {"QuantityString": quantity.to_string(), "UnitOfMeasure": "ea"},
            "Cost": mes_actors::Money(value).to_string(),
        }
    });
    insert(tx, &doc_id, "goods_issue", None, &payload, now).await
}
