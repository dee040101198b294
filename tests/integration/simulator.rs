//! The MES against the line simulator: after the run, every count equals the truth.
//! Also: `line-sim` is deterministic as a program, and `mes demo` reconciles exactly.

use crate::harness::{free_port, temp_dir, Mes, MesOptions};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `line-sim`, brought up to date beside the test binary (a no-op when `cargo test` at the
/// workspace root already built it).
pub fn line_sim() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let status = Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "line-sim"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo build -p line-sim");
    assert!(status.success());
    dir.join("line-sim")
}

/// The demo plant (MQTT and Modbus devices) with its Modbus servers on free ports.
fn demo_plant_on_free_ports() -> String {
    include_str!("../../plants/demo.toml")
        .replace("127.0.0.1:15020", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:15021", &format!("127.0.0.1:{}", free_port()))
}

/// The numbers in `line` in order (digits only; `12.5` gives 12 and 5).
fn numbers(line: &str) -> Vec<u64> {
    line.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).filter_map(|s| s.parse().ok()).collect()
}

/// The line of `text` that starts with `prefix`.
fn line_starting<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no line `{prefix}` in:\n{text}"))
}

/// A work center's (good, scrap) in the truth.
fn made(truth: &Value, wc: &str) -> (i64, i64) {
    let t = &truth["work_centers"][wc];
    (t["good"].as_i64().expect("good"), t["scrap"].as_i64().expect("scrap"))
}

/// The production orders the test releases: (id, work center, quantity, priority). The
/// MQTT work centers get three each: two that complete during the run (the MES then hands
/// the work center to the next in its queue) and one too large to finish.
const ORDERS: [(&str, &str, i64, i64); 6] = [
    ("PO-B1", "BLANK-1", 4000, 30),
    ("PO-B2", "BLANK-1", 4000, 20),
    ("PO-B3", "BLANK-1", 1_000_000, 10),
    ("PO-A1", "ASSY-1", 1500, 30),
    ("PO-A2", "ASSY-1", 1500, 20),
    ("PO-A3", "ASSY-1", 1_000_000, 10),
];

/// Three simulated hours (two against an external broker) of the demo plant (MQTT and Modbus devices) under `faults`:
/// reboots, duplicate and reordered publishes, dropped MQTT connections with publishes in
/// flight, Modbus servers that stop answering, breakdowns. Production orders are released
/// before the line starts. Afterwards every work center's and order's good/scrap equals
/// the truth, and stock equals initial − consumption + production.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_plant_with_mqtt_and_modbus_under_faults_matches_the_truth_exactly() {
    let mes = Mes::start(MesOptions { plant: Some(demo_plant_on_free_ports()), ..Default::default() }).await;
    let truth_path = mes.dir.join("truth.json");
    let plant_path = mes.dir.join("plant.toml");
    let log_path = mes.dir.join("line-sim.log");
    // The embedded broker queues without limit; a stock Mosquitto drops QoS 1 messages
    // beyond `max_queued_messages` (1000) for a subscriber that falls behind, so against an
    // external broker the line runs at a pace the MES keeps up with.
    // A burst after each dropped connection must fit that queue too.
    let (speed, duration) = if crate::harness::external_broker().is_some() { ("80", "2h") } else { ("max", "3h") };
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut sim = Command::new(line_sim())
        .arg("--plant")
        .arg(&plant_path)
        .args(["--mqtt", &format!("mqtt://{}:{}", mes.mqtt_host, mes.mqtt_port), "--topic-prefix", &mes.prefix])
        .args(["--scenario", "faults", "--seed", "11", "--speed", speed, "--duration", duration, "--start-stopped"])
        .arg("--truth")
        .arg(&truth_path)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("run line-sim");
    let sim_log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // The line waits, stopped, for its shift. Once it names its broker and client id, the
    // simulator is subscribed to its commands.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sim_log().contains(" as line-sim-11") {
        assert!(Instant::now() < deadline, "line-sim did not connect:\n{}", sim_log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The MES reads the Modbus devices (form-01, pack-01) before anything is sent to them:
    // started before line-sim, it found their ports closed and retries after a backoff, and
    // a command written meanwhile answers 503 once its write times out.
    for wc in ["FORM-1", "PACK-1"] {
        let status = crate::modbus::wait_status_of(&mes, wc, None, "online", Duration::from_secs(30)).await;
        assert_eq!(status, "online", "{wc}'s Modbus device not online\n{}", sim_log());
    }
    // Release the orders (the first of each work center goes to its device at once), then
    // start the line.
    for (id, wc, quantity, priority) in ORDERS {
        let (s, v) = mes
            .post(
                "/api/v1/orders",
                json!({"id": id, "sku": sku_of(wc), "quantity": quantity, "work_center": wc, "priority": priority}),
                &[],
            )
            .await;
        assert_eq!(s, 201, "{v}");
        let (s, v) = mes.post(&format!("/api/v1/orders/{id}/release"), json!({}), &[]).await;
        assert_eq!(s, 200, "{v}");
    }
    for wc in ["BLANK-1", "FORM-1", "ASSY-1", "PACK-1"] {
        let (s, v) = mes.post(&format!("/api/v1/work-centers/{wc}/commands"), json!({"cmd": "start"}), &[]).await;
        assert!(s == 200 || s == 202, "start {wc}: {s} {v}");
    }

    let status = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(420);
        loop {
            if let Some(s) = sim.try_wait().expect("wait line-sim") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = sim.kill();
                panic!("line-sim did not finish within 420 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .expect("join");
    let log = sim_log();
    assert!(status.success(), "line-sim failed: {log}");
    let truth: Value =
        serde_json::from_str(&std::fs::read_to_string(&truth_path).expect("truth file")).expect("truth json");
    assert_eq!(truth["seed"], 11);

    // The faults happened: reboots, dropped connections whose publishes were sent again,
    // Modbus requests left unanswered.
    let faults = &truth["faults"];
    for kind in ["reboots", "mqtt_drops", "modbus_timeouts"] {
        assert!(faults[kind].as_u64().expect(kind) > 0, "no {kind}: {faults}");
    }
    let f = numbers(line_starting(&log, "[line-sim] faults:"));
    assert_eq!(f[0], faults["reboots"].as_u64().expect("reboots"), "{log}");
    // A drop that falls due while the client is still reconnecting finds nothing to cut.
    assert!((1..=faults["mqtt_drops"].as_u64().expect("drops")).contains(&f[1]), "connections cut: {log}");
    assert!(f[2] > 0, "publishes were in flight when the connection dropped, and were sent again: {log}");
    assert_eq!(f[3], faults["modbus_timeouts"].as_u64().expect("timeouts"));
    assert!(f[4] > 0, "a silent Modbus server left requests unanswered: {log}");

    // Wait (bounded) for the MES to drain, then compare every count.
    let wcs = truth["work_centers"].as_object().expect("work_centers");
    assert_eq!(wcs.len(), 4);
    let deadline = Instant::now() + Duration::from_secs(120);
    for wc in wcs.keys() {
        let want = made(&truth, wc);
        assert!(want.0 > 0, "{wc} made nothing");
        let got = loop {
            let got = mes.totals(wc).await;
            if got == want || Instant::now() > deadline {
                break got;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(got, want, "{wc}");
    }

    // Every order's good/scrap equals the truth; the truth knows exactly the orders released.
    let orders = truth["orders"].as_object().expect("orders");
    let ids: Vec<&str> = orders.keys().map(String::as_str).collect();
    let mut released: Vec<&str> = ORDERS.iter().map(|o| o.0).collect();
    released.sort_unstable();
    assert_eq!(ids, released, "every released order made something");
    for (id, _, quantity, _) in ORDERS {
        let (s, o) = mes.get(&format!("/api/v1/orders/{id}")).await;
        assert_eq!(s, 200, "{o}");
        let want = (orders[id]["good"].as_i64().expect("good"), orders[id]["scrap"].as_i64().expect("scrap"));
        assert_eq!((o["good"].as_i64().expect("good"), o["scrap"].as_i64().expect("scrap")), want, "order {id}");
        if quantity < 100_000 {
            // The device stops at its target: exactly the quantity, and the order completed.
            assert_eq!(want.0, quantity, "order {id}");
            assert_eq!(o["status"], "completed", "order {id}");
        } else {
            assert_eq!(o["status"], "running", "order {id}");
        }
    }
    // Output under orders is the whole output of their work centers (the line started only
    // after the first orders had reached the devices).
    for wc in ["BLANK-1", "ASSY-1"] {
        let sum = ORDERS.iter().filter(|o| o.1 == wc).fold((0, 0), |(g, s), o| {
            (g + orders[o.0]["good"].as_i64().unwrap_or(-1), s + orders[o.0]["scrap"].as_i64().unwrap_or(-1))
        });
        assert_eq!(sum, made(&truth, wc), "{wc}");
    }

    // Stock equals initial − consumption + production (the demo plant's BOMs), as the
    // simulator saw it and as the MES booked it.
    let units = |wc: &str| made(&truth, wc).0 + made(&truth, wc).1;
    let want: BTreeMap<&str, i64> = BTreeMap::from([
        ("RM-COIL", 1_000_000 - units("BLANK-1")),
        ("WIP-BLANK", 2000 + made(&truth, "BLANK-1").0 - 2 * units("FORM-1")),
        ("WIP-HOUSING", 500 + made(&truth, "FORM-1").0 - units("ASSY-1")),
        ("RM-MOTOR", 200_000 - units("ASSY-1")),
        ("WIP-ASSY", 200 + made(&truth, "ASSY-1").0 - units("PACK-1")),
        ("RM-CARTON", 200_000 - units("PACK-1")),
        ("FG-BOXED", made(&truth, "PACK-1").0),
    ]);
    let (_, buffers) = mes.get("/api/v1/buffers").await;
    let buffers = buffers.as_array().expect("buffers");
    assert_eq!(buffers.len(), want.len());
    for (id, level) in &want {
        assert_eq!(truth["buffers"][id].as_i64(), Some(*level), "truth of buffer {id}");
        let got = buffers.iter().find(|b| b["id"] == *id).and_then(|b| b["on_hand"].as_i64());
        assert_eq!(got, Some(*level), "buffer {id}");
    }
    let consumed = &truth["consumed"];
    assert_eq!(consumed["BLANK"].as_i64(), Some(2 * units("FORM-1")));
    assert_eq!(consumed["MOTOR"].as_i64(), Some(units("ASSY-1")));

    let (_, tb) = mes.get("/api/v1/trial-balance").await;
    assert_eq!(tb["total_debits"], tb["total_credits"]);
    assert_eq!(mes.metric("mes_writer_order_violations_total").await, 0);
    assert!(mes.metric("mes_telemetry_duplicates_total").await > 0, "duplicates and resent publishes reached the MES");
    assert!(mes.metric("mes_modbus_errors_total").await > 0, "the MES's polls failed during the silences");
}

/// The output sku of a demo-plant work center.
fn sku_of(wc: &str) -> &'static str {
    match wc {
        "BLANK-1" => "BLANK",
        "FORM-1" => "HOUSING",
        "ASSY-1" => "BASE-ASSY",
        _ => "BASE-BOXED",
    }
}

/// Runs `line-sim` to its end against `mes`'s broker; returns the truth file's bytes.
fn run_line_sim(bin: &Path, mes: &Mes, plant: &Path, scenario: &str, seed: u64, truth: &Path) -> String {
    let out = Command::new(bin)
        .arg("--plant")
        .arg(plant)
        .args(["--mqtt", &format!("mqtt://{}:{}", mes.mqtt_host, mes.mqtt_port), "--topic-prefix", &mes.prefix])
        .args(["--scenario", scenario, "--seed", &seed.to_string(), "--speed", "max", "--duration", "30m"])
        .arg("--truth")
        .arg(truth)
        .stdout(Stdio::null())
        .output()
        .expect("run line-sim");
    assert!(out.status.success(), "line-sim {scenario} seed {seed}: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::read_to_string(truth).expect("truth file")
}

/// The same plant, scenario and seed give a byte-identical truth file from the `line-sim`
/// program (talking to a real broker and polled over Modbus by a real MES); another seed
/// gives another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn line_sim_truth_is_byte_identical_for_a_seed_and_differs_for_another() {
    let mes = Mes::start(MesOptions { plant: Some(demo_plant_on_free_ports()), ..Default::default() }).await;
    let plant = mes.dir.join("plant.toml");
    let bin = line_sim();
    for scenario in ["steady", "promo-surge", "faults"] {
        let path = |name: &str| mes.dir.join(format!("{scenario}-{name}.json"));
        let (bin, plant) = (&bin, &plant);
        let first = tokio::task::block_in_place(|| run_line_sim(bin, &mes, plant, scenario, 5, &path("a")));
        let again = tokio::task::block_in_place(|| run_line_sim(bin, &mes, plant, scenario, 5, &path("b")));
        let other = tokio::task::block_in_place(|| run_line_sim(bin, &mes, plant, scenario, 6, &path("c")));
        assert_eq!(first, again, "{scenario}: same seed, same bytes");
        assert_ne!(first, other, "{scenario}: another seed, another truth");
        let t: Value = serde_json::from_str(&first).expect("truth json");
        assert_eq!(t["seed"], 5);
        assert!(made(&t, "PACK-1").0 > 0, "{scenario}: {t}");
        match scenario {
            "promo-surge" => {
                let d = &t["demand"];
                assert_eq!(d["sku"], "BASE-BOXED");
                assert!(d["requests"].as_u64().expect("requests") > 0, "{d}");
                assert!(d.get("mes").is_none(), "no MES answers without --mes-http: {d}");
            }
            "faults" => {
                let f = &t["faults"];
                for kind in ["reboots", "mqtt_drops", "modbus_timeouts"] {
                    assert!(f[kind].as_u64().expect(kind) > 0, "faults seed 5 has {kind}: {f}");
                }
                assert!(t.get("demand").is_none());
            }
            _ => {
                assert_eq!(t["faults"], json!({"reboots": 0, "mqtt_drops": 0, "modbus_timeouts": 0}));
                assert!(t.get("demand").is_none());
            }
        }
    }
}

/// `mes demo` as the README runs it (a fresh directory, nothing else installed; a short run
/// at high speed): it exits 0 and its reconciliation reports every count exact, stock
/// exact, the promo reservations exact and the books balanced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mes_demo_reconciles_every_count_exactly() {
    let dir = temp_dir();
    let (http, mqtt) = (free_port(), free_port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mes"));
    // At a speed the MES follows (its Modbus polls see the finished goods as they come),
    // so that it can grant promo reservations.
    cmd.args(["demo", "--duration", "15m", "--speed", "150", "--seed", "3"])
        .current_dir(&dir)
        // Free ports instead of the defaults (8080, 11883), which another process may hold.
        .env("MES_HTTP__LISTEN", format!("127.0.0.1:{http}"))
        .env("MES_MQTT__URL", format!("mqtt://127.0.0.1:{mqtt}"))
        .env("MES_MQTT__EMBEDDED_BROKER", format!("127.0.0.1:{mqtt}"))
        .env("RUST_LOG", "warn");
    // The compiled-in demo plant serves Modbus on 15020/15021; if another process holds
    // either, the demo gets the same plant on free ports.
    let busy = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_err();
    if busy(15020) || busy(15021) {
        let plant = dir.join("plant-free-ports.toml");
        std::fs::write(&plant, demo_plant_on_free_ports()).expect("plant");
        cmd.env("MES_PLANT__FILE", &plant);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run mes demo")).await.expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "mes demo failed ({}):\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains(&format!("Dashboard: http://127.0.0.1:{http}/")), "{stdout}");

    let truth: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("mes-data/demo-truth.json")).expect("truth"))
            .expect("truth json");
    assert_eq!(truth["seed"], 3);
    // Work centers: MES good, real good, MES scrap, real scrap, "exact".
    for wc in ["BLANK-1", "FORM-1", "ASSY-1", "PACK-1"] {
        let row = line_starting(&stdout, &format!("{wc} "));
        let (good, scrap) = made(&truth, wc);
        assert!(good > 0, "{wc}");
        let n: Vec<i64> = numbers(row.trim_start_matches(wc)).into_iter().map(|x| x as i64).collect();
        assert_eq!(n, vec![good, good, scrap, scrap], "{row}");
        assert!(row.ends_with("exact"), "{row}");
    }
    // Stock: every buffer, MES and real, "exact".
    let buffers = truth["buffers"].as_object().expect("buffers");
    assert_eq!(buffers.len(), 7);
    for (id, level) in buffers {
        let row = line_starting(&stdout, &format!("{id} "));
        let level = level.as_u64().expect("level");
        let n = numbers(row);
        assert_eq!(n[n.len() - 2..], [level, level], "{row}");
        assert!(row.ends_with("exact"), "{row}");
    }
    // The books balance: total debits equal total credits.
    let total = line_starting(&stdout, "  total");
    assert!(total.ends_with("balanced"), "{total}");
    let money: Vec<&str> = total.split_whitespace().filter(|w| w.contains('.')).collect();
    assert_eq!(money.len(), 2, "{total}");
    assert_eq!(money[0], money[1], "{total}");
    // The promo demand became reservations, and the MES holds exactly what it granted.
    let demand = &truth["demand"];
    let mes = &demand["mes"];
    assert!(demand["requests"].as_u64().expect("requests") > 0, "{demand}");
    assert!(mes["granted_requests"].as_u64().expect("granted") > 0, "the MES granted some: {demand}");
    assert_eq!(
        mes["granted_requests"].as_u64().expect("granted") + mes["refused_requests"].as_u64().expect("refused"),
        demand["requests"].as_u64().expect("requests"),
        "every sales order was answered: {demand}"
    );
    let row = line_starting(&stdout, "  reservations:");
    let n = numbers(row);
    let granted = mes["granted"].as_u64().expect("granted");
    assert_eq!(
        n,
        vec![
            mes["granted_requests"].as_u64().unwrap_or(0),
            granted,
            mes["refused_requests"].as_u64().unwrap_or(0),
            0,
            granted
        ],
        "{row}"
    );
    assert!(row.ends_with("exact"), "{row}");
    assert!(stdout.contains("Every count is exact and the books balance."), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}
