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

pub(crate) const ORDER_COLS: &str =
    "id, sku, quantity, work_center, status, good, scrap, due, priority, created_ms, updated_ms";

const WC_COLS: &str =
    "id, name, device_id, device_kind, output_buffer, ideal_cycle_ms, state, reason, current_order, good_total, scrap_total, last_seen_ms";

pub(crate) fn order_row(r: &AnyRow) -> Result<OrderRow, sqlx::Error> {
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

/// A device's committed cursor and where counting of its previous boot stopped (the work
/// center's `prev_boot`), as `device_cursors` holds them.
pub type StoredCursor = (Cursor, Option<Cursor>);

/// The columns [`stored_cursor`] reads.
pub const CURSOR_COLS: &str = "boot, seq, good, scrap, prev_boot, prev_seq, prev_good, prev_scrap";

/// One `device_cursors` row's [`CURSOR_COLS`].
pub fn stored_cursor(r: &AnyRow) -> Result<StoredCursor, sqlx::Error> {
    let get = |c: &str| -> Result<u64, sqlx::Error> { Ok(r.try_get::<i64, _>(c)?.max(0) as u64) };
    let cursor = Cursor { boot: get("boot")?, seq: get("seq")?, good: get("good")?, scrap: get("scrap")? };
    let prev =
        |c: &str| -> Result<Option<u64>, sqlx::Error> { Ok(r.try_get::<Option<i64>, _>(c)?.map(|v| v.max(0) as u64)) };
    let prev_boot = match (prev("prev_boot")?, prev("prev_seq")?, prev("prev_good")?, prev("prev_scrap")?) {
        (Some(boot), Some(seq), Some(good), Some(scrap)) => Some(Cursor { boot, seq, good, scrap }),
        _ => None,
    };
    Ok((cursor, prev_boot))
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
    pub async fn cursors(&self) -> Result<BTreeMap<String, StoredCursor>, DbError> {
        let sql = format!("SELECT device, {CURSOR_COLS} FROM device_cursors");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&self.pool).await?;
        let mut out = BTreeMap::new();
        for r in rows {
            out.insert(r.try_get::<String, _>("device")?, stored_cursor(&r)?);
        }
        Ok(out)
    }

    /// Device time of the newest reading that moved the device's cursor and carried one:
    /// the actor's `last_ts_ms`, so running time (and the conversion priced from it) between
    /// the last reading before a restart and the first after it is counted as without the
    /// restart.
    pub async fn last_ts_of(&self, device: &str) -> Result<Option<i64>, DbError> {
        // Moved with the device's cursor by the writer (migration 0016).
        let r = sqlx::query("SELECT last_ts_ms FROM device_cursors WHERE device = $1")
            .bind(device)
            .fetch_optional(&self.pool)
            .await?;
        Ok(r.map(|r| r.try_get::<Option<i64>, _>("last_ts_ms")).transpose()?.flatten())
    }

    /// The last raw counter registers per Modbus device (the restart baseline).
    pub async fn modbus_raw(&self) -> Result<BTreeMap<String, mes_actors::counter::RawCounters>, DbError> {
        let rows = sqlx::query("SELECT device, good, scrap, boot FROM modbus_raw").fetch_all(&self.pool).await?;
        let mut out = BTreeMap::new();
        for r in rows {
            let boot: Option<i64> = r.try_get("boot")?;
            out.insert(
                r.try_get::<String, _>("device")?,
                mes_actors::counter::RawCounters {
                    good: r.try_get::<i64, _>("good")?.max(0) as u64,
                    scrap: r.try_get::<i64, _>("scrap")?.max(0) as u64,
                    boot: boot.map(|b| b.max(0) as u64),
                },
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
    /// Closing settles the order: what is left in its WIP becomes variances (same transaction),
    /// and a close document goes to the ERP outbox. Returns the order after the command,
    /// whether it became current, and the status the update moved it from.
    pub async fn order_command(
        &self,
        id: &str,
        cmd: OrderCommand,
        ledger: &crate::settlement::Ledger,
    ) -> Result<(OrderRow, bool, OrderStatus), CommandError> {
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
            if cmd == OrderCommand::Close {
                if let Some(spec) = ledger.for_order(order.work_center.as_deref(), &order.sku) {
                    let r = sqlx::query("SELECT material, conversion FROM order_costs WHERE order_id = $1")
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await?;
                    let (material, conversion) = match r {
                        Some(r) => (r.try_get::<i64, _>("material")?, r.try_get::<i64, _>("conversion")?),
                        None => (0, 0),
                    };
                    let cost = mes_actors::ledger::order_cost(spec, order.good, order.scrap, material, conversion);
                    for p in mes_actors::ledger::close_postings(&cost) {
                        sqlx::query(
                            "INSERT INTO journal (ts_ms, kind, debit, credit, amount, order_id, source_kind, source_id)
                             VALUES ($1, $2, $3, $4, $5, $6, 'order_close', $6)",
                        )
                        .bind(now)
                        .bind(p.kind)
                        .bind(p.debit.code())
                        .bind(p.credit.code())
                        .bind(p.amount)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                    }
                }
                super::outbox::enqueue(&mut tx, "close", id, now).await?;
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
            return Ok((order, made_current, from));
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

#[derive(Debug, Clone, Serialize)]
pub struct JournalRow {
    pub id: i64,
    pub ts_ms: i64,
    pub kind: String,
    pub debit: String,
    pub credit: String,
    pub amount: i64,
    pub order_id: Option<String>,
    pub source_kind: String,
    pub source_id: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReservationRow {
    pub id: String,
    pub reference: String,
    pub sku: String,
    pub buffer: String,
    pub quantity: i64,
    pub status: String,
    pub created_ms: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OutboxRow {
    pub seq: i64,
    pub id: String,
    pub kind: String,
    pub order_id: Option<String>,
    pub payload: String,
    pub status: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub next_attempt_ms: i64,
}

/// Why a reservation could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    #[error("only {available} of `{sku}` available, {requested} requested")]
    Insufficient { sku: String, available: i64, requested: i64 },
    #[error("sku `{0}` has no buffer")]
    UnknownSku(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for ReserveError {
    fn from(e: sqlx::Error) -> Self {
        ReserveError::Db(DbError::Sqlx(e))
    }
}

fn reservation_row(r: &AnyRow) -> Result<ReservationRow, sqlx::Error> {
    Ok(ReservationRow {
        id: r.try_get("id")?,
        reference: r.try_get("ref")?,
        sku: r.try_get("sku")?,
        buffer: r.try_get("buffer")?,
        quantity: r.try_get("quantity")?,
        status: r.try_get("status")?,
        created_ms: r.try_get("created_ms")?,
    })
}

const RES_COLS: &str = "id, ref, sku, buffer, quantity, status, created_ms";

impl Store {
    pub async fn journal(&self, order: Option<&str>, limit: i64) -> Result<Vec<JournalRow>, DbError> {
        const COLS: &str = "id, ts_ms, kind, debit, credit, amount, order_id, source_kind, source_id";
        let rows = match order {
            Some(o) => {
                let sql = format!("SELECT {COLS} FROM journal WHERE order_id = $1 ORDER BY id LIMIT $2");
                sqlx::query(sqlx::AssertSqlSafe(sql)).bind(o).bind(limit).fetch_all(&self.pool).await?
            }
            None => {
                let sql = format!("SELECT {COLS} FROM journal ORDER BY id LIMIT $1");
                sqlx::query(sqlx::AssertSqlSafe(sql)).bind(limit).fetch_all(&self.pool).await?
            }
        };
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(JournalRow {
                id: r.try_get("id")?,
                ts_ms: r.try_get("ts_ms")?,
                kind: r.try_get("kind")?,
                debit: r.try_get("debit")?,
                credit: r.try_get("credit")?,
                amount: r.try_get("amount")?,
                order_id: r.try_get("order_id")?,
                source_kind: r.try_get("source_kind")?,
                source_id: r.try_get("source_id")?,
            });
        }
        Ok(out)
    }

    /// Per account: (code, name, total debits, total credits): the running totals the
    /// database keeps with every journal line (migration 0011), so the cost does not grow
    /// with the journal. [`Store::trial_balance_from_journal`] sums the lines themselves.
    pub async fn trial_balance(&self) -> Result<Vec<(String, String, i64, i64)>, DbError> {
        self.accounts_query(
            "SELECT code, name, debit_total AS debit, credit_total AS credit FROM accounts ORDER BY code",
        )
        .await
    }

    /// The trial balance summed from every journal line (a full scan): the check of the
    /// running totals, for tests and audits.
    pub async fn trial_balance_from_journal(&self) -> Result<Vec<(String, String, i64, i64)>, DbError> {
        self.accounts_query(
            "SELECT a.code AS code, a.name AS name,
               CAST(COALESCE((SELECT SUM(amount) FROM journal j WHERE j.debit = a.code), 0) AS BIGINT) AS debit,
               CAST(COALESCE((SELECT SUM(amount) FROM journal j WHERE j.credit = a.code), 0) AS BIGINT) AS credit
             FROM accounts a ORDER BY a.code",
        )
        .await
    }

    async fn accounts_query(&self, sql: &'static str) -> Result<Vec<(String, String, i64, i64)>, DbError> {
        let rows = sqlx::query(sql).fetch_all(&self.pool).await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push((r.try_get("code")?, r.try_get("name")?, r.try_get("debit")?, r.try_get("credit")?));
        }
        Ok(out)
    }

    /// (material, conversion, running_ms) put into an order so far.
    pub async fn order_cost_totals(&self, order: &str) -> Result<(i64, i64, i64), DbError> {
        let r = sqlx::query("SELECT material, conversion, running_ms FROM order_costs WHERE order_id = $1")
            .bind(order)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match r {
            Some(r) => (r.try_get("material")?, r.try_get("conversion")?, r.try_get("running_ms")?),
            None => (0, 0, 0),
        })
    }

    pub async fn reservation(&self, id: &str) -> Result<Option<ReservationRow>, DbError> {
        let sql = format!("SELECT {RES_COLS} FROM reservations WHERE id = $1");
        let r = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&self.pool).await?;
        Ok(r.as_ref().map(reservation_row).transpose()?)
    }

    async fn reservation_by_ref(&self, reference: &str) -> Result<Option<ReservationRow>, DbError> {
        let sql = format!("SELECT {RES_COLS} FROM reservations WHERE ref = $1");
        let r = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(reference).fetch_optional(&self.pool).await?;
        Ok(r.as_ref().map(reservation_row).transpose()?)
    }

    /// Promises `quantity` of `sku`. The conditional UPDATE is the no-oversell rule: it
    /// succeeds only while `on_hand - reserved` covers the request, inside the same
    /// transaction as the reservation row. A repeated `ref` returns the first reservation.
    /// Returns the reservation and whether it was created now.
    pub async fn reserve(
        &self,
        sku: &str,
        quantity: i64,
        reference: &str,
    ) -> Result<(ReservationRow, bool), ReserveError> {
        if let Some(r) = self.reservation_by_ref(reference).await? {
            return Ok((r, false));
        }
        let buffers = sqlx::query(
            "SELECT id, on_hand - reserved AS available FROM buffers WHERE sku = $1 ORDER BY available DESC, id",
        )
        .bind(sku)
        .fetch_all(&self.pool)
        .await?;
        if buffers.is_empty() {
            return Err(ReserveError::UnknownSku(sku.to_string()));
        }
        let now = crate::now_ms();
        for b in &buffers {
            let buffer: String = b.try_get("id")?;
            let id = format!("R-{}", reference_id(reference, now));
            let mut tx = self.pool.begin().await?;
            let ins = sqlx::query(
                "INSERT INTO reservations (id, ref, sku, buffer, quantity, status, created_ms, updated_ms)
                 VALUES ($1, $2, $3, $4, $5, 'open', $6, $6) ON CONFLICT (ref) DO NOTHING",
            )
            .bind(&id)
            .bind(reference)
            .bind(sku)
            .bind(&buffer)
            .bind(quantity)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if ins.rows_affected() == 0 {
                drop(tx);
                let r = self
                    .reservation_by_ref(reference)
                    .await?
                    .ok_or_else(|| ReserveError::Conflict("reservation vanished".into()))?;
                return Ok((r, false));
            }
            let upd =
                sqlx::query("UPDATE buffers SET reserved = reserved + $1 WHERE id = $2 AND on_hand - reserved >= $1")
                    .bind(quantity)
                    .bind(&buffer)
                    .execute(&mut *tx)
                    .await?;
            if upd.rows_affected() == 1 {
                sqlx::query(
                    "INSERT INTO stock_movements (ts_ms, buffer, sku, qty, kind, order_id, source_kind, source_id)
                     VALUES ($1, $2, $3, 0, 'reservation', NULL, 'reservation', $4)",
                )
                .bind(now)
                .bind(&buffer)
                .bind(sku)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                let r = self
                    .reservation(&id)
                    .await?
                    .ok_or_else(|| ReserveError::Conflict("reservation vanished".into()))?;
                return Ok((r, true));
            }
            // This buffer is short: roll back and try the next one.
        }
        let available = self.available(sku).await?;
        Err(ReserveError::Insufficient { sku: sku.to_string(), available, requested: quantity })
    }

    pub async fn available(&self, sku: &str) -> Result<i64, DbError> {
        let r =
            sqlx::query("SELECT CAST(COALESCE(SUM(on_hand - reserved), 0) AS BIGINT) AS a FROM buffers WHERE sku = $1")
                .bind(sku)
                .fetch_one(&self.pool)
                .await?;
        Ok(r.try_get("a")?)
    }

    /// Goods issue (`ship`) or release (`!ship`) of an open reservation.
    pub async fn finish_reservation(
        &self,
        id: &str,
        ship: bool,
        unit_cost: i64,
    ) -> Result<ReservationRow, ReserveError> {
        let Some(r) = self.reservation(id).await? else {
            return Err(ReserveError::NotFound(format!("reservation `{id}` does not exist")));
        };
        let now = crate::now_ms();
        let to = if ship { "shipped" } else { "released" };
        let mut tx = self.pool.begin().await?;
        let upd = sqlx::query("UPDATE reservations SET status = $1, updated_ms = $2 WHERE id = $3 AND status = 'open'")
            .bind(to)
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if upd.rows_affected() == 0 {
            return Err(ReserveError::Conflict(format!("reservation `{id}` is {}, not open", r.status)));
        }
        if ship {
            sqlx::query("UPDATE buffers SET on_hand = on_hand - $1, reserved = reserved - $1 WHERE id = $2")
                .bind(r.quantity)
                .bind(&r.buffer)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO stock_movements (ts_ms, buffer, sku, qty, kind, order_id, source_kind, source_id)
                 VALUES ($1, $2, $3, $4, 'goods_issue', NULL, 'reservation', $5)",
            )
            .bind(now)
            .bind(&r.buffer)
            .bind(&r.sku)
            .bind(-r.quantity)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            let amount = r.quantity * unit_cost;
            super::outbox::enqueue_goods_issue(&mut tx, id, &r.reference, &r.sku, r.quantity, amount, now).await?;
            if amount > 0 {
                use mes_actors::ledger::Account;
                sqlx::query(
                    "INSERT INTO journal (ts_ms, kind, debit, credit, amount, order_id, source_kind, source_id)
                     VALUES ($1, 'goods_issue', $2, $3, $4, NULL, 'reservation', $5)",
                )
                .bind(now)
                .bind(Account::CostOfGoodsSold.code())
                .bind(Account::FinishedGoods.code())
                .bind(amount)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            }
        } else {
            sqlx::query("UPDATE buffers SET reserved = reserved - $1 WHERE id = $2")
                .bind(r.quantity)
                .bind(&r.buffer)
                .execute(&mut *tx)
                .await?;
            // Like the reservation itself, a release moves no stock; the ledger shows it.
            sqlx::query(
                "INSERT INTO stock_movements (ts_ms, buffer, sku, qty, kind, order_id, source_kind, source_id)
                 VALUES ($1, $2, $3, 0, 'release', NULL, 'reservation', $4)",
            )
            .bind(now)
            .bind(&r.buffer)
            .bind(&r.sku)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.reservation(id).await?.ok_or_else(|| ReserveError::NotFound(format!("reservation `{id}` vanished")))
    }

    pub async fn outbox(&self, limit: i64) -> Result<Vec<OutboxRow>, DbError> {
        let rows = sqlx::query(
            "SELECT id, doc_id, kind, order_id, payload, status, attempts, last_error, next_attempt_ms FROM outbox ORDER BY id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(outbox_row).collect::<Result<_, _>>().map_err(DbError::from)
    }
}

/// One row of the append-only stock ledger.
#[derive(Debug, Clone, Serialize)]
pub struct MovementRow {
    pub id: i64,
    pub ts_ms: i64,
    pub buffer: String,
    pub sku: String,
    pub qty: i64,
    pub kind: String,
    pub order_id: Option<String>,
    pub source_kind: String,
    pub source_id: String,
}

/// A counted correction of one buffer's stock.
#[derive(Debug, Clone, Serialize)]
pub struct AdjustmentRow {
    pub id: String,
    pub reference: String,
    pub buffer: String,
    pub sku: String,
    pub quantity: i64,
    pub reason: String,
    pub on_hand_after: i64,
    pub actor: String,
    pub created_ms: i64,
}

/// An adjustment as the API validated it, priced for the books.
#[derive(Debug, Clone)]
pub struct NewAdjustment {
    pub buffer: String,
    pub quantity: i64,
    pub reason: String,
    pub reference: String,
    pub actor: String,
    /// Standard cost of one unit (1/10000), and the account the sku is carried in.
    pub unit_cost: i64,
    pub account: mes_actors::ledger::Account,
}

/// Why an adjustment could not be booked.
#[derive(Debug, thiserror::Error)]
pub enum AdjustError {
    #[error("buffer `{buffer}` has {available} available ({on_hand} on hand, {reserved} reserved); cannot remove {requested}")]
    Insufficient { buffer: String, on_hand: i64, reserved: i64, available: i64, requested: i64 },
    #[error("buffer `{0}` does not exist")]
    NotFound(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for AdjustError {
    fn from(e: sqlx::Error) -> Self {
        AdjustError::Db(DbError::Sqlx(e))
    }
}

const ADJ_COLS: &str = "id, ref, buffer, sku, quantity, reason, on_hand_after, actor, created_ms";

fn adjustment_row(r: &AnyRow) -> Result<AdjustmentRow, sqlx::Error> {
    Ok(AdjustmentRow {
        id: r.try_get("id")?,
        reference: r.try_get("ref")?,
        buffer: r.try_get("buffer")?,
        sku: r.try_get("sku")?,
        quantity: r.try_get("quantity")?,
        reason: r.try_get("reason")?,
        on_hand_after: r.try_get("on_hand_after")?,
        actor: r.try_get("actor")?,
        created_ms: r.try_get("created_ms")?,
    })
}

impl Store {
    async fn adjustment_by_ref(&self, reference: &str) -> Result<Option<AdjustmentRow>, DbError> {
        let sql = format!("SELECT {ADJ_COLS} FROM stock_adjustments WHERE ref = $1");
        let r = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(reference).fetch_optional(&self.pool).await?;
        Ok(r.as_ref().map(adjustment_row).transpose()?)
    }

    /// Books an inventory adjustment in one transaction: the buffer's balance (a removal
    /// only while `on_hand + quantity >= reserved`, decided by the conditional UPDATE), the
    /// adjustment row (`ref` unique), its stock movement (source `adjustment`), its journal
    /// line at standard cost (inventory against 5400) and its audit line. A repeated `ref`
    /// returns the first adjustment. Returns the adjustment and whether it was booked now.
    pub async fn adjust(&self, a: &NewAdjustment) -> Result<(AdjustmentRow, bool), AdjustError> {
        if let Some(r) = self.adjustment_by_ref(&a.reference).await? {
            return Ok((r, false));
        }
        let now = crate::now_ms();
        let id = format!("ADJ-{}", reference_id(&a.reference, now));
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "UPDATE buffers SET on_hand = on_hand + $1 WHERE id = $2 AND ($1 > 0 OR on_hand + $1 >= reserved)
             RETURNING on_hand, sku",
        )
        .bind(a.quantity)
        .bind(&a.buffer)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            drop(tx);
            let b = sqlx::query("SELECT on_hand, reserved FROM buffers WHERE id = $1")
                .bind(&a.buffer)
                .fetch_optional(&self.pool)
                .await?
                .ok_or_else(|| AdjustError::NotFound(a.buffer.clone()))?;
            let (on_hand, reserved): (i64, i64) = (b.try_get("on_hand")?, b.try_get("reserved")?);
            return Err(AdjustError::Insufficient {
                buffer: a.buffer.clone(),
                on_hand,
                reserved,
                available: on_hand - reserved,
                requested: -a.quantity,
            });
        };
        let (on_hand, sku): (i64, String) = (row.try_get("on_hand")?, row.try_get("sku")?);
        let ins = sqlx::query(
            "INSERT INTO stock_adjustments (id, ref, buffer, sku, quantity, reason, on_hand_after, actor, created_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (ref) DO NOTHING",
        )
        .bind(&id)
        .bind(&a.reference)
        .bind(&a.buffer)
        .bind(&sku)
        .bind(a.quantity)
        .bind(&a.reason)
        .bind(on_hand)
        .bind(&a.actor)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if ins.rows_affected() == 0 {
            // The same ref won a race: roll back and answer with the first one.
            drop(tx);
            let r = self
                .adjustment_by_ref(&a.reference)
                .await?
                .ok_or_else(|| AdjustError::Db(DbError::Other("adjustment vanished".into())))?;
            return Ok((r, false));
        }
        sqlx::query(
            "INSERT INTO stock_movements (ts_ms, buffer, sku, qty, kind, order_id, source_kind, source_id)
             VALUES ($1, $2, $3, $4, 'adjustment', NULL, 'adjustment', $5)",
        )
        .bind(now)
        .bind(&a.buffer)
        .bind(&sku)
        .bind(a.quantity)
        .bind(&id)
        .execute(&mut *tx)
        .await?;
        let amount = a.quantity.unsigned_abs().saturating_mul(a.unit_cost.unsigned_abs());
        let amount = i64::try_from(amount).unwrap_or(i64::MAX);
        if amount > 0 {
            use mes_actors::ledger::Account;
            let (debit, credit) = if a.quantity > 0 {
                (a.account, Account::InventoryAdjustment)
            } else {
                (Account::InventoryAdjustment, a.account)
            };
            sqlx::query(
                "INSERT INTO journal (ts_ms, kind, debit, credit, amount, order_id, source_kind, source_id)
                 VALUES ($1, 'inventory_adjustment', $2, $3, $4, NULL, 'adjustment', $5)",
            )
            .bind(now)
            .bind(debit.code())
            .bind(credit.code())
            .bind(amount)
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        }
        let detail = serde_json::json!({"after": {"buffer": a.buffer, "sku": sku, "quantity": a.quantity,
            "reason": a.reason, "ref": a.reference, "on_hand": on_hand}});
        sqlx::query(
            "INSERT INTO audit (ts_ms, actor, action, target, detail) VALUES ($1, $2, 'stock_adjustment', $3, $4)",
        )
        .bind(now)
        .bind(&a.actor)
        .bind(&id)
        .bind(detail.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((
            AdjustmentRow {
                id,
                reference: a.reference.clone(),
                buffer: a.buffer.clone(),
                sku,
                quantity: a.quantity,
                reason: a.reason.clone(),
                on_hand_after: on_hand,
                actor: a.actor.clone(),
                created_ms: now,
            },
            true,
        ))
    }

    /// The stock ledger of `sku` (optionally one buffer), oldest first, after movement `after`.
    pub async fn movements(
        &self,
        sku: &str,
        buffer: Option<&str>,
        after: i64,
        limit: i64,
    ) -> Result<Vec<MovementRow>, DbError> {
        const COLS: &str = "id, ts_ms, buffer, sku, qty, kind, order_id, source_kind, source_id";
        let rows = match buffer {
            Some(b) => {
                let sql = format!(
                    "SELECT {COLS} FROM stock_movements WHERE sku = $1 AND buffer = $2 AND id > $3 ORDER BY id LIMIT $4"
                );
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(sku)
                    .bind(b)
                    .bind(after)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                let sql = format!("SELECT {COLS} FROM stock_movements WHERE sku = $1 AND id > $2 ORDER BY id LIMIT $3");
                sqlx::query(sqlx::AssertSqlSafe(sql)).bind(sku).bind(after).bind(limit).fetch_all(&self.pool).await?
            }
        };
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(MovementRow {
                id: r.try_get("id")?,
                ts_ms: r.try_get("ts_ms")?,
                buffer: r.try_get("buffer")?,
                sku: r.try_get("sku")?,
                qty: r.try_get("qty")?,
                kind: r.try_get("kind")?,
                order_id: r.try_get("order_id")?,
                source_kind: r.try_get("source_kind")?,
                source_id: r.try_get("source_id")?,
            });
        }
        Ok(out)
    }
}

pub(crate) fn outbox_row(r: &AnyRow) -> Result<OutboxRow, sqlx::Error> {
    Ok(OutboxRow {
        seq: r.try_get("id")?,
        id: r.try_get("doc_id")?,
        kind: r.try_get("kind")?,
        order_id: r.try_get("order_id")?,
        payload: r.try_get("payload")?,
        status: r.try_get("status")?,
        attempts: r.try_get("attempts")?,
        last_error: r.try_get("last_error")?,
        next_attempt_ms: r.try_get("next_attempt_ms")?,
    })
}

/// A reservation id derived from its reference and time (unique per reference).
fn reference_id(reference: &str, now: i64) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    reference.hash(&mut h);
    now.hash(&mut h);
    format!("{:016x}", h.finish())
}
