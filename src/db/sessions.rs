//! The MQTT sessions the MES has used (`crate::ingest::sessions`).

use super::{DbError, Store};
use sqlx::Row;

impl Store {
    /// Every session recorded, oldest first.
    pub async fn mqtt_sessions(&self) -> Result<Vec<String>, DbError> {
        let rows = sqlx::query("SELECT client_id FROM mqtt_sessions ORDER BY first_used_ms, client_id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| r.try_get::<String, _>("client_id").map_err(DbError::from)).collect()
    }

    /// Records sessions in use (before they first connect, so that a crash right after
    /// cannot leave a session the next start does not know about).
    pub async fn mqtt_sessions_add(&self, ids: &[String], now_ms: i64) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        for id in ids {
            sqlx::query("INSERT INTO mqtt_sessions (client_id, first_used_ms) VALUES ($1, $2) ON CONFLICT (client_id) DO NOTHING")
                .bind(id)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Forgets a session once the broker no longer keeps anything for it.
    pub async fn mqtt_sessions_remove(&self, id: &str) -> Result<(), DbError> {
        sqlx::query("DELETE FROM mqtt_sessions WHERE client_id = $1").bind(id).execute(&self.pool).await?;
        Ok(())
    }
}
