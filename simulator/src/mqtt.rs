//! MQTT I/O: one client for the whole simulator. Publishes telemetry at QoS 1 with a
//! bounded number of unacknowledged publishes, counts the broker's acknowledgements, and
//! passes commands from `{prefix}/devices/+/cmd` to the model.
//!
//! The client keeps a persistent session (stable client id, `clean_session = false`), so
//! publishes not yet acknowledged when the connection drops are sent again after it
//! returns. Any session left by an earlier run is wiped before the first connection, and
//! the session is wiped again on the way out, so no stale commands pile up.

use anyhow::{anyhow, bail, Context};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio::time::{timeout, Instant};

/// Longest wait for the broker to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Packets the client sends before it waits for acknowledgements.
const CLIENT_INFLIGHT: u16 = 200;
/// Requests queued between the simulator and the client's event loop.
const REQUEST_CAPACITY: usize = 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Commands waiting for the model; more are dropped with a warning.
const COMMAND_QUEUE: usize = 1024;

/// `mqtt://host[:port]`, `tcp://host[:port]` or `host[:port]` into host and port.
pub fn parse_url(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = match url.split_once("://") {
        Some(("mqtt" | "tcp", rest)) => rest,
        Some((scheme, _)) => bail!("MQTT URL `{url}`: scheme `{scheme}` is not supported (use mqtt://host:port)"),
        None => url,
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains(['/', '?', '@']) {
        bail!("MQTT URL `{url}`: expected mqtt://host:port");
    }
    let port_of = |p: &str| p.parse::<u16>().map_err(|_| anyhow!("MQTT URL `{url}`: `{p}` is not a port"));
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| anyhow!("MQTT URL `{url}`: unclosed `[`"))?;
        match after.strip_prefix(':') {
            Some(p) => (h, port_of(p)?),
            None if after.is_empty() => (h, 1883),
            None => bail!("MQTT URL `{url}`: expected mqtt://host:port"),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, port_of(p)?),
            None => (rest, 1883),
        }
    };
    if host.is_empty() {
        bail!("MQTT URL `{url}` has no host");
    }
    Ok((host.to_string(), port))
}

/// The device id in `{prefix}/devices/{id}/cmd`.
pub fn device_from_cmd_topic<'a>(prefix: &str, topic: &'a str) -> Option<&'a str> {
    let id = topic.strip_prefix(prefix)?.strip_prefix("/devices/")?.strip_suffix("/cmd")?;
    (!id.is_empty() && !id.contains('/')).then_some(id)
}

/// A command as received: device id and raw payload.
pub type RawCommand = (String, Vec<u8>);

struct Shared {
    published: AtomicU64,
    acked: AtomicU64,
    /// Publishes on the wire and not yet acknowledged (packet ids).
    outstanding: AtomicU64,
    /// Subscriptions acknowledged (the end-of-run fence is one).
    subacks: AtomicU64,
    /// The broker came back without our session: what was in flight then is gone.
    session_lost: AtomicBool,
    connected: AtomicBool,
    stop: AtomicBool,
    progress: Notify,
}

/// The simulator's connection to the broker.
pub struct Link {
    client: AsyncClient,
    shared: Arc<Shared>,
    filter: String,
    task: tokio::task::JoinHandle<()>,
    host: String,
    port: u16,
    client_id: String,
}

fn options(client_id: &str, host: &str, port: u16, clean: bool) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, host, port);
    o.set_keep_alive(Duration::from_secs(15))
        .set_clean_session(clean)
        .set_inflight(CLIENT_INFLIGHT)
        .set_max_packet_size(256 * 1024, 256 * 1024);
    o
}

/// Polls `el` until the broker's ConnAck, within [`CONNECT_TIMEOUT`].
async fn await_connack(el: &mut rumqttc::EventLoop, broker: &str) -> anyhow::Result<()> {
    let connected = timeout(CONNECT_TIMEOUT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    match connected {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => bail!("cannot connect to the MQTT broker at {broker}: {e}"),
        Err(_) => bail!("the MQTT broker at {broker} did not answer within {CONNECT_TIMEOUT:?}"),
    }
}

/// Connects with a clean session and leaves, which deletes any session the broker keeps
/// for `client_id`.
async fn wipe_session(client_id: &str, host: &str, port: u16) -> anyhow::Result<()> {
    let (client, mut el) = AsyncClient::new(options(client_id, host, port, true), 8);
    await_connack(&mut el, &format!("{host}:{port}")).await?;
    let _ = client.try_disconnect();
    // Let the DISCONNECT go out; the loop ends with an error when the broker closes.
    let _ = timeout(Duration::from_secs(2), async { while el.poll().await.is_ok() {} }).await;
    Ok(())
}

impl Link {
    /// Connects to `url` as `client_id`, subscribes to `{prefix}/devices/+/cmd`, and
    /// returns the link and the stream of commands. Fails when the broker cannot be
    /// reached.
    pub async fn connect(
        url: &str,
        client_id: &str,
        prefix: &str,
    ) -> anyhow::Result<(Link, mpsc::Receiver<RawCommand>)> {
        let (host, port) = parse_url(url)?;
        wipe_session(client_id, &host, port).await?;
        let (client, mut el) = AsyncClient::new(options(client_id, &host, port, false), REQUEST_CAPACITY);
        let shared = Arc::new(Shared {
            published: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            outstanding: AtomicU64::new(0),
            subacks: AtomicU64::new(0),
            session_lost: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            progress: Notify::new(),
        });
        // Wait for the first connection here, so a bad broker fails fast.
        await_connack(&mut el, url).await?;
        shared.connected.store(true, Relaxed);
        let filter = format!("{prefix}/devices/+/cmd");
        client.try_subscribe(filter.clone(), QoS::AtLeastOnce).context("cannot subscribe to commands")?;
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let task =
            tokio::spawn(run_event_loop(el, client.clone(), shared.clone(), filter.clone(), prefix.to_string(), tx));
        Ok((Link { client, shared, filter, task, host, port, client_id: client_id.to_string() }, rx))
    }

    pub fn published(&self) -> u64 {
        self.shared.published.load(Relaxed)
    }
    pub fn acked(&self) -> u64 {
        self.shared.acked.load(Relaxed)
    }
    /// Whether the broker lost the session during the run.
    pub fn session_lost(&self) -> bool {
        self.shared.session_lost.load(Relaxed)
    }
    pub fn connected(&self) -> bool {
        self.shared.connected.load(Relaxed)
    }

    /// Publishes at QoS 1. In flight are at most `CLIENT_INFLIGHT` unacknowledged
    /// publishes on the wire and `REQUEST_CAPACITY` queued ones; beyond that this waits.
    pub async fn publish(&mut self, topic: String, payload: String) -> anyhow::Result<()> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .map_err(|e| anyhow!("MQTT client stopped: {e}"))?;
        self.shared.published.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Waits until the broker has acknowledged every publish, at most `limit`; true when
    /// it has. When the broker lost the session, the publishes dropped with it are never
    /// acknowledged: then a subscription queued behind every publish is the fence — once
    /// it is acknowledged, everything before it has been sent, and nothing sent may remain
    /// unacknowledged.
    pub async fn wait_acked(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let fence = self.shared.subacks.load(Relaxed);
        let fenced = self.client.try_subscribe(self.filter.clone(), QoS::AtLeastOnce).is_ok();
        loop {
            let wake = self.shared.progress.notified();
            if self.acked() >= self.published() {
                return true;
            }
            if fenced
                && self.session_lost()
                && self.shared.subacks.load(Relaxed) > fence
                && self.shared.outstanding.load(Relaxed) == 0
            {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            let _ = timeout(Duration::from_millis(100), wake).await;
        }
    }

    /// Disconnects and deletes the broker-side session.
    pub async fn close(self) {
        self.shared.stop.store(true, Relaxed);
        let _ = self.client.try_disconnect();
        let _ = timeout(Duration::from_secs(3), self.task).await;
        if let Err(e) = wipe_session(&self.client_id, &self.host, self.port).await {
            eprintln!("[line-sim] warning: could not clear the MQTT session: {e}");
        }
    }
}

async fn run_event_loop(
    mut el: EventLoop,
    client: AsyncClient,
    shared: Arc<Shared>,
    filter: String,
    prefix: String,
    commands: mpsc::Sender<RawCommand>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut outstanding: HashSet<u16> = HashSet::new();
    let update = |set: &HashSet<u16>| {
        shared.outstanding.store(set.len() as u64, Relaxed);
        shared.progress.notify_waiters();
    };
    loop {
        match el.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff = BACKOFF_MIN;
                shared.connected.store(true, Relaxed);
                eprintln!("[line-sim] reconnected to the MQTT broker (session present: {})", ack.session_present);
                if !ack.session_present {
                    // The client drops what it had in flight when the broker has no session.
                    shared.session_lost.store(true, Relaxed);
                    eprintln!(
                        "[line-sim] warning: the broker lost the session; {} publishes in flight were dropped (later messages carry the cumulative counters)",
                        outstanding.len()
                    );
                    outstanding.clear();
                    update(&outstanding);
                }
                if let Err(e) = client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                    eprintln!("[line-sim] warning: cannot subscribe to commands: {e}");
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                outstanding.insert(pkid);
                update(&outstanding);
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                shared.acked.fetch_add(1, Relaxed);
                outstanding.remove(&ack.pkid);
                update(&outstanding);
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                shared.subacks.fetch_add(1, Relaxed);
                shared.progress.notify_waiters();
            }
            Ok(Event::Incoming(Packet::Publish(p))) => match device_from_cmd_topic(&prefix, &p.topic) {
                Some(device) => {
                    if commands.try_send((device.to_string(), p.payload.to_vec())).is_err() {
                        eprintln!("[line-sim] warning: command for {device} dropped (queue full)");
                    }
                }
                None => eprintln!("[line-sim] warning: ignoring a message on topic {}", p.topic),
            },
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                if shared.stop.load(Relaxed) {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                if shared.stop.load(Relaxed) {
                    break;
                }
                if shared.connected.swap(false, Relaxed) {
                    eprintln!(
                        "[line-sim] MQTT connection lost ({e}); retrying, unacknowledged publishes will be sent again"
                    );
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    shared.connected.store(false, Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(parse_url("mqtt://127.0.0.1:11884").expect("ok"), ("127.0.0.1".into(), 11884));
        assert_eq!(parse_url("tcp://broker/").expect("ok"), ("broker".into(), 1883));
        assert_eq!(parse_url("localhost:1884").expect("ok"), ("localhost".into(), 1884));
        assert_eq!(parse_url("[::1]:1884").expect("ok"), ("::1".into(), 1884));
        assert_eq!(parse_url("mqtt://[::1]").expect("ok"), ("::1".into(), 1883));
        assert!(parse_url("mqtts://x:8883").is_err());
        assert!(parse_url("mqtt://x:notaport").is_err());
        assert!(parse_url("mqtt://:1883").is_err());
        assert!(parse_url("mqtt://u@x:1883").is_err());
    }

    #[test]
    fn command_topics() {
        assert_eq!(device_from_cmd_topic("mes", "mes/devices/press-01/cmd"), Some("press-01"));
        assert_eq!(device_from_cmd_topic("mes", "mes/devices//cmd"), None);
        assert_eq!(device_from_cmd_topic("mes", "mes/devices/a/b/cmd"), None);
        assert_eq!(device_from_cmd_topic("mes", "x/devices/a/cmd"), None);
        assert_eq!(device_from_cmd_topic("mes", "mes/devices/a/telemetry"), None);
    }
}
