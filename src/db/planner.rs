//! Read models and commands for planners: order lists with filters and keyset paging,
//! work-center queues, dispatch tracking, the audit log, surge plans, and the inputs of
//! OEE (state timeline and counts by time).

use super::queries::{order_row, OrderRow, ORDER_COLS};
use super::{opt_i64, DbError, Store};
use mes_actors::MachineState;
use serde::Serialize;
use sqlx::Row;

/// Filters and keyset paging of `GET /orders`.
#[derive(Debug, Clone, Default)]
pub struct OrderFilter {
    pub status: Option<String>,
    pub sku: Option<String>,
    pub work_center: Option<String>,
    /// Return orders after this one in (created_ms, id) order.
    pub after: Option<(i64, String)>,
    pub limit: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditRow {
    pub id: i64,
    pub ts_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DispatchRow {
    pub id: String,
    pub order_id: String,
    pub work_center: String,
    pub device: String,
    pub channel: String,
    pub status: String,
    pub error: Option<String>,
    pub sent_ms: i64,
    pub acked_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SurgePlanRow {
    pub id: String,
    pub sku: String,
    pub quantity: i64,
    pub due_ms: i64,
    pub status: String,
    pub plan: String,
    pub created_by: String,
    pub created_ms: i64,
    pub released_ms: Option<i64>,
}

/// A work center's states over a window: the one in force at its start and the changes.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    pub initial: Option<(MachineState, Option<String>)>,
    pub changes: Vec<(i64, MachineState, Option<String>)>,
}

const DISPATCH_COLS: &str = "id, order_id, work_center, device, channel, status, error, sent_ms, acked_ms";
const PLAN_COLS: &str = "id, sku, quantity, due_ms, status, plan, created_by, created_ms, released_ms";

fn dispatch_row(r: &sqlx::any::AnyRow) -> Result<DispatchRow, sqlx::Error> {
    Ok(DispatchRow {
        id: r.try_get("id")?,
        order_id: r.try_get("order_id")?,
        work_center: r.try_get("work_center")?,
        device: r.try_get("device")?,
        channel: r.try_get("channel")?,
        status: r.try_get("status")?,
        error: r.try_get("error")?,
        sent_ms: r.try_get("sent_ms")?,
        acked_ms: opt_i64(r, "acked_ms")?,
    })
}

fn plan_row(r: &sqlx::any::AnyRow) -> Result<SurgePlanRow, sqlx::Error> {
    Ok(SurgePlanRow {
        id: r.try_get("id")?,
        sku: r.try_get("sku")?,
        quantity: r.try_get("quantity")?,
        due_ms: r.try_get("due_ms")?,
        status: r.try_get("status")?,
        plan: r.try_get("plan")?,
        created_by: r.try_get("created_by")?,
        created_ms: r.try_get("created_ms")?,
        released_ms: opt_i64(r, "released_ms")?,
    })
}

fn state(s: &str) -> MachineState {
    s.parse().unwrap_or(MachineState::Stopped)
}

impl Store {
    /// Orders matching `f`, oldest first, at most `f.limit`.
    pub async fn orders_filtered(&self, f: &OrderFilter) -> Result<Vec<OrderRow>, DbError> {
        let mut conds: Vec<String> = Vec::new();
        let mut binds: Vec<String> = Vec::new();
        for (col, v) in [("status", &f.status), ("sku", &f.sku), ("work_center", &f.work_center)] {
            if let Some(v) = v {
                binds.push(v.clone());
                conds.push(format!("{col} = ${}", binds.len()));
            }
        }
        let mut after_ms = None;
        if let Some((ms, id)) = &f.after {
            after_ms = Some(*ms);
            binds.push(id.clone());
            // (created_ms, id) > (after_ms, id), spelled out for both dialects.
            let n = binds.len();
            conds.push(format!("(created_ms > ${} OR (created_ms = ${} AND id > ${n}))", n + 1, n + 1));
        }
        let where_ = if conds.is_empty() { String::new() } else { format!("WHERE {}", conds.join(" AND ")) };
        let limit_at = binds.len() + usize::from(after_ms.is_some()) + 1;
        let sql = format!("SELECT {ORDER_COLS} FROM orders {where_} ORDER BY created_ms, id LIMIT ${limit_at}");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for b in &binds {
            q = q.bind(b.clone());
        }
        if let Some(ms) = after_ms {
            q = q.bind(ms);
        }
        let rows = q.bind(f.limit).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(order_row).collect::<Result<_, _>>()?)
    }

    /// The open orders of a work center in the order it should work them: highest
    /// priority first, then earliest due (no due date last), then oldest.
    pub async fn work_center_queue(&self, wc: &str) -> Result<Vec<OrderRow>, DbError> {
        let sql = format!(
            "SELECT {ORDER_COLS} FROM orders WHERE work_center = $1 AND status IN ('planned', 'released', 'running')
             ORDER BY CASE status WHEN 'running' THEN 0 WHEN 'released' THEN 1 ELSE 2 END,
                      priority DESC, CASE WHEN due IS NULL THEN 1 ELSE 0 END, due, created_ms, id LIMIT 1000"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(wc).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(order_row).collect::<Result<_, _>>()?)
    }

    /// Makes the next released order of `wc` current when it has no open current order.
    /// Returns the order made current, if any (the database decides races).
    pub async fn advance_queue(&self, wc: &str) -> Result<Option<OrderRow>, DbError> {
        let queue = self.work_center_queue(wc).await?;
        let Some(next) = queue.into_iter().find(|o| o.status == "released") else {
            return Ok(None);
        };
        let r = sqlx::query(
            "UPDATE work_centers SET current_order = $1 WHERE id = $2 AND (current_order IS NULL OR current_order NOT IN
               (SELECT id FROM orders WHERE status IN ('released', 'running')))",
        )
        .bind(&next.id)
        .bind(wc)
        .execute(&self.pool)
        .await?;
        Ok((r.rows_affected() > 0).then_some(next))
    }

    /// Work centers whose current order is finished (or unset) while a released order waits.
    pub async fn idle_queues(&self) -> Result<Vec<String>, DbError> {
        let rows = sqlx::query(
            "SELECT DISTINCT o.work_center AS wc FROM orders o JOIN work_centers w ON w.id = o.work_center
             WHERE o.status = 'released' AND (w.current_order IS NULL OR w.current_order NOT IN
               (SELECT id FROM orders WHERE status IN ('released', 'running')))
             ORDER BY o.work_center",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(|r| r.try_get("wc")).collect::<Result<_, _>>()?)
    }

    pub async fn record_dispatch(&self, d: &DispatchRow) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO dispatches (id, order_id, work_center, device, channel, status, error, sent_ms, acked_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&d.id)
        .bind(&d.order_id)
        .bind(&d.work_center)
        .bind(&d.device)
        .bind(&d.channel)
        .bind(&d.status)
        .bind(d.error.as_deref())
        .bind(d.sent_ms)
        .bind(d.acked_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The latest dispatch of an order. A `sent` MQTT dispatch becomes `acknowledged`
    /// once the device reports output for the order after it was sent.
    pub async fn dispatch_of(&self, order: &str) -> Result<Option<DispatchRow>, DbError> {
        let sql = format!(
            "SELECT {DISPATCH_COLS} FROM dispatches WHERE order_id = $1 ORDER BY sent_ms DESC, id DESC LIMIT 1"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(order).fetch_optional(&self.pool).await?;
        let Some(mut d) = row.as_ref().map(dispatch_row).transpose()? else {
            return Ok(None);
        };
        if d.status == "sent" {
            let r = sqlx::query(
                "SELECT MIN(COALESCE(ts_ms, received_ms)) AS first FROM telemetry
                 WHERE work_center = $1 AND pack_t_max >= $3 AND order_id = $2 AND COALESCE(ts_ms, received_ms) >= $3",
            )
            .bind(&d.work_center)
            .bind(order)
            .bind(d.sent_ms)
            .fetch_one(&self.pool)
            .await?;
            if let Some(first) = opt_i64(&r, "first")? {
                sqlx::query(
                    "UPDATE dispatches SET status = 'acknowledged', acked_ms = $1 WHERE id = $2 AND status = 'sent'",
                )
                .bind(first)
                .bind(&d.id)
                .execute(&self.pool)
                .await?;
                d.status = "acknowledged".into();
                d.acked_ms = Some(first);
            }
        }
        Ok(Some(d))
    }

    /// Audit lines, newest first; `before` pages backwards by id.
    pub async fn audit_log(
        &self,
        actor: Option<&str>,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<AuditRow>, DbError> {
        let rows = sqlx::query(
            "SELECT id, ts_ms, actor, action, target, detail FROM audit
             WHERE ($1 IS NULL OR actor = $1) AND id < $2 ORDER BY id DESC LIMIT $3",
        )
        .bind(actor)
        .bind(before.unwrap_or(i64::MAX))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(AuditRow {
                id: r.try_get("id")?,
                ts_ms: r.try_get("ts_ms")?,
                actor: r.try_get("actor")?,
                action: r.try_get("action")?,
                target: r.try_get("target")?,
                detail: r.try_get("detail")?,
            });
        }
        Ok(out)
    }

    /// The state in force at `from` and the changes in `[from, to)`.
    pub async fn timeline(&self, wc: &str, from: i64, to: i64) -> Result<Timeline, DbError> {
        let before = sqlx::query(
            "SELECT state, reason FROM state_changes WHERE work_center = $1 AND ts_ms < $2
             ORDER BY ts_ms DESC, id DESC LIMIT 1",
        )
        .bind(wc)
        .bind(from)
        .fetch_optional(&self.pool)
        .await?;
        let initial = match before {
            Some(r) => Some((state(&r.try_get::<String, _>("state")?), r.try_get("reason")?)),
            None => None,
        };
        let rows = sqlx::query(
            "SELECT ts_ms, state, reason FROM state_changes WHERE work_center = $1 AND ts_ms >= $2 AND ts_ms < $3
             ORDER BY ts_ms, id LIMIT 100000",
        )
        .bind(wc)
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        let mut changes = Vec::with_capacity(rows.len());
        for r in rows {
            changes.push((r.try_get("ts_ms")?, state(&r.try_get::<String, _>("state")?), r.try_get("reason")?));
        }
        Ok(Timeline { initial, changes })
    }

    /// Output counted at a work center in `[from, to)` by device time (receive time where
    /// the device sent none), optionally only an order's, summed per `bucket_ms` of time:
    /// `(bucket start ms, good, scrap)`. Buckets bound the rows read however busy the line.
    pub async fn counts(
        &self,
        wc: &str,
        order: Option<&str>,
        from: i64,
        to: i64,
        bucket_ms: i64,
    ) -> Result<Vec<(i64, u64, u64)>, DbError> {
        let bucket = bucket_ms.max(1);
        let rows = sqlx::query(
            "SELECT (COALESCE(ts_ms, received_ms) - $5) / $6 AS b, CAST(SUM(good) AS BIGINT) AS g, CAST(SUM(scrap) AS BIGINT) AS s
             FROM telemetry
             WHERE work_center = $1 AND pack_t_max >= $2 AND pack_t_min < $3
               AND COALESCE(ts_ms, received_ms) >= $2 AND COALESCE(ts_ms, received_ms) < $3
               AND ($4 IS NULL OR order_id = $4) AND (good > 0 OR scrap > 0)
             GROUP BY (COALESCE(ts_ms, received_ms) - $5) / $6 ORDER BY b LIMIT 1000000",
        )
        .bind(wc)
        .bind(from)
        .bind(to)
        .bind(order)
        .bind(from)
        .bind(bucket)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let b: i64 = r.try_get("b")?;
            let g = opt_i64(&r, "g")?.unwrap_or(0);
            let s = opt_i64(&r, "s")?.unwrap_or(0);
            out.push((from + b * bucket, g.max(0) as u64, s.max(0) as u64));
        }
        Ok(out)
    }

    /// The first telemetry id (a pack's, see migration 0012) received at or after
    /// `received_ms` (ids grow with commit order, and so, nearly, do receive times): a
    /// binary search over the ids, a few dozen indexed lookups however long the table.
    pub async fn telemetry_id_since(&self, received_ms: i64) -> Result<i64, DbError> {
        let bound = |sql: &'static str| async move {
            let r = sqlx::query(sql).fetch_one(&self.pool).await?;
            Ok::<i64, DbError>(opt_i64(&r, "v")?.unwrap_or(0))
        };
        let (mut lo, mut hi) =
            (bound("SELECT MIN(id) AS v FROM telemetry_packs").await?, self.telemetry_max_id().await? + 1);
        // Invariant: rows before `lo` were received before `received_ms`; `hi` is past it.
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            // The first reading of the first pack from `mid` on: one pack unpacked.
            let r = sqlx::query(
                "SELECT id, received_ms FROM telemetry
                 WHERE id = (SELECT MIN(id) FROM telemetry_packs WHERE id >= $1) ORDER BY pos LIMIT 1",
            )
            .bind(mid)
            .fetch_optional(&self.pool)
            .await?;
            match r {
                Some(r) if r.try_get::<i64, _>("received_ms")? < received_ms => lo = r.try_get::<i64, _>("id")? + 1,
                _ => hi = mid,
            }
        }
        Ok(lo)
    }

    /// The highest telemetry id (a pack's; 0: none yet).
    pub async fn telemetry_max_id(&self) -> Result<i64, DbError> {
        let r = sqlx::query("SELECT MAX(id) AS v FROM telemetry_packs").fetch_one(&self.pool).await?;
        Ok(opt_i64(&r, "v")?.unwrap_or(0))
    }

    /// The telemetry readings with (pack) ids in `(after, upto]`, summed in the database: good units per
    /// work center and minute of their time (device time, else receive time) with the latest
    /// time among them, and the scrap by second in id order (scrap keeps its second). The
    /// live OEE's counts take these in (`oee_live`); summing in SQL spares decoding every
    /// row, which under a flood was a twentieth of the process's CPU. A pack whose readings
    /// all fall within one second counts from its sums (migration 0013) without being
    /// unpacked: that is nearly every pack, one device's readings of one commit.
    pub async fn telemetry_counts(&self, after: i64, upto: i64) -> Result<TelemetryCounts, DbError> {
        // Minutes by floor division, also before the epoch (device clocks are not trusted).
        let good = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT work_center, m, CAST(SUM(good) AS BIGINT) AS good, MAX(t) AS latest FROM (
               SELECT work_center, t, good, CASE WHEN t >= 0 THEN t / 60000 ELSE (t - 59999) / 60000 END AS m FROM (
                 SELECT work_center, t_max AS t, good FROM telemetry_packs
                 WHERE id > $1 AND id <= $2 AND {packed}
                 UNION ALL
                 SELECT work_center, COALESCE(ts_ms, received_ms) AS t, good FROM telemetry
                 WHERE id > $1 AND id <= $2 AND NOT {unpacked}) u) r
             GROUP BY work_center, m",
            packed = within_one_second("t_min", "t_max"),
            unpacked = within_one_second("pack_t_min", "pack_t_max"),
        )))
        .bind(after)
        .bind(upto)
        .fetch_all(&self.pool)
        .await?;
        let scrap = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT id, 0 AS pos, work_center, t_max AS t, scrap FROM telemetry_packs
             WHERE id > $1 AND id <= $2 AND scrap > 0 AND {packed}
             UNION ALL
             SELECT id, pos, work_center, COALESCE(ts_ms, received_ms) AS t, scrap FROM telemetry
             WHERE id > $1 AND id <= $2 AND scrap > 0 AND NOT {unpacked}
             ORDER BY id, pos",
            packed = within_one_second("t_min", "t_max"),
            unpacked = within_one_second("pack_t_min", "pack_t_max"),
        )))
        .bind(after)
        .bind(upto)
        .fetch_all(&self.pool)
        .await?;
        let mut out = TelemetryCounts::default();
        for r in good {
            let m: i64 = r.try_get("m")?;
            let good: i64 = r.try_get("good")?;
            out.good.push((r.try_get("work_center")?, m * 60_000, good.max(0) as u64, r.try_get("latest")?));
        }
        for r in scrap {
            let scrap: i64 = r.try_get("scrap")?;
            out.scrap.push((r.try_get("work_center")?, r.try_get("t")?, scrap.max(0) as u64));
        }
        Ok(out)
    }

    /// The latest device time (receive time where none) of a work center's readings.
    pub async fn latest_time(&self, wc: &str) -> Result<Option<i64>, DbError> {
        let r = sqlx::query("SELECT MAX(t_max) AS t FROM telemetry_packs WHERE work_center = $1")
            .bind(wc)
            .fetch_one(&self.pool)
            .await?;
        Ok(opt_i64(&r, "t")?)
    }

    /// First and last time an order's output was counted.
    pub async fn order_span(&self, order: &str, wc: &str) -> Result<Option<(i64, i64)>, DbError> {
        let r = sqlx::query(
            "SELECT MIN(COALESCE(ts_ms, received_ms)) AS a, MAX(COALESCE(ts_ms, received_ms)) AS b FROM telemetry
             WHERE work_center = $1 AND order_id = $2",
        )
        .bind(wc)
        .bind(order)
        .fetch_one(&self.pool)
        .await?;
        Ok(match (opt_i64(&r, "a")?, opt_i64(&r, "b")?) {
            (Some(a), Some(b)) => Some((a, b)),
            _ => None,
        })
    }

    pub async fn insert_surge_plan(&self, p: &SurgePlanRow) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO surge_plans (id, sku, quantity, due_ms, status, plan, created_by, created_ms, released_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&p.id)
        .bind(&p.sku)
        .bind(p.quantity)
        .bind(p.due_ms)
        .bind(&p.status)
        .bind(&p.plan)
        .bind(&p.created_by)
        .bind(p.created_ms)
        .bind(p.released_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn surge_plan(&self, id: &str) -> Result<Option<SurgePlanRow>, DbError> {
        let sql = format!("SELECT {PLAN_COLS} FROM surge_plans WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&self.pool).await?;
        Ok(row.as_ref().map(plan_row).transpose()?)
    }

    pub async fn surge_plans(&self, limit: i64) -> Result<Vec<SurgePlanRow>, DbError> {
        let sql = format!("SELECT {PLAN_COLS} FROM surge_plans ORDER BY created_ms DESC, id DESC LIMIT $1");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(limit).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(plan_row).collect::<Result<_, _>>()?)
    }

    /// Marks a plan released (once); true when this call did it.
    pub async fn mark_plan_released(&self, id: &str) -> Result<bool, DbError> {
        let r = sqlx::query(
            "UPDATE surge_plans SET status = 'released', released_ms = $1 WHERE id = $2 AND status = 'proposed'",
        )
        .bind(crate::now_ms())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Units still to make per sku on open orders (planned, released, running).
    pub async fn open_supply(&self) -> Result<Vec<(String, i64)>, DbError> {
        let rows = sqlx::query(
            "SELECT sku, CAST(SUM(CASE WHEN quantity > good THEN quantity - good ELSE 0 END) AS BIGINT) AS left_ FROM orders
             WHERE status IN ('planned', 'released', 'running') GROUP BY sku ORDER BY sku",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::new();
        for r in rows {
            out.push((r.try_get("sku")?, opt_i64(&r, "left_")?.unwrap_or(0)));
        }
        Ok(out)
    }

    /// Units still to make per work center on its open orders.
    pub async fn open_load(&self) -> Result<Vec<(String, i64)>, DbError> {
        let rows = sqlx::query(
            "SELECT work_center, CAST(SUM(CASE WHEN quantity > good THEN quantity - good ELSE 0 END) AS BIGINT) AS left_ FROM orders
             WHERE status IN ('planned', 'released', 'running') AND work_center IS NOT NULL
             GROUP BY work_center ORDER BY work_center",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::new();
        for r in rows {
            out.push((r.try_get("work_center")?, opt_i64(&r, "left_")?.unwrap_or(0)));
        }
        Ok(out)
    }

    /// `mes bench-scale`: `n` released orders of PART spread over `wcs` work centers.
    pub async fn insert_bench_orders(&self, n: usize, wcs: usize) -> Result<(), DbError> {
        let now = crate::now_ms();
        let mut tx = self.pool.begin().await?;
        for i in 0..n {
            sqlx::query(
                "INSERT INTO orders (id, sku, quantity, work_center, status, priority, created_ms, updated_ms)
                 VALUES ($1, 'PART', 1000, $2, 'released', 0, $3, $3)",
            )
            .bind(format!("BENCH-{i:06}"))
            .bind(format!("WC-{:05}", i % wcs.max(1)))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Telemetry summed for the live OEE (see [`Store::telemetry_counts`]).
#[derive(Default, Debug)]
pub struct TelemetryCounts {
    /// (work center, minute start ms, good units, latest time ms)
    pub good: Vec<(String, i64, u64, i64)>,
    /// (work center, time ms, scrap) of each reading with scrap, in id order; a pack counted
    /// from its sums gives one, at its latest time (the same second as all its readings)
    pub scrap: Vec<(String, i64, u64)>,
}

/// SQL: whether a telemetry pack's readings, whose times (device time, else receive time)
/// lie in `[t_min, t_max]` (column names), all fall within one second (integer division
/// truncates, so below zero only equal bounds count): then its sums (migration 0013) stand
/// for its readings in the live OEE's per-minute good units and per-second scrap.
fn within_one_second(t_min: &str, t_max: &str) -> String {
    format!("({t_min} = {t_max} OR ({t_min} >= 0 AND {t_min} / 1000 = {t_max} / 1000))")
}
