//! `mes export-timeseries --from --to`: re-sends the time series of a time range from the
//! database of record (after an InfluxDB outage, or to fill a new bucket). The points are
//! the ones the live exporter writes, built by the same code from the same rows, so
//! re-sending overwrites instead of duplicating.

use super::line::{self, Minute, ReadingRef};
use super::{rollup, Settings, Sink, WriteError};
use crate::db::{DbError, Store};
use mes_actors::MachineState;
use serde_json::value::RawValue;
use sqlx::Row;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Rows read per query (keyset pagination keeps memory bounded).
const PAGE: i64 = 5_000;
/// Telemetry packs read a page (each holds up to a commit's readings of one device).
const PAGE_PACKS: i64 = 64;
/// Attempts per batch before the backfill gives up (it can be run again).
const ATTEMPTS: u32 = 8;

/// What a backfill sent.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub readings: u64,
    pub state_changes: u64,
    pub minutes: u64,
    pub points: u64,
    pub rejected: u64,
    pub requests: u64,
}

/// A `metrics` column back into numbers. The column was written by serde_json (shortest
/// round-trip form) and each number is parsed by the standard library (correctly
/// rounded), so the values are bit-for-bit the ones the live exporter sent. A value that
/// does not parse is skipped.
pub fn parse_metrics(text: Option<&str>) -> BTreeMap<String, f64> {
    let Some(text) = text else { return BTreeMap::new() };
    let raw: BTreeMap<String, Box<RawValue>> = serde_json::from_str(text).unwrap_or_default();
    raw.into_iter().filter_map(|(k, v)| v.get().parse::<f64>().ok().filter(|x| x.is_finite()).map(|x| (k, x))).collect()
}

/// Parses `--from`/`--to`: an RFC 3339 time, a date (its start, UTC), milliseconds since
/// the epoch, `now`, or a duration (`90m`, `2d`) meaning that long before `now_ms`.
pub fn parse_time(s: &str, now_ms: i64) -> Result<i64, String> {
    let s = s.trim();
    if s == "now" {
        return Ok(now_ms);
    }
    if let Some(ms) = crate::time::instant_ms(s, crate::time::Day::Start) {
        return Ok(ms);
    }
    match crate::config::parse_duration(s) {
        Some(d) => Ok(now_ms - i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2)),
        None => Err(format!(
            "`{s}` is not a time (RFC 3339, a date, ms since the epoch, `now`, or a duration like 90m ago)"
        )),
    }
}

struct Batcher<'a> {
    sink: &'a Sink,
    settings: &'a Settings,
    body: String,
    points: usize,
    report: Report,
}

impl Batcher<'_> {
    async fn added(&mut self, n: usize) -> Result<(), String> {
        self.points += n;
        if self.points >= self.settings.batch_size {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), String> {
        if self.points == 0 {
            return Ok(());
        }
        let mut delay = Duration::from_millis(200);
        for attempt in 1..=ATTEMPTS {
            self.report.requests += 1;
            match self.sink.write(self.body.clone(), self.settings.timeout).await {
                Ok(()) => {
                    self.report.points += self.points as u64;
                    break;
                }
                Err(WriteError::Rejected { status, reason }) => {
                    tracing::error!(status, points = self.points, %reason, "InfluxDB rejected a batch of time-series points; skipped");
                    self.report.rejected += self.points as u64;
                    break;
                }
                Err(WriteError::Failed(e)) if attempt < ATTEMPTS => {
                    tracing::warn!(error = %e, attempt, retry_in_ms = delay.as_millis() as u64, "time-series write failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.settings.retry_max);
                }
                Err(WriteError::Failed(e)) => return Err(format!("writing to {}: {e}", self.settings.url)),
            }
        }
        self.body.clear();
        self.points = 0;
        Ok(())
    }
}

fn db(e: DbError) -> String {
    e.to_string()
}

fn sq(e: sqlx::Error) -> String {
    e.to_string()
}

/// Re-sends everything whose time falls in `[from_ms, to_ms)`: readings (telemetry and
/// counts), state changes, and every minute that has readings in the range.
pub async fn run(settings: &Settings, store: &Store, from_ms: i64, to_ms: i64) -> Result<Report, String> {
    if to_ms <= from_ms {
        return Err(format!("--to ({to_ms}) must be after --from ({from_ms})"));
    }
    let sink = Sink::new(settings)?;
    let mut b = Batcher { sink: &sink, settings, body: String::new(), points: 0, report: Report::default() };
    let started = Instant::now();
    let wcs: Vec<String> = sqlx::query("SELECT id FROM work_centers ORDER BY id")
        .fetch_all(&store.pool)
        .await
        .map_err(sq)?
        .iter()
        .map(|r| r.try_get::<String, _>("id"))
        .collect::<Result<_, _>>()
        .map_err(sq)?;
    for wc in &wcs {
        let mut minutes = BTreeSet::new();
        // Readings, a page of packs at a time in commit order (see migration 0012).
        let mut after = i64::MIN;
        loop {
            let page = sqlx::query(
                "SELECT id FROM telemetry_packs WHERE work_center = $1 AND id > $2 AND t_max >= $3 AND t_min < $4
                 ORDER BY id LIMIT $5",
            )
            .bind(wc.as_str())
            .bind(after)
            .bind(from_ms)
            .bind(to_ms)
            .bind(PAGE_PACKS)
            .fetch_all(&store.pool)
            .await
            .map_err(sq)?;
            let (Some(first), Some(last)) = (page.first(), page.last()) else { break };
            let (first, last): (i64, i64) = (first.try_get("id").map_err(sq)?, last.try_get("id").map_err(sq)?);
            let rows = sqlx::query(
                "SELECT device, seq, order_id, COALESCE(ts_ms, received_ms) AS t, good, scrap, state, metrics
                 FROM telemetry
                 WHERE id >= $1 AND id <= $2 AND work_center = $3
                   AND COALESCE(ts_ms, received_ms) >= $4 AND COALESCE(ts_ms, received_ms) < $5
                 ORDER BY id, pos",
            )
            .bind(first)
            .bind(last)
            .bind(wc.as_str())
            .bind(from_ms)
            .bind(to_ms)
            .fetch_all(&store.pool)
            .await
            .map_err(sq)?;
            after = last;
            for r in &rows {
                let t: i64 = r.try_get("t").map_err(sq)?;
                let metrics = parse_metrics(r.try_get::<Option<String>, _>("metrics").map_err(sq)?.as_deref());
                let device: String = r.try_get("device").map_err(sq)?;
                let order: Option<String> = r.try_get("order_id").map_err(sq)?;
                let state: String = r.try_get("state").map_err(sq)?;
                let reading = ReadingRef {
                    work_center: wc,
                    device: &device,
                    order: order.as_deref(),
                    seq: r.try_get::<i64, _>("seq").map_err(sq)?.max(0) as u64,
                    time_ms: t,
                    good: r.try_get::<i64, _>("good").map_err(sq)?.max(0) as u64,
                    scrap: r.try_get::<i64, _>("scrap").map_err(sq)?.max(0) as u64,
                    state: state.parse().unwrap_or(MachineState::Stopped),
                    metrics: &metrics,
                };
                let n = line::reading(&mut b.body, &reading);
                b.report.readings += 1;
                minutes.insert(Minute::start_of(t));
                b.added(n).await?;
            }
            if (page.len() as i64) < PAGE_PACKS {
                break;
            }
        }
        // State changes, in (time, id) order.
        let (mut at, mut id) = (i64::MIN, i64::MIN);
        loop {
            let rows = sqlx::query(
                "SELECT id, state, reason, ts_ms FROM state_changes
                 WHERE work_center = $1 AND ts_ms >= $2 AND ts_ms < $3 AND (ts_ms > $4 OR (ts_ms = $4 AND id > $5))
                 ORDER BY ts_ms, id LIMIT $6",
            )
            .bind(wc.as_str())
            .bind(from_ms)
            .bind(to_ms)
            .bind(at)
            .bind(id)
            .bind(PAGE)
            .fetch_all(&store.pool)
            .await
            .map_err(sq)?;
            for r in &rows {
                at = r.try_get("ts_ms").map_err(sq)?;
                id = r.try_get("id").map_err(sq)?;
                let state: String = r.try_get("state").map_err(sq)?;
                let reason: Option<String> = r.try_get("reason").map_err(sq)?;
                line::state(&mut b.body, wc, state.parse().unwrap_or(MachineState::Stopped), reason.as_deref(), at);
                b.report.state_changes += 1;
                b.added(1).await?;
            }
            if (rows.len() as i64) < PAGE {
                break;
            }
        }
        // Every minute with readings in the range (whole minutes, also at the edges).
        for start in minutes {
            if let Some(m) = rollup::minute(store, wc, start).await.map_err(db)? {
                m.write(&mut b.body);
                b.report.minutes += 1;
                b.added(1).await?;
            }
        }
    }
    b.flush().await?;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        points = b.report.points,
        rejected = b.report.rejected,
        secs,
        points_per_s = b.report.points as f64 / secs.max(1e-9),
        "time series re-sent"
    );
    Ok(b.report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_round_trip_bit_for_bit() {
        let mut m = BTreeMap::new();
        for (i, x) in [71.5, 0.1 + 0.2, 1.0 / 3.0, -1e-300, 1e21, 123456.789e-3, f64::MIN_POSITIVE].iter().enumerate() {
            m.insert(format!("m{i} \"x\""), *x);
        }
        let text = serde_json::to_string(&m).expect("serializes");
        let back = parse_metrics(Some(&text));
        assert_eq!(back.len(), m.len());
        for (k, v) in &m {
            assert_eq!(back[k].to_bits(), v.to_bits(), "{k}");
        }
        assert!(parse_metrics(None).is_empty());
        assert!(parse_metrics(Some("not json")).is_empty());
    }

    #[test]
    fn times() {
        let now = 1_795_600_800_000;
        assert_eq!(parse_time("now", now), Ok(now));
        assert_eq!(parse_time("90m", now), Ok(now - 5_400_000));
        assert_eq!(parse_time("1795600800123", now), Ok(1_795_600_800_123));
        assert_eq!(parse_time("2026-11-25T10:00:00.123Z", now), Ok(1_795_600_800_123));
        assert!(parse_time("yesterday", now).is_err());
    }
}
