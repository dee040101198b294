use super::proto::{datatype as dt, Metric, Payload, Value};
use super::*;

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
"#;

fn host() -> Host {
    let plant = Plant::parse(PLANT, "t", None).expect("plant");
    Host::new(Arc::new(Bindings::from_plant(&plant)), StatusBoard::default(), None)
}

fn aliased(alias: u64, v: Value) -> Metric {
    Metric { alias: Some(alias), value: Some(v), ..Default::default() }
}

fn payload(ts: u64, seq: u64, metrics: Vec<Metric>) -> Vec<u8> {
    Payload { timestamp: Some(ts), seq: Some(seq), metrics, ..Default::default() }.encode_to_vec()
}

fn nbirth(bd: u64) -> Vec<u8> {
    payload(1000, 0, vec![Metric::named("bdSeq", dt::INT64, Value::LongValue(bd))])
}

fn dbirth(ts: u64, seq: u64, good: u64, scrap: u64) -> Vec<u8> {
    let m = |name: &str, alias: u64, t: u32, v: Value| Metric { alias: Some(alias), ..Metric::named(name, t, v) };
    payload(
        ts,
        seq,
        vec![
            m("Good", 1, dt::UINT64, Value::LongValue(good)),
            m("Scrap", 2, dt::INT32, Value::IntValue(scrap as u32)),
            m("State", 3, dt::STRING, Value::StringValue("running".into())),
            m("Order", 4, dt::STRING, Value::StringValue(String::new())),
            m("Temp", 5, dt::DOUBLE, Value::DoubleValue(71.5)),
        ],
    )
}

fn reading(d: Decision) -> Reading {
    match d.action {
        Action::Submit(r) => r,
        other => panic!("expected a reading, got {other:?}"),
    }
}

const NB: &str = "spBv1.0/G/NBIRTH/E";
const DB: &str = "spBv1.0/G/DBIRTH/E/press";
const DD: &str = "spBv1.0/G/DDATA/E/press";

#[test]
fn topics() {
    let t = parse_topic("spBv1.0/G/DDATA/E/press").expect("topic");
    assert_eq!((t.group, t.kind, t.edge_node, t.device), ("G", Kind::DData, "E", Some("press")));
    assert_eq!(parse_topic("spBv1.0/G/NDATA/E").expect("topic").device, None);
    for bad in ["spBv1.0/G/NDATA/E/d", "spBv1.0/G/DDATA/E", "spBv1.0/G/XDATA/E", "spBv1.0//NDATA/E", "x/G/NDATA/E"] {
        assert!(parse_topic(bad).is_err(), "{bad}");
    }
}

#[test]
fn seq_clock_orders_messages_and_never_raises_a_repeat() {
    let mut c = SeqClock::default();
    // 300 messages in one millisecond (Sparkplug seq wraps past 255 meanwhile), then later.
    let mut keys: Vec<u64> = (0..300).map(|_| c.key(10)).collect();
    keys.extend([c.key(11), c.key(11)]);
    assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
    // A clock going back stays below.
    assert!(c.key(9) < keys[0]);
    // After a restart of the MES the clock is fresh: any suffix of the stream maps each
    // message to its first key or lower.
    let mut fresh = SeqClock::default();
    for (i, k) in keys.iter().enumerate().skip(120) {
        let ts = if i < 300 { 10 } else { 11 };
        assert!(fresh.key(ts) <= *k);
    }
}

#[test]
fn births_and_aliased_data_make_cumulative_readings() {
    let mut h = host();
    assert!(matches!(h.decide(NB, &nbirth(3), 0).action, Action::Ack));
    let r = reading(h.decide(DB, &dbirth(1001, 1, 10, 1), 0));
    assert_eq!((r.boot, r.good, r.scrap, r.state), (BOOT, 10, 1, Some(MachineState::Running)));
    assert_eq!(r.metrics.get("Temp"), Some(&71.5));
    assert_eq!(h.board.read().expect("board").get("press-1").map(|s| s.status), Some("online"));
    // Data by alias only, without datatypes; scrap is carried over from the birth.
    let d = h.decide(DD, &payload(1002, 2, vec![aliased(1, Value::LongValue(15))]), 0);
    let r2 = reading(d);
    assert_eq!((r2.good, r2.scrap), (15, 1));
    assert!(r2.seq > r.seq);
    let r3 = reading(h.decide(DD, &payload(1003, 3, vec![aliased(4, Value::StringValue("PO-1".into()))]), 0));
    assert_eq!(r3.order.as_deref(), Some("PO-1"));
}

#[test]
fn gaps_unknown_aliases_and_data_before_birth_ask_for_a_rebirth() {
    let mut h = host();
    let d = h.decide(DD, &payload(1002, 2, vec![aliased(1, Value::LongValue(15))]), 0);
    assert!(matches!(d.action, Action::Ack));
    assert!(d.rebirth.as_ref().is_some_and(|r| r.reason.contains("before its NBIRTH")), "{d:?}");
    // At most one request per interval.
    let d = h.decide(DD, &payload(1003, 3, vec![]), 10);
    assert!(d.rebirth.is_none());
    h.decide(NB, &nbirth(4), 5000);
    reading(h.decide(DB, &dbirth(1001, 1, 10, 1), 5000));
    let d = h.decide(DD, &payload(1004, 3, vec![aliased(1, Value::LongValue(20))]), 5000);
    assert!(matches!(d.action, Action::Ack));
    assert!(d.rebirth.as_ref().is_some_and(|r| r.reason.contains("seq gap: expected 2, got 3")), "{d:?}");
    // Stale until the next NBIRTH, with no second request inside the interval.
    let d = h.decide(DD, &payload(1005, 4, vec![aliased(1, Value::LongValue(21))]), 5001);
    assert!(matches!(d.action, Action::Ack) && d.rebirth.is_none());
    h.decide(NB, &nbirth(5), 9000);
    reading(h.decide(DB, &dbirth(1006, 1, 21, 1), 9000));
    let d = h.decide(DD, &payload(1007, 2, vec![aliased(9, Value::LongValue(22))]), 9000);
    assert!(d.rebirth.as_ref().is_some_and(|r| r.reason.contains("unknown alias 9")), "{d:?}");
}

#[test]
fn deaths_mark_devices_unreachable_and_respect_bd_seq() {
    let mut h = host();
    h.decide(NB, &nbirth(7), 0);
    reading(h.decide(DB, &dbirth(1001, 1, 10, 1), 0));
    let status = |h: &Host| h.board.read().expect("board").get("press-1").map(|s| s.status);
    // A death of an earlier session (other bdSeq) changes nothing.
    let old = payload(1002, 0, vec![Metric::named("bdSeq", dt::INT64, Value::LongValue(6))]);
    h.decide("spBv1.0/G/NDEATH/E", &old, 0);
    assert_eq!(status(&h), Some("online"));
    let death = Payload { metrics: vec![Metric::named("bdSeq", dt::INT64, Value::LongValue(7))], ..Default::default() };
    h.decide("spBv1.0/G/NDEATH/E", &death.encode_to_vec(), 0);
    assert_eq!(status(&h), Some("unreachable"));
    h.decide(NB, &nbirth(8), 0);
    reading(h.decide(DB, &dbirth(1003, 1, 10, 1), 0));
    assert_eq!(status(&h), Some("online"));
    h.decide("spBv1.0/G/DDEATH/E/press", &payload(1004, 2, vec![]), 0);
    assert_eq!(status(&h), Some("unreachable"));
}

#[test]
fn invalid_input_is_a_dead_letter() {
    let mut h = host();
    assert!(
        matches!(h.decide(NB, b"\xff\xff\xff", 0).action, Action::DeadLetter(r) if r.contains("invalid Sparkplug B payload"))
    );
    h.decide(NB, &nbirth(1), 0);
    reading(h.decide(DB, &dbirth(1001, 1, 10, 1), 0));
    let neg = payload(1002, 2, vec![Metric { datatype: Some(dt::INT32), ..aliased(2, Value::IntValue(-1i32 as u32)) }]);
    assert!(matches!(h.decide(DD, &neg, 0).action, Action::DeadLetter(r) if r.contains("not a non-negative count")));
    let bad_state = payload(1003, 3, vec![aliased(3, Value::StringValue("exploded".into()))]);
    assert!(matches!(h.decide(DD, &bad_state, 0).action, Action::DeadLetter(r) if r.contains("unknown state")));
    let no_ts = Payload { seq: Some(4), ..Default::default() }.encode_to_vec();
    assert!(matches!(h.decide(DD, &no_ts, 0).action, Action::DeadLetter(r) if r.contains("timestamp")));
    // Nothing was applied by the invalid messages.
    let r = reading(h.decide(DD, &payload(1005, 5, vec![]), 0));
    assert_eq!((r.good, r.scrap, r.state), (10, 1, Some(MachineState::Running)));
    // Other groups' and nodes' traffic is not ours.
    assert!(matches!(h.decide("spBv1.0/G/NBIRTH/other", b"\xff", 0).action, Action::Ack));
}

#[test]
fn commands_write_the_bound_metrics() {
    let h = host();
    let body = serde_json::json!({"cmd": "set_order", "order": "PO-9", "target": 500, "id": "DSP-1"});
    let (topic, bytes) = h.bindings().command("press-1", &body, 42).expect("dcmd");
    assert_eq!(topic, "spBv1.0/G/DCMD/E/press");
    let p = Payload::decode(bytes.as_slice()).expect("decodes");
    assert_eq!(p.metrics[0], Metric::named("Order", dt::STRING, Value::StringValue("PO-9".into())));
    assert_eq!(p.metrics[1], Metric::named("Target", dt::UINT64, Value::LongValue(500)));
    assert!(h.bindings().command("press-1", &serde_json::json!({"cmd": "start"}), 0).is_err());
    let (t, b) = rebirth_request("G", "E", 7);
    assert_eq!(t, "spBv1.0/G/NCMD/E");
    let p = Payload::decode(b.as_slice()).expect("decodes");
    assert_eq!(p.metrics[0].name.as_deref(), Some("Node Control/Rebirth"));
    assert_eq!(p.metrics[0].value, Some(Value::BooleanValue(true)));
    assert_eq!(state_topic("mes/x"), "spBv1.0/STATE/mes_x");
    assert_eq!(h.bindings().filters(), vec!["spBv1.0/G/#".to_string()]);
}

/// A PLC that publishes its state as an integer code: the work center's `state_codes` name
/// what each code means; a code not named, or a code where none are named, is a dead letter
/// that changes nothing.
#[test]
fn integer_state_codes_map_to_states_and_an_unnamed_code_is_a_dead_letter() {
    let coded = PLANT.replace(
        "state = \"State\",",
        "state = \"State\", state_codes = { 0 = \"stopped\", 1 = \"running\", 3 = \"down\" },",
    );
    let plant = Plant::parse(&coded, "t", None).expect("plant");
    let mut h = Host::new(Arc::new(Bindings::from_plant(&plant)), StatusBoard::default(), None);
    let code = |v: u32| Metric { datatype: Some(dt::INT16), ..aliased(3, Value::IntValue(v)) };
    h.decide(NB, &nbirth(1), 0);
    let m = |name: &str, alias: u64, t: u32, v: Value| Metric { alias: Some(alias), ..Metric::named(name, t, v) };
    let birth = payload(
        1001,
        1,
        vec![
            m("Good", 1, dt::UINT64, Value::LongValue(10)),
            m("Scrap", 2, dt::INT32, Value::IntValue(1)),
            m("State", 3, dt::INT16, Value::IntValue(1)),
        ],
    );
    assert_eq!(reading(h.decide(DB, &birth, 0)).state, Some(MachineState::Running));
    let r = reading(h.decide(DD, &payload(1002, 2, vec![code(3)]), 0));
    assert_eq!(r.state, Some(MachineState::Down));
    assert!(matches!(h.decide(DD, &payload(1003, 3, vec![code(7)]), 0).action,
                 Action::DeadLetter(r) if r.contains("code 7 is not in the work center's state_codes")),);
    // A negative code (two's complement in the INT16) is a code too, and not named here.
    assert!(matches!(h.decide(DD, &payload(1004, 4, vec![code(-1i32 as u32)]), 0).action,
                     Action::DeadLetter(r) if r.contains("code -1")));
    // Strings still work alongside codes; what the dead letters carried changed nothing.
    let r = reading(h.decide(DD, &payload(1005, 5, vec![aliased(3, Value::StringValue("idle".into()))]), 0));
    assert_eq!((r.good, r.scrap, r.state), (10, 1, Some(MachineState::Idle)));

    // Without state_codes an integer state is refused, naming the setting.
    let mut plain = host();
    plain.decide(NB, &nbirth(1), 0);
    reading(plain.decide(DB, &dbirth(1001, 1, 10, 1), 0));
    assert!(matches!(plain.decide(DD, &payload(1002, 2, vec![code(1)]), 0).action,
                     Action::DeadLetter(r) if r.contains("name the codes in the work center's sparkplug state_codes")));
}

#[test]
fn state_codes_are_checked_when_the_plant_is_loaded() {
    for (codes, expected) in [
        ("state_codes = { 01 = \"running\" },", "state_codes key `01` must be an integer"),
        ("state_codes = { x = \"running\" },", "state_codes key `x` must be an integer"),
        ("state_codes = { 2 = \"exploded\" },", "state_codes `2` = `exploded` is not a state"),
    ] {
        let bad = PLANT.replace("state = \"State\",", &format!("state = \"State\", {codes}"));
        let e = Plant::parse(&bad, "t", None).expect_err(codes).to_string();
        assert!(e.contains(expected), "{codes}: {e}");
    }
    let orphan = PLANT.replace("state = \"State\",", "state_codes = { 1 = \"running\" },");
    let e = Plant::parse(&orphan, "t", None).expect_err("orphan").to_string();
    assert!(e.contains("state_codes without a state metric"), "{e}");
}
