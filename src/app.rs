//! Start-up and shutdown: the order in which the parts come up and go down.
//!
//! Up: config → database (migrate, master data) → embedded broker → actors rebuilt from
//! the database → writer → MQTT intake → HTTP. Down (SIGINT/SIGTERM or the caller's stop):
//! HTTP stops, MQTT intake stops admitting, in-flight inputs commit and are acknowledged,
//! the writer drains, exit 0.

use crate::config::Config;
use crate::db::writer::Writer;
use crate::db::Store;
use crate::events::Events;
use crate::http::api::{self, AppState};
use crate::http::{ApiError, Auth};
use crate::ingest::{mqtt, Pipeline, Router};
use crate::metrics::Metrics;
use crate::plant::Plant;
use actix_web::{web, HttpServer};
use anyhow::Context;
use mes_actors::actor::WorkCenterActor;
use mes_actors::{MachineState, WorkCenterState};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// What a running MES exposes to its caller (the demo, tests).
#[derive(Clone)]
pub struct Handle {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub http_addr: SocketAddr,
    pub mqtt_url: String,
    /// The time-series exporter's tap, when `[influx]` is configured.
    pub influx: Option<crate::influx::Tap>,
}

/// Connects, migrates and loads master data.
pub async fn prepare(cfg: &Config) -> anyhow::Result<(Store, Plant)> {
    let plant = Plant::load(cfg.plant.file.as_deref())?;
    crate::ingest::modbus::check_maps(&plant).map_err(anyhow::Error::msg)?;
    // A cluster node's transactions must never hold locks long past a third of the lease.
    let idle_in_tx = match &cfg.cluster {
        Some(c) => crate::config::parse_duration(&c.lease_timeout).map_or(Duration::from_secs(3), |d| d / 3),
        None => Duration::from_secs(10),
    };
    let store = Store::connect_with(&cfg.database.url, cfg.database.max_connections, idle_in_tx)
        .await
        .with_context(|| format!("connecting to database.url `{}`", redact(&cfg.database.url)))?;
    store.migrate().await?;
    store.upsert_plant(&plant).await?;
    Ok((store, plant))
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].find(':') {
            Some(c) => format!("{}:***{}", &url[..s + 3 + c], &url[at..]),
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}

/// A work center's actor state as committed: totals, state, current order, device cursor
/// and the device time of its last counted reading.
pub fn work_center_state(
    plant: &Plant,
    w: &crate::db::queries::WorkCenterRow,
    cursor: Option<crate::db::queries::StoredCursor>,
    last_ts_ms: Option<i64>,
) -> WorkCenterState {
    let mut st = WorkCenterState::new(&w.id, &w.device_id);
    st.state = w.state.parse().unwrap_or(MachineState::Stopped);
    st.reason = w.reason.clone();
    st.current_order = w.current_order.clone();
    st.cursor = cursor.map(|c| c.0);
    st.prev_boot = cursor.and_then(|c| c.1);
    st.last_ts_ms = last_ts_ms;
    st.good_total = w.good_total.max(0) as u64;
    st.scrap_total = w.scrap_total.max(0) as u64;
    st.max_step = plant.work_center(&w.id).and_then(|p| p.max_units_per_reading);
    st
}

/// The plant's MQTT device ids.
fn mqtt_devices(plant: &Plant) -> Vec<String> {
    plant
        .work_centers
        .iter()
        .filter_map(|w| match &w.device {
            crate::plant::Device::Mqtt { id } => Some(id.clone()),
            _ => None,
        })
        .collect()
}

/// Runs the MES until `stop` completes, then shuts down gracefully.
/// `on_ready` is called once everything is up.
pub async fn run<F, R>(cfg: Config, stop: F, on_ready: R) -> anyhow::Result<()>
where
    F: Future<Output = ()>,
    R: FnOnce(Handle),
{
    let (store, plant) = prepare(&cfg).await?;
    // A single node's MQTT sessions: the main one and its plant's devices in partitions.
    let devices = mqtt_devices(&plant);
    let mut layout = cfg.cluster.is_none().then(|| crate::ingest::sessions::layout(&cfg.mqtt, &devices));
    // A single node that ingests from the broker it embeds reads its partition sessions
    // through in-process links (`crate::broker::LocalLink`); everything else connects over TCP.
    let mut local_links = HashMap::new();
    if let Some(b) = &cfg.mqtt.embedded_broker {
        let addr: SocketAddr = b.parse().context("mqtt.embedded_broker")?;
        let own = cfg.mqtt.host_port().ok().and_then(|(h, p)| format!("{h}:{p}").parse::<SocketAddr>().ok());
        let local: Vec<String> = match (&layout, own == Some(addr)) {
            (Some(l), true) => l.partitions.iter().map(|s| s.client_id.clone()).collect(),
            _ => Vec::new(),
        };
        local_links = crate::broker::start(addr, cfg.ingest.max_payload, &local).map_err(anyhow::Error::msg)?;
    }
    let metrics = Arc::new(Metrics::default());
    // A cluster node's events are relayed to the other nodes (`crate::events`).
    let (events, relay) = match &cfg.cluster {
        Some(c) => {
            let (e, q) = Events::clustered(&c.node_id, metrics.clone());
            (e, Some(q))
        }
        None => (Events::default(), None),
    };
    let ledger = Arc::new(crate::settlement::Ledger::from_plant(&plant));

    // Cluster mode (several nodes on one PostgreSQL database, `crate::cluster`): work
    // centers start when this node takes their lease, each with its own MQTT session.
    let cluster = match &cfg.cluster {
        Some(c) => {
            if let Some(w) = plant.work_centers.iter().find(|w| matches!(w.device, crate::plant::Device::Sparkplug(_)))
            {
                anyhow::bail!(
                    "cluster: work center `{}` has a Sparkplug device; a cluster supports MQTT and Modbus devices",
                    w.id
                );
            }
            let lease = crate::config::parse_duration(&c.lease_timeout).context("cluster.lease_timeout")?;
            Some((c.node_id.clone(), lease.as_millis() as i64))
        }
        None => None,
    };

    // Actors, rebuilt from the database (a cluster node starts none until it owns them).
    let router = Arc::new(Router::default());
    if cluster.is_none() {
        let cursors = store.cursors().await?;
        for w in store.work_centers().await? {
            if plant.work_center(&w.id).is_none() {
                continue; // retired from the plant file; its history stays
            }
            let cursor = cursors.get(&w.device_id).copied();
            let last_ts = match cursor {
                Some(_) => store.last_ts_of(&w.device_id).await?,
                None => None,
            };
            router.insert(&w.id, &w.device_id, WorkCenterActor::new(work_center_state(&plant, &w, cursor, last_ts)));
        }
    }

    // Writer and intake.
    let (writer_tx, writer_rx) = mpsc::channel(cfg.ingest.queue);
    let writer =
        Writer::new(store.clone(), writer_rx, metrics.clone(), events.clone(), cfg.ingest.batch_max, ledger.clone());
    let writer = match &cluster {
        Some((node, _)) => writer.with_fence(node.clone()),
        None => writer,
    };
    // Live state actors (buffers, open orders), rebuilt from the database.
    let buffers = store.buffers().await?.into_iter().map(|b| (b.id, b.sku, b.capacity, b.on_hand)).collect();
    let mut open = Vec::new();
    for status in ["released", "running", "completed"] {
        for o in store.orders(Some(status), 100_000).await? {
            let st = o.status.parse().unwrap_or(mes_actors::OrderStatus::Released);
            open.push((o.id, o.quantity, o.good, o.scrap, st));
        }
    }
    let live = crate::live::Live::start(buffers, open, events.clone(), metrics.clone());
    let writer = writer
        .with_live(live.clone())
        .with_progress_every(cfg.erp.as_ref().map(|e| e.progress_every_units).unwrap_or(0));
    // Time series out (optional): fed by the writer after each commit, never waited for.
    let influx = match &cfg.influx {
        Some(i) => Some(crate::influx::Exporter::start(i, store.clone(), metrics.clone()).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let writer = match &influx {
        Some(x) => writer.with_tap(x.tap.clone()),
        None => writer,
    };
    let writer_task = tokio::spawn(writer.run());
    let pipeline = Pipeline::new(router.clone(), writer_tx, metrics.clone(), cfg.ingest.max_in_flight);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    if let Some(q) = relay {
        q.start(store.clone(), cfg.database.url.clone(), shutdown_rx.clone());
    }
    let board: crate::ingest::modbus::StatusBoard = Default::default();
    let (pollers, modbus_writers) = match cluster {
        Some(_) => (Vec::new(), Default::default()),
        None => crate::ingest::modbus::start(&plant, &store, pipeline.clone(), board.clone(), shutdown_rx.clone())
            .await
            .map_err(anyhow::Error::msg)?,
    };
    // Sparkplug B primary host, when the plant binds a work center to a Sparkplug device;
    // device births and deaths show on the same status board as polled devices.
    let spb = Arc::new(crate::ingest::sparkplug::Bindings::from_plant(&plant));
    let spb = (!spb.is_empty()).then(|| crate::ingest::sparkplug::Host::new(spb, board.clone(), Some(store.clone())));
    // MQTT sessions. A single node: the plant's MQTT devices split over `mqtt.sessions`
    // partition sessions plus the main one (`ingest::sessions`); sessions an earlier
    // configuration used are drained in the background. A cluster node: commands only
    // (its work centers' sessions start with their leases).
    let mut intake_tasks = Vec::new();
    let session = match &cluster {
        None => {
            let layout = layout.take().unwrap_or_else(|| crate::ingest::sessions::layout(&cfg.mqtt, &devices));
            let retired =
                crate::ingest::sessions::record(&store, &cfg.mqtt, &layout).await.map_err(anyhow::Error::msg)?;
            for part in layout.partitions {
                let (ingest, shutdown) = (&cfg.ingest, shutdown_rx.clone());
                let (_, task) = match local_links.remove(&part.client_id) {
                    Some(link) => mqtt::start_local(&cfg.mqtt, ingest, part, pipeline.clone(), shutdown, link),
                    None => mqtt::start(&cfg.mqtt, ingest, part, pipeline.clone(), shutdown, None),
                }
                .map_err(anyhow::Error::msg)?;
                intake_tasks.push(task);
            }
            if !layout.routes.wait_subscribed(Duration::from_secs(5)).await {
                // The main session ingests those devices itself until their sessions are
                // subscribed (a broker not reachable yet: nothing is lost by waiting).
                tracing::warn!("not every MQTT partition session is subscribed yet; starting the main session anyway");
            }
            if !retired.is_empty() {
                tracing::info!(sessions = ?retired, "draining MQTT sessions this configuration no longer uses");
                intake_tasks.push(tokio::spawn(crate::ingest::sessions::retire(
                    cfg.mqtt.clone(),
                    cfg.ingest.clone(),
                    store.clone(),
                    retired,
                    devices,
                    pipeline.clone(),
                    shutdown_rx.clone(),
                )));
            }
            layout.main
        }
        Some((node, _)) => mqtt::Session {
            client_id: format!("{}-node-{node}", cfg.mqtt.client_id),
            filters: Vec::new(),
            guard: None,
            kind: mqtt::Kind::Plain,
        },
    };
    let (mqtt_handle, mqtt_task) =
        mqtt::start(&cfg.mqtt, &cfg.ingest, session, pipeline.clone(), shutdown_rx.clone(), spb)
            .map_err(anyhow::Error::msg)?;
    intake_tasks.push(mqtt_task);
    let plant_arc = Arc::new(plant.clone());
    let node = cluster.map(|(id, lease_ms)| {
        crate::cluster::Node::new(
            id,
            lease_ms,
            store.clone(),
            plant_arc.clone(),
            pipeline.clone(),
            router.clone(),
            board.clone(),
            modbus_writers.clone(),
            metrics.clone(),
            cfg.mqtt.clone(),
            cfg.ingest.clone(),
        )
    });
    drop(pipeline);

    let erp_task = cfg
        .erp
        .as_ref()
        .map(|e| tokio::spawn(crate::erp::run(store.clone(), e.webhook_url.clone(), shutdown_tx.subscribe())));

    // HTTP.
    let state = web::Data::new(AppState {
        store: store.clone(),
        metrics: metrics.clone(),
        events,
        auth: Auth::new(&cfg.auth.tokens),
        router,
        mqtt: Some(mqtt_handle),
        ledger: ledger.clone(),
        plant: plant_arc.clone(),
        modbus: board,
        live: live.clone(),
        modbus_writers,
        oee: Default::default(),
        cluster: node.clone(),
    });
    let background = tokio::spawn(crate::http::planner::run_background(state.clone(), shutdown_tx.subscribe()));
    if cfg.auth.tokens.is_empty() {
        tracing::warn!("no [[auth.tokens]] configured: every caller is admin (loopback only)");
    }
    let json_cfg = web::JsonConfig::default()
        .limit(256 * 1024)
        .error_handler(|e, _| ApiError::bad_request("invalid_json", e.to_string()).into());
    let path_cfg =
        web::PathConfig::default().error_handler(|e, _| ApiError::bad_request("invalid_path", e.to_string()).into());
    let query_cfg =
        web::QueryConfig::default().error_handler(|e, _| ApiError::bad_request("invalid_query", e.to_string()).into());
    let server = HttpServer::new(move || {
        let counted = state.metrics.clone();
        actix_web::App::new()
            .wrap_fn(move |req, srv| {
                use futures_util::future::{ready, Either};
                counted.http_requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if crate::http::has_control_chars(req.uri()) {
                    let e = ApiError::bad_request("invalid_path", "control characters are not accepted in a URL");
                    return Either::Left(ready(Err(e.into())));
                }
                Either::Right(actix_web::dev::Service::call(srv, req))
            })
            .app_data(state.clone())
            .app_data(json_cfg.clone())
            .app_data(path_cfg.clone())
            .app_data(query_cfg.clone())
            .configure(api::routes)
            .default_service(web::to(api::not_found))
    })
    .workers(2)
    .disable_signals()
    .shutdown_timeout(2)
    .bind(&cfg.http.listen)
    .with_context(|| format!("binding http.listen `{}`", cfg.http.listen))?;
    let http_addr = server.addrs().first().copied().context("no HTTP address bound")?;
    let server = server.run();
    let server_handle = server.handle();
    let server_task = actix_rt::spawn(server);
    let cluster_task = node.map(|n| actix_rt::spawn(n.run(http_addr.to_string(), shutdown_tx.subscribe())));
    tracing::info!(%http_addr, mqtt = %cfg.mqtt.url, database = %redact(&cfg.database.url), "MES ready");
    on_ready(Handle {
        store: store.clone(),
        metrics: metrics.clone(),
        http_addr,
        mqtt_url: cfg.mqtt.url.clone(),
        influx: influx.as_ref().map(|x| x.tap.clone()),
    });

    stop.await;
    tracing::info!("shutting down: stopping intake, committing what is in flight");
    server_handle.stop(true).await;
    let _ = server_task.await;
    let _ = shutdown_tx.send(true);
    // The ERP sender, the planner's background task and the pollers stop together, within
    // one second in all (the whole shutdown stays under the contract's 10 s).
    let side_deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    if let Some(t) = erp_task {
        let _ = tokio::time::timeout_at(side_deadline, t).await;
    }
    let _ = tokio::time::timeout_at(side_deadline, background).await;
    for p in pollers {
        let _ = tokio::time::timeout_at(side_deadline, p).await;
    }
    if let Some(t) = cluster_task {
        // Stops the owned work centers' intake and hands their leases back.
        if tokio::time::timeout(Duration::from_secs(3), t).await.is_err() {
            tracing::warn!("cluster node did not leave in time; its leases expire on their own");
        }
    }
    if tokio::time::timeout(Duration::from_secs(4), futures_util::future::join_all(intake_tasks)).await.is_err() {
        tracing::warn!("MQTT intake did not stop in time");
    }
    if tokio::time::timeout(Duration::from_secs(2), writer_task).await.is_err() {
        tracing::warn!("writer did not drain in time; uncommitted inputs stay unacknowledged and will be redelivered");
    }
    if let Some(x) = influx {
        // A last flush of at most about a second; the rest is left to a backfill.
        if tokio::time::timeout(Duration::from_millis(800), x.stop()).await.is_err() {
            tracing::warn!("time-series exporter did not flush in time; a backfill fills the hole");
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// Runs the MES and, once it is up, `driver` (the demo line, the benchmark); stops the MES
/// when the driver ends and returns the driver's result.
pub async fn run_with<F, Fut, T>(cfg: Config, driver: F) -> anyhow::Result<T>
where
    F: FnOnce(Handle) -> Fut + 'static,
    Fut: Future<Output = anyhow::Result<T>> + 'static,
    T: 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel::<Handle>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = actix_rt::spawn(async move {
        let handle = rx.await.context("the MES did not start")?;
        let r = driver(handle).await;
        let _ = stop_tx.send(());
        r
    });
    run(
        cfg,
        async move {
            let _ = stop_rx.await;
        },
        move |h| {
            let _ = tx.send(h);
        },
    )
    .await?;
    task.await.map_err(|e| anyhow::anyhow!("{e}"))?
}

/// Completes on SIGINT or SIGTERM.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
