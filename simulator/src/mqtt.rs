//! MQTT I/O: one client for the whole simulator. Publishes telemetry at QoS 1 with a
//! bounded number of unacknowledged publishes, counts the broker's acknowledgements, and
//! passes commands from `{prefix}/devices/+/cmd` to the model.
//!
//! The client keeps a persistent session (stable client id, `clean_session = false`), so
//! publishes not yet acknowledged when the connection drops are sent again after it
//! returns. Any session left by an earlier run is wiped before the first connection, and
//! the session is wiped again on the way out, so no stale commands pile up.
//!
//! When the scenario cuts the connection now and then (`faults.mqtt_drops_per_hour`),
//! the client reaches the broker through a [`Relay`] on loopback that can reset both TCP
//! connections at once, with publishes in flight.

use anyhow::{anyhow, bail, Context};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
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
/// A cut waits at most this long for a publish to be in flight.
const CUT_WAIT: Duration = Duration::from_secs(2);
/// After the first publish whose acknowledgement is held back, the broker gets this long
/// to take it before the connection is reset.
const CUT_GRACE: Duration = Duration::from_millis(20);

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
    /// Publishes sent again after a reconnect (their acknowledgement never came).
    retransmitted: AtomicU64,
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
    relay: Option<Relay>,
}

/// A TCP relay on loopback between the client and the broker that can cut the connection
/// abruptly: it stops passing anything from the broker to the client (so acknowledgements
/// are lost), waits for a publish to go out, then resets both TCP connections (no MQTT
/// DISCONNECT; the broker sees the client vanish, the client sees a reset). The client
/// reconnects through the relay and resends what was never acknowledged.
pub struct Relay {
    cut: Arc<watch::Sender<u64>>,
    /// Connections reset.
    resets: Arc<AtomicU64>,
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    /// Listens on a free loopback port and relays each connection to `host:port`.
    pub async fn start(host: &str, port: u16) -> anyhow::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("cannot start the MQTT relay")?;
        let addr = listener.local_addr()?;
        let cut = Arc::new(watch::channel(0u64).0);
        let resets = Arc::new(AtomicU64::new(0));
        let (sender, upstream, counter) = (cut.clone(), (host.to_string(), port), resets.clone());
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((client, _)) => {
                        let conn = relay_connection(client, upstream.clone(), sender.subscribe(), counter.clone());
                        tokio::spawn(conn);
                    }
                    Err(e) => {
                        eprintln!("[line-sim] warning: MQTT relay: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        Ok(Relay { cut, resets, addr, task })
    }

    /// Connections reset so far.
    pub fn resets(&self) -> u64 {
        self.resets.load(Relaxed)
    }

    /// Cuts the connections open now (one that is not open is not cut).
    pub fn cut(&self) {
        self.cut.send_modify(|generation| *generation += 1);
    }
}

/// Resets a TCP connection: a zero linger makes the close send RST (it never blocks).
#[allow(deprecated)]
fn reset(stream: TcpStream) {
    let _ = stream.set_linger(Some(Duration::ZERO));
    drop(stream);
}

async fn relay_connection(
    mut client: TcpStream,
    upstream: (String, u16),
    mut cut: watch::Receiver<u64>,
    resets: Arc<AtomicU64>,
) {
    cut.borrow_and_update();
    let Ok(mut broker) = TcpStream::connect((upstream.0.as_str(), upstream.1)).await else {
        return; // the client sees the connection close and tries again
    };
    let _ = (client.set_nodelay(true), broker.set_nodelay(true));
    let (mut up, mut down) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    // Set once a cut was asked for: nothing reaches the client any more, and the
    // connection is reset after the next publish (or at this instant).
    let mut cutting: Option<Instant> = None;
    loop {
        let give_up = cutting.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            r = client.read(&mut up) => match r {
                Ok(n) if n > 0 => {
                    if broker.write_all(&up[..n]).await.is_err() {
                        return;
                    }
                    if cutting.is_some() {
                        tokio::time::sleep(CUT_GRACE).await;
                        break;
                    }
                }
                _ => return,
            },
            r = broker.read(&mut down), if cutting.is_none() => match r {
                Ok(n) if n > 0 => {
                    if client.write_all(&down[..n]).await.is_err() {
                        return;
                    }
                }
                _ => return,
            },
            changed = cut.changed(), if cutting.is_none() => {
                if changed.is_err() {
                    return;
                }
                cutting = Some(Instant::now() + CUT_WAIT);
            }
            _ = tokio::time::sleep_until(give_up), if cutting.is_some() => break,
        }
    }
    resets.fetch_add(1, Relaxed);
    reset(client);
    reset(broker);
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
    ///
    /// With `relay`, the client goes through a [`Relay`], so [`Link::cut`] can drop the
    /// connection.
    pub async fn connect(
        url: &str,
        client_id: &str,
        prefix: &str,
        relay: bool,
    ) -> anyhow::Result<(Link, mpsc::Receiver<RawCommand>)> {
        let (host, port) = parse_url(url)?;
        wipe_session(client_id, &host, port).await?;
        let relay = if relay { Some(Relay::start(&host, port).await?) } else { None };
        let (via_host, via_port) = match &relay {
            Some(r) => (r.addr.ip().to_string(), r.addr.port()),
            None => (host.clone(), port),
        };
        let (client, mut el) = AsyncClient::new(options(client_id, &via_host, via_port, false), REQUEST_CAPACITY);
        let shared = Arc::new(Shared {
            published: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            outstanding: AtomicU64::new(0),
            subacks: AtomicU64::new(0),
            session_lost: AtomicBool::new(false),
            retransmitted: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            progress: Notify::new(),
        });
        // Wait for the first connection here, so a bad broker fails fast.
        await_connack(&mut el, url).await?;
        shared.connected.store(true, Relaxed);
        let filter = format!("{prefix}/devices/+/cmd");
        client.try_subscribe(filter.clone(), QoS::AtLeastOnce).context("cannot subscribe to commands")?;
        // Commands count from here: return only once the broker has the subscription.
        let subscribed = timeout(CONNECT_TIMEOUT, async {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
        })
        .await;
        match subscribed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("cannot subscribe to commands at {url}: {e}"),
            Err(_) => bail!(
                "the MQTT broker at {url} did not acknowledge the command subscription within {CONNECT_TIMEOUT:?}"
            ),
        }
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let task =
            tokio::spawn(run_event_loop(el, client.clone(), shared.clone(), filter.clone(), prefix.to_string(), tx));
        Ok((Link { client, shared, filter, task, host, port, client_id: client_id.to_string(), relay }, rx))
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
    /// Publishes sent again after a reconnect.
    pub fn retransmitted(&self) -> u64 {
        self.shared.retransmitted.load(Relaxed)
    }
    /// Connections actually reset by [`Link::cut`] (a cut while the connection is down
    /// finds nothing to reset).
    pub fn cuts(&self) -> u64 {
        self.relay.as_ref().map_or(0, Relay::resets)
    }

    /// Drops the connection abruptly (a TCP reset after a publish is in flight); the client
    /// reconnects and resends what was not acknowledged. Only with a relay (see
    /// [`Link::connect`]); otherwise nothing happens.
    pub fn cut(&self) {
        if let Some(relay) = &self.relay {
            relay.cut();
        }
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
                // A session the broker kept still has the subscription.
                if !ack.session_present {
                    if let Err(e) = client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                        eprintln!("[line-sim] warning: cannot subscribe to commands: {e}");
                    }
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                // Still outstanding: sent again after a reconnect.
                if !outstanding.insert(pkid) {
                    shared.retransmitted.fetch_add(1, Relaxed);
                }
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_relay_passes_bytes_and_cuts_after_a_publish_with_its_ack_held_back() {
        let broker = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = broker.local_addr().expect("addr").port();
        let relay = Relay::start("127.0.0.1", port).await.expect("relay");
        let mut client = TcpStream::connect(relay.addr).await.expect("connect");
        let (mut upstream, _) = broker.accept().await.expect("accept");
        let mut buf = [0u8; 16];
        client.write_all(b"connect").await.expect("write");
        let n = upstream.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"connect");
        upstream.write_all(b"connack").await.expect("write");
        let n = client.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"connack");

        relay.cut();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // From the cut on, nothing reaches the client (the broker's acks are lost)...
        upstream.write_all(b"puback").await.expect("write");
        // ...and the next publish still reaches the broker, then both sides are reset.
        client.write_all(b"publish").await.expect("write");
        let n = upstream.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"publish");
        let after = timeout(Duration::from_secs(2), client.read(&mut buf)).await.expect("closed at once");
        assert!(matches!(after, Ok(0) | Err(_)), "the client got {after:?}");
        let after = timeout(Duration::from_secs(2), upstream.read(&mut buf)).await.expect("closed at once");
        assert!(matches!(after, Ok(0) | Err(_)), "the broker got {after:?}");
        assert_eq!(relay.resets(), 1);
        // The client comes back through the relay.
        let mut again = TcpStream::connect(relay.addr).await.expect("reconnect");
        let (mut upstream, _) = broker.accept().await.expect("accept");
        again.write_all(b"connect").await.expect("write");
        let n = upstream.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"connect");
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
