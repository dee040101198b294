//! Sparkplug B: the protobuf decoder (src/ingest/sparkplug/proto.rs) and the primary
//! host's session logic ([`Host::decide`]) over a stream of arbitrary messages.
//!
//! Input: a sequence of messages, each one byte choosing the topic (bound and unbound
//! edge nodes, every message type, malformed topics), two bytes of length, then that
//! many payload bytes. Properties checked beyond "no panic":
//! * a payload that decodes re-encodes to bytes that decode to the same encoding;
//! * a reading the host submits is for the bound device, has `boot` 0, passes its own
//!   validation, and its counters, seq key and timestamp fit a BIGINT; its key is the
//!   payload timestamp × 65 536 plus a position below 65 536;
//! * a dead letter has a reason; a rebirth request names the bound edge node; messages
//!   of unbound nodes and malformed topics never yield a reading.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mes::ingest::modbus::StatusBoard;
use mes::ingest::sparkplug::proto::Payload;
use mes::ingest::sparkplug::{Action, Bindings, Host, BOOT};
use mes::plant::Plant;
use prost::Message;
use std::sync::{Arc, OnceLock};

const PLANT: &str = r#"
[[materials]]
sku = "A"
standard_cost = "1"
[[buffers]]
id = "B"
sku = "A"
capacity = 10
[[work_centers]]
id = "PRESS-1"
output = "B"
device = { sparkplug = { group = "G", edge_node = "E", device = "press", good = "Good", scrap = "Scrap", state = "State", order = "Order", target = "Target" } }
[[work_centers]]
id = "CELL-1"
output = "B"
device = { sparkplug = { group = "G", edge_node = "N", good = "Good", scrap = "Scrap" } }
"#;

const TOPICS: &[&str] = &[
    "spBv1.0/G/NBIRTH/E",
    "spBv1.0/G/DBIRTH/E/press",
    "spBv1.0/G/DDATA/E/press",
    "spBv1.0/G/NDATA/E",
    "spBv1.0/G/DDEATH/E/press",
    "spBv1.0/G/NDEATH/E",
    "spBv1.0/G/NBIRTH/N",
    "spBv1.0/G/NDATA/N",
    "spBv1.0/G/NDEATH/N",
    "spBv1.0/G/DDATA/E/other",
    "spBv1.0/G/DCMD/E/press",
    "spBv1.0/X/NBIRTH/E",
    "spBv1.0/G/NDATA/E/extra/levels",
    "spBv1.0/G//E",
    "spBv1.0/G/DDATA/E",
    "spBv1.0/G/XDATA/E",
];

fn bindings() -> Arc<Bindings> {
    static B: OnceLock<Arc<Bindings>> = OnceLock::new();
    B.get_or_init(|| {
        let plant = Plant::parse(PLANT, "fuzz", None).expect("the fuzz plant parses");
        Arc::new(Bindings::from_plant(&plant))
    })
    .clone()
}

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Payload::decode(data) {
        let once = p.encode_to_vec();
        let again = Payload::decode(once.as_slice()).expect("an encoded payload decodes");
        assert_eq!(again.encode_to_vec(), once);
    }

    let mut host = Host::new(bindings(), StatusBoard::default(), None);
    let mut rest = data;
    let mut now_ms = 1_700_000_000_000i64;
    while let [t, hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (payload, next) = tail.split_at(len);
        rest = next;
        let topic = TOPICS[usize::from(*t) % TOPICS.len()];
        now_ms += i64::from(*t);
        let d = host.decide(topic, payload, now_ms);
        if let Some(r) = &d.rebirth {
            assert_eq!(r.group, "G");
            assert!(r.edge_node == "E" || r.edge_node == "N", "{r:?}");
            assert!(!r.reason.is_empty());
        }
        match d.action {
            Action::Submit(r) => {
                let (bound, device) = match topic {
                    "spBv1.0/G/NBIRTH/N" | "spBv1.0/G/NDATA/N" => (true, "cell-1"),
                    "spBv1.0/G/DBIRTH/E/press" | "spBv1.0/G/DDATA/E/press" => (true, "press-1"),
                    _ => (false, ""),
                };
                assert!(bound, "a reading from {topic}: {r:?}");
                assert_eq!(r.device, device);
                assert_eq!(r.boot, BOOT);
                assert!(r.validate().is_ok(), "{r:?}");
                for v in [r.seq, r.good, r.scrap] {
                    assert!(i64::try_from(v).is_ok(), "{v} does not fit a BIGINT: {r:?}");
                }
                let ts = r.ts_ms.expect("a Sparkplug reading carries its timestamp");
                assert!(ts >= 0 && (ts as u64) == r.seq >> 16, "{r:?}");
                assert!(r.metrics.values().all(|x| x.is_finite()));
            }
            Action::DeadLetter(reason) => assert!(!reason.is_empty()),
            Action::Ack => {}
        }
    }
});
