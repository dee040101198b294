//! The MES against the line simulator: after the run, every count equals the truth.

use crate::harness::{free_port, Mes, MesOptions};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_plant_with_mqtt_and_modbus_under_faults_matches_the_truth_exactly() {
    // The demo plant (MQTT and Modbus devices), on free Modbus ports.
    let demo = include_str!("../../plants/demo.toml")
        .replace("127.0.0.1:15020", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:15021", &format!("127.0.0.1:{}", free_port()));
    let mes = Mes::start(MesOptions { plant: Some(demo), ..Default::default() }).await;
    let truth_path = mes.dir.join("truth.json");
    let plant_path = mes.dir.join("plant.toml");
    // The embedded broker queues without limit; a stock Mosquitto drops QoS 1 messages
    // beyond `max_queued_messages` (1000) for a subscriber that falls behind, so against an
    // external broker the line runs at a pace the MES keeps up with.
    let (speed, duration) = if crate::harness::external_broker().is_some() { ("100", "30m") } else { ("max", "1h") };
    let out = tokio::task::spawn_blocking({
        let (bin, truth, url, prefix) =
            (line_sim(), truth_path.clone(), format!("mqtt://{}:{}", mes.mqtt_host, mes.mqtt_port), mes.prefix.clone());
        move || {
            Command::new(bin)
                .arg("--plant")
                .arg(&plant_path)
                .args(["--mqtt", &url, "--topic-prefix", &prefix])
                .args(["--scenario", "faults", "--seed", "11", "--speed", speed, "--duration", duration])
                .arg("--truth")
                .arg(&truth)
                .output()
                .expect("run line-sim")
        }
    })
    .await
    .expect("join");
    assert!(out.status.success(), "line-sim failed: {}", String::from_utf8_lossy(&out.stderr));
    let truth: Value =
        serde_json::from_str(&std::fs::read_to_string(&truth_path).expect("truth file")).expect("truth json");
    assert_eq!(truth["seed"], 11);
    let wcs = truth["work_centers"].as_object().expect("work_centers");
    assert_eq!(wcs.len(), 4);
    // Wait (bounded) for the MES to drain, then compare every count.
    let deadline = Instant::now() + Duration::from_secs(120);
    for (wc, t) in wcs {
        let want = (t["good"].as_i64().expect("good"), t["scrap"].as_i64().expect("scrap"));
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
    // Stock equals initial - consumption + production, as the simulator saw it.
    if let Some(buffers) = truth.get("buffers").and_then(Value::as_object) {
        let (_, mine) = mes.get("/api/v1/buffers").await;
        for (id, level) in buffers {
            let got =
                mine.as_array().and_then(|a| a.iter().find(|b| b["id"] == id.as_str())).map(|b| b["on_hand"].clone());
            assert_eq!(got.as_ref(), Some(level), "buffer {id}");
        }
    }
    let (_, tb) = mes.get("/api/v1/trial-balance").await;
    assert_eq!(tb["total_debits"], tb["total_credits"]);
    assert_eq!(mes.metric("mes_writer_order_violations_total").await, 0);
}
