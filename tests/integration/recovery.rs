//! Restarts: state is rebuilt from the database; a SIGKILL loses nothing.

use crate::driver::Mosquitto;
use crate::harness::{external_broker, widget_plant, Mes, MesOptions};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_rebuilds_cursors_from_the_database() {
    let mut mes = Mes::start(MesOptions::default()).await;
    {
        let mut dev = mes.device("rebuild-1");
        for seq in 1..=20 {
            dev.reading("blank-01", 3, seq, seq * 5, 1, json!({})).await;
        }
        dev.flush().await;
        assert_eq!(mes.wait_totals("BLANK-1", (100, 1)).await, (100, 1));
    }
    let (status, _) = mes.terminate();
    assert!(status.success());
    mes.spawn().await;
    assert_eq!(mes.totals("BLANK-1").await, (100, 1));
    let mut dev = mes.device("rebuild-2");
    // Replays of before the restart count nothing; new readings count the difference.
    dev.reading("blank-01", 3, 20, 100, 1, json!({})).await;
    dev.reading("blank-01", 3, 10, 50, 1, json!({})).await;
    dev.reading("blank-01", 3, 21, 104, 2, json!({})).await;
    dev.flush().await;
    assert_eq!(mes.wait_totals("BLANK-1", (104, 2)).await, (104, 2));
}

/// Where counting of a device's previous boot stopped is committed with its cursor: a
/// reading of that boot delivered late (after the new boot's first, and after an MES
/// restart) still counts what it adds, once. (It was kept in memory only: after a restart
/// such a reading was taken for a duplicate and its output lost.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_reading_of_the_previous_boot_counts_after_a_restart() {
    let mut mes = Mes::start(MesOptions::default()).await;
    {
        let mut dev = mes.device("prev-boot-1");
        for seq in 1..=3 {
            dev.reading("blank-01", 7, seq, seq * 10, 0, json!({})).await;
        }
        // The device restarts (boot 8) before its boot-7 seq 4 reaches the MES.
        dev.reading("blank-01", 8, 1, 5, 0, json!({})).await;
        dev.flush().await;
        assert_eq!(mes.wait_totals("BLANK-1", (35, 0)).await, (35, 0));
        // One late boot-7 reading before the restart: counted (40 - 30), and its new high
        // mark must be what the restart rebuilds.
        dev.reading("blank-01", 7, 4, 40, 1, json!({})).await;
        dev.flush().await;
        assert_eq!(mes.wait_totals("BLANK-1", (45, 1)).await, (45, 1));
    }
    let (status, _) = mes.terminate();
    assert!(status.success());
    mes.spawn().await;
    assert_eq!(mes.totals("BLANK-1").await, (45, 1));
    let mut dev = mes.device("prev-boot-2");
    // Boot 7's seq 5 arrives now: it adds 12 good and 1 scrap beyond seq 4. Its replay and
    // seq 4's replay add nothing; boot 8 goes on from where it was.
    dev.reading("blank-01", 7, 5, 52, 2, json!({})).await;
    dev.reading("blank-01", 7, 5, 52, 2, json!({})).await;
    dev.reading("blank-01", 7, 4, 40, 1, json!({})).await;
    dev.reading("blank-01", 8, 2, 9, 0, json!({})).await;
    dev.flush().await;
    assert_eq!(mes.wait_totals("BLANK-1", (61, 2)).await, (61, 2));
}

/// A broker that outlives the MES and queues a flood for it: a private Mosquitto when
/// installed, else `MES_TEST_MQTT_URL`. (A Mosquitto on its defaults queues at most 1,000
/// messages per session and drops the rest — "Outgoing messages are being dropped" in its
/// log — which a device flooding faster than a loaded machine commits can exceed; the MES
/// cannot get back what the broker dropped. README: raise `max_queued_messages`.)
async fn queuing_broker() -> Option<(Option<Mosquitto>, String)> {
    if Mosquitto::available() {
        let m = Mosquitto::start().await;
        let url = m.url();
        return Some((Some(m), url));
    }
    external_broker().map(|u| (None, u))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_publishing_loses_and_doubles_nothing() {
    let Some((_broker, url)) = queuing_broker().await else {
        eprintln!("skipped: needs Mosquitto or MES_TEST_MQTT_URL (a broker that outlives the MES)");
        return;
    };
    let mut mes = Mes::start(MesOptions { mqtt_url: Some(url), ..Default::default() }).await;
    let mut dev = mes.device("kill");
    let (mut good, mut scrap) = (0u64, 0u64);
    let mut seq = 0u64;
    for round in 0..5 {
        for _ in 0..300 {
            seq += 1;
            good += 3;
            if seq.is_multiple_of(17) {
                scrap += 1;
            }
            dev.reading("form-01", 1, seq, good, scrap, json!({})).await;
            if seq % 100 == 50 && round < 4 {
                // Kill mid-stream; the device keeps publishing into the broker meanwhile.
                mes.kill9();
            }
        }
        dev.flush().await;
        if mes.child.is_none() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            mes.spawn().await;
        }
    }
    let want = (good as i64, scrap as i64);
    assert_eq!(mes.wait_totals("FORM-1", want).await, want, "log:\n{}", mes.log());
    assert_eq!(mes.metric("mes_writer_order_violations_total").await, 0);
    // Stock and books equal what an uninterrupted run gives.
    let (_, buffers) = mes.get("/api/v1/buffers").await;
    let on_hand =
        |id: &str| buffers.as_array().and_then(|a| a.iter().find(|b| b["id"] == id)).map(|b| b["on_hand"].as_i64());
    assert_eq!(on_hand("WIP-HOUSING"), Some(Some(500 + good as i64)));
    assert_eq!(on_hand("WIP-BLANK"), Some(Some(2000 - 2 * (good + scrap) as i64)));
    let (_, tb) = mes.get("/api/v1/trial-balance").await;
    assert_eq!(tb["total_debits"], tb["total_credits"]);
    let fg =
        tb["accounts"].as_array().and_then(|a| a.iter().find(|x| x["account"] == "1400").cloned()).expect("FG account");
    // HOUSING at standard 2 × 0.8125 + 120.00/h × 1 s = 1.6583; BLANK issued at 0.8125.
    let expect_debit = mes_actors::Money(good as i64 * 16_583);
    let expect_credit = mes_actors::Money(2 * (good + scrap) as i64 * 8_125);
    assert_eq!(fg["debit"], expect_debit.to_string());
    assert_eq!(fg["credit"], expect_credit.to_string());
}

/// `mqtt.sessions` changed between two runs while devices kept publishing: the sessions the
/// new configuration no longer uses still hold what the broker queued for them; the MES
/// drains them (nothing lost), removes them, and after that nothing is queued twice.
/// Needs a broker that outlives the MES (`queuing_broker`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_session_count_drains_the_retired_sessions() {
    let Some((_broker, url)) = queuing_broker().await else {
        eprintln!("skipped: needs Mosquitto or MES_TEST_MQTT_URL (a broker that outlives the MES)");
        return;
    };
    const DEVICES: [(&str, &str); 4] =
        [("blank-01", "BLANK-1"), ("form-01", "FORM-1"), ("assy-01", "ASSY-1"), ("pack-01", "PACK-1")];
    let set_sessions = |mes: &Mes, n: u16| {
        let text = std::fs::read_to_string(&mes.config).expect("config");
        let kept: Vec<&str> = text.lines().filter(|l| !l.starts_with("sessions = ")).collect();
        let text = kept.join("\n").replace("\n[plant]", &format!("\nsessions = {n}\n[plant]"));
        std::fs::write(&mes.config, text).expect("config");
    };
    let mut mes = Mes::start(MesOptions { mqtt_url: Some(url), ..Default::default() }).await;
    let mut dev = mes.device("sessions");
    // Each round: 40 more readings per device, 2 good a reading, 1 scrap every 5th.
    async fn round(dev: &mut crate::harness::Device, seq: &mut u64) {
        for s in *seq + 1..=*seq + 40 {
            for (d, _) in DEVICES {
                dev.reading(d, 1, s, 2 * s, s / 5, json!({})).await;
            }
        }
        *seq += 40;
        dev.flush().await;
    }
    let mut seq = 0u64;
    round(&mut dev, &mut seq).await;
    let expect = |s: u64| (2 * s as i64, (s / 5) as i64);
    for (_, wc) in DEVICES {
        assert_eq!(mes.wait_totals(wc, expect(seq)).await, expect(seq));
    }
    // Down; the devices go on, into the partition sessions of the default count the broker keeps.
    assert!(mes.terminate().0.success());
    round(&mut dev, &mut seq).await;
    set_sessions(&mes, 3);
    mes.spawn().await;
    for (_, wc) in DEVICES {
        assert_eq!(mes.wait_totals(wc, expect(seq)).await, expect(seq), "log:\n{}", mes.log());
    }
    // Every retired partition session was drained and removed.
    let old: std::collections::BTreeSet<usize> = DEVICES
        .iter()
        .map(|(d, _)| mes::ingest::sessions::partition_of(d, usize::from(mes::config::DEFAULT_SESSIONS)))
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let removed = mes
            .log()
            .lines()
            .filter(|l| l.contains("retired MQTT session drained and removed") && l.contains("-in-"))
            .count();
        if removed == old.len() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{removed} of {} removed; log:\n{}", old.len(), mes.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for i in &old {
        let n = mes::config::DEFAULT_SESSIONS;
        assert!(mes.log().contains(&format!("-in-{i}of{n}")), "session {i} of {n} not named in the log");
    }
    // Down again: now only the 3 current sessions queue; nothing is counted twice.
    assert!(mes.terminate().0.success());
    round(&mut dev, &mut seq).await;
    let drained_before = mes.log().matches("draining MQTT sessions").count();
    mes.spawn().await;
    for (_, wc) in DEVICES {
        assert_eq!(mes.wait_totals(wc, expect(seq)).await, expect(seq), "log:\n{}", mes.log());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (_, wc) in DEVICES {
        assert_eq!(mes.totals(wc).await, expect(seq));
    }
    assert_eq!(mes.log().matches("draining MQTT sessions").count(), drained_before, "nothing left to drain");
    assert_eq!(mes.metric("mes_dead_letters_total").await, 0);
    assert_eq!(mes.metric("mes_writer_order_violations_total").await, 0);
}

/// Everything settlement leaves behind that must not depend on a crash: stock per buffer,
/// the trial balance per account, journal totals per (kind, order, debit, credit), each
/// order's cost, and the outbox documents (kind, order, contents without ids and times).
#[derive(Debug, PartialEq)]
struct Settled {
    buffers: BTreeMap<String, (i64, i64)>,
    trial_balance: BTreeMap<String, (String, String)>,
    journal: BTreeMap<(String, String, String, String), i64>,
    costs: BTreeMap<String, Value>,
    outbox: Vec<(String, String, Value)>,
}

/// A document without what differs between runs by design: its id (a goods issue is named
/// after its reservation's id) and its publication time.
fn strip_volatile(v: &Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(
            o.iter()
                .filter(|(k, _)| k.as_str() != "ID" && k.as_str() != "PublishedDate")
                .map(|(k, v)| (k.clone(), strip_volatile(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_volatile).collect()),
        other => other.clone(),
    }
}

fn minor(v: &Value) -> i64 {
    v.as_str().and_then(|s| s.parse::<mes_actors::Money>().ok()).map(|m| m.0).unwrap_or_else(|| panic!("money: {v}"))
}

async fn settled(mes: &Mes) -> Settled {
    let (_, bs) = mes.get("/api/v1/buffers").await;
    let buffers = bs
        .as_array()
        .expect("buffers")
        .iter()
        .map(|b| {
            let id = b["id"].as_str().expect("id").to_string();
            (id, (b["on_hand"].as_i64().expect("on_hand"), b["reserved"].as_i64().expect("reserved")))
        })
        .collect();
    let (_, tb) = mes.get("/api/v1/trial-balance").await;
    assert_eq!(tb["total_debits"], tb["total_credits"], "{tb}");
    let trial_balance = tb["accounts"]
        .as_array()
        .expect("accounts")
        .iter()
        .map(|a| {
            let s = |k: &str| a[k].as_str().unwrap_or("").to_string();
            (s("account"), (s("debit"), s("credit")))
        })
        .collect();
    let (_, j) = mes.get("/api/v1/journal?limit=100000").await;
    let mut journal = BTreeMap::new();
    for p in j.as_array().expect("journal") {
        let s = |k: &str| p[k].as_str().unwrap_or("").to_string();
        *journal.entry((s("kind"), s("order"), s("debit"), s("credit"))).or_insert(0) += minor(&p["amount"]);
    }
    let mut costs = BTreeMap::new();
    for o in ["PO-A", "PO-B"] {
        let (s, c) = mes.get(&format!("/api/v1/orders/{o}/cost")).await;
        assert_eq!(s, 200, "{c}");
        costs.insert(o.to_string(), c);
    }
    let (_, docs) = mes.get("/api/v1/erp/outbox").await;
    let outbox = docs
        .as_array()
        .expect("outbox")
        .iter()
        .map(|d| {
            let kind = d["kind"].as_str().unwrap_or("").to_string();
            (kind, d["order"].as_str().unwrap_or("").to_string(), strip_volatile(&d["document"]))
        })
        .collect();
    Settled { buffers, trial_balance, journal, costs, outbox }
}

/// Device time of reading `seq`: one second apart, all running.
fn at(seq: u64) -> String {
    let s = 3_600 + seq;
    format!("2026-11-11T{:02}:{:02}:{:02}.000Z", s / 3600, s / 60 % 60, s % 60)
}

/// Seq 1..=200 make PO-A's 600 good (3 a reading, a scrap every 17th); 201..=300 make
/// PO-B's 400 (4 a reading, a scrap every 13th). With `kills`, the MES is SIGKILLed right
/// after publishing each of those seqs and restarted 40 readings later, the device
/// publishing into the broker meanwhile.
async fn settlement_run(broker: &str, kills: &[u64]) -> (Settled, (i64, i64)) {
    let plant = widget_plant(r#"{ mqtt = { id = "press-01" } }"#);
    let mut mes =
        Mes::start(MesOptions { plant: Some(plant), mqtt_url: Some(broker.to_string()), ..Default::default() }).await;
    for (id, q) in [("PO-A", 600), ("PO-B", 400)] {
        let (s, o) = mes
            .post("/api/v1/orders", json!({"id": id, "sku": "WIDGET", "quantity": q, "work_center": "PRESS-1"}), &[])
            .await;
        assert_eq!(s, 201, "{o}");
        let (s, o) = mes.post(&format!("/api/v1/orders/{id}/release"), json!({}), &[]).await;
        assert_eq!(s, 200, "{o}");
    }
    let mut dev = mes.device("m4");
    let (mut good, mut scrap) = (0u64, 0u64);
    let mut restart_at = None;
    for seq in 1..=300u64 {
        let order = if seq <= 200 { "PO-A" } else { "PO-B" };
        if seq <= 200 {
            good += 3;
            scrap += u64::from(seq.is_multiple_of(17));
        } else {
            good += 4;
            scrap += u64::from(seq.is_multiple_of(13));
        }
        dev.reading("press-01", 1, seq, good, scrap, json!({"ts": at(seq), "order": order})).await;
        if kills.contains(&seq) {
            mes.kill9();
            restart_at = Some(seq + 40);
        }
        if restart_at == Some(seq) {
            dev.flush().await;
            mes.spawn().await;
            restart_at = None;
        }
        if seq % 25 == 0 {
            // Paced like a line, so commits interleave with publishing.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    dev.flush().await;
    assert!(mes.child.is_some(), "restarted after every kill");
    let want = (good as i64, scrap as i64);
    assert_eq!(mes.wait_totals("PRESS-1", want).await, want, "log:\n{}", mes.log());
    assert_eq!(mes.metric("mes_writer_order_violations_total").await, 0);
    for o in ["PO-A", "PO-B"] {
        let (_, v) = mes.get(&format!("/api/v1/orders/{o}")).await;
        assert_eq!(v["status"], "completed", "{v}");
        let (s, v) = mes.post(&format!("/api/v1/orders/{o}/close"), json!({}), &[]).await;
        assert_eq!((s, v["status"].as_str()), (200, Some("closed")), "{v}");
    }
    let (s, r) = mes.post("/api/v1/reservations", json!({"sku": "WIDGET", "quantity": 50, "ref": "SO-1"}), &[]).await;
    assert_eq!(s, 201, "{r}");
    let (s, _) =
        mes.post(&format!("/api/v1/reservations/{}/ship", r["id"].as_str().unwrap_or("")), json!({}), &[]).await;
    assert_eq!(s, 200);
    let (s, r) = mes.post("/api/v1/reservations", json!({"sku": "WIDGET", "quantity": 30, "ref": "SO-2"}), &[]).await;
    assert_eq!(s, 201, "{r}");
    let (s, e) = mes
        .post(
            "/api/v1/inventory/adjustments",
            json!({"buffer": "RM", "quantity": -7, "reason": "count", "ref": "ADJ"}),
            &[],
        )
        .await;
    assert_eq!(s, 201, "{e}");
    let out = settled(&mes).await;
    // The stock ledger recomputes every balance.
    for (sku, buffer) in [("WIDGET", "FG"), ("SHEET", "RM")] {
        let (_, ms) = mes.get(&format!("/api/v1/inventory/{sku}/movements?limit=100000")).await;
        let sum: i64 = ms.as_array().expect("movements").iter().filter_map(|m| m["quantity"].as_i64()).sum();
        assert_eq!(Some(&sum), out.buffers.get(buffer).map(|b| &b.0), "{buffer}");
    }
    (out, want)
}

/// Issue 4: kill -9 mid-run and restart; stock, journal and outbox equal what an
/// uninterrupted run of the same telemetry gives. Needs a broker that outlives the MES:
/// `MES_TEST_MQTT_URL`, else a private Mosquitto when installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_settles_exactly_like_an_uninterrupted_run() {
    let private = match external_broker() {
        Some(_) => None,
        None if Mosquitto::available() => Some(Mosquitto::start().await),
        None => {
            eprintln!("skipped: needs MES_TEST_MQTT_URL or /usr/sbin/mosquitto (a broker that outlives the MES)");
            return;
        }
    };
    let broker = private.as_ref().map(Mosquitto::url).or_else(external_broker).expect("a broker");
    let (clean, totals) = settlement_run(&broker, &[]).await;
    let (killed, killed_totals) = settlement_run(&broker, &[90, 203]).await;
    assert_eq!(totals, (1000, 11 + 8));
    assert_eq!(killed_totals, totals);
    // Exact values of the uninterrupted run, so equality below is not equality of two wrong runs.
    assert_eq!(clean.buffers.get("FG"), Some(&(1000 - 50, 30)));
    assert_eq!(clean.buffers.get("RM"), Some(&(50_000 - 2 * (1000 + 19) - 7, 0)));
    assert_eq!(
        clean.outbox.iter().map(|d| d.0.as_str()).collect::<Vec<_>>(),
        ["completion", "completion", "close", "close", "goods_issue"]
    );
    assert_eq!(killed.buffers, clean.buffers, "stock");
    assert_eq!(killed.trial_balance, clean.trial_balance, "trial balance");
    assert_eq!(killed.journal, clean.journal, "journal totals");
    assert_eq!(killed.costs, clean.costs, "order costs");
    assert_eq!(killed.outbox, clean.outbox, "outbox documents");
    assert_eq!(killed, clean);
}

/// A device added to the plant while the MES was down, which published before it was
/// added: its messages wait only in the main session's queue (the wildcard), since its
/// partition session subscribes to it only at the next start. The main session used to
/// pass them on as its partition's: acknowledged, never stored (a later message's
/// cumulative counters carried the output, but the readings, their states and times were
/// gone, and the totals waited for that next message). Needs a broker that outlives the MES
/// (`queuing_broker`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_added_while_down_keeps_what_it_published_before() {
    let Some((_broker, url)) = queuing_broker().await else {
        eprintln!("skipped: needs Mosquitto or MES_TEST_MQTT_URL (a broker that outlives the MES)");
        return;
    };
    let plant_with = |device: &str| widget_plant(&format!("{{ mqtt = {{ id = \"{device}\" }} }}"));
    let mut mes =
        Mes::start(MesOptions { mqtt_url: Some(url), plant: Some(plant_with("press-00")), ..Default::default() }).await;
    let mut dev = mes.device("added");
    // Not in the plant yet: a dead letter, counted nowhere.
    dev.reading("press-01", 1, 1, 4, 0, json!({})).await;
    dev.flush().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while mes.metric("mes_dead_letters_total").await < 1 {
        assert!(std::time::Instant::now() < deadline, "no dead letter; log:\n{}", mes.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Down: the device goes on; the plant file now names it.
    assert!(mes.terminate().0.success());
    for seq in 2..=30 {
        dev.reading("press-01", 1, seq, 4 * seq, seq / 10, json!({})).await;
    }
    dev.flush().await;
    std::fs::write(mes.dir.join("plant.toml"), plant_with("press-01")).expect("plant");
    mes.spawn().await;
    // Counters are cumulative and a first reading counts in full: seq 30's 120 good and 3
    // scrap. (Lost, the totals stay 0 here, and seq 31 alone would later show 124.)
    assert_eq!(mes.wait_totals("PRESS-1", (120, 3)).await, (120, 3), "log:\n{}", mes.log());
    // And after the start, as always.
    dev.reading("press-01", 1, 31, 124, 3, json!({})).await;
    dev.flush().await;
    assert_eq!(mes.wait_totals("PRESS-1", (124, 3)).await, (124, 3), "log:\n{}", mes.log());
    assert_eq!(mes.metric("mes_writer_order_violations_total").await, 0);
    // The main session's catch-up marker came back and is no dead letter: still only seq 1's.
    assert!(mes.log().contains("main session caught up"), "log:\n{}", mes.log());
    let (_, letters) = mes.get("/api/v1/dead-letters").await;
    let topics: Vec<&str> = letters.as_array().into_iter().flatten().filter_map(|l| l["topic"].as_str()).collect();
    assert_eq!(topics, vec![format!("{}/devices/press-01/telemetry", mes.prefix).as_str()]);
}
