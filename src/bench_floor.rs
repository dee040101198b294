//! The *contract floor* of `mes bench ingest`: the least work any implementation of the
//! MQTT contract does per message, measured in the same run as the MES and the raw broker.
//!
//! The raw baseline moves messages through publisher, broker and a subscriber that does
//! nothing. The contract asks more of any ingest, however written: QoS 1 on a persistent
//! session, each message decoded and checked, one row per reading stored under its
//! `(device, boot, seq)` key (so a redelivery is not counted twice), and the message
//! acknowledged only after that row is committed. The floor does exactly that and nothing
//! else: the MES's own parser, the MES's `telemetry` table with its indexes (migrated in a
//! database of its own), one multi-row `INSERT … ON CONFLICT DO NOTHING` per batch committed
//! on its own (one trip), a session per device with manual acknowledgements sent after the
//! commit. No actors, deltas, settlement, cursors or metrics.
//!
//! The MES's rate over the floor's is the cost of what the MES does beyond storing; the
//! floor's rate over the raw broker's is the cost the contract itself puts on any
//! implementation on this machine.

use crate::db::Store;
use crate::ingest::parse;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use std::time::Duration;
use tokio::sync::mpsc;

/// Readings per insert (11 values each: under SQLite's 32,766 values per statement).
const BATCH_MAX: usize = 2_000;
/// Publishes waiting for the store, across sessions.
const QUEUE: usize = 8_192;

/// A running floor: its sessions and its store task; stopped when dropped.
pub struct Floor {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Floor {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts the floor on `broker` for `devices` under `prefix`, storing into `store` (already
/// migrated); returns once every session's subscription is confirmed.
pub async fn start(broker: &str, store: Store, devices: &[String], prefix: &str) -> anyhow::Result<Floor> {
    // One inserting connection, as the MES's one writer: the observer relies on row ids
    // growing in commit order, which concurrent PostgreSQL transactions do not keep. (Four
    // inserting connections, one per session, measured no faster on PostgreSQL here:
    // 43–48k against 43k msg/s; the server's own work per row is the bound.)
    let (tx, rx) = mpsc::channel::<(usize, rumqttc::Publish)>(QUEUE);
    let mut clients = Vec::new();
    let mut tasks = Vec::new();
    let mut ready = Vec::new();
    for (i, device) in devices.iter().enumerate() {
        let mut o = crate::bench_load::mqtt_options(&format!("bench-floor-{i}-{}", crate::now_ms()), broker)?;
        o.set_manual_acks(true);
        let (client, mut el) = AsyncClient::new(o, 16_384);
        client.subscribe(format!("{prefix}/devices/{device}/telemetry"), QoS::AtLeastOnce).await?;
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        ready.push(ready_rx);
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            loop {
                match el.poll().await {
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
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }));
        clients.push(client);
    }
    for r in ready {
        tokio::time::timeout(Duration::from_secs(5), r)
            .await
            .map_err(|_| anyhow::anyhow!("floor: a subscription was not confirmed in 5 s"))??;
    }
    tasks.push(tokio::spawn(store_loop(store, clients, rx, prefix.to_string())));
    Ok(Floor { tasks })
}

/// Takes what has arrived (up to [`BATCH_MAX`]), stores it in one statement, then
/// acknowledges it, in arrival order (so in each session's receive order).
async fn store_loop(
    store: Store,
    clients: Vec<AsyncClient>,
    mut rx: mpsc::Receiver<(usize, rumqttc::Publish)>,
    prefix: String,
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
        let readings: Vec<_> = batch
            .iter()
            .filter_map(|(_, p)| {
                let device = parse::device_from_topic(&prefix, &p.topic).ok()?;
                parse::parse(device, &p.payload).ok()
            })
            .collect();
        if !readings.is_empty() {
            let mut sql = String::from(
                "INSERT INTO telemetry (device, boot, seq, work_center, order_id, ts_ms, received_ms, good, scrap, state, metrics) VALUES ",
            );
            sql.push_str(&crate::db::writer::rows_sql(store.backend, readings.len(), 11));
            sql.push_str(" ON CONFLICT (device, boot, seq) DO NOTHING");
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(false);
            for r in &readings {
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
            if let Err(e) = q.execute(&mut *conn).await {
                // Not acknowledged: the broker redelivers, the key absorbs what was stored.
                eprintln!("floor: insert failed: {e}");
                continue;
            }
        }
        for (i, p) in &batch {
            if clients[*i].ack(p).await.is_err() {
                return;
            }
        }
    }
}

/// A fresh database for the floor next to the MES's: a SQLite file beside it, or a
/// PostgreSQL database `<name>_floor` on the same server; migrated.
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
    Ok(store)
}
