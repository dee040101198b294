//! Storage: one sqlx `Any` pool over SQLite (embedded default) or PostgreSQL.
//!
//! All SQL uses `$n` placeholders, which both backends accept. Writes on the telemetry
//! path go through the single [`writer`] task (group commit); the HTTP API's own writes
//! are short transactions with conditional updates, so the database, not memory,
//! enforces every rule that matters (idempotency, no oversell, legal transitions).

pub mod cluster;
pub mod outbox;
pub mod planner;
pub mod queries;
pub mod sessions;
pub mod writer;

use crate::plant::Plant;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};
use std::time::Duration;

static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database: {0}")]
    Other(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The shared handle to the database.
#[derive(Clone, Debug)]
pub struct Store {
    pub pool: AnyPool,
    pub backend: Backend,
}

/// Normalizes a SQLite URL so the file (and its directory) is created on first use.
fn sqlite_url(url: &str) -> Result<String, DbError> {
    let rest = url.trim_start_matches("sqlite://").trim_start_matches("sqlite:");
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path != ":memory:" && !path.is_empty() {
        if let Some(dir) = std::path::Path::new(path).parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| DbError::Other(format!("cannot create {}: {e}", dir.display())))?;
            }
        }
    }
    let mut q: Vec<&str> = query.split('&').filter(|s| !s.is_empty()).collect();
    if !q.iter().any(|s| s.starts_with("mode=")) {
        q.push("mode=rwc");
    }
    Ok(format!("sqlite://{path}?{}", q.join("&")))
}

impl Store {
    /// Connects (with a bounded wait) and returns the store; does not migrate.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store, DbError> {
        Store::connect_with(url, max_connections, Duration::from_secs(10)).await
    }

    /// As [`Store::connect`]; on PostgreSQL a session that stays idle inside a transaction
    /// longer than `idle_in_tx` is ended by the server, and its locks with it. That bounds
    /// what a paused or hung process can block: a cluster node stopped mid-commit would
    /// otherwise hold its row locks (buffers, leases) and stall every other node.
    pub async fn connect_with(url: &str, max_connections: u32, idle_in_tx: Duration) -> Result<Store, DbError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") { Backend::Sqlite } else { Backend::Postgres };
        let url = match backend {
            Backend::Sqlite => sqlite_url(url)?,
            Backend::Postgres => url.to_string(),
        };
        let opts =
            AnyPoolOptions::new().max_connections(max_connections.max(2)).acquire_timeout(Duration::from_secs(3));
        let opts = match backend {
            // A SQLite connection is a file handle in this process: it cannot go stale, so
            // no ping before each acquire (a trip to the driver's thread per transaction).
            Backend::Sqlite => opts.test_before_acquire(false).after_connect(|conn, _meta| {
                Box::pin(async move {
                    conn.execute("PRAGMA journal_mode = WAL").await?;
                    conn.execute("PRAGMA synchronous = NORMAL").await?;
                    conn.execute("PRAGMA busy_timeout = 10000").await?;
                    conn.execute("PRAGMA foreign_keys = ON").await?;
                    // Statement journals and temporary b-trees in memory: on disk each
                    // large commit created, wrote and unlinked a file under /var/tmp.
                    conn.execute("PRAGMA temp_store = MEMORY").await?;
                    Ok(())
                })
            }),
            Backend::Postgres => {
                let ms = idle_in_tx.as_millis().max(100);
                opts.after_connect(move |conn, _meta| {
                    Box::pin(async move {
                        conn.execute(sqlx::AssertSqlSafe(format!("SET idle_in_transaction_session_timeout = {ms}")))
                            .await?;
                        Ok(())
                    })
                })
            }
        };
        let pool = opts.connect(&url).await?;
        Ok(Store { pool, backend })
    }

    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        }
    }

    pub async fn migrate(&self) -> Result<(), DbError> {
        match self.backend {
            Backend::Sqlite => SQLITE_MIGRATOR.run(&self.pool).await?,
            Backend::Postgres => POSTGRES_MIGRATOR.run(&self.pool).await?,
        }
        Ok(())
    }

    pub async fn ping(&self) -> bool {
        tokio::time::timeout(Duration::from_secs(2), sqlx::query("SELECT 1").execute(&self.pool))
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false)
    }

    /// Upserts the plant's master data in one transaction. Buffers keep their balances:
    /// `initial` applies only when a buffer is first created, booked as an `opening`
    /// stock movement.
    pub async fn upsert_plant(&self, plant: &Plant) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        for a in mes_actors::ledger::Account::ALL {
            sqlx::query("INSERT INTO accounts (code, name) VALUES ($1, $2) ON CONFLICT (code) DO UPDATE SET name = excluded.name")
                .bind(a.code())
                .bind(a.name())
                .execute(&mut *tx)
                .await?;
        }
        for m in &plant.materials {
            sqlx::query(
                "INSERT INTO materials (sku, unit, standard_cost) VALUES ($1, $2, $3)
                 ON CONFLICT (sku) DO UPDATE SET unit = excluded.unit, standard_cost = excluded.standard_cost",
            )
            .bind(&m.sku)
            .bind(&m.unit)
            .bind(m.standard_cost.minor())
            .execute(&mut *tx)
            .await?;
        }
        for b in &plant.boms {
            sqlx::query("DELETE FROM bom_lines WHERE sku = $1").bind(&b.sku).execute(&mut *tx).await?;
            for c in &b.components {
                sqlx::query("INSERT INTO bom_lines (sku, component, quantity) VALUES ($1, $2, $3)")
                    .bind(&b.sku)
                    .bind(&c.sku)
                    .bind(c.quantity.0)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        let now = crate::now_ms();
        for b in &plant.buffers {
            let created = sqlx::query(
                "INSERT INTO buffers (id, sku, capacity, on_hand) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (id) DO NOTHING RETURNING id",
            )
            .bind(&b.id)
            .bind(&b.sku)
            .bind(b.capacity)
            .bind(b.initial)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
            if created && b.initial != 0 {
                // The opening balance is a movement too, so on_hand is the sum of the ledger.
                sqlx::query(
                    "INSERT INTO stock_movements (ts_ms, buffer, sku, qty, kind, order_id, source_kind, source_id)
                     VALUES ($1, $2, $3, $4, 'opening', NULL, 'plant', $2)",
                )
                .bind(now)
                .bind(&b.id)
                .bind(&b.sku)
                .bind(b.initial)
                .execute(&mut *tx)
                .await?;
            }
            if !created {
                sqlx::query("UPDATE buffers SET sku = $1, capacity = $2 WHERE id = $3")
                    .bind(&b.sku)
                    .bind(b.capacity)
                    .bind(&b.id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        for w in &plant.work_centers {
            sqlx::query(
                "INSERT INTO work_centers (id, name, device_id, device_kind, output_buffer, ideal_cycle_ms, conversion_rate)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name, device_id = excluded.device_id,
                   device_kind = excluded.device_kind, output_buffer = excluded.output_buffer,
                   ideal_cycle_ms = excluded.ideal_cycle_ms, conversion_rate = excluded.conversion_rate",
            )
            .bind(&w.id)
            .bind(w.display_name())
            .bind(w.device_id())
            .bind(w.device_kind())
            .bind(&w.output)
            .bind(w.ideal_cycle_ms())
            .bind(w.conversion_rate_per_hour.map(|m| m.minor()).unwrap_or(0))
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM work_center_inputs WHERE work_center = $1").bind(&w.id).execute(&mut *tx).await?;
            for i in &w.inputs {
                sqlx::query("INSERT INTO work_center_inputs (work_center, buffer) VALUES ($1, $2)")
                    .bind(&w.id)
                    .bind(i)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Reads an optional i64 column that may be NULL.
pub(crate) fn opt_i64(row: &AnyRow, col: &str) -> Result<Option<i64>, sqlx::Error> {
    row.try_get::<Option<i64>, _>(col)
}
