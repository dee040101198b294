//! Scale-out: three `mes serve` nodes share a plant of 30 work centers on one PostgreSQL
//! database and one broker. A node killed mid-surge has its work centers taken over; a
//! node paused past its lease cannot commit for what it lost and rejoins; afterwards every
//! count, stock level and the books equal the simulator's truth.
//!
//! Needs PostgreSQL (`MES_TEST_DATABASE_URL`) and an external broker (`MES_TEST_MQTT_URL`):
//! skipped with a note otherwise (`.ci/run` sets both).

use crate::harness::{free_port, fresh_database, temp_dir, Mes};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

const WORK_CENTERS: usize = 30;
const LEASE_MS: u64 = 3_000;

fn postgres() -> Option<String> {
    std::env::var("MES_TEST_DATABASE_URL").ok().filter(|s| s.starts_with("postgres"))
}

/// 30 work centers in parallel, each making PART from RAW, each with its own MQTT device.
fn plant() -> String {
    let mut p = String::from(
        r#"[[materials]]
sku = "RAW"
unit = "ea"
standard_cost = "1.00"

[[materials]]
sku = "PART"
unit = "ea"
standard_cost = "2.50"

[[boms]]
sku = "PART"
components = [{ sku = "RAW", quantity = "1" }]

[[buffers]]
id = "RM"
sku = "RAW"
capacity = 100000000
initial = 50000000

[[buffers]]
id = "FG"
sku = "PART"
capacity = 100000000
initial = 0
"#,
    );
    for i in 1..=WORK_CENTERS {
        p.push_str(&format!(
            "\n[[work_centers]]\nid = \"WC-{i:02}\"\nname = \"Cell {i}\"\nideal_cycle_s = 1.0\nconversion_rate_per_hour = \"60.00\"\ninputs = [\"RM\"]\noutput = \"FG\"\ndevice = {{ mqtt = {{ id = \"cell-{i:02}\" }} }}\n"
        ));
    }
    p
}

/// A node of the cluster: its own directory, config and HTTP port; shared database,
/// broker, topic prefix and MQTT client id (work-center sessions are named after it).
async fn node(id: &str, db: &str, broker: &str, prefix: &str, plant: &std::path::Path) -> Mes {
    node_with(id, db, broker, prefix, plant, LEASE_MS).await
}

async fn node_with(id: &str, db: &str, broker: &str, prefix: &str, plant: &std::path::Path, lease_ms: u64) -> Mes {
    let dir = temp_dir();
    let http_port = free_port();
    let hp = broker.trim_start_matches("mqtt://");
    let (host, port) = hp.rsplit_once(':').expect("host:port");
    let config = dir.join("mes.toml");
    std::fs::write(
        &config,
        format!(
            "[http]\nlisten = \"127.0.0.1:{http_port}\"\n[database]\nurl = \"{db}\"\n[mqtt]\nurl = \"{broker}\"\nclient_id = \"mes-{prefix}\"\ntopic_prefix = \"{prefix}\"\n[plant]\nfile = \"{}\"\n[cluster]\nnode_id = \"{id}\"\nlease_timeout = \"{lease_ms}ms\"\n",
            plant.display()
        ),
    )
    .expect("write config");
    let mut mes = Mes {
        child: None,
        dir,
        config,
        database: db.to_string(),
        http: format!("http://127.0.0.1:{http_port}"),
        mqtt_host: host.to_string(),
        mqtt_port: port.parse().expect("port"),
        prefix: prefix.to_string(),
        client: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("http client"),
    };
    mes.spawn().await;
    mes
}

/// Live leases per node, from any node's `GET /api/v1/cluster`.
async fn owners(any: &Mes) -> BTreeMap<String, usize> {
    let (status, doc) = any.get("/api/v1/cluster").await;
    assert_eq!(status, 200, "{doc}");
    let mut out = BTreeMap::new();
    for l in doc["leases"].as_array().expect("leases") {
        if l["live"] == true {
            *out.entry(l["node_id"].as_str().expect("node").to_string()).or_default() += 1;
        }
    }
    out
}

async fn wait_for<F: Fn(&BTreeMap<String, usize>) -> bool>(
    any: &Mes,
    within: Duration,
    what: &str,
    ok: F,
) -> (Duration, BTreeMap<String, usize>) {
    let start = Instant::now();
    loop {
        let o = owners(any).await;
        if ok(&o) {
            return (start.elapsed(), o);
        }
        assert!(start.elapsed() < within, "{what}: not within {within:?}; leases per node {o:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn signal(mes: &Mes, sig: &str) {
    let pid = mes.child.as_ref().expect("running").id().to_string();
    let st = Command::new("kill").args([sig, &pid]).status().expect("kill");
    assert!(st.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_the_plant_survive_a_kill_and_a_pause_and_match_the_truth() {
    let (Some(_), Some(broker)) = (postgres(), crate::harness::external_broker()) else {
        eprintln!("cluster test skipped: needs MES_TEST_DATABASE_URL (PostgreSQL) and MES_TEST_MQTT_URL");
        return;
    };
    let dir = temp_dir();
    let db = fresh_database(&dir).await;
    let plant_path = dir.join("plant.toml");
    std::fs::write(&plant_path, plant()).expect("plant");
    let prefix = format!("c{}", std::process::id());
    let mut n1 = node("n1", &db, &broker, &prefix, &plant_path).await;
    let mut n2 = node("n2", &db, &broker, &prefix, &plant_path).await;
    let mut n3 = node("n3", &db, &broker, &prefix, &plant_path).await;

    // Ownership spreads evenly: 10 work centers each.
    let (t, spread) = wait_for(&n1, Duration::from_secs(30), "even spread", |o| {
        o.len() == 3 && o.values().all(|&n| n == WORK_CENTERS / 3)
    })
    .await;
    eprintln!("spread {spread:?} after {t:?}");

    // The line runs a promo surge (1× → 10×) against the broker.
    let truth_path = dir.join("truth.json");
    let sim = tokio::task::spawn_blocking({
        let (bin, truth, plant, broker, prefix) =
            (crate::simulator::line_sim(), truth_path.clone(), plant_path.clone(), broker.clone(), prefix.clone());
        move || {
            Command::new(bin)
                .arg("--plant")
                .arg(&plant)
                .args(["--mqtt", &broker, "--topic-prefix", &prefix])
                .args(["--scenario", "promo-surge", "--seed", "31", "--speed", "6", "--duration", "240s"])
                .arg("--truth")
                .arg(&truth)
                .output()
                .expect("run line-sim")
        }
    });
    tokio::time::sleep(Duration::from_secs(8)).await;

    // SIGKILL n2 mid-surge: n1 and n3 take its work centers over once its leases expire.
    let killed = Instant::now();
    n2.kill9();
    // Both survivors end up with a share: under load one may see the other's heartbeat
    // late, take everything, and hand back its excess a round later.
    let (failover, after_kill) = wait_for(&n1, Duration::from_millis(LEASE_MS) * 6, "takeover after kill", |o| {
        !o.contains_key("n2") && o.values().sum::<usize>() == WORK_CENTERS && o.len() == 2
    })
    .await;
    eprintln!("kill → every work center owned again: {failover:?} (lease {LEASE_MS} ms); {after_kill:?}");
    assert!(killed.elapsed() >= Duration::from_millis(LEASE_MS / 2), "taken over before the lease could expire");
    assert_eq!(after_kill.len(), 2, "{after_kill:?}");

    // SIGSTOP n3 past its lease: n1 takes everything; n3, resumed, finds its leases taken
    // over (its late commits are fenced), then rejoins and gets its share back.
    signal(&n3, "-STOP");
    let (_, alone) = wait_for(&n1, Duration::from_millis(LEASE_MS) * 4, "n1 takes over from paused n3", |o| {
        o.get("n1") == Some(&WORK_CENTERS)
    })
    .await;
    eprintln!("n3 paused: {alone:?}");
    signal(&n3, "-CONT");
    let (t, back) = wait_for(&n1, Duration::from_secs(30), "n3 rejoins", |o| {
        o.get("n3") == Some(&(WORK_CENTERS / 2)) && o.get("n1") == Some(&(WORK_CENTERS / 2))
    })
    .await;
    eprintln!("n3 rejoined after {t:?}: {back:?}");
    assert!(n3.metric("mes_cluster_leases_lost_total").await >= 1, "n3 never noticed it lost its leases");
    eprintln!("n3 commits refused by fencing: {}", n3.metric("mes_cluster_fenced_total").await);

    // The run ends; every count equals the truth.
    let out = sim.await.expect("join");
    assert!(out.status.success(), "line-sim failed: {}", String::from_utf8_lossy(&out.stderr));
    let truth: Value =
        serde_json::from_str(&std::fs::read_to_string(&truth_path).expect("truth file")).expect("truth json");
    let wcs = truth["work_centers"].as_object().expect("work_centers");
    assert_eq!(wcs.len(), WORK_CENTERS);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut made = 0;
    for (wc, t) in wcs {
        let want = (t["good"].as_i64().expect("good"), t["scrap"].as_i64().expect("scrap"));
        assert!(want.0 > 0, "{wc} made nothing");
        made += want.0 + want.1;
        let got = loop {
            // Any node answers for any work center (reads come from the database).
            let got = n3.totals(wc).await;
            if got == want || Instant::now() > deadline {
                break got;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(got, want, "{wc}: MES (good, scrap) vs the truth");
    }
    // Stock: the raw buffer lost exactly what was consumed, the finished buffer holds
    // exactly the good parts.
    let good: i64 = wcs.values().map(|t| t["good"].as_i64().expect("good")).sum();
    let consumed = truth["consumed"]["RAW"].as_i64().expect("consumed RAW");
    assert_eq!(consumed, made, "every part made (good or scrap) consumed one RAW");
    let (_, buffers) = n1.get("/api/v1/buffers").await;
    let level = |id: &str| {
        buffers.as_array().and_then(|a| a.iter().find(|b| b["id"] == id)).map(|b| b["on_hand"].as_i64().expect("n"))
    };
    assert_eq!(level("RM"), Some(50_000_000 - consumed));
    assert_eq!(level("FG"), Some(good));
    // The books balance and agree with the stock: material issued = consumption at cost.
    let (_, tb) = n1.get("/api/v1/trial-balance").await;
    assert_eq!(tb["total_debits"], tb["total_credits"], "{tb}");
    for m in [&n1, &n3] {
        assert_eq!(m.metric("mes_writer_order_violations_total").await, 0);
    }
    eprintln!(
        "units made {made}; fenced commits n1 {} n3 {}",
        n1.metric("mes_cluster_fenced_total").await,
        n3.metric("mes_cluster_fenced_total").await
    );
    let (code, _) = n1.terminate();
    assert!(code.success());
    let (code, _) = n3.terminate();
    assert!(code.success());
}

/// Fencing, deterministically: a node's writer holding a job computed under a lease token
/// that another node has since taken over commits nothing; the new owner's job commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_under_a_lease_taken_over_is_refused() {
    use mes::db::writer::{Job, Writer};
    let Some(_) = postgres() else {
        eprintln!("fencing test skipped: needs MES_TEST_DATABASE_URL (PostgreSQL)");
        return;
    };
    let dir = temp_dir();
    let db = fresh_database(&dir).await;
    let plant_path = dir.join("plant.toml");
    std::fs::write(&plant_path, plant()).expect("plant");
    let plant = mes::plant::Plant::load(Some(&plant_path)).expect("plant loads");
    let store = mes::db::Store::connect(&db, 4).await.expect("connect");
    store.migrate().await.expect("migrate");
    store.upsert_plant(&plant).await.expect("master data");
    let wcs: Vec<String> = plant.work_centers.iter().map(|w| w.id.clone()).collect();

    // Node a owns WC-01 under token 1; its lease runs out; node b takes it (token 2).
    store.cluster_join("a", "127.0.0.1:1", 60_000, &wcs).await.expect("join a");
    let a = store.cluster_claim("a", 60_000, 1).await.expect("claim a");
    assert_eq!(a, vec![("WC-01".to_string(), 1)]);
    sqlx::query("UPDATE leases SET expires_ms = 0 WHERE work_center = 'WC-01'")
        .execute(&store.pool)
        .await
        .expect("expire");
    store.cluster_join("b", "127.0.0.1:2", 60_000, &wcs).await.expect("join b");
    let b = store.cluster_claim("b", 60_000, 1).await.expect("claim b");
    assert_eq!(b, vec![("WC-01".to_string(), 2)]);
    assert!(!store.cluster_holds("a", "WC-01", 1).await.expect("holds"));
    assert!(store.cluster_holds("b", "WC-01", 2).await.expect("holds"));

    let job = |node_token: i64, seq: u64, done| Job {
        lease: Some(("WC-01".to_string(), node_token)),
        ..crate::harness::counted_job(crate::harness::counted_delta("WC-01", "cell-01", seq, 5, 0), done)
    };
    let ledger = std::sync::Arc::new(mes::settlement::Ledger::from_plant(&plant));
    let run = |node: &str, token: i64, seq: u64| {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let metrics = std::sync::Arc::new(mes::metrics::Metrics::default());
        let w = Writer::new(store.clone(), rx, metrics.clone(), Default::default(), 8, ledger.clone())
            .with_fence(node.to_string());
        let task = tokio::spawn(w.run());
        async move {
            let (done_tx, done_rx) = tokio::sync::oneshot::channel();
            tx.send(job(token, seq, done_tx)).await.expect("queue");
            drop(tx);
            task.await.expect("writer");
            (done_rx.await.is_ok(), metrics.cluster_fenced.load(std::sync::atomic::Ordering::Relaxed))
        }
    };
    // The old owner's late job: refused, nothing committed, nothing acknowledged.
    assert_eq!(run("a", 1, 1).await, (false, 1));
    let totals = || async {
        let w = store.work_center("WC-01").await.expect("read").expect("exists");
        (w.good_total, w.scrap_total)
    };
    assert_eq!(totals().await, (0, 0));
    // The new owner's job commits.
    assert_eq!(run("b", 2, 1).await, (true, 0));
    assert_eq!(totals().await, (5, 0));
    // Once b hands the work center back, b's writer cannot commit for it either.
    assert!(store.cluster_release("b", "WC-01", 2).await.expect("release"));
    assert_eq!(run("b", 2, 2).await, (false, 1));
    assert_eq!(totals().await, (5, 0));
}

/// The API is the same on every node: a Modbus device polled by one node is written through
/// the other (forwarded to the owner), an order released through the non-owner reaches the
/// device through the owner, and when the owner dies the other node polls on from the
/// committed registers without losing or doubling a unit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_answers_and_modbus_work_goes_to_the_owner() {
    use crate::modbus::{serve, Press};
    let (Some(_), Some(broker)) = (postgres(), crate::harness::external_broker()) else {
        eprintln!("cluster Modbus test skipped: needs MES_TEST_DATABASE_URL (PostgreSQL) and MES_TEST_MQTT_URL");
        return;
    };
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let press = Press::new();
    press.set(100, 2, 1, 2);
    let server = serve(addr, press.clone());
    let dir = temp_dir();
    let db = fresh_database(&dir).await;
    let plant_path = dir.join("plant.toml");
    std::fs::write(&plant_path, crate::modbus::plant(addr)).expect("plant");
    let prefix = format!("m{}", std::process::id());
    let a = node_with("a", &db, &broker, &prefix, &plant_path, 2_000).await;
    let b = node_with("b", &db, &broker, &prefix, &plant_path, 2_000).await;
    let (_, o) = wait_for(&a, Duration::from_secs(20), "PRESS-1 owned", |o| o.values().sum::<usize>() == 1).await;
    let owner_is_a = o.contains_key("a");
    // `mes cluster status` shows both nodes live and who holds the one work center.
    let (code, out, err) = a.cli(&["cluster", "status"]);
    assert_eq!(code, 0, "{err}");
    let holder = if owner_is_a { "a" } else { "b" };
    let line = |id: &str| out.lines().find(|l| l.split_whitespace().next() == Some(id)).map(str::to_string);
    let held = |id: &str| line(id).and_then(|l| l.split_whitespace().last().map(str::to_string));
    assert!(line("a").is_some_and(|l| l.contains(" yes ")), "{out}");
    assert!(line("b").is_some_and(|l| l.contains(" yes ")), "{out}");
    assert_eq!(held(holder).as_deref(), Some("1"), "{out}");
    assert!(out.contains("1 work centers, 0 without a live owner"), "{out}");
    let (code, json, _) = a.cli(&["cluster", "status", "--json"]);
    assert_eq!(code, 0);
    let doc: Value = serde_json::from_str(&json).expect("json");
    assert_eq!(doc["node"], "a");
    assert_eq!(doc["leases"][0]["node_id"], holder);
    let (mut owner, other) = if owner_is_a { (a, b) } else { (b, a) };
    let other_id = if owner_is_a { "b" } else { "a" };
    // Each node's live events stream also carries what the other node published.
    let mut other_events = Events::open(&other).await;
    let mut owner_events = Events::open(&owner).await;
    // The first poll is the baseline; later units count.
    tokio::time::sleep(Duration::from_millis(500)).await;
    press.set(130, 3, 1, 2);
    assert_eq!(other.wait_totals("PRESS-1", (30, 1)).await, (30, 1), "read through the non-owner");
    // The counts were committed by the owner; the non-owner's stream shows them, tagged.
    let (mut good, mut scrap) = (0, 0);
    while (good, scrap) != (30, 1) {
        let counts = other_events.until(|e| e["type"] == "counts" && e["work_center"] == "PRESS-1").await;
        assert_eq!(counts["node"], holder, "{counts}");
        good += counts["good"].as_i64().expect("good");
        scrap += counts["scrap"].as_i64().expect("scrap");
    }

    // A point write and a command through the non-owner reach the device via the owner.
    let (s, r) =
        other.post("/api/v1/work-centers/PRESS-1/points/order_target", serde_json::json!({"value": 70_000}), &[]).await;
    assert_eq!((s, r["after"].as_u64()), (200, Some(70_000)), "{r}");
    assert_eq!(press.u32_at(100), 70_000);
    let (s, _) = other.post("/api/v1/work-centers/PRESS-1/commands", serde_json::json!({"cmd": "start"}), &[]).await;
    assert_eq!(s, 202);
    assert_eq!(press.reg(102), 1);

    // An order released through the non-owner: dispatched by the owner.
    let (s, _) = other
        .post(
            "/api/v1/orders",
            serde_json::json!({"id": "PO-C", "sku": "WIDGET", "quantity": 500, "work_center": "PRESS-1"}),
            &[],
        )
        .await;
    assert_eq!(s, 201);
    // Created through the non-owner: the owner's stream shows it, tagged with where it was.
    let created = owner_events.until(|e| e["type"] == "order_created").await;
    assert_eq!(created, json!({"type": "order_created", "order": "PO-C", "node": other_id}));
    // Counted once the notification's statement returns, which may be after the other node
    // has it: waited for, not read once.
    assert!(other.wait_metric("mes_events_relayed_total", 1).await >= 1);
    assert!(owner.wait_metric("mes_events_remote_total", 1).await >= 1);
    assert_eq!(other.metric("mes_events_relay_dropped_total").await, 0);
    let (s, _) = other.post("/api/v1/orders/PO-C/release", serde_json::json!({}), &[]).await;
    assert_eq!(s, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while press.u32_at(100) != 500 {
        assert!(Instant::now() < deadline, "the owner never wrote the dispatched target");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, order) = other.get("/api/v1/orders/PO-C").await;
        if order["dispatch"]["status"] == "acknowledged" {
            break;
        }
        assert!(Instant::now() < deadline, "dispatch not acknowledged: {order}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Audited: `dispatch` (pending) by the caller on the node asked, `dispatch_write` by the
    // owner with the value read back before and after.
    let (_, audit) = other.get("/api/v1/audit?limit=100").await;
    let line = |action: &str| {
        audit.as_array().and_then(|a| a.iter().find(|l| l["action"] == action).cloned()).unwrap_or(Value::Null)
    };
    let (asked, written) = (line("dispatch"), line("dispatch_write"));
    assert_eq!((&asked["actor"], &asked["detail"]["after"]["status"]), (&json!("local"), &json!("pending")), "{audit}");
    assert_eq!(
        (&written["actor"], &written["target"]),
        (&json!(format!("node:{holder}")), &json!("PRESS-1")),
        "{audit}"
    );
    assert_eq!(
        written["detail"],
        json!({"dispatch": asked["detail"]["dispatch"], "device": "press-1",
               "write": {"point": "order_target", "value": 500, "before": 70_000, "after": 500, "result": "ok"}}),
        "{audit}"
    );

    // The owner dies; the other node takes the poller over and counts on exactly.
    owner.kill9();
    press.set(175, 5, 1, 2);
    let survivor = if owner_is_a { "b" } else { "a" };
    wait_for(&other, Duration::from_secs(20), "takeover of PRESS-1", |o| o.get(survivor) == Some(&1)).await;
    assert_eq!(other.wait_totals("PRESS-1", (75, 3)).await, (75, 3));
    server.abort();
}

/// A node's `GET /api/v1/events` stream, read event by event.
struct Events {
    response: reqwest::Response,
    text: String,
}

impl Events {
    async fn open(mes: &Mes) -> Events {
        // A client of its own: the harness's gives up on a whole response after 10 s, and
        // this one stays open for the test; each read has its own deadline below.
        let client = reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).build().expect("client");
        let response =
            tokio::time::timeout(Duration::from_secs(10), client.get(format!("{}/api/v1/events", mes.http)).send())
                .await
                .expect("events answered in 10 s")
                .expect("events");
        assert_eq!(response.status().as_u16(), 200);
        Events { response, text: String::new() }
    }

    /// The next event that `wanted` accepts; fails after 15 s.
    async fn until(&mut self, wanted: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            while let Some(end) = self.text.find("\n\n") {
                let block: String = self.text.drain(..end + 2).collect();
                for line in block.lines() {
                    if let Some(Ok(e)) = line.strip_prefix("data: ").map(serde_json::from_str::<Value>) {
                        if wanted(&e) {
                            return e;
                        }
                    }
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no such event in 15 s");
            if let Ok(chunk) = tokio::time::timeout(left, self.response.chunk()).await {
                let chunk = chunk.expect("events stream").expect("events stream open");
                self.text.push_str(&String::from_utf8_lossy(&chunk));
            }
        }
    }
}
