//! MQTT adapter: a persistent-session rumqttc client with manual acknowledgements.
//!
//! The event loop only reads: each publish is admitted into the in-flight bound, then
//! handed to a task that decodes it and submits it to the [`Pipeline`]. The writer sends
//! committed publishes to the acker, which acknowledges them to the broker. A publish
//! that is never committed is never acknowledged, so the broker redelivers it.

use super::{parse, Pipeline};
use crate::config::{IngestConfig, MqttConfig};
use crate::db::writer::Completion;
use crate::metrics::Metrics;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

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
}

impl MqttHandle {
    /// Publishes a command to `{prefix}/devices/{device}/cmd` at QoS 1.
    pub async fn command(&self, device: &str, body: &serde_json::Value) -> Result<(), String> {
        let topic = format!("{}/devices/{device}/cmd", self.prefix);
        let bytes = serde_json::to_vec(body).map_err(|e| e.to_string())?;
        match tokio::time::timeout(
            PUBLISH_TIMEOUT,
            self.client.publish(topic, QoS::AtLeastOnce, false, bytes),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("MQTT client: {e}")),
            Err(_) => Err("MQTT client queue full (timed out)".into()),
        }
    }
}

fn options(cfg: &MqttConfig, ingest: &IngestConfig) -> Result<MqttOptions, String> {
    let (host, port) = cfg.host_port().map_err(|e| e.to_string())?;
    let mut o = MqttOptions::new(cfg.client_id.clone(), host, port);
    o.set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(cfg.keep_alive_s))
        .set_max_packet_size(ingest.max_payload + 4096, 256 * 1024)
        .set_inflight(1000);
    if let (Some(u), Some(p)) = (&cfg.username, &cfg.password) {
        o.set_credentials(u.clone(), p.clone());
    }
    Ok(o)
}

/// Starts the client; returns the command handle and the task running the event loop.
/// The task ends when `shutdown` turns true.
pub fn start(
    cfg: &MqttConfig,
    ingest: &IngestConfig,
    pipeline: Pipeline,
    ack_rx: mpsc::Receiver<Vec<rumqttc::Publish>>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(MqttHandle, tokio::task::JoinHandle<()>), String> {
    let opts = options(cfg, ingest)?;
    let (client, mut eventloop) = AsyncClient::new(opts, REQUEST_CAPACITY);
    let handle = MqttHandle {
        client: client.clone(),
        prefix: cfg.topic_prefix.clone(),
    };
    tokio::spawn(acker(client.clone(), ack_rx, pipeline.metrics.clone()));
    let filter = format!("{}/devices/+/telemetry", cfg.topic_prefix);
    let prefix = cfg.topic_prefix.clone();
    let max_payload = ingest.max_payload;
    let metrics = pipeline.metrics.clone();
    let task = tokio::spawn(async move {
        let mut backoff = BACKOFF_MIN;
        loop {
            let ev = tokio::select! {
                _ = shutdown.changed() => break,
                ev = eventloop.poll() => ev,
            };
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff = BACKOFF_MIN;
                    metrics.mqtt_connected.store(true, Relaxed);
                    tracing::info!(
                        session_present = ack.session_present,
                        "connected to MQTT broker"
                    );
                    // Subscribing again is harmless when the broker kept the session, and
                    // needed when it lost it.
                    if let Err(e) = client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                        tracing::error!(error = %e, "cannot queue subscribe");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    Metrics::inc(&metrics.telemetry_messages);
                    let Some(slot) = pipeline.admit().await else {
                        break;
                    };
                    let pipeline = pipeline.clone();
                    let prefix = prefix.clone();
                    tokio::spawn(async move {
                        handle_publish(pipeline, &prefix, max_payload, p, slot).await
                    });
                }
                Ok(_) => {}
                Err(e) => {
                    if metrics.mqtt_connected.swap(false, Relaxed) {
                        Metrics::inc(&metrics.mqtt_reconnects);
                    }
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "MQTT connection lost; reconnecting");
                    tokio::select! {
                        _ = shutdown.changed() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        drain(&mut eventloop, &client, &metrics).await;
        metrics.mqtt_connected.store(false, Relaxed);
        tracing::info!("MQTT intake stopped");
    });
    Ok((handle, task))
}

/// After intake stops: keep the connection polled until what is in flight is committed
/// and its acknowledgements are sent (bounded), then disconnect. Publishes arriving now are
/// not admitted, so they stay unacknowledged and the broker keeps them for the next start.
async fn drain(eventloop: &mut rumqttc::EventLoop, client: &AsyncClient, metrics: &Metrics) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
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
        match tokio::time::timeout(Duration::from_millis(50), eventloop.poll()).await {
            Ok(Err(_)) => break,
            _ => {}
        }
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
}

async fn handle_publish(
    pipeline: Pipeline,
    prefix: &str,
    max_payload: usize,
    p: rumqttc::Publish,
    slot: super::InFlight,
) {
    let received_ms = crate::now_ms();
    let topic = p.topic.clone();
    let done = if p.qos == QoS::AtMostOnce {
        Completion::None
    } else {
        Completion::Mqtt(p.clone())
    };
    let payload = &p.payload;
    let parsed = if payload.len() > max_payload {
        Err(format!(
            "payload of {} bytes exceeds the limit of {max_payload}",
            payload.len()
        ))
    } else {
        parse::device_from_topic(prefix, &topic).and_then(|device| parse::parse(device, payload))
    };
    match parsed {
        Ok(reading) => {
            let span = tracing::debug_span!("reading", device = %reading.device, boot = reading.boot, seq = reading.seq);
            pipeline
                .submit_reading(reading, &topic, received_ms, done, slot)
                .instrument(span)
                .await;
        }
        Err(reason) => {
            let keep = payload.len().min(max_payload);
            let text = String::from_utf8_lossy(&payload[..keep]).into_owned();
            pipeline
                .submit_dead_letter(topic, reason, text, received_ms, done, slot)
                .await;
        }
    }
}

/// Acknowledges committed publishes, in commit order.
async fn acker(
    client: AsyncClient,
    mut rx: mpsc::Receiver<Vec<rumqttc::Publish>>,
    metrics: Arc<Metrics>,
) {
    while let Some(batch) = rx.recv().await {
        for p in batch {
            if let Err(e) = client.ack(&p).await {
                tracing::warn!(error = %e, "ack not sent; the broker will redeliver (deduplicated)");
                continue;
            }
            Metrics::inc(&metrics.acks_sent);
        }
    }
}
