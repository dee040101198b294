//! Leases and node heartbeats of a cluster (PostgreSQL only; `crate::cluster`).
//!
//! Every time is the database's clock (`clock_timestamp()`), never a node's: nodes whose
//! clocks disagree still agree on when a lease expires.

use super::{Backend, DbError, Store};
use serde::Serialize;
use sqlx::{AssertSqlSafe, Row};

/// The database's clock in ms since the epoch, as SQL.
const DB_NOW: &str = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)";

#[derive(Debug, Clone, Serialize)]
pub struct NodeRow {
    pub node_id: String,
    pub http_addr: String,
    pub started_ms: i64,
    pub heartbeat_ms: i64,
    pub lease_ms: i64,
    pub left_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LeaseRow {
    pub work_center: String,
    pub node_id: Option<String>,
    pub token: i64,
    pub expires_ms: i64,
    pub acquired_ms: Option<i64>,
}

fn marks(from: usize, n: usize) -> String {
    (0..n).map(|i| format!("${}", from + i)).collect::<Vec<_>>().join(", ")
}

impl Store {
    fn require_postgres(&self) -> Result<(), DbError> {
        match self.backend {
            Backend::Postgres => Ok(()),
            Backend::Sqlite => Err(DbError::Other("a cluster needs PostgreSQL (database.url)".into())),
        }
    }

    /// The database's clock.
    pub async fn db_now(&self) -> Result<i64, DbError> {
        self.require_postgres()?;
        let row = sqlx::query(AssertSqlSafe(format!("SELECT {DB_NOW} AS now"))).fetch_one(&self.pool).await?;
        Ok(row.try_get("now")?)
    }

    /// Registers the node (again) and makes sure every work center has a lease row. Leases
    /// still recorded under this node id belong to an earlier run of the node (it owns
    /// nothing yet): they are let go, so that they are taken over with a new token.
    pub async fn cluster_join(
        &self,
        node: &str,
        http_addr: &str,
        lease_ms: i64,
        work_centers: &[String],
    ) -> Result<(), DbError> {
        self.require_postgres()?;
        let mut tx = self.pool.begin().await?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO cluster_nodes (node_id, http_addr, started_ms, heartbeat_ms, lease_ms, left_ms)
             VALUES ($1, $2, {DB_NOW}, {DB_NOW}, $3, NULL)
             ON CONFLICT (node_id) DO UPDATE SET http_addr = excluded.http_addr, started_ms = excluded.started_ms,
               heartbeat_ms = excluded.heartbeat_ms, lease_ms = excluded.lease_ms, left_ms = NULL"
        )))
        .bind(node)
        .bind(http_addr)
        .bind(lease_ms)
        .execute(&mut *tx)
        .await?;
        for chunk in work_centers.chunks(500) {
            let values: Vec<String> = (0..chunk.len()).map(|i| format!("(${})", i + 1)).collect();
            let sql = format!(
                "INSERT INTO leases (work_center) VALUES {} ON CONFLICT (work_center) DO NOTHING",
                values.join(", ")
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for w in chunk {
                q = q.bind(w.as_str());
            }
            q.execute(&mut *tx).await?;
        }
        sqlx::query("UPDATE leases SET node_id = NULL, expires_ms = 0 WHERE node_id = $1")
            .bind(node)
            .execute(&mut *tx)
            .await?;
        // Work centers retired from the plant file are nobody's to take.
        let known: std::collections::HashSet<&str> = work_centers.iter().map(String::as_str).collect();
        for r in sqlx::query("SELECT work_center FROM leases").fetch_all(&mut *tx).await? {
            let wc: String = r.try_get("work_center")?;
            if !known.contains(wc.as_str()) {
                sqlx::query("DELETE FROM leases WHERE work_center = $1").bind(&wc).execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records the node's heartbeat and extends every lease it holds; returns the leases
    /// it still holds (work center, token). A lease missing from the answer was taken over.
    pub async fn cluster_renew(&self, node: &str, lease_ms: i64) -> Result<Vec<(String, i64)>, DbError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(AssertSqlSafe(format!("UPDATE cluster_nodes SET heartbeat_ms = {DB_NOW} WHERE node_id = $1")))
            .bind(node)
            .execute(&mut *tx)
            .await?;
        let rows = sqlx::query(AssertSqlSafe(format!(
            "UPDATE leases SET expires_ms = {DB_NOW} + $2 WHERE node_id = $1 RETURNING work_center, token"
        )))
        .bind(node)
        .bind(lease_ms)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        rows.iter().map(|r| Ok((r.try_get("work_center")?, r.try_get("token")?))).collect()
    }

    /// Nodes with a heartbeat younger than their lease, and the number of work centers.
    pub async fn cluster_shape(&self) -> Result<(i64, i64), DbError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT (SELECT COUNT(*) FROM cluster_nodes WHERE left_ms IS NULL AND heartbeat_ms > {DB_NOW} - lease_ms) AS live,
                    (SELECT COUNT(*) FROM leases) AS total"
        )))
        .fetch_one(&self.pool)
        .await?;
        Ok((row.try_get("live")?, row.try_get("total")?))
    }

    /// Takes up to `n` work centers that nobody holds (free, or their lease expired), each
    /// with its token moved on by one; returns them with their new tokens. Rows another
    /// transaction holds (a late commit of the old owner) are skipped this time.
    pub async fn cluster_claim(&self, node: &str, lease_ms: i64, n: i64) -> Result<Vec<(String, i64)>, DbError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "UPDATE leases SET node_id = $1, token = token + 1, expires_ms = {DB_NOW} + $2, acquired_ms = {DB_NOW}
             WHERE work_center IN (
               SELECT work_center FROM leases WHERE node_id IS NULL OR expires_ms < {DB_NOW}
               ORDER BY work_center LIMIT $3 FOR UPDATE SKIP LOCKED)
             RETURNING work_center, token"
        )))
        .bind(node)
        .bind(lease_ms)
        .bind(n)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok((r.try_get("work_center")?, r.try_get("token")?))).collect()
    }

    /// Hands a work center back (it is free at once for another node).
    pub async fn cluster_release(&self, node: &str, wc: &str, token: i64) -> Result<bool, DbError> {
        let r = sqlx::query(
            "UPDATE leases SET node_id = NULL, expires_ms = 0 WHERE work_center = $1 AND node_id = $2 AND token = $3",
        )
        .bind(wc)
        .bind(node)
        .bind(token)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// The node leaves: every lease it holds is free at once.
    pub async fn cluster_leave(&self, node: &str) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE leases SET node_id = NULL, expires_ms = 0 WHERE node_id = $1")
            .bind(node)
            .execute(&mut *tx)
            .await?;
        sqlx::query(AssertSqlSafe(format!("UPDATE cluster_nodes SET left_ms = {DB_NOW} WHERE node_id = $1")))
            .bind(node)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Whether `node` holds the work center's lease under `token`, unexpired.
    pub async fn cluster_holds(&self, node: &str, wc: &str, token: i64) -> Result<bool, DbError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT COUNT(*) AS n FROM leases WHERE work_center = $1 AND node_id = $2 AND token = $3
               AND expires_ms > {DB_NOW}"
        )))
        .bind(wc)
        .bind(node)
        .bind(token)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>("n")? > 0)
    }

    /// Current orders of some work centers (a cluster node follows the orders dispatched
    /// through other nodes).
    pub async fn current_orders(&self, wcs: &[String]) -> Result<Vec<(String, Option<String>)>, DbError> {
        let mut out = Vec::with_capacity(wcs.len());
        for chunk in wcs.chunks(500) {
            let sql = format!("SELECT id, current_order FROM work_centers WHERE id IN ({})", marks(1, chunk.len()));
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for w in chunk {
                q = q.bind(w.as_str());
            }
            for r in q.fetch_all(&self.pool).await? {
                out.push((r.try_get("id")?, r.try_get("current_order")?));
            }
        }
        Ok(out)
    }

    /// Nodes and leases, for `GET /api/v1/cluster` and `mes cluster status`; with the
    /// database's clock, so that callers can tell live from stale.
    pub async fn cluster_status(&self) -> Result<(i64, Vec<NodeRow>, Vec<LeaseRow>), DbError> {
        let now = self.db_now().await?;
        let nodes = sqlx::query(
            "SELECT node_id, http_addr, started_ms, heartbeat_ms, lease_ms, left_ms FROM cluster_nodes ORDER BY node_id",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(NodeRow {
                node_id: r.try_get("node_id")?,
                http_addr: r.try_get("http_addr")?,
                started_ms: r.try_get("started_ms")?,
                heartbeat_ms: r.try_get("heartbeat_ms")?,
                lease_ms: r.try_get("lease_ms")?,
                left_ms: r.try_get("left_ms")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
        let leases =
            sqlx::query("SELECT work_center, node_id, token, expires_ms, acquired_ms FROM leases ORDER BY work_center")
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|r| {
                    Ok(LeaseRow {
                        work_center: r.try_get("work_center")?,
                        node_id: r.try_get("node_id")?,
                        token: r.try_get("token")?,
                        expires_ms: r.try_get("expires_ms")?,
                        acquired_ms: r.try_get("acquired_ms")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok((now, nodes, leases))
    }

    /// The node holding a work center's live lease, and its HTTP address.
    pub async fn cluster_owner(&self, wc: &str) -> Result<Option<(String, String)>, DbError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT n.node_id, n.http_addr FROM leases l JOIN cluster_nodes n ON n.node_id = l.node_id
             WHERE l.work_center = $1 AND l.expires_ms > {DB_NOW}"
        )))
        .bind(wc)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok((r.try_get("node_id")?, r.try_get("http_addr")?))).transpose()
    }

    /// Modbus dispatches recorded `pending` by another node for these work centers, oldest
    /// first: (dispatch id, work center, device, the order's quantity).
    pub async fn pending_dispatches(&self, wcs: &[String]) -> Result<Vec<(String, String, String, i64)>, DbError> {
        let mut out = Vec::new();
        for chunk in wcs.chunks(500) {
            let sql = format!(
                "SELECT d.id, d.work_center, d.device, o.quantity FROM dispatches d JOIN orders o ON o.id = d.order_id
                 WHERE d.status = 'pending' AND d.work_center IN ({}) ORDER BY d.sent_ms, d.id",
                marks(1, chunk.len())
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for w in chunk {
                q = q.bind(w.as_str());
            }
            for r in q.fetch_all(&self.pool).await? {
                out.push((r.try_get("id")?, r.try_get("work_center")?, r.try_get("device")?, r.try_get("quantity")?));
            }
        }
        Ok(out)
    }

    /// The owner's result of a pending dispatch.
    pub async fn finish_dispatch(&self, id: &str, error: Option<&str>) -> Result<(), DbError> {
        let now = crate::now_ms();
        let (status, acked) = match error {
            None => ("acknowledged", Some(now)),
            Some(_) => ("failed", None),
        };
        sqlx::query(
            "UPDATE dispatches SET status = $2, error = $3, acked_ms = $4 WHERE id = $1 AND status = 'pending'",
        )
        .bind(id)
        .bind(status)
        .bind(error)
        .bind(acked)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// One device's committed cursor (a work center taken over is rebuilt from it).
    pub async fn cursor_of(&self, device: &str) -> Result<Option<super::queries::StoredCursor>, DbError> {
        let sql = format!("SELECT {} FROM device_cursors WHERE device = $1", super::queries::CURSOR_COLS);
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(device).fetch_optional(&self.pool).await?;
        Ok(row.as_ref().map(super::queries::stored_cursor).transpose()?)
    }
}
