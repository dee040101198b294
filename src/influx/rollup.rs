//! Per-minute counts, running time and OEE of a work center, read from the database of
//! record. The live exporter and `mes export-timeseries` both call [`minute`], so a minute
//! re-sent later is the same point (and overwrites a partial one written earlier).

use super::line::{running_in_minute, Minute, MINUTE_MS};
use crate::db::{DbError, Store};
use mes_actors::oee::{oee, Count, OeeInput, OeeParams, StateAt, StateChange};
use mes_actors::MachineState;
use sqlx::Row;

/// Most state changes read for one minute (a device flapping faster is cut off there).
const MAX_CHANGES: i64 = 100_000;

fn state_of(s: &str) -> MachineState {
    s.parse().unwrap_or(MachineState::Stopped)
}

/// The minute starting at `start_ms` for `work_center`, or `None` when no telemetry row
/// falls in it (a reading's time is its device time, else its receive time).
pub async fn minute(store: &Store, work_center: &str, start_ms: i64) -> Result<Option<Minute>, DbError> {
    let end = start_ms + MINUTE_MS;
    let row = sqlx::query(
        "SELECT CAST(COALESCE(SUM(good), 0) AS BIGINT) AS good, CAST(COALESCE(SUM(scrap), 0) AS BIGINT) AS scrap,
           COUNT(*) AS n
         FROM telemetry
         WHERE work_center = $1 AND pack_t_max >= $2 AND pack_t_min < $3
           AND COALESCE(ts_ms, received_ms) >= $2 AND COALESCE(ts_ms, received_ms) < $3",
    )
    .bind(work_center)
    .bind(start_ms)
    .bind(end)
    .fetch_one(&store.pool)
    .await?;
    let n: i64 = row.try_get("n")?;
    if n == 0 {
        return Ok(None);
    }
    let (good, scrap): (i64, i64) = (row.try_get("good")?, row.try_get("scrap")?);
    let before = sqlx::query(
        "SELECT state FROM state_changes WHERE work_center = $1 AND ts_ms < $2 ORDER BY ts_ms DESC, id DESC LIMIT 1",
    )
    .bind(work_center)
    .bind(start_ms)
    .fetch_optional(&store.pool)
    .await?
    .map(|r| r.try_get::<String, _>("state"))
    .transpose()?
    .map(|s| state_of(&s))
    .unwrap_or(MachineState::Stopped);
    let changes = sqlx::query(
        "SELECT state, ts_ms FROM state_changes WHERE work_center = $1 AND ts_ms >= $2 AND ts_ms < $3
         ORDER BY ts_ms, id LIMIT $4",
    )
    .bind(work_center)
    .bind(start_ms)
    .bind(end)
    .bind(MAX_CHANGES)
    .fetch_all(&store.pool)
    .await?
    .iter()
    .map(|r| Ok((r.try_get::<i64, _>("ts_ms")?, state_of(&r.try_get::<String, _>("state")?))))
    .collect::<Result<Vec<_>, DbError>>()?;
    let ideal_cycle_ms = sqlx::query("SELECT ideal_cycle_ms FROM work_centers WHERE id = $1")
        .bind(work_center)
        .fetch_optional(&store.pool)
        .await?
        .map(|r| r.try_get::<i64, _>("ideal_cycle_ms"))
        .transpose()?
        .unwrap_or(0);
    let (running_ms, state_end) = running_in_minute(start_ms, before, &changes);
    // Planned busy and run time as the API's OEE defines them (stopped is planned
    // downtime; breakdowns and setup are availability losses; short idle is not).
    let initial = StateAt { state: before, reason: None };
    let timeline: Vec<StateChange> =
        changes.iter().map(|&(ts_ms, state)| StateChange { ts_ms, state, reason: None }).collect();
    let counts = [Count { ts_ms: start_ms, good: good.max(0) as u64, scrap: scrap.max(0) as u64 }];
    let input = OeeInput {
        from_ms: start_ms,
        to_ms: end,
        initial: Some(&initial),
        changes: &timeline,
        counts: &counts,
        ideal_cycle_ms: ideal_cycle_ms.max(1),
    };
    let (planned_busy_ms, run_ms) = match oee(&input, &OeeParams::default()) {
        Ok(o) => (o.planned_busy_ms, o.run_ms),
        Err(_) => (MINUTE_MS, running_ms),
    };
    Ok(Some(Minute {
        work_center: work_center.to_string(),
        start_ms,
        good,
        scrap,
        running_ms,
        state_end,
        ideal_cycle_ms,
        planned_busy_ms,
        run_ms,
    }))
}
