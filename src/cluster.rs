//! Scale-out: several `mes serve` nodes share one plant through leases in PostgreSQL.
//!
//! Each work center (its device intake, its actor and its order queue) is owned by one node
//! at a time, through a row of the `leases` table: owner, expiry (database clock) and a
//! fencing token that moves on by one at every change of owner. A node
//! - heartbeats and renews its leases every quarter of the lease timeout;
//! - takes free or expired work centers up to its fair share (work centers ÷ live nodes,
//!   rounded up), rebuilding each one's actor from the database under the new token;
//! - hands back what is above its share when nodes join (rebalancing), and everything when
//!   it stops;
//! - drops at once, locally, a work center whose lease it finds taken over, and all of them
//!   when it cannot renew for a whole lease timeout.
//!
//! Safety does not rest on any of that being timely: the writer commits a job only while
//! the node holds the job's work center under the token the job was computed with
//! (`db::writer`, rows locked `FOR SHARE` in the commit's transaction), so a node paused
//! past its lease cannot commit for what it lost, however late it wakes up.
//!
//! Transport: a node subscribes only to the devices of the work centers it owns, one MQTT
//! session per work center with a client id derived from the work center (not the node):
//! the persistent session, with what the broker queued in it while nobody held it, passes
//! to the next owner. Modbus pollers run only on the owner.

use crate::config::{IngestConfig, MqttConfig};
use crate::db::Store;
use crate::ingest::modbus::{StatusBoard, WriteTarget, Writers};
use crate::ingest::{mqtt, Pipeline, Router};
use crate::metrics::Metrics;
use crate::plant::{Device, Plant};
use mes_actors::actor::{SetOrder, WorkCenterActor};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// What a node runs for one work center it owns.
struct Local {
    token: i64,
    device: String,
    current_order: Option<String>,
    stop: watch::Sender<bool>,
}

/// One node of a cluster.
pub struct Node {
    pub node_id: String,
    pub lease_ms: i64,
    store: Store,
    plant: Arc<Plant>,
    /// Taken when the node leaves, so that the writer sees its last sender go.
    pipeline: std::sync::Mutex<Option<Pipeline>>,
    router: Arc<Router>,
    board: StatusBoard,
    writers: Writers,
    metrics: Arc<Metrics>,
    mqtt: MqttConfig,
    ingest: IngestConfig,
    owned: tokio::sync::Mutex<BTreeMap<String, Local>>,
    /// Pending Modbus dispatches are being written (one batch at a time).
    dispatching: Arc<std::sync::atomic::AtomicBool>,
}

impl Node {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node_id: String,
        lease_ms: i64,
        store: Store,
        plant: Arc<Plant>,
        pipeline: Pipeline,
        router: Arc<Router>,
        board: StatusBoard,
        writers: Writers,
        metrics: Arc<Metrics>,
        mqtt: MqttConfig,
        ingest: IngestConfig,
    ) -> Arc<Node> {
        Arc::new(Node {
            node_id,
            lease_ms,
            store,
            plant,
            pipeline: std::sync::Mutex::new(Some(pipeline)),
            router,
            board,
            writers,
            metrics,
            mqtt,
            ingest,
            owned: Default::default(),
            dispatching: Default::default(),
        })
    }

    /// The MQTT client id of a work center's session, the same on every node.
    pub fn session_id(client_id: &str, wc: &str) -> String {
        format!("{client_id}-wc-{wc}")
    }

    fn tick_every(&self) -> Duration {
        Duration::from_millis((self.lease_ms / 4).clamp(100, 5_000) as u64)
    }

    /// Runs on the actix system thread (work-center actors start on it). Joins the cluster
    /// and keeps the node's share of work centers until `shutdown`, then
    /// stops their intake and hands them back.
    pub async fn run(self: Arc<Self>, http_addr: String, mut shutdown: watch::Receiver<bool>) {
        let wcs: Vec<String> = self.plant.work_centers.iter().map(|w| w.id.clone()).collect();
        let mut delay = Duration::from_millis(200);
        loop {
            match self.store.cluster_join(&self.node_id, &http_addr, self.lease_ms, &wcs).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, node = %self.node_id, "cannot join the cluster; retrying");
                }
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        tracing::info!(node = %self.node_id, lease_ms = self.lease_ms, "joined the cluster");
        // One round for nodes starting together to see each other before taking shares.
        tokio::select! {
            _ = shutdown.changed() => {}
            _ = tokio::time::sleep(self.tick_every()) => {}
        }
        let mut last_ok = tokio::time::Instant::now();
        while !*shutdown.borrow() {
            match self.tick().await {
                Ok(()) => last_ok = tokio::time::Instant::now(),
                Err(e) => {
                    tracing::warn!(error = %e, node = %self.node_id, "cluster heartbeat failed");
                    if last_ok.elapsed() >= Duration::from_millis(self.lease_ms as u64) {
                        // Our leases have expired by now: another node may own them.
                        self.drop_all("heartbeat failed for a whole lease").await;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tokio::time::sleep(self.tick_every()) => {}
            }
        }
        self.drop_all("shutting down").await;
        if let Ok(mut p) = self.pipeline.lock() {
            p.take();
        }
        if let Err(e) = self.store.cluster_leave(&self.node_id).await {
            tracing::warn!(error = %e, "could not hand the leases back; they expire on their own");
        }
        tracing::info!(node = %self.node_id, "left the cluster");
    }

    /// One round: heartbeat and renewal, then take or hand back to reach the fair share.
    async fn tick(&self) -> Result<(), crate::db::DbError> {
        let held: BTreeMap<String, i64> =
            self.store.cluster_renew(&self.node_id, self.lease_ms).await?.into_iter().collect();
        let mut owned = self.owned.lock().await;
        // Lost: taken over by another node while we were not looking (a pause, a slow
        // database). Their late commits are fenced; stop their intake here too.
        let lost: Vec<String> =
            owned.iter().filter(|(wc, l)| held.get(*wc) != Some(&l.token)).map(|(wc, _)| wc.clone()).collect();
        for wc in lost {
            if let Some(l) = owned.remove(&wc) {
                tracing::warn!(node = %self.node_id, work_center = %wc, token = l.token, "lease lost to another node");
                self.stop_local(&wc, &l);
                Metrics::inc(&self.metrics.cluster_lost);
            }
        }
        let (live, total) = self.store.cluster_shape().await?;
        let share = if live <= 0 { total } else { (total + live - 1) / live };
        let have = owned.len() as i64;
        if have > share {
            // Hand back the excess, newest ids first; their sessions keep what arrives.
            let excess: Vec<String> = owned.keys().rev().take((have - share) as usize).cloned().collect();
            for wc in excess {
                if let Some(l) = owned.remove(&wc) {
                    self.stop_local(&wc, &l);
                    self.store.cluster_release(&self.node_id, &wc, l.token).await?;
                    Metrics::inc(&self.metrics.cluster_released);
                    tracing::info!(node = %self.node_id, work_center = %wc, "handed back (rebalancing)");
                }
            }
        } else if have < share {
            for (wc, token) in self.store.cluster_claim(&self.node_id, self.lease_ms, share - have).await? {
                match self.start_local(&wc, token).await {
                    Ok(l) => {
                        tracing::info!(node = %self.node_id, work_center = %wc, token, "took ownership");
                        Metrics::inc(&self.metrics.cluster_acquired);
                        owned.insert(wc, l);
                    }
                    Err(e) => {
                        tracing::error!(node = %self.node_id, work_center = %wc, error = %e, "cannot start; handing back");
                        self.store.cluster_release(&self.node_id, &wc, token).await?;
                    }
                }
            }
        }
        // Orders dispatched through other nodes: the owner's actor follows the database.
        let ids: Vec<String> = owned.keys().cloned().collect();
        for (wc, order) in self.store.current_orders(&ids).await? {
            if let Some(l) = owned.get_mut(&wc) {
                if order.is_some() && l.current_order != order {
                    if let Some(addr) = self.router.work_center(&wc) {
                        if addr.send(SetOrder(order.clone())).await.is_ok() {
                            l.current_order = order;
                        }
                    }
                }
            }
        }
        // Modbus dispatches that other nodes recorded for our devices: written here, off
        // the heartbeat's path (a slow device must not delay lease renewal).
        if !self.dispatching.swap(true, Relaxed) {
            let pending = self.store.pending_dispatches(&ids).await;
            let (store, writers, busy) = (self.store.clone(), self.writers.clone(), self.dispatching.clone());
            let actor = format!("node:{}", self.node_id);
            tokio::spawn(async move {
                for (id, wc, device, quantity) in pending.unwrap_or_default() {
                    let Some(h) = writers.get(&device) else { continue };
                    let target = WriteTarget::Role(mes_plc_maps::Role::Target);
                    let q = quantity.max(0) as u64;
                    let result = match h.check(&target, q) {
                        Ok(point) => {
                            let written = h.write(target, q).await;
                            // Audited like a dispatch written by the node asked: the point,
                            // its value read back before and after, the result (the
                            // `dispatch` line of the node asked names who released the order).
                            let write = match &written {
                                Ok((_, before, after)) => serde_json::json!({"point": point, "value": q,
                                    "before": before, "after": after, "result": "ok"}),
                                Err(e) => serde_json::json!({"point": point, "value": q, "result": e.to_string()}),
                            };
                            let detail = serde_json::json!({"dispatch": id, "device": device, "write": write});
                            if let Err(e) = store.audit(&actor, "dispatch_write", &wc, &detail.to_string()).await {
                                tracing::warn!(dispatch = %id, error = %e, "dispatch write not audited");
                            }
                            written.map(|_| ()).map_err(|e| e.to_string())
                        }
                        Err(_) => Ok(()), // the map has no target point: nothing to write
                    };
                    if let Err(e) = &result {
                        tracing::warn!(work_center = %wc, dispatch = %id, error = %e, "order dispatch failed");
                    }
                    if let Err(e) = store.finish_dispatch(&id, result.err().as_deref()).await {
                        tracing::warn!(dispatch = %id, error = %e, "dispatch result not recorded; retried");
                    }
                }
                busy.store(false, Relaxed);
            });
        }
        self.metrics.cluster_owned.store(owned.len() as i64, Relaxed);
        Ok(())
    }

    /// Rebuilds a work center's actor from the database under `token` and starts its
    /// device intake (its MQTT session or its Modbus poller).
    async fn start_local(&self, wc: &str, token: i64) -> Result<Local, String> {
        let row = self
            .store
            .work_center(wc)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("work center `{wc}` is not in the database"))?;
        let cursor = self.store.cursor_of(&row.device_id).await.map_err(|e| e.to_string())?;
        let last_ts = match cursor {
            Some(_) => self.store.last_ts_of(&row.device_id).await.map_err(|e| e.to_string())?,
            None => None,
        };
        let state = crate::app::work_center_state(&self.plant, &row, cursor, last_ts);
        let current_order = state.current_order.clone();
        self.router.insert_fenced(wc, &row.device_id, WorkCenterActor::new(state), token);
        let pipeline = self.pipeline.lock().ok().and_then(|p| p.clone()).ok_or("the node is leaving")?;
        let (stop, stop_rx) = watch::channel(false);
        let started = match self.plant.work_center(wc).map(|w| &w.device) {
            Some(Device::Modbus(_)) => {
                let raw = self.store.modbus_raw().await.map_err(|e| e.to_string())?.get(&row.device_id).copied();
                crate::ingest::modbus::start_one(
                    &self.plant,
                    wc,
                    cursor.map(|c| c.0),
                    raw,
                    &pipeline,
                    &self.board,
                    &self.writers,
                    stop_rx,
                )
                .map(|_| ())
            }
            Some(Device::Mqtt { .. }) => {
                let (store, node, wc2) = (self.store.clone(), self.node_id.clone(), wc.to_string());
                let guard: mqtt::Guard = Arc::new(move || {
                    let (store, node, wc) = (store.clone(), node.clone(), wc2.clone());
                    Box::pin(async move { store.cluster_holds(&node, &wc, token).await.unwrap_or(false) })
                });
                let session = mqtt::Session {
                    client_id: Node::session_id(&self.mqtt.client_id, wc),
                    filters: vec![format!("{}/devices/{}/telemetry", self.mqtt.topic_prefix, row.device_id)],
                    guard: Some(guard),
                    kind: mqtt::Kind::Plain,
                };
                mqtt::start(&self.mqtt, &self.ingest, session, pipeline, stop_rx, None).map(|_| ())
            }
            _ => Err(format!("work center `{wc}`: this device kind is not supported in a cluster")),
        };
        match started {
            Ok(()) => Ok(Local { token, device: row.device_id, current_order, stop }),
            Err(e) => {
                self.router.remove(wc);
                Err(e)
            }
        }
    }

    /// Stops a work center's intake here: new input is no longer taken; what is in flight
    /// commits only if the lease still holds (fencing) and is otherwise redelivered to the
    /// next owner.
    fn stop_local(&self, wc: &str, l: &Local) {
        let _ = l.stop.send(true);
        self.router.remove(wc);
        self.writers.remove(&l.device);
    }

    async fn drop_all(&self, why: &str) {
        let mut owned = self.owned.lock().await;
        if !owned.is_empty() {
            tracing::warn!(node = %self.node_id, work_centers = owned.len(), why, "stopping the intake of every owned work center");
        }
        for (wc, l) in std::mem::take(&mut *owned) {
            self.stop_local(&wc, &l);
        }
        self.metrics.cluster_owned.store(0, Relaxed);
    }
}
