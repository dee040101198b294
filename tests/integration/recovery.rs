//! Restarts: state is rebuilt from the database; a SIGKILL loses nothing.

use crate::harness::{external_broker, Mes, MesOptions};
use serde_json::json;
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

/// Needs a broker that outlives the MES: runs with `MES_TEST_MQTT_URL` (CI uses Mosquitto).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_publishing_loses_and_doubles_nothing() {
    if external_broker().is_none() {
        eprintln!("skipped: set MES_TEST_MQTT_URL to run against an external broker");
        return;
    }
    let mut mes = Mes::start(MesOptions::default()).await;
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
/// Needs a broker that outlives the MES (`MES_TEST_MQTT_URL`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_session_count_drains_the_retired_sessions() {
    if external_broker().is_none() {
        eprintln!("skipped: set MES_TEST_MQTT_URL to run against an external broker");
        return;
    }
    const DEVICES: [(&str, &str); 4] =
        [("blank-01", "BLANK-1"), ("form-01", "FORM-1"), ("assy-01", "ASSY-1"), ("pack-01", "PACK-1")];
    let set_sessions = |mes: &Mes, n: u16| {
        let text = std::fs::read_to_string(&mes.config).expect("config");
        let kept: Vec<&str> = text.lines().filter(|l| !l.starts_with("sessions = ")).collect();
        let text = kept.join("\n").replace("\n[plant]", &format!("\nsessions = {n}\n[plant]"));
        std::fs::write(&mes.config, text).expect("config");
    };
    let mut mes = Mes::start(MesOptions::default()).await;
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
    // Down; the devices go on, into the 8 partition sessions the broker keeps.
    assert!(mes.terminate().0.success());
    round(&mut dev, &mut seq).await;
    set_sessions(&mes, 3);
    mes.spawn().await;
    for (_, wc) in DEVICES {
        assert_eq!(mes.wait_totals(wc, expect(seq)).await, expect(seq), "log:\n{}", mes.log());
    }
    // Every retired partition session was drained and removed.
    let old: std::collections::BTreeSet<usize> =
        DEVICES.iter().map(|(d, _)| mes::ingest::sessions::partition_of(d, 8)).collect();
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
        assert!(mes.log().contains(&format!("-in-{i}of8")), "session {i} of 8 not named in the log");
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
