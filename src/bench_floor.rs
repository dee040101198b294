//! The *contract floors* of `mes bench ingest`: the least work an implementation of the
//! MQTT contract does per message, measured in the same run as the MES and the raw broker.
//!
//! The raw baseline moves messages through publisher, broker and one subscriber that does
//! nothing (its client acknowledges on receipt). The contract asks more of any ingest,
//! however written: QoS 1 on a persistent session, each message decoded and checked,
//! what it changes committed, and the message acknowledged only after that commit. A floor
//! does that and nothing else: a session per device, the MES's own parser, one statement
//! per batch committed on its own (one trip), the batch's acknowledgements written to each
//! session at once after the commit, as the MES writes them. No actors, deltas,
//! settlement or metrics. What is committed is a [`Keep`]:
//!
//! - [`Keep::Rows`], the floor of the MES's design before session 13: one row per reading
//!   in a `telemetry` table under its `(device, boot, seq)` key (the floor's database
//!   keeps that table in place of the view over packs), one multi-row
//!   `INSERT … ON CONFLICT DO NOTHING` per batch;
//! - [`Keep::Cursors`], the floor of any design: what a cumulative counter needs to be
//!   counted once, the greatest `(boot, seq, good, scrap)` per device, one conditional
//!   upsert per batch into `device_cursors`;
//! - [`Keep::Nothing`]: parsed and acknowledged, nothing committed (not an implementation
//!   of the contract; the cost of the sessions, the parse and the acknowledgements).
//!
//! The MES's rate over a floor's is the cost of what the MES does beyond it; a floor's rate
//! over the raw broker's is the cost that part of the contract puts on any implementation on
//! this machine.

use crate::db::Store;
use crate::ingest::parse;
use mes_actors::Reading;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Readings per batch (11 values each: under SQLite's 32,766 values per statement).
const BATCH_MAX: usize = 2_000;
/// Publishes waiting for the store, across sessions.
const QUEUE: usize = 8_192;

/// What a floor commits of each batch (see the module's documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Keep {
    Rows,
    Cursors,
    Nothing,
}

/// A running floor: its sessions and its store task; stopped when dropped.
pub struct Floor {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stored: Arc<AtomicU64>,
}

impl Floor {
    /// Messages committed (or, keeping nothing, parsed) so far, counted before their
    /// acknowledgements are written.
    pub fn stored(&self) -> u64 {
        self.stored.load(Relaxed)
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts a floor on `broker` for `devices` under `prefix`, committing what `keep` says
/// into `store` (already migrated); returns once every session's subscription is confirmed.
pub async fn start(broker: &str, store: Store, devices: &[String], prefix: &str, keep: Keep) -> anyhow::Result<Floor> {
    // One committing connection, as the MES's one writer: the observer relies on row ids
    // growing in commit order, which concurrent PostgreSQL transactions do not keep. (Four
    // inserting connections, one per session, measured no faster on PostgreSQL here:
    // 43–48k against 43k msg/s; the server's own work per row is the bound.)
    let (tx, rx) = mpsc::channel::<(usize, rumqttc::Publish)>(QUEUE);
    let mut tasks = Vec::new();
    let mut ready = Vec::new();
    let mut acks = Vec::new();
    for (i, device) in devices.iter().enumerate() {
        let mut o =
            crate::bench_load::mqtt_options(&crate::bench_load::client_id(&format!("bench-floor-{i}")), broker)?;
        o.set_manual_acks(true);
        let (client, el) = AsyncClient::new(o, 64);
        client.subscribe(format!("{prefix}/devices/{device}/telemetry"), QoS::AtLeastOnce).await?;
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        ready.push(ready_rx);
        // Unbounded in type only, as the MES's: it holds ids of publishes received and not
        // yet acknowledged, which the broker's window bounds.
        let (ack_tx, ack_rx) = mpsc::unbounded_channel::<Vec<u16>>();
        acks.push(ack_tx);
        tasks.push(tokio::spawn(session_loop(client, el, i, tx.clone(), ack_rx, ready_tx)));
    }
    for r in ready {
        tokio::time::timeout(Duration::from_secs(5), r)
            .await
            .map_err(|_| anyhow::anyhow!("floor: a subscription was not confirmed in 5 s"))??;
    }
    let stored = Arc::new(AtomicU64::new(0));
    tasks.push(tokio::spawn(store_loop(store, keep, acks, rx, prefix.to_string(), stored.clone())));
    Ok(Floor { tasks, stored })
}

/// One session: hands each publish to the store loop and writes the acknowledgements it
/// gets back, a batch at a time, taking them before the next poll (as the MES's loop). The
/// client is held so that its event loop keeps running. A floor does not outlive its
/// connection: acknowledgements of a lost connection must not reach the next one, so the
/// session ends, and the run waiting for its count fails at its deadline.
async fn session_loop(
    _client: AsyncClient,
    mut el: rumqttc::EventLoop,
    i: usize,
    tx: mpsc::Sender<(usize, rumqttc::Publish)>,
    mut acks: mpsc::UnboundedReceiver<Vec<u16>>,
    ready_tx: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready_tx = Some(ready_tx);
    loop {
        let event = tokio::select! {
            biased;
            Some(pkids) = acks.recv() => {
                let written = tokio::time::timeout(Duration::from_secs(10), crate::ingest::mqtt::write_pubacks(&mut el, pkids));
                if !matches!(written.await, Ok(Ok(()))) {
                    eprintln!("floor: acknowledgements not written; the broker redelivers");
                }
                continue;
            }
            e = el.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                if let Some(t) = ready_tx.take() {
                    let _ = t.send(());
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if tx.send((i, p)).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("floor: session {i} lost its connection ({e}); it ends");
                return;
            }
        }
    }
}

/// Takes what has arrived (up to [`BATCH_MAX`]), commits it in one statement, then hands
/// each session its packet ids, in arrival order (so in the session's receive order).
async fn store_loop(
    store: Store,
    keep: Keep,
    acks: Vec<mpsc::UnboundedSender<Vec<u16>>>,
    mut rx: mpsc::Receiver<(usize, rumqttc::Publish)>,
    prefix: String,
    stored: Arc<AtomicU64>,
) {
    let mut batch = Vec::with_capacity(BATCH_MAX);
    let mut conn = match store.pool.acquire().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("floor: no connection: {e}");
            return;
        }
    };
    loop {
        batch.clear();
        match rx.recv().await {
            Some(m) => batch.push(m),
            None => return,
        }
        while batch.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let received_ms = crate::now_ms();
        let readings: Vec<Reading> = batch
            .iter()
            .filter_map(|(_, p)| {
                let device = parse::device_from_topic(&prefix, &p.topic).ok()?;
                parse::parse(device, &p.payload).ok()
            })
            .collect();
        let statement = match keep {
            Keep::Rows => rows_statement(store.backend, &readings, received_ms),
            Keep::Cursors => cursors_statement(store.backend, &readings, received_ms),
            Keep::Nothing => None,
        };
        if let Some(q) = statement {
            if let Err(e) = q.execute(&mut *conn).await {
                // Not acknowledged: the broker redelivers, the key absorbs what was stored.
                eprintln!("floor: commit failed: {e}");
                continue;
            }
        }
        stored.fetch_add(batch.len() as u64, Relaxed);
        let mut per_session = vec![Vec::new(); acks.len()];
        for (i, p) in &batch {
            per_session[*i].push(p.pkid);
        }
        for (tx, pkids) in acks.iter().zip(per_session) {
            if !pkids.is_empty() && tx.send(pkids).is_err() {
                return;
            }
        }
    }
}

type Statement = sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments>;

/// One row per reading; a reading already stored is skipped by its key.
fn rows_statement(backend: crate::db::Backend, readings: &[Reading], received_ms: i64) -> Option<Statement> {
    if readings.is_empty() {
        return None;
    }
    let mut sql = String::from(
        "INSERT INTO telemetry (device, boot, seq, work_center, order_id, ts_ms, received_ms, good, scrap, state, metrics) VALUES ",
    );
    sql.push_str(&crate::db::writer::rows_sql(backend, readings.len(), 11));
    sql.push_str(" ON CONFLICT (device, boot, seq) DO NOTHING");
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(false);
    for r in readings {
        let metrics = (!r.metrics.is_empty()).then(|| serde_json::to_string(&r.metrics).ok()).flatten();
        q = q
            .bind(r.device.clone())
            .bind(r.boot as i64)
            .bind(r.seq as i64)
            .bind(r.device.clone())
            .bind(r.order.clone())
            .bind(r.ts_ms)
            .bind(received_ms)
            .bind(r.good as i64)
            .bind(r.scrap as i64)
            .bind(r.state.map(|s| s.as_str()).unwrap_or("running"))
            .bind(metrics);
    }
    Some(q)
}

/// The greatest reading per device, upserted where it is ahead of the stored one.
fn cursors_statement(backend: crate::db::Backend, readings: &[Reading], received_ms: i64) -> Option<Statement> {
    let mut last: BTreeMap<&str, &Reading> = BTreeMap::new();
    for r in readings {
        let e = last.entry(r.device.as_str()).or_insert(r);
        if (r.boot, r.seq) > (e.boot, e.seq) {
            *e = r;
        }
    }
    if last.is_empty() {
        return None;
    }
    let mut sql = String::from("INSERT INTO device_cursors (device, boot, seq, good, scrap, updated_ms) VALUES ");
    sql.push_str(&crate::db::writer::rows_sql(backend, last.len(), 6));
    sql.push_str(
        " ON CONFLICT (device) DO UPDATE SET boot = excluded.boot, seq = excluded.seq, good = excluded.good, \
         scrap = excluded.scrap, updated_ms = excluded.updated_ms \
         WHERE (excluded.boot, excluded.seq) > (device_cursors.boot, device_cursors.seq)",
    );
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(false);
    for r in last.values() {
        q = q
            .bind(r.device.clone())
            .bind(r.boot as i64)
            .bind(r.seq as i64)
            .bind(r.good as i64)
            .bind(r.scrap as i64)
            .bind(received_ms);
    }
    Some(q)
}

/// A fresh database for the floor next to the MES's: a SQLite file beside it, or a
/// PostgreSQL database `<name>_floor` on the same server; migrated, with a `telemetry`
/// table of a row per reading.
pub async fn store_beside(mes_url: &str) -> anyhow::Result<Store> {
    let url = if mes_url.starts_with("sqlite:") {
        let path = mes_url.trim_start_matches("sqlite://").trim_start_matches("sqlite:");
        let path = path.split('?').next().unwrap_or(path);
        let floor = format!("{}.floor.db", path.trim_end_matches(".db"));
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{floor}{suffix}"));
        }
        format!("sqlite://{floor}")
    } else {
        let (base, name) = mes_url.rsplit_once('/').ok_or_else(|| anyhow::anyhow!("bad database URL {mes_url}"))?;
        let name = name.split('?').next().unwrap_or(name);
        let floor = format!("{name}_floor");
        let admin = Store::connect(&format!("{base}/postgres"), 2).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {floor} WITH (FORCE)")))
            .execute(&admin.pool)
            .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {floor}"))).execute(&admin.pool).await?;
        admin.pool.close().await;
        format!("{base}/{floor}")
    };
    let store = Store::connect(&url, 8).await?;
    store.migrate().await?;
    // The row-per-reading table the MES kept before packing (migrations 0001–0011), in
    // place of the view over packs; and for the bench observer, which follows packs, a
    // view of its rows as packs of one.
    let (id, pack) = match store.backend {
        crate::db::Backend::Sqlite => ("id INTEGER PRIMARY KEY AUTOINCREMENT", "json_array(json_array"),
        crate::db::Backend::Postgres => {
            ("id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "CAST(json_build_array(json_build_array")
        }
    };
    let close = match store.backend {
        crate::db::Backend::Sqlite => ")",
        crate::db::Backend::Postgres => ") AS TEXT)",
    };
    for sql in [
        "DROP VIEW telemetry".to_string(),
        "DROP TABLE telemetry_packs".to_string(),
        format!(
            "CREATE TABLE telemetry ({id}, device TEXT NOT NULL, boot BIGINT NOT NULL, seq BIGINT NOT NULL,
               work_center TEXT NOT NULL, order_id TEXT, ts_ms BIGINT, received_ms BIGINT NOT NULL,
               good BIGINT NOT NULL, scrap BIGINT NOT NULL, state TEXT NOT NULL, metrics TEXT,
               UNIQUE (device, boot, seq))"
        ),
        "CREATE INDEX telemetry_wc_time ON telemetry(work_center, (COALESCE(ts_ms, received_ms)))".to_string(),
        format!(
            "CREATE VIEW telemetry_packs AS SELECT id, device,
               {pack}(boot, seq, order_id, ts_ms, received_ms, good, scrap, state, NULL){close} AS readings
             FROM telemetry"
        ),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&store.pool).await?;
    }
    Ok(store)
}
