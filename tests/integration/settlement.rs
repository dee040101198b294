//! Settlement: backflush, stock, double-entry books, order cost, reservations, ERP outbox.

use crate::harness::{widget_plant, Mes, MesOptions};
use mes_actors::Money;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn plant() -> String {
    widget_plant(r#"{ mqtt = { id = "press-01" } }"#)
}

fn m(v: &Value) -> Money {
    v.as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not money: {v}"))
}

fn ts(sec: u64) -> String {
    format!("2026-11-11T00:{:02}:{:02}.000Z", sec / 60, sec % 60)
}

async fn buffer(mes: &Mes, id: &str) -> Value {
    let (_, all) = mes.get("/api/v1/buffers").await;
    all.as_array().and_then(|a| a.iter().find(|b| b["id"] == id).cloned()).unwrap_or(Value::Null)
}

/// Runs PO-1 (100 WIDGET) to 100 good + 4 scrap over 10 running seconds.
async fn produce(mes: &Mes) {
    let (s, _) = mes
        .post("/api/v1/orders", json!({"id": "PO-1", "sku": "WIDGET", "quantity": 100, "work_center": "PRESS-1"}), &[])
        .await;
    assert_eq!(s, 201);
    let (s, _) = mes.post("/api/v1/orders/PO-1/release", json!({}), &[]).await;
    assert_eq!(s, 200);
    let mut dev = mes.device("press");
    for i in 0..=10u64 {
        let scrap = i.saturating_sub(6);
        dev.reading("press-01", 1, i + 1, i * 10, scrap, json!({"ts": ts(i)})).await;
    }
    dev.flush().await;
    assert_eq!(mes.wait_totals("PRESS-1", (100, 4)).await, (100, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_run_settles_stock_books_and_cost_exactly() {
    let mes = Mes::start(MesOptions { plant: Some(plant()), ..Default::default() }).await;
    produce(&mes).await;
    assert_eq!(buffer(&mes, "FG").await["on_hand"], 100);
    assert_eq!(buffer(&mes, "RM").await["on_hand"], 50_000 - 2 * 104);
    let (_, inv) = mes.get("/api/v1/inventory/SHEET").await;
    assert_eq!((inv["on_hand"].as_i64(), inv["available"].as_i64()), (Some(49_792), Some(49_792)));
    let (_, o) = mes.get("/api/v1/orders/PO-1").await;
    assert_eq!(o["status"], "completed");
    assert_eq!(o["consumed"]["SHEET"], 208);

    let (s, o) = mes.post("/api/v1/orders/PO-1/close", json!({}), &[]).await;
    assert_eq!((s, o["status"].as_str()), (200, Some("closed")));
    let (_, c) = mes.get("/api/v1/orders/PO-1/cost").await;
    // Standard: 100 × (2 × 1.20 + 60.00/h × 1 s) = 100 × 2.4166
    assert_eq!(c["standard"], "241.66");
    // Actual: 208 SHEET × 1.20 + 10 s running at 60.00/h
    assert_eq!(c["actual"], "249.7666");
    let v = &c["variances"];
    assert_eq!(v["material_usage"], "0.00");
    assert_eq!(v["yield"], "9.6664");
    assert_eq!(v["efficiency"], "-1.5598");
    let sum = m(&c["standard"]).0 + m(&v["material_usage"]).0 + m(&v["efficiency"]).0 + m(&v["yield"]).0;
    assert_eq!(sum, m(&c["actual"]).0, "standard + variances = actual");

    let (_, tb) = mes.get("/api/v1/trial-balance").await;
    assert_eq!(tb["total_debits"], tb["total_credits"], "{tb}");
    assert_eq!(tb["balanced"], true);
    let wip = tb["accounts"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["account"] == "1300").cloned())
        .expect("WIP account");
    assert_eq!(wip["debit"], wip["credit"], "a closed order leaves nothing in WIP: {wip}");
    let (_, j) = mes.get("/api/v1/journal?order=PO-1").await;
    let kinds: BTreeSet<&str> = j.as_array().expect("list").iter().filter_map(|p| p["kind"].as_str()).collect();
    for k in ["material_issue", "conversion", "completion", "scrap", "efficiency_variance"] {
        assert!(kinds.contains(k), "{k} missing from {kinds:?}");
    }
    assert!(j.as_array().expect("list").iter().all(|p| p["source"]["id"].as_str().is_some_and(|s| !s.is_empty())));
    let (_, docs) = mes.get("/api/v1/erp/outbox").await;
    let kinds: Vec<&str> = docs.as_array().expect("list").iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, vec!["completion", "close"]);
    assert!(docs[0]["status"] == "pending" && docs[0]["attempts"] == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_reservations_never_oversell() {
    let mes = Arc::new(Mes::start(MesOptions { plant: Some(plant()), ..Default::default() }).await);
    produce(&mes).await; // 100 WIDGET on hand
    let mut tasks = Vec::new();
    for i in 0..64 {
        let mes = mes.clone();
        tasks.push(tokio::spawn(async move {
            let (s, v) = mes
                .post("/api/v1/reservations", json!({"sku": "WIDGET", "quantity": 7, "ref": format!("SO-{i}")}), &[])
                .await;
            (s, v)
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let (s, v) = t.await.expect("task");
        match s {
            201 => ok += 1,
            409 => assert_eq!(v["error"]["code"], "insufficient_stock", "{v}"),
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert_eq!(ok, 14, "100 / 7 = 14 reservations fit");
    let fg = buffer(&mes, "FG").await;
    assert_eq!(
        (fg["on_hand"].as_i64(), fg["reserved"].as_i64(), fg["available"].as_i64()),
        (Some(100), Some(98), Some(2))
    );
    // A repeated ref returns the first reservation and creates nothing.
    let (s1, a) =
        mes.post("/api/v1/reservations", json!({"sku": "WIDGET", "quantity": 7, "ref": "SO-REPEAT"}), &[]).await;
    assert_eq!(s1, 409);
    let (_, a0) =
        mes.post("/api/v1/reservations", json!({"sku": "WIDGET", "quantity": 2, "ref": "SO-LAST"}), &[]).await;
    let (_, a1) =
        mes.post("/api/v1/reservations", json!({"sku": "WIDGET", "quantity": 2, "ref": "SO-LAST"}), &[]).await;
    assert_eq!(a0["id"], a1["id"], "{a}");
    assert_eq!(buffer(&mes, "FG").await["reserved"], 100);
    // Goods issue and release.
    let id = a0["id"].as_str().expect("id");
    let (s, r) = mes.post(&format!("/api/v1/reservations/{id}/ship"), json!({}), &[]).await;
    assert_eq!((s, r["status"].as_str()), (200, Some("shipped")));
    let (s, _) = mes.post(&format!("/api/v1/reservations/{id}/ship"), json!({}), &[]).await;
    assert_eq!(s, 409);
    let fg = buffer(&mes, "FG").await;
    assert_eq!((fg["on_hand"].as_i64(), fg["reserved"].as_i64()), (Some(98), Some(98)));
    let (_, tb) = mes.get("/api/v1/trial-balance").await;
    let cogs =
        tb["accounts"].as_array().and_then(|a| a.iter().find(|x| x["account"] == "5000").cloned()).expect("COGS");
    assert_eq!(cogs["debit"], "4.8332", "2 × 2.4166");
    assert_eq!(tb["total_debits"], tb["total_credits"]);
    let (_, docs) = mes.get("/api/v1/erp/outbox").await;
    let gi: Vec<&Value> = docs.as_array().expect("list").iter().filter(|d| d["kind"] == "goods_issue").collect();
    assert_eq!(gi.len(), 1, "{docs}");
    assert_eq!(gi[0]["id"], format!("GI-{id}"));
    assert_eq!(gi[0]["document"]["MaterialActual"]["Quantity"]["QuantityString"], "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_documents_every_n_units() {
    let extra = "[erp]\nwebhook_url = \"http://127.0.0.1:9/erp\"\nprogress_every_units = 30\n".to_string();
    let mes = Mes::start(MesOptions { plant: Some(plant()), extra_config: extra, ..Default::default() }).await;
    produce(&mes).await; // good passes 30, 60, 90, then completes at 100
    let (_, docs) = mes.get("/api/v1/erp/outbox").await;
    let kinds: Vec<&str> = docs.as_array().expect("list").iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, vec!["progress", "progress", "progress", "completion"], "{docs}");
    let ids: Vec<&str> = docs.as_array().expect("list").iter().filter_map(|d| d["id"].as_str()).collect();
    assert_eq!(ids, vec!["PO-1-progress-30", "PO-1-progress-60", "PO-1-progress-90", "PO-1-completion"]);
    // The ERP is down (nothing listens on port 9): documents wait, ingest did not.
    assert!(docs.as_array().expect("list").iter().all(|d| d["status"] != "sent"));
}

/// A tiny ERP: fails the first two requests, stalls the third past the sender's timeout,
/// then accepts; records every accepted Idempotency-Key.
fn flaky_erp() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/erp", listener.local_addr().expect("addr"));
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let acc = accepted.clone();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(mut s) = stream else { continue };
            let mut reader = BufReader::new(s.try_clone().expect("clone"));
            let (mut key, mut len) = (String::new(), 0usize);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("idempotency-key:") {
                    key = line[line.len() - v.len()..].trim().to_string();
                }
                if let Some(v) = lower.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            let _ = reader.read_exact(&mut body);
            let reply = match n {
                0 | 1 => "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                2 => {
                    std::thread::sleep(Duration::from_secs(7));
                    "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                }
                _ => {
                    acc.lock().expect("lock").push(key);
                    "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                }
            };
            let _ = s.write_all(reply.as_bytes());
        }
    });
    (url, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erp_receiver_failing_and_timing_out_still_gets_every_document_once() {
    let (url, accepted) = flaky_erp();
    let extra = format!("[erp]\nwebhook_url = \"{url}\"\n");
    let mes = Mes::start(MesOptions { plant: Some(plant()), extra_config: extra, ..Default::default() }).await;
    produce(&mes).await;
    let (s, _) = mes.post("/api/v1/orders/PO-1/close", json!({}), &[]).await;
    assert_eq!(s, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        let (_, docs) = mes.get("/api/v1/erp/outbox").await;
        let docs = docs.as_array().cloned().unwrap_or_default();
        if docs.len() == 2 && docs.iter().all(|d| d["status"] == "sent") {
            assert!(docs[0]["attempts"].as_i64().unwrap_or(0) >= 3, "{docs:?}");
            let ids: Vec<String> = docs.iter().filter_map(|d| d["id"].as_str().map(str::to_string)).collect();
            let got = accepted.lock().expect("lock").clone();
            let distinct: BTreeSet<&String> = got.iter().collect();
            assert_eq!(distinct.len(), 2, "every document accepted: {got:?}");
            assert!(ids.iter().all(|i| distinct.contains(i)));
            return;
        }
        if std::time::Instant::now() > deadline {
            panic!("documents not delivered: {docs:?}");
        }
        if docs.iter().any(|d| d["status"] == "failing") {
            assert!(docs.iter().any(|d| d["last_error"].as_str().is_some_and(|e| !e.is_empty())));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shortage_is_booked_and_alerted_once() {
    let plant = plant().replace("initial = 50000", "initial = 50");
    let mes = Mes::start(MesOptions { plant: Some(plant), ..Default::default() }).await;
    let mut events = mes.client.get(format!("{}/api/v1/events", mes.http)).send().await.expect("events");
    assert_eq!(events.status().as_u16(), 200);
    produce(&mes).await; // consumes 208 SHEET from 50: booked anyway
    let rm = buffer(&mes, "RM").await;
    assert_eq!((rm["on_hand"].as_i64(), rm["shortfall"].as_i64()), (Some(-158), Some(158)));
    assert_eq!(rm["alert"], "material_shortage");
    assert_eq!(buffer(&mes, "FG").await["alert"], Value::Null);
    // The live stream carries the alert, raised once however many commits stayed short.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen = String::new();
    while !seen.contains("material_shortage") && std::time::Instant::now() < deadline {
        if let Ok(Ok(Some(chunk))) = tokio::time::timeout(Duration::from_secs(1), events.chunk()).await {
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    assert!(seen.contains("\"alert\":\"material_shortage\"") && seen.contains("\"state\":\"raised\""), "{seen}");
    assert_eq!(mes.metric("mes_alerts_total").await, 1);
}
