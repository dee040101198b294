//! Sparkplug B: the MES as primary host, driven by an edge node built on an independent
//! implementation (`tests/sparkplug/edge.py`: pysparkplug payloads over paho-mqtt).
//!
//! Python with `pysparkplug` comes from `MES_TEST_SPARKPLUG_PYTHON` (CI: a venv), else
//! `python3` if it can import it; without one the tests are skipped, unless
//! `MES_TEST_REQUIRE_SPARKPLUG` is set (CI), where they fail.

use crate::harness::{external_broker, widget_plant, Mes, MesOptions};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn python() -> Option<String> {
    crate::harness::optional_tool(
        "MES_TEST_SPARKPLUG_PYTHON",
        "python3",
        &["-c", "import pysparkplug, paho.mqtt.client"],
        "MES_TEST_REQUIRE_SPARKPLUG",
        "no Python with pysparkplug and paho-mqtt (pip install pysparkplug; or set MES_TEST_SPARKPLUG_PYTHON)",
    )
}

/// The work center's binding: group (unique per MES), edge node `E1`, device `press`.
fn plant(mes_group: &str) -> String {
    widget_plant(&format!(
        r#"{{ sparkplug = {{ group = "{mes_group}", edge_node = "E1", device = "press", good = "Counts/Good", scrap = "Counts/Scrap", state = "State", order = "Order" }} }}"#
    ))
}

async fn start() -> Option<(Mes, String, String)> {
    let py = python()?;
    // The group must be unique per MES: tests share an external broker.
    let group = format!("G{}", std::process::id() ^ rand_u32());
    let mes = Mes::start(MesOptions { plant: Some(plant(&group)), ..Default::default() }).await;
    Some((mes, py, group))
}

fn rand_u32() -> u32 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0)
}

/// The edge node process; lines it prints other than `ok …` are kept in `events`.
struct Edge {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    events: Vec<String>,
}

impl Edge {
    fn spawn(py: &str, mes: &Mes, group: &str, extra: &[&str]) -> Edge {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sparkplug/edge.py");
        let port = mes.mqtt_port.to_string();
        let mut child = Command::new(py)
            .arg(script)
            .args(["--host", &mes.mqtt_host, "--port", &port, "--group", group, "--node", "E1", "--device", "press"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn edge.py");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Edge { child, stdin, lines, events: Vec::new() }
    }

    /// Sends one command and waits (bounded) for its `ok`; returns the `ok` line.
    fn cmd(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").expect("write to edge");
        self.stdin.flush().expect("flush");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with("ok ") => return l,
                Ok(l) if l.starts_with("error") => panic!("edge: {l}"),
                Ok(l) => self.events.push(l),
                Err(e) => panic!("edge did not answer `{line}`: {e}"),
            }
        }
    }

    /// Waits (bounded) until an event line starting with `prefix` was printed.
    fn wait_event(&mut self, prefix: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.events.iter().any(|e| e.starts_with(prefix)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.events.push(l),
                Err(_) => return false,
            }
        }
        true
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Records every publish on `filter` (an independent observer on the broker).
async fn observe(mes: &Mes, filter: &str) -> (AsyncClient, tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>) {
    let mut o = MqttOptions::new(format!("observer-{}", rand_u32()), mes.mqtt_host.clone(), mes.mqtt_port);
    o.set_keep_alive(Duration::from_secs(10)).set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = AsyncClient::new(o, 100);
    client.subscribe(filter, QoS::AtLeastOnce).await.expect("subscribe");
    // Return only once the broker has the subscription: a publish that comes before it
    // would be missed (found under the full suite's load).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(_) => panic!("observer: no SUBACK for {filter} in 10 s"),
        }
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    (client, rx)
}

async fn device(mes: &Mes) -> Value {
    let (s, v) = mes.get("/api/v1/work-centers/PRESS-1").await;
    assert_eq!(s, 200, "{v}");
    v["device"].clone()
}

async fn dead_letters(mes: &Mes) -> Vec<Value> {
    mes.get("/api/v1/dead-letters").await.1.as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn births_and_aliased_data_count_exactly() {
    let Some((mes, py, group)) = start().await else { return };
    // The harness's client id is `mes-{prefix}`: the host id of this MES.
    let (_obs, mut state) = observe(&mes, &format!("spBv1.0/STATE/mes-{}", mes.prefix)).await;
    let mut edge = Edge::spawn(&py, &mes, &group, &[]);
    edge.cmd("connect");
    edge.cmd("count 3 0 100");
    edge.cmd("count 2 1 50");
    edge.cmd("temp 71.5");
    let last = edge.cmd("count 1 0 1");
    assert!(last.ends_with("good=401 scrap=50"), "{last}");
    assert_eq!(mes.wait_totals("PRESS-1", (401, 50)).await, (401, 50), "log:\n{}", mes.log());
    let d = device(&mes).await;
    assert_eq!((d["kind"].as_str(), d["status"].as_str()), (Some("sparkplug"), Some("online")), "{d}");
    assert!(dead_letters(&mes).await.is_empty());
    // Stock moved exactly: 2 SHEET per unit, good and scrap.
    let (_, buffers) = mes.get("/api/v1/buffers").await;
    let on_hand =
        |id: &str| buffers.as_array().and_then(|a| a.iter().find(|b| b["id"] == id)).map(|b| b["on_hand"].clone());
    assert_eq!(on_hand("FG"), Some(json!(401)));
    assert_eq!(on_hand("RM"), Some(json!(50_000 - 2 * 451)));
    // The primary host's STATE is retained: online, JSON with a timestamp.
    let (topic, payload) =
        tokio::time::timeout(Duration::from_secs(5), state.recv()).await.ok().flatten().expect("STATE");
    assert_eq!(topic, format!("spBv1.0/STATE/mes-{}", mes.prefix));
    let v: Value = serde_json::from_slice(&payload).expect("STATE JSON");
    assert_eq!(v["online"], json!(true));
    assert!(v["timestamp"].as_i64().is_some_and(|t| t > 0));
    // Order dispatch is a DCMD writing the bound `Order` metric (decoded by pysparkplug).
    let (s, o) = mes
        .post("/api/v1/orders", json!({"id": "PO-SPB", "sku": "WIDGET", "quantity": 40, "work_center": "PRESS-1"}), &[])
        .await;
    assert_eq!(s, 201, "{o}");
    let (s, o) = mes.post("/api/v1/orders/PO-SPB/release", json!({}), &[]).await;
    assert_eq!(s, 200, "{o}");
    assert!(edge.wait_event("dcmd Order=PO-SPB"), "no DCMD seen by the edge: {:?}", edge.events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequence_gap_requests_a_rebirth_and_counts_stay_exact() {
    let Some((mes, py, group)) = start().await else { return };
    let (_obs, mut ncmd) = observe(&mes, &format!("spBv1.0/{group}/NCMD/+")).await;
    let mut edge = Edge::spawn(&py, &mes, &group, &[]);
    edge.cmd("connect");
    edge.cmd("count 1 0 10");
    assert_eq!(mes.wait_totals("PRESS-1", (10, 0)).await, (10, 0));
    edge.cmd("skip");
    edge.cmd("count 2 1 10");
    // The MES asked for a rebirth: seen on the broker and by the edge node.
    let (topic, _) = tokio::time::timeout(Duration::from_secs(10), ncmd.recv()).await.ok().flatten().expect("NCMD");
    assert_eq!(topic, format!("spBv1.0/{group}/NCMD/E1"));
    assert!(edge.wait_event("rebirth"), "the edge saw no rebirth request: {:?}", edge.events);
    edge.cmd("count 1 0 5");
    assert_eq!(mes.wait_totals("PRESS-1", (35, 10)).await, (35, 10), "log:\n{}", mes.log());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(mes.totals("PRESS-1").await, (35, 10));
    // Recorded in the audit log.
    let (_, audit) = mes.get("/api/v1/audit").await;
    let text = audit.to_string();
    assert!(text.contains("sparkplug_rebirth") && text.contains("seq gap"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndeath_marks_the_device_unreachable_and_a_restarted_edge_counts_on() {
    let Some((mes, py, group)) = start().await else { return };
    let mut edge = Edge::spawn(&py, &mes, &group, &[]);
    edge.cmd("connect");
    edge.cmd("count 2 1 20");
    assert_eq!(mes.wait_totals("PRESS-1", (40, 20)).await, (40, 20));
    assert_eq!(device(&mes).await["status"], json!("online"));
    // SIGKILL: the broker publishes the edge node's will (NDEATH with its bdSeq).
    edge.kill9();
    let killed = Instant::now();
    loop {
        let d = device(&mes).await;
        if d["status"] == json!("unreachable") {
            assert!(d["last_error"].as_str().is_some_and(|e| e.contains("NDEATH")), "{d}");
            break;
        }
        assert!(killed.elapsed() < Duration::from_secs(1), "still {d} one second after the edge died");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A restarted edge node: new session, counters from 0 again. Nothing lost or doubled.
    let mut edge = Edge::spawn(&py, &mes, &group, &[]);
    edge.cmd("connect");
    let deadline = Instant::now() + Duration::from_secs(5);
    while device(&mes).await["status"] != json!("online") {
        assert!(Instant::now() < deadline, "not online after the new birth");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    edge.cmd("count 3 0 10");
    assert_eq!(mes.wait_totals("PRESS-1", (70, 20)).await, (70, 20), "log:\n{}", mes.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mes_restart_while_the_edge_publishes_loses_and_doubles_nothing() {
    let Some((mut mes, py, group)) = start().await else { return };
    // QoS 1 data, so that the broker redelivers what the MES had not acknowledged.
    let mut edge = Edge::spawn(&py, &mes, &group, &["--qos", "1", "--pace-ms", "2"]);
    edge.cmd("connect");
    let (mut good, mut scrap) = (0i64, 0i64);
    for round in 0..3 {
        edge.cmd("count 2 1 100");
        good += 200;
        scrap += 100;
        // Restart mid-stream: SIGKILL with an external broker (it keeps the session and the
        // edge stays connected), SIGTERM with the embedded one (the edge reconnects).
        if external_broker().is_some() {
            mes.kill9();
        } else {
            let (status, _) = mes.terminate();
            assert!(status.success());
        }
        edge.cmd("count 1 0 50");
        good += 50;
        mes.spawn().await;
        edge.cmd(&format!("count 1 1 {}", 20 + round));
        good += 20 + round;
        scrap += 20 + round;
    }
    edge.cmd("sleep 500");
    edge.cmd("count 1 0 1");
    good += 1;
    assert_eq!(mes.wait_totals("PRESS-1", (good, scrap)).await, (good, scrap), "log:\n{}", mes.log());
    // And it stays there (a late redelivery or rebirth doubles nothing).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(mes.totals("PRESS-1").await, (good, scrap));
    assert_eq!(mes.metric("mes_writer_order_violations_total").await, 0);
    // Settled exactly once: FG holds the good units.
    let (_, buffers) = mes.get("/api/v1/buffers").await;
    let fg = buffers.as_array().and_then(|a| a.iter().find(|b| b["id"] == "FG")).map(|b| b["on_hand"].clone());
    assert_eq!(fg, Some(json!(good)));
    if external_broker().is_some() {
        // The edge stayed connected: after each restart its data came before any birth the
        // new process had seen, and the MES asked for the births.
        let (_, audit) = mes.get("/api/v1/audit").await;
        let text = audit.to_string();
        assert!(text.contains("sparkplug_rebirth") && text.contains("before its NBIRTH"), "{text}");
    }
}

/// Sparkplug DDATA committed per second next to JSON telemetry, same MES, same broker,
/// same run (QoS 1 both, so each is acknowledged only after its commit). Run with
/// `cargo test --release -p mes --test integration sparkplug::bench -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn bench_sparkplug_ddata_vs_json() {
    use mes::ingest::sparkplug::proto::{datatype, Metric, Payload, Value};
    use prost::Message as _;
    let n: u64 = std::env::var("MES_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let group = format!("B{}", rand_u32());
    let mut text = widget_plant(r#"{ mqtt = { id = "press-01" } }"#);
    text.push_str(&format!(
        "[[work_centers]]\nid = \"PRESS-2\"\ninputs = [\"RM\"]\noutput = \"FG\"\n\
         device = {{ sparkplug = {{ group = \"{group}\", edge_node = \"E1\", device = \"press\", good = \"Good\", scrap = \"Scrap\" }} }}\n"
    ));
    let text = text.replace("initial = 50000", "initial = 100000");
    let mes = Mes::start(MesOptions { plant: Some(text), ..Default::default() }).await;
    let mut o = MqttOptions::new(format!("bench-{}", rand_u32()), mes.mqtt_host.clone(), mes.mqtt_port);
    o.set_keep_alive(Duration::from_secs(30)).set_inflight(1000);
    let (client, mut el) = AsyncClient::new(o, 10_000);
    tokio::spawn(async move {
        loop {
            if el.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let now = || {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
    };
    // JSON: `seq` and cumulative counters, as the contract has them.
    let started = Instant::now();
    for i in 1..=n {
        let body = json!({"boot": 1, "seq": i, "good": i, "scrap": 0, "state": "running", "metrics": {"temp_c": 71.5}});
        let topic = format!("{}/devices/press-01/telemetry", mes.prefix);
        client.publish(topic, QoS::AtLeastOnce, false, body.to_string()).await.expect("publish");
    }
    wait_long(&mes, "PRESS-1", n).await;
    let json_s = started.elapsed().as_secs_f64();
    // Sparkplug: births, then DDATA by alias with the good counter and a temperature.
    let m = |name: &str, alias: u64, t: u32, v: Value| Metric { alias: Some(alias), ..Metric::named(name, t, v) };
    let birth = |metrics: Vec<Metric>, seq: u64| Payload {
        timestamp: Some(now()),
        seq: Some(seq),
        metrics,
        ..Default::default()
    };
    let nb = birth(vec![Metric::named("bdSeq", datatype::INT64, Value::LongValue(0))], 0);
    let db = birth(
        vec![
            m("Good", 1, datatype::UINT64, Value::LongValue(0)),
            m("Scrap", 2, datatype::UINT64, Value::LongValue(0)),
            m("Temp", 3, datatype::DOUBLE, Value::DoubleValue(71.5)),
        ],
        1,
    );
    client
        .publish(format!("spBv1.0/{group}/NBIRTH/E1"), QoS::AtLeastOnce, false, nb.encode_to_vec())
        .await
        .expect("nbirth");
    client
        .publish(format!("spBv1.0/{group}/DBIRTH/E1/press"), QoS::AtLeastOnce, false, db.encode_to_vec())
        .await
        .expect("dbirth");
    let started = Instant::now();
    for i in 1..=n {
        let metrics = vec![
            Metric { alias: Some(1), value: Some(Value::LongValue(i)), ..Default::default() },
            Metric { alias: Some(3), value: Some(Value::DoubleValue(71.5)), ..Default::default() },
        ];
        let p = Payload { timestamp: Some(now()), seq: Some((i + 1) % 256), metrics, ..Default::default() };
        client
            .publish(format!("spBv1.0/{group}/DDATA/E1/press"), QoS::AtLeastOnce, false, p.encode_to_vec())
            .await
            .expect("ddata");
    }
    wait_long(&mes, "PRESS-2", n).await;
    let spb_s = started.elapsed().as_secs_f64();
    let (json_rate, spb_rate) = (n as f64 / json_s, n as f64 / spb_s);
    println!(
        "BENCH n={n} json={json_rate:.0} msg/s sparkplug={spb_rate:.0} msg/s ratio={:.2} dead_letters={}",
        spb_rate / json_rate,
        dead_letters(&mes).await.len()
    );
}

async fn wait_long(mes: &Mes, wc: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while mes.totals(wc).await != (n as i64, 0) {
        if Instant::now() > deadline {
            let m = mes.client.get(format!("{}/metrics", mes.http)).send().await.expect("metrics").text().await;
            let m = m.unwrap_or_default();
            let lines: Vec<&str> = m.lines().filter(|l| l.starts_with("mes_") && !l.contains("bucket")).collect();
            let log = mes.log();
            let spb: Vec<&str> = log.lines().filter(|l| l.contains("parkplug")).take(30).collect();
            panic!("{wc} not at {n} in time: {:?}\n{}\n{}", mes.totals(wc).await, lines.join("\n"), spb.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
