//! The benchmark suite's publisher and commit observer (`mes::bench_load`), against a real
//! `mes serve`: every message of a paced plan is seen committed exactly once and counted in
//! its own phase, and a second plan on the same devices continues their `seq` instead of
//! repeating it (repeats would be duplicates the MES ignores, and the run would never end).

use crate::harness::{Mes, MesOptions};
use mes::bench_load::{self, Load, Phase};

const DEVICES: [&str; 4] = ["blank-01", "form-01", "assy-01", "pack-01"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_plan_is_observed_committed_exactly_once_per_phase() {
    let mes = Mes::start(MesOptions::default()).await;
    let config: toml::Value = toml::from_str(&std::fs::read_to_string(&mes.config).expect("config")).expect("toml");
    let url = config["database"]["url"].as_str().expect("database.url").to_string();
    let store = mes::db::Store::connect(&url, 2).await.expect("observer connects");
    let broker = format!("{}:{}", mes.mqtt_host, mes.mqtt_port);
    let devices: Vec<String> = DEVICES.iter().map(|d| d.to_string()).collect();

    // 2 s at 50 msg/s and 1 s at 150 msg/s: 100 + 150 messages, 250 / 4 devices.
    let plan = vec![Phase::paced("slow", 50.0, 2.0), Phase::paced("fast", 150.0, 1.0)];
    let load = Load::new(devices.clone(), &mes.prefix, 1, plan);
    assert_eq!(load.total(), 250);
    let (figures, samples) = bench_load::run(&broker, &store.pool, load.clone(), "test", None).await.expect("run");
    assert_eq!(figures.len(), 2);
    assert_eq!((figures[0].messages, figures[0].committed), (100, 100));
    assert_eq!((figures[1].messages, figures[1].committed), (150, 150));
    assert_eq!(samples.last().map(|s| (s.published, s.committed)), Some((250, 250)));
    // Latency is a time from a publish to a later commit: never zero, never negative.
    assert!(figures.iter().all(|f| f.p50_ms > 0.0 && f.p50_ms <= f.p99_ms && f.p99_ms <= f.max_ms));
    // The publish-to-receipt part comes from the rows' `received_ms` (whole ms, so within
    // a millisecond of the commit it precedes).
    assert!(
        figures.iter().all(|f| f.p50_to_receipt_ms <= f.p50_ms + 1.0 && f.p99_to_receipt_ms <= f.max_ms + 1.0),
        "{figures:?}"
    );
    // 250 over 4 devices: seq 1..=63 for the first two, 1..=62 for the others.
    assert_eq!(load.next_seq(), 64);

    let again = Load::new(devices, &mes.prefix, load.next_seq(), vec![Phase::flood("flood", 40)]);
    let (figures, _) = bench_load::run(&broker, &store.pool, again, "test", None).await.expect("second run");
    assert_eq!((figures[0].messages, figures[0].committed), (40, 40));
    // Every reading counted exactly once in the MES's own totals: good = 2 × seq, so each
    // device's total good is twice its last seq.
    assert_eq!(mes.wait_totals("BLANK-1", (2 * 73, 73 / 50)).await, (146, 1));
}

/// The contract floor of `mes bench ingest` (`mes::bench_floor`) stores each reading once,
/// with the values the payload carries, and acknowledges after the commit: a plan run
/// against it is seen committed in full, and its table holds exactly the plan's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_floor_stores_each_reading_once_with_its_values() {
    let mes = Mes::start(MesOptions::default()).await;
    let broker = format!("{}:{}", mes.mqtt_host, mes.mqtt_port);
    // Beside a fresh MES database: a SQLite file, or on PostgreSQL when the suite runs there.
    let url = crate::harness::fresh_database(&crate::harness::temp_dir()).await;
    let store = mes::bench_floor::store_beside(&url).await.expect("floor database");
    let devices: Vec<String> = DEVICES.iter().map(|d| d.to_string()).collect();
    let floor = mes::bench_floor::start(&broker, store.clone(), &devices, "floor-test", mes::bench_floor::Keep::Rows)
        .await
        .expect("floor starts");

    let load = Load::new(devices, "floor-test", 1, vec![Phase::flood("flood", 400)]);
    let (figures, _) = bench_load::run(&broker, &store.pool, load, "floor", None).await.expect("run");
    assert_eq!((figures[0].messages, figures[0].committed), (400, 400));
    drop(floor);
    // 400 over 4 devices: seq 1..=100 each; the payload's good is 2 × seq, scrap seq / 50.
    let rows: Vec<(String, i64, i64, i64)> =
        sqlx::query_as("SELECT device, seq, good, scrap FROM telemetry ORDER BY device, seq")
            .fetch_all(&store.pool)
            .await
            .expect("rows");
    assert_eq!(rows.len(), 400);
    for d in DEVICES {
        let seqs: Vec<i64> = rows.iter().filter(|r| r.0 == d).map(|r| r.1).collect();
        assert_eq!(seqs, (1..=100).collect::<Vec<i64>>(), "{d}");
    }
    assert!(rows.iter().all(|(_, seq, good, scrap)| *good == 2 * seq && *scrap == seq / 50));
}

/// The cursor floor keeps each device's greatest reading and never moves back to an older
/// one; the floor that keeps nothing counts every message and writes nothing. Both publish
/// through the real broker; their counts are what `mes bench ingest` times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursor_floor_keeps_each_devices_last_reading_and_the_empty_floor_writes_nothing() {
    use mes::bench_floor::Keep;
    let mes = Mes::start(MesOptions::default()).await;
    let broker = format!("{}:{}", mes.mqtt_host, mes.mqtt_port);
    let url = crate::harness::fresh_database(&crate::harness::temp_dir()).await;
    let store = mes::bench_floor::store_beside(&url).await.expect("floor database");
    let devices: Vec<String> = DEVICES.iter().map(|d| d.to_string()).collect();

    for (keep, first_seq, n) in [(Keep::Cursors, 1, 400), (Keep::Nothing, 1_001, 400), (Keep::Cursors, 1, 40)] {
        let floor =
            mes::bench_floor::start(&broker, store.clone(), &devices, "floor-keep", keep).await.expect("starts");
        mes::bench::publish(&broker, "floor-keep", &devices, n, first_seq).await.expect("published");
        // Generous: the CI pass runs every suite at once on two cores.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
        while floor.stored() < n && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(floor.stored(), n, "{keep:?}");
        drop(floor);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // 400 over 4 devices from seq 1: the last is seq 100, good 200, scrap 2. The empty
    // floor's later readings (seq 1,001..1,100) moved nothing, and the older ones sent
    // again to the cursor floor (seq 1..10) did not move it back.
    let cursors: Vec<(String, i64, i64, i64, i64)> =
        sqlx::query_as("SELECT device, boot, seq, good, scrap FROM device_cursors ORDER BY device")
            .fetch_all(&store.pool)
            .await
            .expect("cursors");
    let mut expected: Vec<(String, i64, i64, i64, i64)> =
        DEVICES.iter().map(|d| (d.to_string(), 1, 100, 200, 2)).collect();
    expected.sort();
    assert_eq!(cursors, expected);
    let rows: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM telemetry").fetch_one(&store.pool).await.expect("count");
    assert_eq!(rows.0, 0);
}
