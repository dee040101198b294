//! The JSON telemetry path (CONTRACT §4): topic → device id, payload → `Reading`.
//!
//! Input: one byte `n`, then `n` bytes of topic, then the payload. Properties checked
//! beyond "no panic":
//! * a topic that yields a device id is exactly `mes/devices/{id}/telemetry` with a
//!   non-empty id without `/`; every such topic yields its id;
//! * an accepted reading has the device it was parsed for, passes its own validation,
//!   has counters that fit the database's BIGINT and finite metrics;
//! * an accepted reading written back as contract JSON parses to the same reading.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mes::ingest::parse::{device_from_topic, parse, MAX_COUNTER};

const PREFIX: &str = "mes";

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else { return };
    let n = usize::from(n).min(rest.len());
    let (topic, payload) = rest.split_at(n);
    let topic = String::from_utf8_lossy(topic);

    // The topic as given, and the topic built around it as a device id.
    match device_from_topic(PREFIX, &topic) {
        Ok(id) => {
            assert!(!id.is_empty() && !id.contains('/'), "device id {id:?} from {topic:?}");
            assert_eq!(format!("{PREFIX}/devices/{id}/telemetry"), topic);
        }
        Err(reason) => assert!(!reason.is_empty()),
    }
    let built = format!("{PREFIX}/devices/{topic}/telemetry");
    match device_from_topic(PREFIX, &built) {
        Ok(id) => assert_eq!(id, topic),
        Err(_) => assert!(topic.is_empty() || topic.contains('/'), "{built:?} refused"),
    }

    let device = match device_from_topic(PREFIX, &built) {
        Ok(id) => id.to_string(),
        Err(_) => "press-01".to_string(),
    };
    let reading = match parse(&device, payload) {
        Ok(r) => r,
        Err(reason) => {
            assert!(!reason.is_empty());
            return;
        }
    };
    assert_eq!(reading.device, device);
    assert!(reading.validate().is_ok(), "accepted an invalid reading {reading:?}");
    for (name, v) in [("boot", reading.boot), ("seq", reading.seq), ("good", reading.good), ("scrap", reading.scrap)] {
        assert!(v <= MAX_COUNTER && i64::try_from(v).is_ok(), "{name} {v} does not fit i64");
    }
    assert!(reading.metrics.values().all(|x| x.is_finite()), "{:?}", reading.metrics);

    // Written back in the contract's shape, it reads the same.
    let mut wire = serde_json::json!({
        "boot": reading.boot, "seq": reading.seq, "good": reading.good, "scrap": reading.scrap,
        "state": reading.state.map(|s| s.as_str()), "order": reading.order, "reason": reading.reason,
        "metrics": reading.metrics,
    });
    if let Some(ms) = reading.ts_ms {
        let ts = chrono::DateTime::from_timestamp_millis(ms).expect("an accepted ts is a valid time");
        wire["ts"] = serde_json::Value::String(ts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    }
    let again = parse(&device, wire.to_string().as_bytes()).expect("a written-back reading parses");
    assert_eq!(again, reading);
});
