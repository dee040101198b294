//! Read models and the planner's transactional commands.

use super::{opt_i64, DbError, Store};
use mes_actors::{Cursor, OrderCommand, OrderStatus, TransitionError};
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize)]
pub struct WorkCenterRow {
    pub id: String,
    pub name: String,
    pub device_id: String,
    pub device_kind: String,
    pub output_buffer: String,
    pub ideal_cycle_ms: i64,
    pub state: String,
    pub reason: Option<String>,
    pub current_order: Option<String>,
    pub good_total: i64,
    pub scrap_total: i64,
    pub last_seen_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OrderRow {
    pub id: String,
    pub sku: String,
    pub quantity: i64,
    pub work_center: Option<String>,
    pub status: String,
    pub good: i64,
    pub scrap: i64,
    pub due: Option<String>,
    pub priority: i64,
    pub created_ms: i64,
    pub updated_ms: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BufferRow {
    pub id: String,
    pub sku: String,
    pub capacity: i64,
    pub on_hand: i64,
    pub reserved: i64,
    pub available: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterRow {
    pub id: i64,
    pub received_ms: i64,
    pub topic: String,
    pub reason: String,
    pub payload: String,
}

/// A new order as the API validated it.
#[derive(Debug, Clone)]
pub struct NewOrder {
    pub id: String,
    pub sku: String,
    pub quantity: i64,
    pub due: Option<String>,
    pub priority: i64,
    pub work_center: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Transition(#[from] TransitionError),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for CommandError {
    fn from(e: sqlx::Error) -> Self {
        CommandError::Db(DbError::Sqlx(e))
    }
}

const ORDER_COLS: &str = "id, sku, quantity, work_center, status, good, scrap, due, priority, created_ms, updated_ms";
const WC_COLS: &str =
    "id, name, device_id, device_kind, output_buffer, ideal_cycle_ms, state, reason, current_order, good_total, scrap_total, last_seen_ms";

fn order_row(r: &AnyRow) -> Result<OrderRow, sqlx::Error> {
    Ok(OrderRow {
        id: r.try_get("id")?,
        sku: r.try_get("sku")?,
        quantity: r.try_get("quantity")?,
        work_center: r.try_get("work_center")?,
        status: r.try_get("status")?,
        good: r.try_get("good")?,
        scrap: r.try_get("scrap")?,
        due: r.try_get("due")?,
        priority: r.try_get("priority")?,
        created_ms: r.try_get("created_ms")?,
        updated_ms: r.try_get("updated_ms")?,
    })
}

fn wc_row(r: &AnyRow) -> Result<WorkCenterRow, sqlx::Error> {
    Ok(WorkCenterRow {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        device_id: r.try_get("device_id")?,
        device_kind: r.try_get("device_kind")?,
        output_buffer: r.try_get("output_buffer")?,
        ideal_cycle_ms: r.try_get("ideal_cycle_ms")?,
        state: r.try_get("state")?,
        reason: r.try_get("reason")?,
        current_order: r.try_get("current_order")?,
        good_total: r.try_get("good_total")?,
        scrap_total: r.try_get("scrap_total")?,
        last_seen_ms: opt_i64(r, "last_seen_ms")?,
    })
}

impl Store {
    pub async fn work_centers(&self) -> Result<Vec<WorkCenterRow>, DbError> {
        let sql = format!("SELECT {WC_COLS} FROM work_centers ORDER BY id");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(wc_row).collect::<Result<_, _>>()?)
    }

    pub async fn work_center(&self, id: &str) -> Result<Option<WorkCenterRow>, DbError> {
        let sql = format!("SELECT {WC_COLS} FROM work_centers WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&self.pool).await?;
        Ok(row.as_ref().map(wc_row).transpose()?)
    }

    /// Device cursors, to rebuild the work-center actors.
    pub async fn cursors(&self) -> Result<BTreeMap<String, Cursor>, DbError> {
        let rows =
            sqlx::query("SELECT device, boot, seq, good, scrap FROM device_cursors").fetch_all(&self.pool).await?;
        let mut out = BTreeMap::new();
        for r in rows {
            let get = |c: &str| -> Result<u64, sqlx::Error> { Ok(r.try_get::<i64, _>(c)?.max(0) as u64) };
            out.insert(
                r.try_get::<String, _>("device")?,
                Cursor { boot: get("boot")?, seq: get("seq")?, good: get("good")?, scrap: get("scrap")? },
            );
        }
        Ok(out)
    }

    pub async fn orders(&self, status: Option<&str>, limit: i64) -> Result<Vec<OrderRow>, DbError> {
        let rows = match status {
            Some(s) => {
                let sql = format!("SELECT {ORDER_COLS} FROM orders WHERE status = $1 ORDER BY created_ms, id LIMIT $2");
                sqlx::query(sqlx::AssertSqlSafe(sql)).bind(s).bind(limit).fetch_all(&self.pool).await?
            }
            None => {
                let sql = format!("SELECT {ORDER_COLS} FROM orders ORDER BY created_ms, id LIMIT $1");
                sqlx::query(sqlx::AssertSqlSafe(sql)).bind(limit).fetch_all(&self.pool).await?
            }
        };
        Ok(rows.iter().map(order_row).collect::<Result<_, _>>()?)
    }

    pub async fn order(&self, id: &str) -> Result<Option<OrderRow>, DbError> {
        let sql = format!("SELECT {ORDER_COLS} FROM orders WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&self.pool).await?;
        Ok(row.as_ref().map(order_row).transpose()?)
    }

    /// Material consumed by an order: BOM × (good + scrap) per component.
    pub async fn order_consumption(&self, order: &OrderRow) -> Result<BTreeMap<String, i64>, DbError> {
        let rows = sqlx::query("SELECT component, quantity FROM bom_lines WHERE sku = $1 ORDER BY component")
            .bind(&order.sku)
            .fetch_all(&self.pool)
            .await?;
        let mut out = BTreeMap::new();
        for r in rows {
            let q: i64 = r.try_get("quantity")?;
            out.insert(r.try_get("component")?, q * (order.good + order.scrap));
        }
        Ok(out)
    }

    pub async fn sku_exists(&self, sku: &str) -> Result<bool, DbError> {
        let r = sqlx::query("SELECT sku FROM materials WHERE sku = $1").bind(sku).fetch_optional(&self.pool).await?;
        Ok(r.is_some())
    }

    /// A stored response for an idempotency key, if the key was used before.
    pub async fn idempotent_response(&self, key: &str) -> Result<Option<(String, i64, String)>, DbError> {
        let r = sqlx::query("SELECT scope, status, body FROM idempotency WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match r {
            Some(r) => Some((r.try_get("scope")?, r.try_get("status")?, r.try_get("body")?)),
            None => None,
        })
    }

    /// Creates an order (and records the idempotency key) in one transaction.
    /// Returns `Ok(None)` when the id exists already.
    pub async fn create_order(
        &self,
        o: &NewOrder,
        idem: Option<(&str, &str)>,
        body: impl Fn(&OrderRow) -> String,
    ) -> Result<Option<OrderRow>, DbError> {
        let now = crate::now_ms();
        let mut tx = self.pool.begin().await?;
        let res = sqlx::query(
            "INSERT INTO orders (id, sku, quantity, work_center, status, due, priority, created_ms, updated_ms)
             VALUES ($1, $2, $3, $4, 'planned', $5, $6, $7, $7) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&o.id)
        .bind(&o.sku)
        .bind(o.quantity)
        .bind(o.work_center.as_deref())
        .bind(o.due.as_deref())
        .bind(o.priority)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if res.rows_affected() == 0 {
            return Ok(None);
        }
        let row = OrderRow {
            id: o.id.clone(),
            sku: o.sku.clone(),
            quantity: o.quantity,
            work_center: o.work_center.clone(),
            status: "planned".into(),
            good: 0,
            scrap: 0,
            due: o.due.clone(),
            priority: o.priority,
            created_ms: now,
            updated_ms: now,
        };
        if let Some((key, scope)) = idem {
            sqlx::query("INSERT INTO idempotency (key, scope, status, body, created_ms) VALUES ($1, $2, 201, $3, $4)")
                .bind(key)
                .bind(scope)
                .bind(body(&row))
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(Some(row))
    }

    /// Applies a planner command with a conditional update: the database decides races.
    /// Releasing an order for a work center that has no open current order makes it current.
    pub async fn order_command(&self, id: &str, cmd: OrderCommand) -> Result<(OrderRow, bool), CommandError> {
        for _ in 0..5 {
            let Some(order) = self.order(id).await? else {
                return Err(CommandError::NotFound(format!("order `{id}` does not exist")));
            };
            let from: OrderStatus = order.status.parse().map_err(|e: String| CommandError::Conflict(e))?;
            let to = from.apply(cmd)?;
            let now = crate::now_ms();
            let mut tx = self.pool.begin().await?;
            let res = sqlx::query("UPDATE orders SET status = $1, updated_ms = $2 WHERE id = $3 AND status = $4")
                .bind(to.as_str())
                .bind(now)
                .bind(id)
                .bind(from.as_str())
                .execute(&mut *tx)
                .await?;
            if res.rows_affected() == 0 {
                continue; // raced with another change: look again
            }
            let mut made_current = false;
            if let (OrderCommand::Release, Some(wc)) = (cmd, order.work_center.as_deref()) {
                let r = sqlx::query(
                    "UPDATE work_centers SET current_order = $1 WHERE id = $2 AND (current_order IS NULL OR current_order NOT IN
                       (SELECT id FROM orders WHERE status IN ('released', 'running')))",
                )
                .bind(id)
                .bind(wc)
                .execute(&mut *tx)
                .await?;
                made_current = r.rows_affected() > 0;
            }
            tx.commit().await?;
            let order =
                self.order(id).await?.ok_or_else(|| CommandError::NotFound(format!("order `{id}` vanished")))?;
            return Ok((order, made_current));
        }
        Err(CommandError::Conflict(format!("order `{id}` is changing too fast; try again")))
    }

    pub async fn buffers(&self) -> Result<Vec<BufferRow>, DbError> {
        let rows = sqlx::query("SELECT id, sku, capacity, on_hand, reserved FROM buffers ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let on_hand: i64 = r.try_get("on_hand")?;
            let reserved: i64 = r.try_get("reserved")?;
            out.push(BufferRow {
                id: r.try_get("id")?,
                sku: r.try_get("sku")?,
                capacity: r.try_get("capacity")?,
                on_hand,
                reserved,
                available: on_hand - reserved,
            });
        }
        Ok(out)
    }

    pub async fn dead_letters(&self, limit: i64) -> Result<Vec<DeadLetterRow>, DbError> {
        let rows =
            sqlx::query("SELECT id, received_ms, topic, reason, payload FROM dead_letters ORDER BY id DESC LIMIT $1")
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(DeadLetterRow {
                id: r.try_get("id")?,
                received_ms: r.try_get("received_ms")?,
                topic: r.try_get("topic")?,
                reason: r.try_get("reason")?,
                payload: r.try_get("payload")?,
            });
        }
        Ok(out)
    }

    pub async fn audit(&self, actor: &str, action: &str, target: &str, detail: &str) -> Result<(), DbError> {
        sqlx::query("INSERT INTO audit (ts_ms, actor, action, target, detail) VALUES ($1, $2, $3, $4, $5)")
            .bind(crate::now_ms())
            .bind(actor)
            .bind(action)
            .bind(target)
            .bind(detail)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
