//! Hostile MQTT input end to end (issue 9, scenario 5): oversized payloads, 10,000-deep
//! JSON, unicode device ids, topic injection, huge numbers and negative counters. Each is
//! a dead letter with a clear reason (or, when the topic is not a telemetry topic, never
//! reaches the MES); the MES keeps running and no total moves. (Malformed JSON, unknown
//! states, unknown devices and NULs in payloads are in `ingest.rs`.)

use crate::harness::{Mes, MesOptions};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// An MQTT 3.1.1 client written byte by byte, so that it can publish what well-behaved
/// client libraries refuse to send (wildcards or NUL in a topic, payloads over their
/// packet limits).
struct RawClient(TcpStream);

fn remaining_length(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}

fn mqtt_string(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

impl RawClient {
    fn connect(host: &str, port: u16, id: &str) -> RawClient {
        let mut s = TcpStream::connect((host, port)).expect("connect to broker");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut body = mqtt_string(b"MQTT");
        body.extend_from_slice(&[4, 0x02, 0, 60]); // 3.1.1, clean session, keep-alive 60 s
        body.extend(mqtt_string(id.as_bytes()));
        let mut packet = vec![0x10];
        packet.extend(remaining_length(body.len()));
        packet.extend(body);
        s.write_all(&packet).expect("CONNECT");
        let mut connack = [0u8; 4];
        s.read_exact(&mut connack).expect("CONNACK");
        assert_eq!((connack[0], connack[3]), (0x20, 0), "CONNACK {connack:?}");
        RawClient(s)
    }

    /// Publishes at QoS 1 (packet id 1) and waits for the PUBACK; false if the broker
    /// refused (closed the connection) instead.
    fn publish(&mut self, topic: &[u8], payload: &[u8]) -> bool {
        let mut body = mqtt_string(topic);
        body.extend_from_slice(&[0, 1]);
        body.extend_from_slice(payload);
        let mut packet = vec![0x32];
        packet.extend(remaining_length(body.len()));
        packet.extend(body);
        if self.0.write_all(&packet).is_err() {
            return false;
        }
        let mut puback = [0u8; 4];
        self.0.read_exact(&mut puback).is_ok() && puback[0] == 0x40
    }
}

async fn dead_letters(mes: &Mes) -> Vec<Value> {
    let (s, dl) = mes.get("/api/v1/dead-letters?limit=1000").await;
    assert_eq!(s, 200, "{dl}");
    dl.as_array().cloned().unwrap_or_default()
}

fn reason_for<'a>(dl: &'a [Value], topic: &str) -> Vec<&'a str> {
    dl.iter().filter(|d| d["topic"] == topic).filter_map(|d| d["reason"].as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_payloads_are_dead_letters_and_move_no_total() {
    let mut mes = Mes::start(MesOptions::default()).await;
    let mut dev = mes.device("hostile");
    dev.reading("form-01", 1, 1, 10, 1, json!({})).await;
    dev.flush().await;
    assert_eq!(mes.wait_totals("FORM-1", (10, 1)).await, (10, 1));

    let topic = |device: &str| format!("{}/devices/{device}/telemetry", mes.prefix);
    let valid = |seq: u64| json!({"boot": 1, "seq": seq, "good": 999, "scrap": 0}).to_string();
    // (topic, payload, what the reason must say): each must become exactly this dead letter.
    let mut expected: Vec<(String, Vec<u8>, &str)> = Vec::new();
    let pad = "x".repeat(70_000);
    let oversized = json!({"boot": 1, "seq": 2, "good": 999, "scrap": 0, "pad": pad}).to_string();
    expected.push((topic("form-01"), oversized.into_bytes(), "exceeds the limit of 65536"));
    let deep =
        format!(r#"{{"boot":1,"seq":3,"good":999,"scrap":0,"metrics":{}1{}}}"#, "[".repeat(10_000), "]".repeat(10_000));
    expected.push((topic("form-01"), deep.into_bytes(), "recursion limit exceeded"));
    let deep_objects = format!("{}{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000));
    expected.push((topic("form-01"), deep_objects.into_bytes(), "recursion limit exceeded"));
    for device in ["präss-01", "form-01\u{1F600}", "\u{202E}10-mrof", "ＦＯＲＭ-01"] {
        expected.push((topic(device), valid(4).into_bytes(), "unknown device"));
    }
    let huge = [
        (r#"{"boot":1,"seq":5,"good":18446744073709551616,"scrap":0}"#, "`good` must be a non-negative integer"),
        (r#"{"boot":1,"seq":6,"good":9223372036854775808,"scrap":0}"#, "`good` 9223372036854775808 is too large"),
        (r#"{"boot":1,"seq":1e400,"good":999,"scrap":0}"#, "number out of range"),
        (r#"{"boot":1,"seq":7,"good":1e400,"scrap":0}"#, "number out of range"),
        (r#"{"boot":1,"seq":8,"good":1e19,"scrap":0}"#, "`good` must be a non-negative integer"),
        (r#"{"boot":1,"seq":9,"good":999,"scrap":-1}"#, "`scrap` must be a non-negative integer, got -1"),
        (r#"{"boot":1,"seq":-10,"good":999,"scrap":0}"#, "`seq` must be a non-negative integer, got -10"),
        (r#"{"boot":-1,"seq":11,"good":999,"scrap":0}"#, "`boot` must be a non-negative integer, got -1"),
        (r#"{"boot":1,"seq":12,"good":-0.0,"scrap":0}"#, "`good` must be a non-negative integer"),
    ];
    for (payload, why) in huge {
        expected.push((topic("form-01"), payload.as_bytes().to_vec(), why));
    }
    // `+` in the MES's subscription matches an empty level too.
    expected.push((topic(""), valid(13).into_bytes(), "empty or nested device id"));
    for (t, payload, _) in &expected {
        dev.client.publish(t.clone(), rumqttc::QoS::AtLeastOnce, false, payload.clone()).await.expect("publish");
        dev.published += 1;
    }
    // Topics that are not `{prefix}/devices/{id}/telemetry`: not subscribed, never seen.
    for t in [
        format!("{}/devices/form-01/x/telemetry", mes.prefix),
        format!("{}/devices/form-01/telemetry/x", mes.prefix),
        format!("{}/devices/form-01", mes.prefix),
    ] {
        dev.client.publish(t, rumqttc::QoS::AtLeastOnce, false, valid(13)).await.expect("publish");
        dev.published += 1;
    }
    dev.flush().await;

    // What client libraries refuse to send: wildcards and NUL in a topic name (a broker
    // must refuse them: MQTT 3.1.1 §3.3.2.1, §1.5.3), and a payload past the MES's packet
    // limit (1 MiB).
    let (host, port) = (mes.mqtt_host.clone(), mes.mqtt_port);
    let mut raw_topics: Vec<(String, bool)> = Vec::new();
    for (i, device) in ["+", "#", "form-01\u{0}x", "form-01/+"].iter().enumerate() {
        let t = topic(device);
        let mut c = RawClient::connect(&host, port, &format!("raw-{}-{i}", mes.prefix));
        let accepted = c.publish(t.as_bytes(), valid(14).as_bytes());
        raw_topics.push((t, accepted));
    }
    let big = format!(r#"{{"boot":1,"seq":15,"good":999,"scrap":0,"pad":"{}"}}"#, "y".repeat(3 << 20));
    let big_accepted = RawClient::connect(&host, port, &format!("raw-{}-big", mes.prefix))
        .publish(topic("form-01").as_bytes(), big.as_bytes());

    // A valid reading after all of it still counts, and is all that counts.
    dev.reading("form-01", 1, 16, 12, 1, json!({})).await;
    dev.flush().await;
    let totals = mes.wait_totals("FORM-1", (12, 1)).await;
    if totals != (12, 1) {
        let log = mes.log();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        panic!(
            "totals {totals:?} != (12, 1) (3 MiB payload accepted by the broker: {big_accepted}); log tail:\n{}",
            tail.join("\n")
        );
    }

    let want = expected.len() as u64;
    mes.wait_metric("mes_dead_letters_total", want).await;
    let dl = dead_letters(&mes).await;
    for (t, payload, why) in &expected {
        let reasons = reason_for(&dl, t);
        let head = String::from_utf8_lossy(&payload[..payload.len().min(60)]).into_owned();
        assert!(
            reasons.iter().any(|r| r.contains(why)),
            "{t} {head}: want a dead letter saying {why:?}, got {reasons:?}"
        );
    }
    // Raw topics: refused by the broker, or a dead letter naming the device as unknown.
    let mut extra = 0;
    for (t, accepted) in &raw_topics {
        let shown = t.replace('\0', "\u{FFFD}");
        let reasons = reason_for(&dl, &shown);
        eprintln!("raw topic {t:?}: broker accepted {accepted}, dead letters {reasons:?}");
        assert!(reasons.iter().all(|r| r.contains("unknown device") || r.contains("nested device id")), "{reasons:?}");
        extra += reasons.len() as u64;
    }
    let big_reasons: Vec<&str> = dl
        .iter()
        .filter(|d| d["reason"].as_str().is_some_and(|r| r.contains(&format!("payload of {} bytes", big.len()))))
        .filter_map(|d| d["reason"].as_str())
        .collect();
    eprintln!("3 MiB payload: broker accepted {big_accepted}, dead letters {big_reasons:?}");
    extra += big_reasons.len() as u64;
    assert_eq!(dl.len() as u64, want + extra, "dead letters: {dl:?}");
    assert_eq!(mes.metric("mes_dead_letters_total").await, want + extra);

    // Still the same process, answering.
    let exited = mes.child.as_mut().expect("child").try_wait().expect("child status");
    assert!(exited.is_none(), "mes exited ({exited:?}); log:\n{}", mes.log());
    let (s, _) = mes.get("/healthz").await;
    assert_eq!(s, 200);
    let (s, wc) = mes.get("/api/v1/work-centers/FORM-1").await;
    assert_eq!((s, wc["good_total"].as_i64(), wc["scrap_total"].as_i64()), (200, Some(12), Some(1)));
}
