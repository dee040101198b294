//! The embedded MQTT broker (rumqttd) for a set-up with nothing installed.

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

/// An in-process connection to the embedded broker (rumqttd's local link): the same
/// router, subscriptions, window of unacknowledged publishes (100) and acknowledgements as
/// a client over TCP, without the socket, the MQTT encoding, or the broker's connection
/// thread in between. See `ingest::mqtt` (`start_local`).
pub type LocalLink = (rumqttd::local::LinkTx, rumqttd::local::LinkRx);

/// Starts the broker on its own threads and waits until it accepts connections. Returns an
/// in-process link for each of `local` (client ids), made before the broker listens; an id
/// the broker refused is left out (its session connects over TCP).
pub fn start(listen: SocketAddr, max_payload: usize, local: &[String]) -> Result<HashMap<String, LocalLink>, String> {
    let server = ServerSettings {
        name: "mes-embedded".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: (max_payload * 16).max(1 << 20),
            max_inflight_count: 10_000,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_000,
            max_outgoing_packet_count: 1000,
            // Each topic filter is its own in-memory log: 10 segments of 4 MiB keep the last
            // ~200,000 telemetry messages of a filter, far more than any subscriber here lags
            // (the MES's sessions have at most 100 unacknowledged each), and bound the
            // broker's memory: the main session's wildcard filter and every device's own
            // filter (its partition session) each keep a copy.
            max_segment_size: 4 * 1024 * 1024,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("mes".to_string(), server)])),
        ..Default::default()
    };
    let ids = local.to_vec();
    let (links_tx, links_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            let mut links = HashMap::new();
            for id in ids {
                match broker.link(&id) {
                    Ok(link) => {
                        links.insert(id, link);
                    }
                    Err(e) => tracing::warn!(session = %id, error = ?e, "no in-process link to the embedded broker; the session connects over TCP"),
                }
            }
            let _ = links_tx.send(links);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })
        .map_err(|e| e.to_string())?;
    let links = links_rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|e| format!("embedded MQTT broker did not start its router: {e}"))?;
    // Wait (bounded) until the port accepts connections.
    for _ in 0..100 {
        if std::net::TcpStream::connect_timeout(&listen, Duration::from_millis(100)).is_ok() {
            tracing::info!(%listen, in_process = links.len(), "embedded MQTT broker listening");
            return Ok(links);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("embedded MQTT broker did not start listening on {listen}"))
}
