//! The embedded MQTT broker (rumqttd) for a set-up with nothing installed.

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

/// Starts the broker on its own threads and waits until it accepts connections.
pub fn start(listen: SocketAddr, max_payload: usize) -> Result<(), String> {
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
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })
        .map_err(|e| e.to_string())?;
    // Wait (bounded) until the port accepts connections.
    for _ in 0..100 {
        if std::net::TcpStream::connect_timeout(&listen, Duration::from_millis(100)).is_ok() {
            tracing::info!(%listen, "embedded MQTT broker listening");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("embedded MQTT broker did not start listening on {listen}"))
}
