//! MQTT adapter: a persistent-session rumqttc client with manual acknowledgements.
//!
//! The event loop only reads: each publish is admitted into the in-flight bound, then
//! handed to a task that decodes it and submits it to the [`Pipeline`]. The writer hands
//! committed publishes to the session's [`Acker`], which puts their acknowledgements in
//! receive order for the session loop to write. A publish that is never committed is
//! never acknowledged, so the broker redelivers it.

use super::{parse, sparkplug, Pipeline};
use crate::config::{IngestConfig, MqttConfig};
use crate::db::writer::{AckSender, Completion, MqttAck};
use crate::metrics::Metrics;
use futures_util::FutureExt;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Capacity of the client's request channel (acks, subscribes, commands). Larger than
/// any broker in-flight window, so acknowledgements never wait on it for long.
const REQUEST_CAPACITY: usize = 16_384;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Longest a command publish may wait for the client's queue.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);

/// The handle the rest of the MES uses to publish commands.
#[derive(Clone)]
pub struct MqttHandle {
    client: AsyncClient,
    prefix: String,
    /// Sparkplug B devices: commands to them are `DCMD`s (`ingest::sparkplug`).
    sparkplug: Option<Arc<sparkplug::Bindings>>,
}

impl MqttHandle {
    /// Publishes a command to `{prefix}/devices/{device}/cmd` at QoS 1; to a Sparkplug B
    /// device, a `DCMD` writing its bound metrics (QoS 0, as the specification asks).
    pub async fn command(&self, device: &str, body: &serde_json::Value) -> Result<(), String> {
        let (topic, bytes, qos) = match self.sparkplug.as_ref().filter(|b| b.device(device).is_some()) {
            Some(b) => {
                let (topic, bytes) = b.command(device, body, crate::now_ms())?;
                (topic, bytes, QoS::AtMostOnce)
            }
            None => (
                format!("{}/devices/{device}/cmd", self.prefix),
                serde_json::to_vec(body).map_err(|e| e.to_string())?,
                QoS::AtLeastOnce,
            ),
        };
        match tokio::time::timeout(PUBLISH_TIMEOUT, self.client.publish(topic, qos, false, bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("MQTT client: {e}")),
            Err(_) => Err("MQTT client queue full (timed out)".into()),
        }
    }
}

/// The largest remaining length of an MQTT packet (MQTT 3.1.1 §2.2.3).
const MQTT_MAX_PACKET: usize = 268_435_455;

/// One MQTT session of the MES. A single node has a main session (commands, Sparkplug,
/// and every device topic for devices the plant does not name) and its plant's MQTT
/// devices split over `mqtt.sessions` partition sessions (`super::sessions`); a cluster
/// node has one per work center it owns (a stable client id per work center, so its
/// persistent session and the messages queued in it pass to the next owner) and one for
/// commands only.
pub struct Session {
    pub client_id: String,
    /// Subscribed at every connect; empty: publish commands only, or drain.
    pub filters: Vec<String>,
    /// Asked before each reconnect; `false` ends the session (the node lost the work
    /// center's lease, so the session belongs to another node now).
    pub guard: Option<Guard>,
    pub kind: Kind,
}

pub type Guard = Arc<dyn Fn() -> futures_util::future::BoxFuture<'static, bool> + Send + Sync>;

/// What a session does with what it receives.
pub enum Kind {
    /// Ingests everything.
    Plain,
    /// A partition of the plant's devices: raises the flag once the broker has confirmed
    /// every subscription of this connection, lowers it when the connection drops.
    Partition(Arc<AtomicBool>),
    /// The main session of a partitioned node, subscribed to every device topic: a message
    /// of a device whose partition session is subscribed right now is acknowledged without
    /// work (that session has its own copy and commits it); anything else is ingested
    /// (devices the plant does not name become dead letters; a device whose partition is
    /// disconnected is ingested here, and deduplication absorbs the second copy).
    ///
    /// Except while it catches up: what the broker kept for this session from before the
    /// connect may include messages no partition session has (a device added to the plant
    /// while the MES was down is subscribed by its partition only now). So after each
    /// connect the session ingests everything (deduplicated) until its own marker, published
    /// once its subscription is confirmed, comes back: everything after the marker was
    /// published after every partition had subscribed.
    Main(Arc<super::sessions::Partitions>),
    /// A session the configuration no longer uses: takes what the broker kept for it, and
    /// ends once quiet; the report says whether everything taken was committed.
    Drain(tokio::sync::oneshot::Sender<DrainReport>),
}

/// How a retired session's drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// The broker still kept the session.
    pub present: bool,
    /// Messages taken from it.
    pub received: u64,
    /// Every message taken was committed and acknowledged (so the session may be removed).
    pub complete: bool,
}

/// The device id of the main session's catch-up marker (`Kind::Main`): published to
/// `{prefix}/devices/{MARKER_DEVICE}/telemetry`, the topic filter its backlog arrives
/// through, so the broker delivers it after that backlog.
pub const MARKER_DEVICE: &str = "_mes-catch-up-marker";
/// While catching up longer than this, the main session says so (it goes on ingesting every
/// message, deduplicated: safe, at the cost of the work).
const CATCH_UP_WARN: Duration = Duration::from_secs(60);
/// A marker not back after this long is published again: a broker whose queue for the
/// session was full when it arrived dropped it (Mosquitto's `max_queued_messages`).
const MARKER_RESEND: Duration = Duration::from_secs(5);

/// The main session's catch-up after a connect (see [`Kind::Main`]).
struct CatchUp {
    /// Tells this connection's marker from an older one's.
    nonce: String,
    /// When the marker was last published.
    sent: Option<tokio::time::Instant>,
    /// Since when it has been catching up, or when it last warned that it still is.
    warned: tokio::time::Instant,
}

impl CatchUp {
    fn new(nonce: String) -> Self {
        Self { nonce, sent: None, warned: tokio::time::Instant::now() }
    }

    /// Whether to publish the marker now: once the subscription is confirmed, and again
    /// every [`MARKER_RESEND`] while it has not come back.
    fn marker_due(&self, subscribed: bool) -> bool {
        subscribed && self.sent.is_none_or(|t| t.elapsed() >= MARKER_RESEND)
    }

    fn marker(&self) -> String {
        serde_json::json!({ "mes_catch_up_marker": self.nonce.as_str() }).to_string()
    }

    fn is_ours(&self, payload: &[u8]) -> bool {
        let body: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
        body["mes_catch_up_marker"].as_str() == Some(self.nonce.as_str())
    }
}

/// A drained session ends after this long without a message.
const DRAIN_QUIET: Duration = Duration::from_secs(2);
/// Topic filters per SUBSCRIBE packet.
const FILTERS_PER_SUBSCRIBE: usize = 200;

fn options(
    cfg: &MqttConfig,
    client_id: &str,
    ingest: &IngestConfig,
    will: Option<rumqttc::LastWill>,
) -> Result<MqttOptions, String> {
    let (host, port) = cfg.host_port().map_err(|e| e.to_string())?;
    let mut o = MqttOptions::new(client_id.to_string(), host, port);
    o.set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(cfg.keep_alive_s))
        // Accept every packet a broker can deliver (MQTT's largest), so an oversized payload
        // arrives and becomes a dead letter: refused here, it would break the connection and,
        // redelivered on every reconnect, stop all ingest. A broker's own limit (Mosquitto's
        // `message_size_limit`) is where to bound what publishers may send.
        .set_max_packet_size(MQTT_MAX_PACKET.max(ingest.max_payload), 256 * 1024)
        .set_inflight(1000);
    if let Some(w) = will {
        o.set_last_will(w);
    }
    if let (Some(u), Some(p)) = (&cfg.username, &cfg.password) {
        o.set_credentials(u.clone(), p.clone());
    }
    Ok(o)
}

/// Removes a session from the broker: a clean-session connect discards what the broker
/// kept for it, and the clean session itself ends with the disconnect.
pub async fn forget(cfg: &MqttConfig, client_id: &str) -> Result<(), String> {
    let mut o = options(cfg, client_id, &IngestConfig::default(), None)?;
    o.set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(o, 10);
    let connected = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|_| "timed out connecting".to_string())?;
    connected?;
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), async { while eventloop.poll().await.is_ok() {} }).await;
    Ok(())
}

/// Starts the client; returns the command handle and the task running the event loop.
/// The task ends when `shutdown` turns true.
pub fn start(
    cfg: &MqttConfig,
    ingest: &IngestConfig,
    session: Session,
    pipeline: Pipeline,
    shutdown: watch::Receiver<bool>,
    sparkplug: Option<sparkplug::Host>,
) -> Result<(MqttHandle, tokio::task::JoinHandle<()>), String> {
    start_inner(cfg, ingest, session, pipeline, shutdown, sparkplug, None)
}

/// As [`start`], for a partition session of the broker this process embeds, read through
/// an in-process link ([`crate::broker::LocalLink`]) instead of a TCP connection: the
/// same subscriptions, window and acknowledgements after commit, without the socket, the
/// MQTT encoding and the broker's connection thread on the way. Should the link end (the
/// broker dropped it), the session connects over TCP as any other.
pub fn start_local(
    cfg: &MqttConfig,
    ingest: &IngestConfig,
    session: Session,
    pipeline: Pipeline,
    shutdown: watch::Receiver<bool>,
    link: crate::broker::LocalLink,
) -> Result<(MqttHandle, tokio::task::JoinHandle<()>), String> {
    start_inner(cfg, ingest, session, pipeline, shutdown, None, Some(link))
}

fn start_inner(
    cfg: &MqttConfig,
    ingest: &IngestConfig,
    session: Session,
    pipeline: Pipeline,
    mut shutdown: watch::Receiver<bool>,
    mut sparkplug: Option<sparkplug::Host>,
    local: Option<crate::broker::LocalLink>,
) -> Result<(MqttHandle, tokio::task::JoinHandle<()>), String> {
    // Sparkplug primary host: `STATE` online after each connect, offline as the will and
    // at shutdown; one timestamp for the birth and its will.
    let state_ts = crate::now_ms();
    let state_topic = sparkplug::state_topic(&cfg.client_id);
    let will = sparkplug.as_ref().map(|_| {
        rumqttc::LastWill::new(&state_topic, sparkplug::state_payload(false, state_ts), QoS::AtLeastOnce, true)
    });
    let opts = options(cfg, &session.client_id, ingest, will)?;
    // Acknowledgements in receive order, from the acker to the session loop, which writes
    // each batch to the socket at once (see [`write_acks`]). Unbounded in type only: it
    // holds packet ids of publishes received and not yet acknowledged, which the broker's
    // window for the session bounds (at most 65,535, the packet id space). A bound here
    // could close a cycle: the loop waiting for a permit, the writer (which frees permits)
    // waiting in `Acker::submit` for room, which only the loop makes. (`submit` never waits.)
    let (wire_tx, mut wire_rx) = mpsc::unbounded_channel::<WireAcks>();
    let (client, mut eventloop) = AsyncClient::new(opts, REQUEST_CAPACITY);
    let spb_filters = sparkplug.as_ref().map(|h| h.bindings().filters()).unwrap_or_default();
    let handle = MqttHandle {
        client: client.clone(),
        prefix: cfg.topic_prefix.clone(),
        sparkplug: sparkplug.as_ref().map(|h| h.bindings_arc()),
    };
    let generation = Arc::new(AtomicU64::new(0));
    let progress = Arc::new(AckProgress::default());
    let ack_tx: AckSender =
        Arc::new(Acker::new(wire_tx, generation.clone(), progress.clone(), pipeline.metrics.clone()));
    let Session { client_id, filters, guard, kind } = session;
    // The node's own session (not a work center's or a partition's) reports the broker
    // connection.
    let primary = guard.is_none() && matches!(kind, Kind::Main(_) | Kind::Plain);
    let (subscribed, partitions, mut drain_tx) = match kind {
        Kind::Plain => (None, None, None),
        Kind::Partition(flag) => (Some(flag), None, None),
        Kind::Main(p) => (None, Some(p), None),
        Kind::Drain(tx) => (None, None, Some(tx)),
    };
    let draining = drain_tx.is_some();
    let mut report = DrainReport { present: false, received: 0, complete: false };
    let prefix = cfg.topic_prefix.clone();
    let max_payload = ingest.max_payload;
    let metrics = pipeline.metrics.clone();
    let task = tokio::spawn(async move {
        if let Some(link) = local {
            let on = Local {
                pipeline: &pipeline,
                ack_tx: &ack_tx,
                generation: &generation,
                progress: &progress,
                subscribed: subscribed.as_ref(),
                client_id: &client_id,
                prefix: &prefix,
                max_payload,
            };
            let stopped = on.run(link, &filters, &mut shutdown, &mut wire_rx).await;
            if let Some(flag) = &subscribed {
                flag.store(false, Relaxed);
            }
            if stopped {
                tracing::info!(session = %client_id, "MQTT intake stopped");
                return;
            }
            tracing::warn!(session = %client_id, "in-process link to the embedded broker ended; connecting over TCP");
        }
        let mut backoff = BACKOFF_MIN;
        let mut received_qos1: u64 = 0;
        // SUBACKs still awaited on this connection, and whether one refused a filter.
        let mut pending_subacks = 0usize;
        let mut refused = false;
        let mut last_message = tokio::time::Instant::now();
        // Main session: the marker of this connection while it catches up, and since when.
        let mut catch_up: Option<CatchUp> = None;
        let marker_topic = format!("{prefix}/devices/{MARKER_DEVICE}/telemetry");
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        // Main session: copies passed on (acknowledged without work) not yet handed to the
        // acker, handed over together once nothing more is ready to read (or every
        // [`PASSES_AT_ONCE`]), so that they leave in one write rather than one each.
        let mut passes: Vec<MqttAck> = Vec::new();
        loop {
            let ev = tokio::select! {
                // Acknowledgements before new messages: the broker's window for the session
                // (Mosquitto 20 unacknowledged, rumqttd 100) is what keeps them coming.
                biased;
                _ = shutdown.changed() => break,
                Some(acks) = wire_rx.recv() => {
                    write_acks(&mut eventloop, &generation, gather(acks, &mut wire_rx)).await;
                    continue;
                }
                ev = eventloop.poll() => ev,
                () = std::future::ready(()), if !passes.is_empty() => {
                    ack_tx.submit(std::mem::take(&mut passes));
                    continue;
                }
                _ = tick.tick(), if draining || catch_up.is_some() => {
                    // A marker lost while the line is quiet is sent again from here.
                    if let Some(c) = catch_up.as_mut().filter(|c| c.sent.is_some() && c.marker_due(pending_subacks == 0)) {
                        send_marker(&client, &client_id, &marker_topic, c);
                    }
                    if !draining {
                        continue;
                    }
                    // A retired session ends once nothing came for a while and everything
                    // it took has been committed and acknowledged (or given up).
                    if report.present
                        && last_message.elapsed() >= DRAIN_QUIET
                        && progress.settled.load(Relaxed) == received_qos1
                    {
                        report.complete = progress.abandoned.load(Relaxed) == 0;
                        break;
                    }
                    continue;
                }
            };
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff = BACKOFF_MIN;
                    // A new connection: packet ids of the old one mean nothing now.
                    generation.fetch_add(1, Relaxed);
                    progress.reset();
                    received_qos1 = 0;
                    if primary {
                        metrics.mqtt_connected.store(true, Relaxed);
                    }
                    tracing::info!(session = %client_id, session_present = ack.session_present, "connected to MQTT broker");
                    // A kept session kept its subscriptions too: a partition receives its
                    // devices' messages from now on (the main session need not ingest them
                    // while the SUBACK of the repeated subscription is on its way).
                    if let (true, Some(flag)) = (ack.session_present, &subscribed) {
                        flag.store(true, Relaxed);
                    }
                    if draining {
                        report.present = ack.session_present;
                        last_message = tokio::time::Instant::now();
                        if !ack.session_present {
                            report.complete = true;
                            break;
                        }
                    }
                    // Subscribing again is harmless when the broker kept the session, and
                    // needed when it lost it.
                    pending_subacks = 0;
                    refused = false;
                    if partitions.is_some() {
                        let nonce = format!("{}-{}", crate::now_ms(), generation.load(Relaxed));
                        catch_up = Some(CatchUp::new(nonce));
                    }
                    if draining {
                        // A retired session keeps nothing new: its subscriptions go, what
                        // the broker already queued for it still arrives.
                        for f in &filters {
                            if let Err(e) = client.try_unsubscribe(f.clone()) {
                                tracing::error!(session = %client_id, error = %e, "cannot queue unsubscribe");
                            }
                        }
                    }
                    for chunk in filters.chunks(FILTERS_PER_SUBSCRIBE).filter(|_| !draining) {
                        let many = chunk.iter().map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                        match client.try_subscribe_many(many) {
                            Ok(()) => pending_subacks += 1,
                            Err(e) => tracing::error!(session = %client_id, error = %e, "cannot queue subscribe"),
                        }
                    }
                    if sparkplug.is_some() {
                        for f in &spb_filters {
                            if let Err(e) = client.try_subscribe(f.clone(), QoS::AtLeastOnce) {
                                tracing::error!(error = %e, "cannot queue Sparkplug subscribe");
                            }
                        }
                        let online = sparkplug::state_payload(true, state_ts);
                        if let Err(e) = client.try_publish(state_topic.clone(), QoS::AtLeastOnce, true, online) {
                            tracing::error!(error = %e, "cannot queue Sparkplug STATE");
                        }
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) if pending_subacks > 0 => {
                    pending_subacks -= 1;
                    if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                        refused = true;
                        tracing::error!(session = %client_id, "the broker refused a subscription; the main session ingests those devices");
                    }
                    if let (0, false, Some(flag)) = (pending_subacks, refused, &subscribed) {
                        flag.store(true, Relaxed);
                    }
                    if let Some(c) = catch_up.as_mut().filter(|c| c.marker_due(pending_subacks == 0)) {
                        // Subscribed: the marker comes back through the wildcard, after the
                        // backlog the broker kept.
                        send_marker(&client, &client_id, &marker_topic, c);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    last_message = tokio::time::Instant::now();
                    let marker = partitions.is_some() && p.topic == marker_topic;
                    if marker {
                        // This connection's marker ends the catch-up; an older one (sent
                        // just before a disconnect) is only acknowledged.
                        if catch_up.as_ref().is_some_and(|c| c.is_ours(&p.payload)) {
                            tracing::info!(session = %client_id, "main session caught up with what the broker kept for it");
                            catch_up = None;
                        }
                    } else if let Some(c) = catch_up.as_mut() {
                        if c.marker_due(pending_subacks == 0) {
                            send_marker(&client, &client_id, &marker_topic, c);
                        }
                        if c.warned.elapsed() >= CATCH_UP_WARN {
                            tracing::warn!(session = %client_id, "main session still catching up (its marker has not come back): every message is ingested here too, deduplicated");
                            c.warned = tokio::time::Instant::now();
                        }
                    }
                    if marker
                        || (catch_up.is_none()
                            && partitions.as_ref().is_some_and(|parts| parts.covers(&prefix, &p.topic)))
                    {
                        // Its partition session has this message too and commits it (or it
                        // is a marker).
                        if !marker {
                            Metrics::inc(&metrics.mqtt_main_skipped);
                        }
                        if p.qos != QoS::AtMostOnce {
                            received_qos1 += 1;
                            passes.push(MqttAck {
                                generation: generation.load(Relaxed),
                                n: received_qos1 - 1,
                                pkid: Some(p.pkid),
                                pass: true,
                                acker: ack_tx.clone(),
                            });
                            if passes.len() >= PASSES_AT_ONCE {
                                ack_tx.submit(std::mem::take(&mut passes));
                            }
                        }
                        continue;
                    }
                    Metrics::inc(&metrics.telemetry_messages);
                    let Some(slot) = pipeline.admit().await else {
                        break;
                    };
                    let done = if p.qos == QoS::AtMostOnce {
                        Completion::None
                    } else {
                        received_qos1 += 1;
                        let n = received_qos1 - 1;
                        Completion::Mqtt(MqttAck {
                            generation: generation.load(Relaxed),
                            n,
                            pkid: Some(p.pkid),
                            pass: false,
                            acker: ack_tx.clone(),
                        })
                    };
                    match sparkplug.as_mut() {
                        Some(host) if p.topic.starts_with(sparkplug::NAMESPACE) => {
                            sparkplug::handle(host, &pipeline, &client, max_payload, p, done, slot, &ack_tx).await;
                        }
                        _ => handle_publish(&pipeline, &prefix, max_payload, p, done, slot, &ack_tx).await,
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if let Some(flag) = &subscribed {
                        flag.store(false, Relaxed);
                    }
                    // The next connection catches up with its own marker.
                    catch_up = None;
                    if draining {
                        tracing::warn!(session = %client_id, error = %e, "connection lost while draining a retired session; kept for the next start");
                        break;
                    }
                    if !primary || metrics.mqtt_connected.swap(false, Relaxed) {
                        Metrics::inc(&metrics.mqtt_reconnects);
                    }
                    tracing::warn!(session = %client_id, error = %e, retry_in_ms = backoff.as_millis() as u64, "MQTT connection lost; reconnecting");
                    tokio::select! {
                        _ = shutdown.changed() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    // A cluster session reconnects only while its node still owns the work
                    // center: otherwise it would take the session back from the new owner.
                    if let Some(g) = &guard {
                        if !g().await {
                            tracing::info!(session = %client_id, "work center owned elsewhere now; session ends");
                            break;
                        }
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        // Copies passed on and not yet handed over go out with the last acknowledgements.
        ack_tx.submit(std::mem::take(&mut passes));
        let offline = sparkplug.as_ref().map(|_| (state_topic, sparkplug::state_payload(false, state_ts)));
        drain(&mut eventloop, &client, &metrics, offline, &mut wire_rx, &generation).await;
        if primary {
            metrics.mqtt_connected.store(false, Relaxed);
        }
        if let Some(flag) = &subscribed {
            flag.store(false, Relaxed);
        }
        if let Some(tx) = drain_tx.take() {
            report.received = received_qos1;
            let _ = tx.send(report);
        }
        tracing::info!(session = %client_id, "MQTT intake stopped");
    });
    Ok((handle, task))
}

/// A partition session on an in-process link to the embedded broker ([`start_local`]).
struct Local<'a> {
    pipeline: &'a Pipeline,
    ack_tx: &'a AckSender,
    generation: &'a AtomicU64,
    progress: &'a AckProgress,
    subscribed: Option<&'a Arc<AtomicBool>>,
    client_id: &'a str,
    prefix: &'a str,
    max_payload: usize,
}

impl Local<'_> {
    /// Subscribes and ingests until shutdown (`true`) or until the link ends (`false`: the
    /// caller goes on over TCP). What the link delivers is handled as what a TCP connection
    /// delivers ([`handle_publish`]), acknowledged through the same acker, in receive order.
    async fn run(
        &self,
        (mut tx, mut rx): crate::broker::LocalLink,
        filters: &[String],
        shutdown: &mut watch::Receiver<bool>,
        wire_rx: &mut mpsc::UnboundedReceiver<WireAcks>,
    ) -> bool {
        use rumqttd::protocol as p;
        // As after a connect: acknowledgements of an earlier link or connection mean nothing.
        self.generation.fetch_add(1, Relaxed);
        self.progress.reset();
        let filters = filters
            .iter()
            .map(|f| p::Filter {
                path: f.clone(),
                qos: p::QoS::AtLeastOnce,
                nolocal: false,
                preserve_retain: false,
                retain_forward_rule: p::RetainForwardRule::Never,
            })
            .collect();
        if let Err(e) = tx.send(p::Packet::Subscribe(p::Subscribe { pkid: 1, filters }, None)).await {
            tracing::warn!(session = %self.client_id, error = ?e, "cannot subscribe on the in-process link");
            return false;
        }
        tracing::info!(session = %self.client_id, "partition session on an in-process link to the embedded broker");
        // From now on the acknowledgements go from the acker to the router directly.
        self.ack_tx.attach(self.generation.load(Relaxed), tx);
        let links = &self.pipeline.metrics.mqtt_in_process_links;
        links.fetch_add(1, Relaxed);
        let stopped = self.ingest(&mut rx, shutdown, wire_rx).await;
        links.fetch_sub(1, Relaxed);
        self.ack_tx.detach();
        stopped
    }

    /// [`Local::run`] once subscribed.
    async fn ingest(
        &self,
        rx: &mut rumqttd::local::LinkRx,
        shutdown: &mut watch::Receiver<bool>,
        wire_rx: &mut mpsc::UnboundedReceiver<WireAcks>,
    ) -> bool {
        let mut received_qos1: u64 = 0;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => return true,
                // The acker sends this link's acknowledgements itself; what comes here is
                // of an earlier link or connection, which the broker redelivers.
                Some(_) = wire_rx.recv() => {}
                next = rx.next() => match next {
                    Ok(Some(rumqttd::Notification::Forward(mut f))) => {
                        let (qos, pkid, dup) = forward_header(&mut f.publish);
                        let topic = String::from_utf8_lossy(&f.publish.topic).into_owned();
                        let qos = if qos == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce };
                        let mut publish = rumqttc::Publish::from_bytes(topic, qos, f.publish.payload);
                        (publish.pkid, publish.dup) = (pkid, dup);
                        Metrics::inc(&self.pipeline.metrics.telemetry_messages);
                        let Some(slot) = self.pipeline.admit().await else { return true };
                        let done = if qos == QoS::AtMostOnce {
                            Completion::None
                        } else {
                            received_qos1 += 1;
                            Completion::Mqtt(MqttAck {
                                generation: self.generation.load(Relaxed),
                                n: received_qos1 - 1,
                                pkid: Some(pkid),
                                pass: false,
                                acker: self.ack_tx.clone(),
                            })
                        };
                        handle_publish(self.pipeline, self.prefix, self.max_payload, publish, done, slot, self.ack_tx).await;
                    }
                    // The one packet this link sends that the broker answers is the
                    // subscription: its answer says the partition receives from now on.
                    Ok(Some(rumqttd::Notification::DeviceAck(_))) => {
                        if let Some(flag) = self.subscribed {
                            flag.store(true, Relaxed);
                        }
                    }
                    // The broker stopped sending: this link's queue was full (a flood at
                    // QoS 0, which no window bounds). Everything queued has been taken now.
                    Ok(Some(rumqttd::Notification::Unschedule)) => {
                        if let Err(e) = rx.wake().await {
                            tracing::warn!(session = %self.client_id, error = ?e, "in-process link closed");
                            return false;
                        }
                    }
                    Ok(Some(rumqttd::Notification::Disconnect(..))) => return false,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(session = %self.client_id, error = ?e, "in-process link closed");
                        return false;
                    }
                },
            }
        }
    }
}

/// The QoS (0, 1 or 2), packet id and dup flag of a publish the broker forwarded on an
/// in-process link. rumqttd keeps these fields to itself: they are read from the header of
/// its serialisation (fixed header byte, then the id), made while the topic and payload are
/// set aside, so that it copies 5 bytes and not the message.
fn forward_header(publish: &mut rumqttd::protocol::Publish) -> (u8, u16, bool) {
    let topic = std::mem::take(&mut publish.topic);
    let payload = std::mem::take(&mut publish.payload);
    let head = publish.serialize();
    (publish.topic, publish.payload) = (topic, payload);
    match head.get(..3) {
        Some(&[h, a, b]) => ((h >> 1) & 0b11, u16::from_be_bytes([a, b]), h & 0b1000 != 0),
        _ => (0, 0, false),
    }
}

/// Publishes the main session's catch-up marker (QoS 1, through the client's queue).
fn send_marker(client: &AsyncClient, session: &str, topic: &str, c: &mut CatchUp) {
    match client.try_publish(topic.to_string(), QoS::AtLeastOnce, false, c.marker()) {
        Ok(()) => c.sent = Some(tokio::time::Instant::now()),
        Err(e) => tracing::error!(session = %session, error = %e, "cannot queue the catch-up marker"),
    }
}

/// After intake stops: keep the connection polled until what is in flight is committed
/// and its acknowledgements are sent (bounded), then disconnect. Publishes arriving now are
/// not admitted, so they stay unacknowledged and the broker keeps them for the next start.
async fn drain(
    eventloop: &mut rumqttc::EventLoop,
    client: &AsyncClient,
    metrics: &Metrics,
    state_offline: Option<(String, Vec<u8>)>,
    wire: &mut mpsc::UnboundedReceiver<WireAcks>,
    generation: &AtomicU64,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(3500);
    let mut quiet_since: Option<tokio::time::Instant> = None;
    while tokio::time::Instant::now() < deadline {
        if metrics.in_flight.load(Relaxed) <= 0 {
            let since = *quiet_since.get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() >= Duration::from_millis(300) {
                break;
            }
        } else {
            quiet_since = None;
        }
        let polled = tokio::select! {
            biased;
            Some(acks) = wire.recv() => {
                write_acks(eventloop, generation, gather(acks, wire)).await;
                continue;
            }
            p = tokio::time::timeout(Duration::from_millis(50), eventloop.poll()) => p,
        };
        if let Ok(Err(_)) = polled {
            break;
        }
    }
    if let Some((topic, payload)) = state_offline {
        // The Sparkplug host goes offline cleanly (the broker drops the will on DISCONNECT).
        let _ = client.try_publish(topic, QoS::AtLeastOnce, true, payload);
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
}

/// Packet ids of committed publishes, in the order they were received on the connection of
/// the given generation.
type WireAcks = (u64, Vec<u16>);

/// Joins to `first` the acknowledgement batches already queued behind it (up to
/// [`ACKER_BATCHES`]), so that they leave in one write; a batch of a newer connection
/// replaces what was gathered of an older one.
fn gather(first: WireAcks, rx: &mut mpsc::UnboundedReceiver<WireAcks>) -> WireAcks {
    let (mut of, mut pkids) = first;
    for _ in 0..ACKER_BATCHES {
        let Ok((g, more)) = rx.try_recv() else { break };
        if g == of {
            pkids.extend(more);
        } else if g > of {
            (of, pkids) = (g, more);
        }
    }
    (of, pkids)
}

/// Writes a batch of acknowledgements to the connection and flushes them with one write.
/// (Through the client, each acknowledgement was a request of its own, written and flushed
/// alone: one `writev` per message, ~8 % of the CPU of a flood.) A batch of an older
/// connection is dropped: the broker redelivers those publishes, deduplicated.
async fn write_acks(eventloop: &mut rumqttc::EventLoop, generation: &AtomicU64, (of, pkids): WireAcks) {
    if of != generation.load(Relaxed) {
        return;
    }
    match tokio::time::timeout(Duration::from_secs(10), write_pubacks(eventloop, pkids)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "acknowledgements not written; the broker will redeliver (deduplicated)")
        }
        Err(_) => tracing::warn!("acknowledgements not flushed in 10 s; the broker will redeliver (deduplicated)"),
    }
}

/// Writes a PUBACK for each packet id into the event loop's connection and flushes them
/// with one write. Nothing is written without a connection. The caller bounds the time.
pub(crate) async fn write_pubacks(
    eventloop: &mut rumqttc::EventLoop,
    pkids: impl IntoIterator<Item = u16>,
) -> Result<(), rumqttc::StateError> {
    let rumqttc::EventLoop { state, network, .. } = eventloop;
    let Some(network) = network.as_mut() else { return Ok(()) };
    for pkid in pkids {
        if let Some(packet) = state.handle_outgoing_packet(rumqttc::Request::PubAck(rumqttc::PubAck::new(pkid)))? {
            network.write(packet).await?;
        }
    }
    network.flush().await
}

/// Decodes one publish and submits it, in receive order. Invalid input becomes a dead
/// letter (queued from its own task so a slow writer cannot reorder valid readings).
async fn handle_publish(
    pipeline: &Pipeline,
    prefix: &str,
    max_payload: usize,
    p: rumqttc::Publish,
    done: Completion,
    slot: super::InFlight,
    ack_tx: &AckSender,
) {
    let received_ms = crate::now_ms();
    let payload = &p.payload;
    let parsed = if payload.len() > max_payload {
        Err(format!("payload of {} bytes exceeds the limit of {max_payload}", payload.len()))
    } else {
        parse::device_from_topic(prefix, &p.topic).and_then(|device| {
            if pipeline.knows(device) {
                parse::parse(device, payload)
            } else {
                Err(format!("unknown device `{device}`"))
            }
        })
    };
    match parsed {
        Ok(reading) => {
            let span =
                tracing::debug_span!("reading", device = %reading.device, boot = reading.boot, seq = reading.seq);
            let abandoned = span.in_scope(|| pipeline.submit_reading(reading, received_ms, done, slot, None));
            if let Some(Completion::Mqtt(mut a)) = abandoned {
                // Not committed, so not acknowledged; later publishes may still be.
                a.pkid = None;
                ack_tx.submit(vec![a]);
            }
        }
        Err(reason) => {
            let keep = payload.len().min(max_payload);
            let text = String::from_utf8_lossy(&payload[..keep]).into_owned();
            let (pipeline, topic, dup) = (pipeline.clone(), p.topic.clone(), p.dup);
            tokio::spawn(async move {
                pipeline.submit_dead_letter(topic, reason, text, dup, received_ms, done, slot).await;
            });
        }
    }
}

/// How far the acker got on the current connection: publishes settled in receive order
/// (acknowledged, or given up because they were not committed).
#[derive(Default)]
struct AckProgress {
    settled: AtomicU64,
    abandoned: AtomicU64,
}

impl AckProgress {
    fn reset(&self) {
        self.settled.store(0, Relaxed);
        self.abandoned.store(0, Relaxed);
    }
}

/// Acknowledgement batches queued for the session loop that it joins into one write (a
/// bound on the time before the first of them leaves).
const ACKER_BATCHES: usize = 256;

/// The main session's passed copies handed to the acker at once at most.
const PASSES_AT_ONCE: usize = 128;

/// Acknowledges settled publishes in the order they were received on the current
/// connection (MQTT 3.1.1 §4.6; some brokers drop a client that acknowledges out of
/// order). Whoever settles publishes calls [`Acker::submit`]: the writer after a commit,
/// the session loop for the copies it passes on and for publishes it gives up. Commits
/// complete out of order (a dead letter's, a reading's whose actor is gone), so
/// acknowledgements wait in a reorder buffer bounded by the broker's in-flight window; those
/// whose predecessors are all settled go at once, as one batch, to the session loop, which
/// writes them (on an in-process link, straight to the broker's router: [`Acker::attach`]).
/// No task of its own: a task between the writer and the session loop was a wait for a
/// core of its own, under a flood about a millisecond from the end of a commit
/// to its acknowledgements on the wire (session 17), while the broker's window held the
/// next messages back. Acknowledgements for an older connection are dropped: the broker
/// redelivers those publishes and deduplication makes that harmless.
pub struct Acker {
    state: std::sync::Mutex<AckerState>,
    wire: mpsc::UnboundedSender<WireAcks>,
    generation: Arc<AtomicU64>,
    progress: Arc<AckProgress>,
    metrics: Arc<Metrics>,
}

/// The reorder buffer of one connection.
#[derive(Default)]
struct AckerState {
    /// The connection generation the buffer is of.
    current: u64,
    /// The position of the next publish to settle.
    next: u64,
    /// Settled out of turn: position → (packet id, or `None` if abandoned; whether a pass).
    waiting: BTreeMap<u64, (Option<u16>, bool)>,
    /// While the session reads an in-process link: its sending half, through which the
    /// acknowledgements due go straight to the broker's router (see [`Acker::attach`]).
    link: Option<(u64, rumqttd::local::LinkTx)>,
}

impl std::fmt::Debug for Acker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Acker")
    }
}

impl Acker {
    fn new(
        wire: mpsc::UnboundedSender<WireAcks>,
        generation: Arc<AtomicU64>,
        progress: Arc<AckProgress>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self { state: Default::default(), wire, generation, progress, metrics }
    }

    /// Hands the acker the sending half of the in-process link the session reads from now
    /// on (generation `of`): acknowledgements due go from whoever settles them straight
    /// into the link's buffer and wake the broker's router, without a wake-up of the
    /// session loop on the way (which on a socket writes them). Dropped with the link's
    /// generation, or by [`Acker::detach`].
    fn attach(&self, of: u64, tx: rumqttd::local::LinkTx) {
        self.lock().link = Some((of, tx));
    }

    /// Ends [`Acker::attach`]: the session's link ended.
    fn detach(&self) {
        self.lock().link = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AckerState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Settles `batch` (publishes of this session) and sends every acknowledgement now due,
    /// in receive order: to the session loop, or on an in-process link to the broker's
    /// router directly. Does not wait for the session: the lock is held for the reorder and
    /// an unbounded send (or the link's push, which waits only while the router's own
    /// queue of events is full), so that batches leave in order whoever submits them.
    pub fn submit(&self, batch: Vec<MqttAck>) {
        let mut s = self.lock();
        let live = self.generation.load(Relaxed);
        if live != s.current {
            // Due on a connection that has ended: the broker redelivers those.
            let link = s.link.take().filter(|(of, _)| *of == live);
            *s = AckerState { current: live, link, ..Default::default() };
        }
        for a in &batch {
            if a.generation == s.current && a.n >= s.next {
                s.waiting.insert(a.n, (a.pkid, a.pass));
            }
        }
        let (mut pkids, mut counted) = (Vec::new(), 0u64);
        loop {
            let next = s.next;
            let Some((p, pass)) = s.waiting.remove(&next) else { break };
            s.next += 1;
            match p {
                Some(pkid) => {
                    pkids.push(pkid);
                    counted += u64::from(!pass);
                }
                None => {
                    self.progress.abandoned.fetch_add(1, Relaxed);
                }
            }
            self.progress.settled.fetch_add(1, Relaxed);
        }
        if pkids.is_empty() {
            return;
        }
        let n = pkids.len() as u64;
        if let Some((_, tx)) = s.link.as_mut() {
            use rumqttd::protocol as p;
            let ack = |pkid| p::Packet::PubAck(p::PubAck { pkid, reason: p::PubAckReason::Success }, None);
            let Some((&last, rest)) = pkids.split_last() else { return };
            // All into the link's buffer, then one wake-up of the router. (`send` has no
            // await point: it is ready at its first poll.)
            tx.buffer().extend(rest.iter().map(|&pkid| ack(pkid)));
            match tx.send(ack(last)).now_or_never() {
                Some(Ok(_)) => self.metrics.acks_sent.fetch_add(counted, Relaxed),
                _ => {
                    // The broker dropped the link; the session loop sees it end too.
                    tracing::warn!(
                        acks = n,
                        "in-process link closed; acknowledgements not sent, the broker will redeliver (deduplicated)"
                    );
                    self.progress.abandoned.fetch_add(n, Relaxed);
                    s.link = None;
                    0
                }
            };
            return;
        }
        match self.wire.send((s.current, pkids)) {
            Ok(()) => {
                self.metrics.acks_sent.fetch_add(counted, Relaxed);
            }
            Err(_) => {
                tracing::warn!(
                    acks = n,
                    "session ended; acknowledgements not sent, the broker will redeliver (deduplicated)"
                );
                self.progress.abandoned.fetch_add(n, Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The catch-up marker goes out once subscribed, again only when it has not come back
    /// for [`MARKER_RESEND`], and only this connection's marker ends the catch-up.
    #[tokio::test]
    async fn catch_up_marker_is_sent_when_subscribed_resent_when_lost_and_recognised() {
        let mut c = CatchUp::new("n-1".into());
        assert!(!c.marker_due(false), "not before the subscription is confirmed");
        assert!(c.marker_due(true));
        c.sent = Some(tokio::time::Instant::now());
        assert!(!c.marker_due(true), "just sent");
        c.sent = Some(tokio::time::Instant::now() - MARKER_RESEND);
        assert!(c.marker_due(true), "not back in time: sent again");
        assert!(c.is_ours(c.marker().as_bytes()));
        assert!(!c.is_ours(CatchUp::new("n-0".into()).marker().as_bytes()), "an older connection's");
        assert!(!c.is_ours(b"{\"boot\":1}"));
        assert!(!c.is_ours(b"\xff not json"));
    }

    fn ack(acker: &AckSender, generation: u64, n: u64, pkid: Option<u16>, pass: bool) -> MqttAck {
        MqttAck { generation, n, pkid, pass, acker: acker.clone() }
    }

    /// Settled publishes are acknowledged in receive order: each submission sends at once
    /// everything whose predecessors are settled, as one batch; the rest waits for the gap
    /// before it. An abandoned publish is settled but not acknowledged, a passed copy is
    /// acknowledged but not counted as a commit, and one of an older connection is dropped.
    #[test]
    fn acker_sends_what_is_due_in_receive_order() {
        let (wire_tx, mut wire_rx) = mpsc::unbounded_channel::<WireAcks>();
        let generation = Arc::new(AtomicU64::new(1));
        let progress = Arc::new(AckProgress::default());
        let metrics = Arc::new(Metrics::default());
        let acker: AckSender = Arc::new(Acker::new(wire_tx, generation.clone(), progress.clone(), metrics.clone()));
        acker.submit(vec![ack(&acker, 1, 2, Some(12), false), ack(&acker, 1, 0, Some(10), false)]);
        assert_eq!(wire_rx.try_recv().ok(), Some((1, vec![10])), "0 is due; 2 waits for 1");
        acker.submit(vec![ack(&acker, 1, 1, Some(11), true)]);
        assert_eq!(wire_rx.try_recv().ok(), Some((1, vec![11, 12])), "the pass lets 2 go with it");
        assert_eq!(metrics.acks_sent.load(Relaxed), 2, "the pass confirms no commit");
        acker.submit(vec![ack(&acker, 1, 4, Some(14), false), ack(&acker, 1, 5, None, false)]);
        acker.submit(vec![ack(&acker, 0, 3, Some(99), false)]);
        assert!(wire_rx.try_recv().is_err(), "4 and 5 wait for 3; an older connection's 3 is not it");
        acker.submit(vec![ack(&acker, 1, 3, Some(13), false)]);
        assert_eq!(wire_rx.try_recv().ok(), Some((1, vec![13, 14])), "5 was abandoned: settled, not acknowledged");
        assert_eq!(metrics.acks_sent.load(Relaxed), 4);
        assert_eq!((progress.settled.load(Relaxed), progress.abandoned.load(Relaxed)), (6, 1));
        // A new connection starts a new order; what was due on the old one is dropped.
        generation.store(2, Relaxed);
        acker.submit(vec![ack(&acker, 1, 6, Some(16), false), ack(&acker, 2, 0, Some(1), false)]);
        assert_eq!(wire_rx.try_recv().ok(), Some((2, vec![1])));
        drop(wire_rx);
        acker.submit(vec![ack(&acker, 2, 1, Some(2), false)]);
        assert_eq!(progress.abandoned.load(Relaxed), 2, "the session loop is gone: given up, redelivered later");
    }

    /// On an in-process link the acker hands the acknowledgements to the broker's router
    /// itself: the broker sends a QoS 1 subscriber at most 100 unacknowledged publishes, and
    /// exactly the ones acknowledged through the acker let as many more through, with no
    /// session loop in between. Once the link is detached, acknowledgements go to the
    /// session loop again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acknowledgements_through_the_acker_free_the_window_of_an_in_process_link() {
        use rumqttd::protocol as p;
        let port = crate::free_port().expect("port");
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let mut links = crate::broker::start(addr, 64 * 1024, &["t-link".to_string()]).expect("broker");
        let (mut tx, mut rx) = links.remove("t-link").expect("a link");
        let filter = p::Filter {
            path: "t/#".into(),
            qos: p::QoS::AtLeastOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: p::RetainForwardRule::Never,
        };
        tx.send(p::Packet::Subscribe(p::Subscribe { pkid: 1, filters: vec![filter] }, None)).await.expect("subscribe");
        // The next notification, or `None` if none comes for `wait_ms`. (A wake-up can find
        // its notifications taken already with an earlier one: that is not the end.)
        let next = |rx: &mut rumqttd::local::LinkRx, wait_ms: u64| {
            let deadline = std::time::Instant::now() + Duration::from_millis(wait_ms);
            loop {
                match rx.recv_deadline(deadline) {
                    Ok(Some(n)) => return Some(n),
                    Ok(None) => continue,
                    Err(_) => return None,
                }
            }
        };
        assert!(matches!(next(&mut rx, 5_000), Some(rumqttd::Notification::DeviceAck(_))), "subscribed");
        let (wire_tx, mut wire_rx) = mpsc::unbounded_channel::<WireAcks>();
        let generation = Arc::new(AtomicU64::new(1));
        let metrics = Arc::new(Metrics::default());
        let acker: AckSender =
            Arc::new(Acker::new(wire_tx, generation.clone(), Arc::new(AckProgress::default()), metrics.clone()));
        acker.attach(1, tx);

        let (client, mut el) = AsyncClient::new(MqttOptions::new("t-pub", "127.0.0.1", port), 200);
        let publisher = tokio::spawn(async move {
            loop {
                if el.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        for i in 0..150u32 {
            client.publish("t/d", QoS::AtLeastOnce, false, i.to_string()).await.expect("publish");
        }
        // Reads forwards until none comes for `quiet_ms`: their packet ids, in order.
        let take = |rx: &mut rumqttd::local::LinkRx, quiet_ms: u64| {
            let mut pkids = Vec::new();
            while let Some(n) = next(rx, quiet_ms) {
                if let rumqttd::Notification::Forward(mut f) = n {
                    let (qos, pkid, _) = forward_header(&mut f.publish);
                    assert_eq!((qos, f.publish.topic.as_ref()), (1, &b"t/d"[..]), "a QoS 1 forward, its topic kept");
                    pkids.push(pkid);
                }
            }
            pkids
        };
        let first = tokio::task::block_in_place(|| take(&mut rx, 1_000));
        assert_eq!(first.len(), 100, "the broker's window: 100 unacknowledged");
        let due = |from: u64, pkids: &[u16]| -> Vec<MqttAck> {
            pkids.iter().enumerate().map(|(i, &pkid)| ack(&acker, 1, from + i as u64, Some(pkid), false)).collect()
        };
        acker.submit(due(0, &first[..30]));
        let second = tokio::task::block_in_place(|| take(&mut rx, 500));
        assert_eq!(second.len(), 30, "30 acknowledged, 30 more sent");
        acker.submit(due(30, &first[30..]));
        let third = tokio::task::block_in_place(|| take(&mut rx, 500));
        assert_eq!(third.len(), 20, "the rest of the 150");
        assert!(wire_rx.try_recv().is_err(), "nothing went through the session loop");
        assert_eq!(metrics.acks_sent.load(Relaxed), 100);
        acker.detach();
        acker.submit(due(100, &second));
        assert_eq!(wire_rx.try_recv().ok(), Some((1, second.clone())), "detached: to the session loop");
        publisher.abort();
    }

    /// The session loop writes the batches queued behind the first as one; a newer
    /// connection's batch replaces an older one's, and an older batch behind it is dropped.
    #[test]
    fn queued_acknowledgement_batches_are_gathered_into_one_write() {
        let (tx, mut rx) = mpsc::unbounded_channel::<WireAcks>();
        for b in [(3, vec![4, 5]), (3, vec![6]), (4, vec![1]), (3, vec![7]), (4, vec![2, 3])] {
            tx.send(b).expect("send");
        }
        assert_eq!(gather((3, vec![1, 2, 3]), &mut rx), (4, vec![1, 2, 3]));
        assert!(rx.try_recv().is_err(), "everything queued was taken");
        tx.send((5, vec![9])).expect("send");
        assert_eq!(gather((5, vec![8]), &mut rx), (5, vec![8, 9]));
        assert_eq!(gather((5, vec![10]), &mut rx), (5, vec![10]), "nothing queued: the batch alone");
    }

    /// Found by tests/integration/hostile.rs: a 3 MiB publish forwarded by Mosquitto (which
    /// has no size limit by default) was over the client's packet limit, broke the
    /// connection, and came back on every reconnect: no ingest at all. Every packet MQTT
    /// allows must be readable, so that it becomes a dead letter.
    #[test]
    fn every_mqtt_packet_can_be_read() {
        let o = options(&MqttConfig::embedded(), "mes", &IngestConfig::default(), None).expect("options");
        assert_eq!(o.max_packet_size(), 268_435_455);
    }
}
