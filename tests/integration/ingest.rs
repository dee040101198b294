//! Exact MQTT ingest: duplicates, replays, out-of-order and malformed input.

use crate::harness::{Lcg, Mes, MesOptions};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_hundred_messages_with_noise_count_exactly() {
    let mes = Mes::start(MesOptions::default()).await;
    let mut dev = mes.device("noise");
    // Two devices, 150 readings each with cumulative counters.
    let mut readings = Vec::new();
    for (device, step) in [("blank-01", 3u64), ("form-01", 2u64)] {
        for seq in 1..=150u64 {
            readings.push((device, seq, seq * step, seq / 10));
        }
    }
    // Out of order: shuffle within windows of 20; plus 60 duplicates/replays and 40 bad payloads.
    let mut rng = Lcg(7);
    for w in readings.chunks_mut(20) {
        for i in (1..w.len()).rev() {
            let j = rng.below(i + 1);
            w.swap(i, j);
        }
    }
    let mut sent = 0u64;
    for (i, (device, seq, good, scrap)) in readings.iter().enumerate() {
        dev.reading(device, 1, *seq, *good, *scrap, json!({})).await;
        sent += 1;
        if i % 5 == 0 {
            // a replay of an earlier reading
            let (d, s, g, x) = readings[rng.below(i + 1)];
            dev.reading(d, 1, s, g, x, json!({})).await;
            sent += 1;
        }
        if i % 15 == 0 {
            dev.publish_raw(device, "{\"boot\":1,\"seq\":").await;
            dev.publish_raw(device, json!({"boot": 1, "seq": 999_999, "good": -4, "scrap": 0}).to_string()).await;
            dev.publish_raw(
                device,
                json!({"boot": 1, "seq": 999_998, "good": 1, "scrap": 0, "state": "on fire"}).to_string(),
            )
            .await;
            sent += 3;
        }
    }
    dev.publish_raw("no-such-device", json!({"boot": 1, "seq": 1, "good": 1, "scrap": 0}).to_string()).await;
    // NULs, which PostgreSQL refuses in text: escaped in an order id, and raw in the payload.
    dev.publish_raw(
        "blank-01",
        json!({"boot": 1, "seq": 999_997, "good": 1, "scrap": 0, "order": "PO\u{0}1"}).to_string(),
    )
    .await;
    dev.publish_raw("blank-01", &b"{\"boot\":1,\"seq\":\x00}"[..]).await;
    sent += 3;
    dev.flush().await;
    assert!(sent >= 400, "sent {sent}");

    assert_eq!(mes.wait_totals("BLANK-1", (450, 15)).await, (450, 15));
    assert_eq!(mes.wait_totals("FORM-1", (300, 15)).await, (300, 15));
    let bad = 20 * 3 + 3;
    let got = mes.wait_metric("mes_dead_letters_total", bad).await;
    if got != bad {
        let (_, dl) = mes.get("/api/v1/dead-letters?limit=5").await;
        panic!("dead letters {got} != {bad}: {dl}");
    }
    assert_eq!(mes.wait_metric("mes_telemetry_messages_total", sent).await, sent);
    let (s, dl) = mes.get("/api/v1/dead-letters").await;
    assert_eq!(s, 200);
    let dl = dl.as_array().expect("list");
    assert_eq!(dl.len() as u64, bad);
    assert!(dl.iter().any(|d| d["reason"].as_str().unwrap_or("").contains("unknown device `no-such-device`")));
    assert!(dl.iter().any(|d| d["reason"].as_str().unwrap_or("").contains("`good` must be a non-negative integer")));
    assert!(dl.iter().any(|d| d["reason"].as_str().unwrap_or("").contains("unknown state")));
    assert!(dl.iter().any(|d| d["reason"].as_str().unwrap_or("").contains("control character")));
    assert!(dl.iter().all(|d| d["topic"].as_str().is_some()
        && d["payload"].as_str().is_some()
        && d["received_at"].as_str().is_some()));
    // Ingest never stopped: a reading after all the noise still counts.
    dev.reading("blank-01", 1, 151, 460, 15, json!({})).await;
    dev.flush().await;
    assert_eq!(mes.wait_totals("BLANK-1", (460, 15)).await, (460, 15));
    // Every committed input was timed from its receipt: 301 counted readings and 63 dead
    // letters at least (a replay the work center recognised never reaches the writer).
    let timed = mes.metric("mes_receive_to_commit_seconds_count").await;
    assert_eq!(timed, mes.metric("mes_committed_jobs_total").await);
    assert!(timed >= 301 + 63, "{timed}");
    // On the embedded broker, all of that came through the in-process links of the two
    // devices' partition sessions (over TCP with an external broker), one link a partition
    // of the line's, all still up.
    let links = mes.log().lines().filter(|l| l.contains("partition session on an in-process link")).count() as u64;
    assert_eq!(mes.metric("mes_mqtt_in_process_links").await, links);
    if crate::harness::external_broker().is_none() {
        let n = mes::config::DEFAULT_SESSIONS;
        for d in ["blank-01", "form-01"] {
            let session = format!("-in-{}of{n}", mes::ingest::sessions::partition_of(d, usize::from(n)));
            let log = mes.log();
            assert!(
                log.lines().any(|l| l.contains("partition session on an in-process link") && l.contains(&session)),
                "{d}: session {session} not on an in-process link; log:\n{log}"
            );
        }
    }
}

/// A flood at QoS 0 (which no broker window bounds) reaches the MES whole while its intake
/// is held back (two inputs in flight, a commit each): on the embedded broker, through the
/// in-process link, whose queue in the broker grows meanwhile. The last reading carries
/// the totals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_at_qos_0_is_read_to_its_last_reading() {
    let extra_config = "[ingest]\nmax_in_flight = 2\nbatch_max = 1\n".to_string();
    let mes = Mes::start(MesOptions { extra_config, ..Default::default() }).await;
    let mut dev = mes.device("qos0");
    for seq in 1..=3_000u64 {
        let r = json!({"boot": 1, "seq": seq, "good": 2 * seq, "scrap": seq / 100, "state": "running"});
        dev.publish_at_most_once("pack-01", r.to_string()).await;
    }
    assert_eq!(mes.wait_totals("PACK-1", (6_000, 30)).await, (6_000, 30), "log:\n{}", mes.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_restart_loses_and_doubles_nothing() {
    let mes = Mes::start(MesOptions::default()).await;
    let mut dev = mes.device("restart");
    for seq in 1..=10 {
        dev.reading("pack-01", 4, seq, seq * 10, seq, json!({})).await;
    }
    // Reboot: boot 5, counters from zero.
    for seq in 1..=5 {
        dev.reading("pack-01", 5, seq, seq * 7, 0, json!({})).await;
    }
    // A replay of the old boot and of the new one change nothing.
    dev.reading("pack-01", 4, 9, 90, 9, json!({})).await;
    dev.reading("pack-01", 5, 3, 21, 0, json!({})).await;
    dev.flush().await;
    assert_eq!(mes.wait_totals("PACK-1", (135, 10)).await, (135, 10));
    let dups = mes.wait_metric("mes_telemetry_duplicates_total", 2).await;
    assert_eq!(dups, 2);
    // The old boot's last message, delivered after the new boot's (a broker reordering
    // across a reconnect): what it adds counts, once; then the new boot goes on.
    dev.reading("pack-01", 4, 11, 115, 11, json!({})).await;
    dev.reading("pack-01", 4, 11, 115, 11, json!({})).await;
    dev.reading("pack-01", 5, 6, 42, 0, json!({})).await;
    dev.flush().await;
    assert_eq!(mes.wait_totals("PACK-1", (135 + 15 + 7, 11)).await, (157, 11));
    assert_eq!(mes.wait_metric("mes_telemetry_duplicates_total", 3).await, 3);
    assert_eq!(mes.metric("mes_writer_order_violations_total").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_is_attributed_to_named_then_current_order() {
    let mes = Mes::start(MesOptions::default()).await;
    let (s, o) = mes
        .post("/api/v1/orders", json!({"id": "PO-A", "sku": "HOUSING", "quantity": 30, "work_center": "FORM-1"}), &[])
        .await;
    assert_eq!(s, 201, "{o}");
    let (s, o) = mes.post("/api/v1/orders/PO-A/release", json!({}), &[]).await;
    assert_eq!((s, o["status"].as_str()), (200, Some("released")));
    let (_, wc) = mes.get("/api/v1/work-centers/FORM-1").await;
    assert_eq!(wc["current_order"], "PO-A");

    let mut dev = mes.device("attr");
    dev.reading("form-01", 1, 1, 10, 1, json!({})).await; // current order
    dev.flush().await;
    mes.wait_totals("FORM-1", (10, 1)).await;
    let (_, o) = mes.get("/api/v1/orders/PO-A").await;
    assert_eq!((o["good"].as_i64(), o["scrap"].as_i64(), o["status"].as_str()), (Some(10), Some(1), Some("running")));
    assert_eq!(o["consumed"]["BLANK"], 22, "{o}");

    dev.reading("form-01", 1, 2, 35, 2, json!({"order": "PO-A"})).await; // named, reaches quantity
    dev.flush().await;
    mes.wait_totals("FORM-1", (35, 2)).await;
    let (_, o) = mes.get("/api/v1/orders/PO-A").await;
    assert_eq!(
        (o["good"].as_i64(), o["status"].as_str()),
        (Some(35), Some("completed")),
        "output beyond quantity still counts"
    );
    let (s, o) = mes.post("/api/v1/orders/PO-A/close", json!({}), &[]).await;
    assert_eq!((s, o["status"].as_str()), (200, Some("closed")));
}

/// A counter jump beyond the work center's plausibility limit is held for review (a dead
/// letter), never booked; a glitch that returns to normal counts right on the next reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_implausible_jump_is_held_not_booked() {
    let plant =
        format!("{}max_units_per_reading = 1000\n", crate::harness::widget_plant(r#"{ mqtt = { id = "press-01" } }"#));
    let mes = Mes::start(MesOptions { plant: Some(plant), ..Default::default() }).await;
    let mut dev = mes.device("jump");
    dev.reading("press-01", 1, 1, 100, 1, json!({})).await;
    dev.reading("press-01", 1, 2, 1_000_000_100, 1, json!({})).await; // a bit flip
    dev.reading("press-01", 1, 3, 150, 2, json!({})).await;
    dev.flush().await;
    assert_eq!(mes.wait_totals("PRESS-1", (150, 2)).await, (150, 2));
    assert_eq!(mes.wait_metric("mes_readings_held_total", 1).await, 1);
    let (_, dl) = mes.get("/api/v1/dead-letters").await;
    let held: Vec<_> = dl.as_array().expect("list").iter().filter(|d| d["topic"] == "held/press-01").collect();
    assert_eq!(held.len(), 1, "{dl}");
    let reason = held[0]["reason"].as_str().unwrap_or("");
    assert!(reason.contains("1000000000 units in one reading") && reason.contains("limit of 1000"), "{reason}");
    // A device clock a day ahead is flagged; its counts still count.
    let ahead = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    dev.reading("press-01", 1, 4, 151, 2, json!({"ts": ahead})).await;
    dev.flush().await;
    assert_eq!(mes.wait_totals("PRESS-1", (151, 2)).await, (151, 2));
    assert_eq!(mes.wait_metric("mes_clock_skew_total", 1).await, 1);
    // Stock and books saw only the plausible 151 + 2.
    let (_, inv) = mes.get("/api/v1/inventory/WIDGET").await;
    assert_eq!(inv["on_hand"], 151);
}
