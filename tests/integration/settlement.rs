//! Settlement: backflush, stock, double-entry books, order cost, reservations, ERP outbox.

use crate::harness::{widget_plant, Mes, MesOptions};
use mes_actors::Money;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
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

/// `(on_hand, reserved, available)` of a sku, from `GET /inventory/{sku}`.
async fn inventory(mes: &Mes, sku: &str) -> (i64, i64, i64) {
    let (s, v) = mes.get(&format!("/api/v1/inventory/{sku}")).await;
    assert_eq!(s, 200, "{v}");
    let n = |k: &str| v[k].as_i64().unwrap_or_else(|| panic!("{k} missing: {v}"));
    (n("on_hand"), n("reserved"), n("available"))
}

async fn delete(mes: &Mes, path: &str) -> (u16, Value) {
    let r = mes.client.delete(format!("{}{path}", mes.http)).send().await.expect("DELETE");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn adjust(mes: &Mes, body: Value) -> (u16, Value) {
    mes.post("/api/v1/inventory/adjustments", body, &[]).await
}

/// The sku's whole stock ledger, read in pages of `page` to exercise `after`.
async fn movements(mes: &Mes, sku: &str, page: usize) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    loop {
        let after = out.last().and_then(|m| m["id"].as_i64()).unwrap_or(0);
        let (s, v) = mes.get(&format!("/api/v1/inventory/{sku}/movements?after={after}&limit={page}")).await;
        assert_eq!(s, 200, "{v}");
        let rows = v.as_array().cloned().expect("list");
        assert!(rows.len() <= page);
        let done = rows.len() < page;
        out.extend(rows);
        if done {
            return out;
        }
    }
}

/// Per buffer, the sum of its movements.
fn recomputed(moves: &[Value]) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for m in moves {
        let b = m["buffer"].as_str().expect("buffer").to_string();
        *out.entry(b).or_insert(0) += m["quantity"].as_i64().expect("quantity");
    }
    out
}

fn account(tb: &Value, code: &str) -> (Money, Money) {
    let a = tb["accounts"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["account"] == code).cloned())
        .unwrap_or_else(|| panic!("account {code} missing: {tb}"));
    (m(&a["debit"]), m(&a["credit"]))
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
    produce(&mes).await; // 100 WIDGET on hand, none reserved
    const STOCK: i64 = 100;
    const CLIENTS: usize = 64;
    const PER_CLIENT: usize = 3; // 192 one-unit requests for 100 units
    assert_eq!(inventory(&mes, "WIDGET").await, (STOCK, 0, STOCK));

    // A poller samples the inventory while the clients race, until they are done.
    let racing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let start = Arc::new(tokio::sync::Barrier::new(CLIENTS + 1));
    let poller = {
        let (mes, racing, start) = (mes.clone(), racing.clone(), start.clone());
        tokio::spawn(async move {
            let mut samples: Vec<(i64, i64, i64)> = Vec::new();
            start.wait().await;
            loop {
                let running = racing.load(std::sync::atomic::Ordering::SeqCst);
                samples.push(inventory(&mes, "WIDGET").await);
                if !running {
                    return samples;
                }
            }
        })
    };
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (mes, start) = (mes.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let mut out = Vec::new();
            for k in 0..PER_CLIENT {
                let r = format!("SO-{c}-{k}");
                let (s, v) =
                    mes.post("/api/v1/reservations", json!({"sku": "WIDGET", "quantity": 1, "ref": r}), &[]).await;
                out.push((r, s, v));
            }
            out
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.extend(t.await.expect("client"));
    }
    racing.store(false, std::sync::atomic::Ordering::SeqCst);
    let samples = poller.await.expect("poller");

    let mut reserved_sum = 0;
    let mut ids = BTreeSet::new();
    let mut winners = Vec::new();
    let mut refused = 0;
    for (r, s, v) in &results {
        match s {
            201 => {
                assert_eq!((v["ref"].as_str(), v["quantity"].as_i64()), (Some(r.as_str()), Some(1)), "{v}");
                reserved_sum += v["quantity"].as_i64().unwrap_or(0);
                ids.insert(v["id"].as_str().expect("id").to_string());
                winners.push((r.clone(), v.clone()));
            }
            409 => {
                refused += 1;
                assert_eq!(v["error"]["code"], "insufficient_stock", "{v}");
                // Stock only falls during the race, so a refusal sees nothing available.
                assert_eq!((v["error"]["available"].as_i64(), v["error"]["requested"].as_i64()), (Some(0), Some(1)));
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert_eq!(reserved_sum, STOCK, "the successes sum to exactly what was available");
    assert_eq!(ids.len(), STOCK as usize, "one reservation per success");
    assert_eq!(refused, CLIENTS * PER_CLIENT - STOCK as usize);
    assert_eq!(inventory(&mes, "WIDGET").await, (STOCK, STOCK, 0));
    // During the race: never more reserved than on hand, and reserved only grows.
    assert!(!samples.is_empty(), "the poller sampled during the race");
    for w in samples.windows(2) {
        assert!(w[1].1 >= w[0].1, "reserved fell during the race: {w:?}");
    }
    for (on_hand, reserved, available) in &samples {
        assert_eq!(*on_hand, STOCK);
        assert!(*reserved <= *on_hand, "oversold: {reserved} reserved of {on_hand}");
        assert_eq!(*available, on_hand - reserved);
    }
    let mid_race = samples.iter().filter(|s| s.1 > 0 && s.1 < STOCK).count();
    eprintln!("{} samples during the race, {mid_race} with the race under way", samples.len());

    // A repeated ref returns the first reservation and creates nothing.
    let (r0, first) = &winners[0];
    let (s, again) = mes.post("/api/v1/reservations", json!({"sku": "WIDGET", "quantity": 1, "ref": r0}), &[]).await;
    assert_eq!((s, &again["id"]), (201, &first["id"]));
    assert_eq!(inventory(&mes, "WIDGET").await, (STOCK, STOCK, 0));
    // Goods issue of one unit: on hand and reserved both fall by it.
    let id = first["id"].as_str().expect("id");
    let (s, r) = mes.post(&format!("/api/v1/reservations/{id}/ship"), json!({}), &[]).await;
    assert_eq!((s, r["status"].as_str()), (200, Some("shipped")));
    let (s, _) = mes.post(&format!("/api/v1/reservations/{id}/ship"), json!({}), &[]).await;
    assert_eq!(s, 409);
    assert_eq!(inventory(&mes, "WIDGET").await, (STOCK - 1, STOCK - 1, 0));
    let (_, tb) = mes.get("/api/v1/trial-balance").await;
    assert_eq!(account(&tb, "5000").0, Money(24_166), "1 × 2.4166");
    assert_eq!(tb["total_debits"], tb["total_credits"]);
    let (_, docs) = mes.get("/api/v1/erp/outbox").await;
    let gi: Vec<&Value> = docs.as_array().expect("list").iter().filter(|d| d["kind"] == "goods_issue").collect();
    assert_eq!(gi.len(), 1, "{docs}");
    assert_eq!(gi[0]["id"], format!("GI-{id}"));
    assert_eq!(gi[0]["document"]["MaterialActual"]["Quantity"]["QuantityString"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_returns_exactly_its_quantity_and_a_shipped_one_cannot_be_released() {
    let mes = Mes::start(MesOptions { plant: Some(plant()), ..Default::default() }).await;
    produce(&mes).await; // 100 WIDGET
    let (s, a) = mes.post("/api/v1/reservations", json!({"sku": "WIDGET", "quantity": 40, "ref": "SO-A"}), &[]).await;
    assert_eq!(s, 201, "{a}");
    let (s, b) = mes.post("/api/v1/reservations", json!({"sku": "WIDGET", "quantity": 25, "ref": "SO-B"}), &[]).await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(inventory(&mes, "WIDGET").await, (100, 65, 35));

    // Short: 409 insufficient_stock with what is available, in the usual error shape.
    let (s, e) = mes.post("/api/v1/reservations", json!({"sku": "WIDGET", "quantity": 36, "ref": "SO-X"}), &[]).await;
    assert_eq!(s, 409, "{e}");
    assert_eq!(e["error"]["code"], "insufficient_stock");
    assert_eq!(e["error"]["available"], 35);
    assert_eq!(e["error"]["requested"], 36);
    assert!(e["error"]["message"].as_str().is_some_and(|m| m.contains("35")), "{e}");
    assert_eq!(inventory(&mes, "WIDGET").await, (100, 65, 35), "a refusal changes nothing");

    // Release SO-A: reserved falls and available rises by exactly 40; on hand stays.
    let id_a = a["id"].as_str().expect("id");
    let (s, r) = delete(&mes, &format!("/api/v1/reservations/{id_a}")).await;
    assert_eq!((s, r["status"].as_str(), r["quantity"].as_i64()), (200, Some("released"), Some(40)), "{r}");
    assert_eq!(inventory(&mes, "WIDGET").await, (100, 25, 75));
    let (s, e) = delete(&mes, &format!("/api/v1/reservations/{id_a}")).await;
    assert_eq!((s, e["error"]["code"].as_str()), (409, Some("invalid_transition")), "released twice: {e}");
    assert_eq!(inventory(&mes, "WIDGET").await, (100, 25, 75));
    // The 36 refused before now fits.
    let (s, _) = mes.post("/api/v1/reservations", json!({"sku": "WIDGET", "quantity": 36, "ref": "SO-X"}), &[]).await;
    assert_eq!(s, 201);
    assert_eq!(inventory(&mes, "WIDGET").await, (100, 61, 39));

    // Ship SO-B, then try to release it: refused, nothing moves.
    let id_b = b["id"].as_str().expect("id");
    let (s, _) = mes.post(&format!("/api/v1/reservations/{id_b}/ship"), json!({}), &[]).await;
    assert_eq!(s, 200);
    assert_eq!(inventory(&mes, "WIDGET").await, (75, 36, 39));
    let (s, e) = delete(&mes, &format!("/api/v1/reservations/{id_b}")).await;
    assert_eq!((s, e["error"]["code"].as_str()), (409, Some("invalid_transition")), "{e}");
    assert!(e["error"]["message"].as_str().is_some_and(|m| m.contains("shipped")), "{e}");
    assert_eq!(inventory(&mes, "WIDGET").await, (75, 36, 39));
    let (_, r) = mes.get(&format!("/api/v1/reservations/{id_b}")).await;
    assert_eq!(r["status"], "shipped");
    let (s, _) = delete(&mes, "/api/v1/reservations/R-NOPE").await;
    assert_eq!(s, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adjustments_and_the_stock_ledger_recompute_every_balance() {
    let mes = Mes::start(MesOptions { plant: Some(plant()), ..Default::default() }).await;
    produce(&mes).await; // FG 100, RM 50,000 - 208
    let reserve =
        |q: i64, r: &str| mes.post("/api/v1/reservations", json!({"sku": "WIDGET", "quantity": q, "ref": r}), &[]);
    let (_, a) = reserve(30, "SO-A").await;
    let (_, b) = reserve(20, "SO-B").await;
    let (s, _) =
        mes.post(&format!("/api/v1/reservations/{}/ship", a["id"].as_str().expect("id")), json!({}), &[]).await;
    assert_eq!(s, 200);
    let (s, _) = delete(&mes, &format!("/api/v1/reservations/{}", b["id"].as_str().expect("id"))).await;
    assert_eq!(s, 200);
    let (s, _) = reserve(60, "SO-C").await;
    assert_eq!(s, 201);
    assert_eq!(inventory(&mes, "WIDGET").await, (70, 60, 10));

    // A counted surplus; the same ref again (even with other values) returns the first.
    let (s, adj1) = adjust(&mes, json!({"buffer": "FG", "quantity": 5, "reason": "cycle count", "ref": "ADJ-1"})).await;
    assert_eq!(s, 201, "{adj1}");
    assert_eq!(
        (adj1["buffer"].as_str(), adj1["sku"].as_str(), adj1["quantity"].as_i64(), adj1["on_hand"].as_i64()),
        (Some("FG"), Some("WIDGET"), Some(5), Some(75))
    );
    assert_eq!(adj1["reason"], "cycle count");
    let (s, again) = adjust(&mes, json!({"buffer": "FG", "quantity": 9, "reason": "typo", "ref": "ADJ-1"})).await;
    assert_eq!((s, &again), (201, &adj1));
    assert_eq!(inventory(&mes, "WIDGET").await, (75, 60, 15));
    // A loss of raw material, naming sku and buffer.
    let (s, adj2) =
        adjust(&mes, json!({"sku": "SHEET", "buffer": "RM", "quantity": -3, "reason": "damaged", "ref": "ADJ-2"}))
            .await;
    assert_eq!((s, adj2["on_hand"].as_i64()), (201, Some(49_789)), "{adj2}");
    // Removing more than is available (on hand - reserved = 15) is refused: stock stays.
    let (s, e) = adjust(&mes, json!({"buffer": "FG", "quantity": -16, "reason": "lost", "ref": "ADJ-3"})).await;
    assert_eq!(s, 409, "{e}");
    assert_eq!(e["error"]["code"], "insufficient_stock");
    assert!(e["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(
        (e["error"]["available"].as_i64(), e["error"]["on_hand"].as_i64(), e["error"]["reserved"].as_i64()),
        (Some(15), Some(75), Some(60))
    );
    assert_eq!(inventory(&mes, "WIDGET").await, (75, 60, 15));
    // The refused ref booked nothing, so it can be used for what fits.
    let (s, adj3) = adjust(&mes, json!({"buffer": "FG", "quantity": -15, "reason": "lost", "ref": "ADJ-3"})).await;
    assert_eq!((s, adj3["on_hand"].as_i64()), (201, Some(60)), "{adj3}");
    assert_eq!(inventory(&mes, "WIDGET").await, (60, 60, 0));
    // Invalid requests change nothing.
    for (body, status) in [
        (json!({"buffer": "FG", "sku": "SHEET", "quantity": 1, "reason": "x", "ref": "BAD-1"}), 422),
        (json!({"buffer": "NOPE", "quantity": 1, "reason": "x", "ref": "BAD-2"}), 404),
        (json!({"buffer": "FG", "quantity": 0, "reason": "x", "ref": "BAD-3"}), 422),
        (json!({"buffer": "FG", "quantity": 1, "reason": " ", "ref": "BAD-4"}), 422),
        (json!({"buffer": "FG", "quantity": 1, "ref": "BAD-5"}), 400),
        (json!({"buffer": "FG", "quantity": 1.5, "reason": "x", "ref": "BAD-6"}), 400),
    ] {
        let (s, e) = adjust(&mes, body.clone()).await;
        assert_eq!(s, status, "{body}: {e}");
        assert!(e["error"]["code"].is_string(), "{e}");
    }
    assert_eq!(inventory(&mes, "WIDGET").await, (60, 60, 0));

    // More telemetry after the adjustments: PO-2 makes 10 more (20 SHEET).
    let (s, _) = mes
        .post("/api/v1/orders", json!({"id": "PO-2", "sku": "WIDGET", "quantity": 10, "work_center": "PRESS-1"}), &[])
        .await;
    assert_eq!(s, 201);
    let (s, _) = mes.post("/api/v1/orders/PO-2/release", json!({}), &[]).await;
    assert_eq!(s, 200);
    let mut dev = mes.device("press-2");
    dev.reading("press-01", 1, 20, 110, 4, json!({"ts": ts(20), "order": "PO-2"})).await;
    dev.flush().await;
    assert_eq!(mes.wait_totals("PRESS-1", (110, 4)).await, (110, 4));

    // Every balance is the sum of its movements.
    let fg = buffer(&mes, "FG").await;
    let rm = buffer(&mes, "RM").await;
    assert_eq!((fg["on_hand"].as_i64(), rm["on_hand"].as_i64()), (Some(70), Some(49_769)));
    let widget = movements(&mes, "WIDGET", 3).await;
    let sheet = movements(&mes, "SHEET", 1000).await;
    assert_eq!(recomputed(&widget), BTreeMap::from([("FG".to_string(), 70)]));
    assert_eq!(recomputed(&sheet), BTreeMap::from([("RM".to_string(), 49_769)]));
    let sources = |ms: &[Value]| -> BTreeSet<String> {
        ms.iter().filter_map(|m| m["source"]["kind"].as_str().map(str::to_string)).collect()
    };
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(sources(&widget), set(&["adjustment", "reservation", "telemetry"]));
    assert_eq!(sources(&sheet), set(&["adjustment", "plant", "telemetry"]));
    let of = |ms: &[Value], source: &str| -> Vec<(String, i64, String)> {
        ms.iter()
            .filter(|m| m["source"]["kind"] == source)
            .map(|m| {
                let k = m["kind"].as_str().unwrap_or("").to_string();
                (k, m["quantity"].as_i64().unwrap_or(i64::MIN), m["source"]["id"].as_str().unwrap_or("").to_string())
            })
            .collect()
    };
    let id = |v: &Value| v["id"].as_str().expect("id").to_string();
    assert_eq!(
        of(&widget, "adjustment"),
        vec![("adjustment".to_string(), 5, id(&adj1)), ("adjustment".to_string(), -15, id(&adj3))]
    );
    assert_eq!(of(&sheet, "adjustment"), vec![("adjustment".to_string(), -3, id(&adj2))]);
    assert_eq!(of(&sheet, "plant"), vec![("opening".to_string(), 50_000, "RM".to_string())]);
    let kinds: Vec<(String, i64)> = of(&widget, "reservation").into_iter().map(|(k, q, _)| (k, q)).collect();
    let want: Vec<(String, i64)> =
        [("reservation", 0), ("reservation", 0), ("goods_issue", -30), ("release", 0), ("reservation", 0)]
            .iter()
            .map(|(k, q)| (k.to_string(), *q))
            .collect();
    assert_eq!(kinds, want);
    let telemetry_fg: i64 = of(&widget, "telemetry").iter().map(|m| m.1).sum();
    assert_eq!(telemetry_fg, 110, "good units entered FG");
    // One buffer's ledger, and a buffer of another sku has none under this sku.
    let (_, only_fg) = mes.get("/api/v1/inventory/WIDGET/movements?buffer=FG").await;
    assert_eq!(only_fg.as_array().map(Vec::len), Some(widget.len()));
    let (_, none) = mes.get("/api/v1/inventory/WIDGET/movements?buffer=RM").await;
    assert_eq!(none, json!([]));
    let (s, _) = mes.get("/api/v1/inventory/NOPE/movements").await;
    assert_eq!(s, 404);

    // Books: the adjustments at standard cost against 5400, balanced.
    let (_, tb) = mes.get("/api/v1/trial-balance").await;
    assert_eq!(tb["total_debits"], tb["total_credits"], "{tb}");
    // Dr 5400: 3 SHEET × 1.20 + 15 WIDGET × 2.4166; Cr 5400: 5 WIDGET × 2.4166.
    assert_eq!(account(&tb, "5400"), (Money(36_000 + 362_490), Money(120_830)));
    // Audited: one line per booked adjustment, none for a repeat or a refusal.
    let (_, audit) = mes.get("/api/v1/audit?limit=5000").await;
    let mut targets: Vec<String> = audit
        .as_array()
        .expect("audit")
        .iter()
        .filter(|a| a["action"] == "stock_adjustment")
        .filter_map(|a| a["target"].as_str().map(str::to_string))
        .collect();
    targets.sort();
    let mut want = vec![id(&adj1), id(&adj2), id(&adj3)];
    want.sort();
    assert_eq!(targets, want);
    // The trial balance reads running totals the database keeps per account; they equal
    // the journal summed line by line, after telemetry, shipment and adjustment postings.
    let store = mes::db::Store::connect(&mes.database, 1).await.expect("connect");
    let running = store.trial_balance().await.expect("running totals");
    assert_eq!(running, store.trial_balance_from_journal().await.expect("journal sums"));
    let fg = running.iter().find(|a| a.0 == "1400").map(|a| (a.2, a.3));
    assert!(fg.is_some_and(|(d, c)| d > 0 && c > 0), "finished goods moved both ways: {running:?}");
    // The journal is append-only: a changed or deleted line is refused, the totals stand.
    for sql in ["UPDATE journal SET amount = amount + 1", "DELETE FROM journal"] {
        let e = sqlx::query(sql).execute(&store.pool).await.expect_err(sql).to_string();
        assert!(e.contains("journal lines are never"), "{sql}: {e}");
    }
    assert_eq!(store.trial_balance().await.expect("running totals"), running);
    let (_, doc) = mes.get("/openapi.json").await;
    assert_eq!(doc["paths"]["/api/v1/inventory/adjustments"]["post"]["description"], "Role: planner or higher.");
    assert_eq!(doc["paths"]["/api/v1/inventory/{sku}/movements"]["get"]["description"], "Role: viewer or higher.");
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

/// What the flaky ERP saw: the Idempotency-Key of every request in arrival order, and of
/// every request it accepted (answered 2xx in time).
#[derive(Default, Clone, Debug)]
struct ErpLog {
    requests: Vec<String>,
    accepted: Vec<String>,
}

/// A tiny ERP: fails the first two requests, never answers the third (it holds the
/// connection open, so the sender's timeout, not a race with a late reply, ends that
/// attempt), then accepts.
fn flaky_erp() -> (String, Arc<Mutex<ErpLog>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/erp", listener.local_addr().expect("addr"));
    let log = Arc::new(Mutex::new(ErpLog::default()));
    let acc = log.clone();
    std::thread::spawn(move || {
        let mut unanswered = Vec::new();
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(mut s) = stream else { continue };
            let Ok(clone) = s.try_clone() else { continue };
            let mut reader = BufReader::new(clone);
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
            if let Ok(mut l) = acc.lock() {
                l.requests.push(key.clone());
            }
            let reply = match n {
                0 | 1 => "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                2 => {
                    unanswered.push(s);
                    continue;
                }
                _ => {
                    if let Ok(mut l) = acc.lock() {
                        l.accepted.push(key);
                    }
                    "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                }
            };
            let _ = s.write_all(reply.as_bytes());
        }
    });
    (url, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erp_receiver_failing_and_timing_out_still_gets_every_document_once() {
    let (url, log) = flaky_erp();
    // Progress every 30 units: PO-1 makes progress-30, -60, -90, completion, then close.
    let extra = format!("[erp]\nwebhook_url = \"{url}\"\nprogress_every_units = 30\n");
    let mes = Mes::start(MesOptions { plant: Some(plant()), extra_config: extra, ..Default::default() }).await;
    produce(&mes).await;
    let (s, _) = mes.post("/api/v1/orders/PO-1/close", json!({}), &[]).await;
    assert_eq!(s, 200);
    let want = ["PO-1-progress-30", "PO-1-progress-60", "PO-1-progress-90", "PO-1-completion", "PO-1-close"];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut saw_failing = false;
    let docs = loop {
        let (_, docs) = mes.get("/api/v1/erp/outbox").await;
        let docs = docs.as_array().cloned().unwrap_or_default();
        if docs.len() == want.len() && docs.iter().all(|d| d["status"] == "sent") {
            break docs;
        }
        assert!(std::time::Instant::now() < deadline, "documents not delivered: {docs:?}");
        if docs.iter().any(|d| d["status"] == "failing") {
            saw_failing = true;
            assert!(docs.iter().any(|d| d["last_error"].as_str().is_some_and(|e| !e.is_empty())), "{docs:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(saw_failing, "the outbox showed a failing document while the ERP failed");
    let ids: Vec<&str> = docs.iter().filter_map(|d| d["id"].as_str()).collect();
    assert_eq!(ids, want, "the outbox, oldest first");
    // The first document took the two failures and the timeout: four attempts.
    let attempts: Vec<i64> = docs.iter().map(|d| d["attempts"].as_i64().unwrap_or(-1)).collect();
    let log = log.lock().map(|l| l.clone()).unwrap_or_default();
    assert_eq!(attempts, vec![4, 1, 1, 1, 1], "{docs:?}\nthe ERP saw {log:?}");
    // Each document accepted exactly once, and in the order of its order's events.
    let mut per_key: BTreeMap<&str, usize> = BTreeMap::new();
    for k in &log.accepted {
        *per_key.entry(k.as_str()).or_default() += 1;
    }
    assert_eq!(per_key, want.iter().map(|k| (*k, 1)).collect::<BTreeMap<_, _>>(), "{log:?}");
    assert_eq!(log.accepted, want, "one order's documents arrive in order");
    // No document was even attempted before the one ahead of it was accepted.
    let expected_requests: Vec<&str> = [want[0]; 4].into_iter().chain(want[1..].iter().copied()).collect();
    assert_eq!(log.requests, expected_requests, "{log:?}");
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

/// The writer inserts telemetry without returning rows and trusts the insert's row count;
/// a batch holding a reading already stored (a redelivery no actor could tell, say after a
/// crash between commit and acknowledgement) is rolled back whole and committed again,
/// telling the stored row apart. Units, stock and books count each reading once, and every
/// job of the batch still completes (so its source is acknowledged). On SQLite, and on
/// PostgreSQL when `MES_TEST_DATABASE_URL` is set.
#[tokio::test]
async fn a_batch_with_an_already_stored_reading_is_redone_and_counts_once() {
    let dir = crate::harness::temp_dir();
    for url in sqlite_and_postgres(&dir, "redo").await {
        redo_on(&url, &dir).await;
    }
}

/// The writer takes the orders its own commits left as they are, checked in SQL with the
/// commit: an order a planner changed since (here its quantity) fails the check, the batch
/// is redone reading the orders, and the change counts (the order completes at its new
/// quantity); the next commit takes the order as that one left it, without a redo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_changed_between_commits_is_read_again() {
    let dir = crate::harness::temp_dir();
    for url in sqlite_and_postgres(&dir, "orders").await {
        order_changed_on(&url, &dir).await;
    }
}

async fn order_changed_on(url: &str, dir: &std::path::Path) {
    use mes::db::writer::Writer;
    use sqlx::Row;
    use std::sync::atomic::Ordering::Relaxed;
    let (store, ledger) = writer_store(url, dir, "orders", &plant()).await;
    sqlx::query(
        "INSERT INTO orders (id, sku, quantity, work_center, status, priority, created_ms, updated_ms)
         VALUES ('PO-1', 'WIDGET', 100, 'PRESS-1', 'released', 0, 0, 0)",
    )
    .execute(&store.pool)
    .await
    .expect("order");
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let metrics = Arc::new(mes::metrics::Metrics::default());
    let writer = tokio::spawn(Writer::new(store.clone(), rx, metrics.clone(), Default::default(), 16, ledger).run());
    // Each call is one batch: its readings queued at once, waited for until committed.
    let commit = |seqs: Vec<u64>| {
        let tx = tx.clone();
        let deltas: Vec<_> = seqs
            .into_iter()
            .map(|seq| {
                let mut d = crate::harness::counted_delta("PRESS-1", "press-01", seq, 3, 0);
                d.order = Some("PO-1".into());
                d
            })
            .collect();
        async move { commit_batch(&tx, deltas).await }
    };
    let order = || {
        let pool = store.pool.clone();
        async move {
            let r = sqlx::query("SELECT status, good, quantity FROM orders WHERE id = 'PO-1'")
                .fetch_one(&pool)
                .await
                .expect("order row");
            (r.get::<String, _>(0), r.get::<i64, _>(1), r.get::<i64, _>(2))
        }
    };
    let redone = || metrics.commits_redone.load(Relaxed);
    commit(vec![1, 2]).await;
    assert_eq!((order().await, redone()), (("running".to_string(), 6, 100), 0), "{url}");
    commit(vec![3]).await;
    assert_eq!((order().await, redone()), (("running".to_string(), 9, 100), 0), "{url}: taken as left");
    // The planner lowers the quantity: the writer's memory of the order is out of date.
    sqlx::query("UPDATE orders SET quantity = 12 WHERE id = 'PO-1'").execute(&store.pool).await.expect("quantity");
    commit(vec![4]).await;
    assert_eq!((order().await, redone()), (("completed".to_string(), 12, 12), 1), "{url}: read again, completed");
    let docs: i64 = sqlx::query("SELECT COUNT(*) FROM outbox WHERE doc_id = 'PO-1-completion'")
        .fetch_one(&store.pool)
        .await
        .and_then(|r| r.try_get(0))
        .expect("outbox");
    assert_eq!(docs, 1, "{url}: one completion document");
    commit(vec![5, 6]).await;
    assert_eq!((order().await, redone()), (("completed".to_string(), 18, 12), 1), "{url}: taken as the redo left it");
    drop(tx);
    writer.await.expect("writer stops");
}

/// The device time a restarted actor continues from (`Store::last_ts_of`) is moved with the
/// device's cursor in the commit (migration 0016): the newest reading that moved the cursor
/// and carried a time sets it, one without a time keeps it, a late reading of the previous
/// boot leaves it. On SQLite, and on PostgreSQL when
/// `MES_TEST_DATABASE_URL` is set.
#[tokio::test]
async fn the_last_device_time_moves_with_the_cursor() {
    let dir = crate::harness::temp_dir();
    for url in sqlite_and_postgres(&dir, "last-ts").await {
        last_ts_on(&url, &dir).await;
    }
}

async fn last_ts_on(url: &str, dir: &std::path::Path) {
    use mes::db::writer::Writer;
    use mes_actors::counter::Cursor;
    let (store, ledger) = writer_store(url, dir, "last-ts", &plant()).await;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let metrics = Arc::new(mes::metrics::Metrics::default());
    let writer = tokio::spawn(Writer::new(store.clone(), rx, metrics, Default::default(), 16, ledger).run());
    // Boot 1, 3 good a reading; `ts` the device time, if any.
    let reading = |seq: u64, ts: Option<i64>| {
        let mut d = crate::harness::counted_delta("PRESS-1", "press-01", seq, 3, 0);
        d.ts_ms = ts;
        d
    };
    // Each call is one batch: its readings queued at once, waited for until committed.
    let commit = |deltas: Vec<mes_actors::Delta>| {
        let tx = tx.clone();
        async move { commit_batch(&tx, deltas).await }
    };
    let last = || store.last_ts_of("press-01");
    assert_eq!(last().await.expect("read"), None, "{url}: no reading yet");
    commit(vec![reading(1, None)]).await;
    assert_eq!(last().await.expect("read"), None, "{url}: no reading with a time yet");
    commit(vec![reading(2, Some(2_000)), reading(3, Some(3_000)), reading(4, None)]).await;
    assert_eq!(last().await.expect("read"), Some(3_000), "{url}: the newest that had one");
    commit(vec![reading(5, None)]).await;
    assert_eq!(last().await.expect("read"), Some(3_000), "{url}: kept by a reading without one");
    commit(vec![reading(6, Some(6_000))]).await;
    assert_eq!(last().await.expect("read"), Some(6_000), "{url}");
    // The device restarts (boot 2), then a reading of boot 1 arrives late: it counts what it
    // adds, keeps the cursor of boot 2, and is no newer than boot 2's readings.
    let mut first = crate::harness::counted_delta("PRESS-1", "press-01", 1, 1, 0);
    (first.boot, first.ts_ms, first.restarted) = (2, Some(9_000), true);
    first.cursor = Cursor { boot: 2, seq: 1, good: 1, scrap: 0 };
    first.prev_boot = Some(Cursor { boot: 1, seq: 6, good: 18, scrap: 0 });
    commit(vec![first.clone()]).await;
    assert_eq!(last().await.expect("read"), Some(9_000), "{url}: boot 2's first reading");
    let mut late = reading(7, Some(7_000));
    late.cursor = first.cursor;
    late.prev_boot = Some(Cursor { boot: 1, seq: 7, good: 21, scrap: 0 });
    commit(vec![late]).await;
    assert_eq!(last().await.expect("read"), Some(9_000), "{url}: the late reading of boot 1 leaves it");
    let w = store.work_center("PRESS-1").await.expect("read").expect("exists");
    assert_eq!(w.good_total, 22, "{url}: seqs 1-6 of boot 1, its late seq 7, boot 2's first");
    drop(tx);
    writer.await.expect("writer stops");
}

/// Migration 0016 gives each device cursor the device time the old read found: the newest
/// reading with a time among the device's 16 newest packs, else in its whole history, else
/// none. On SQLite, and on PostgreSQL when `MES_TEST_DATABASE_URL` is set.
#[tokio::test]
async fn migration_0016_keeps_the_last_device_time_the_packs_held() {
    use sqlx::Executor;
    let dir = crate::harness::temp_dir();
    for url in sqlite_and_postgres(&dir, "last-ts-migration").await {
        let store = mes::db::Store::connect(&url, 1).await.expect("connect");
        let run = |sql: String| {
            let pool = store.pool.clone();
            async move { pool.execute(sqlx::AssertSqlSafe(sql.clone())).await.unwrap_or_else(|e| panic!("{sql}: {e}")) }
        };
        let (before, after) = migrations_split(&url, "0016");
        for f in &before {
            run(std::fs::read_to_string(f).expect("migration file")).await;
        }
        // press-01: its newest pack's first reading has a time, its second none.
        // press-02: a time only in its oldest pack, 16 newer packs without one.
        // press-03: never a time.
        let pack = |device: &str, seq: u64, ts: Option<i64>| {
            let ts = ts.map_or("null".to_string(), |t| t.to_string());
            format!(
                "INSERT INTO telemetry_packs (device, work_center, t_min, t_max, last_boot, last_seq, n, readings)
                 VALUES ('{device}', 'PRESS-1', 1, 1, 1, {seq}, 1, '[[1,{seq},null,{ts},1,1,0,\"running\",null]]')"
            )
        };
        run(pack("press-01", 1, Some(1_000))).await;
        run("INSERT INTO telemetry_packs (device, work_center, t_min, t_max, last_boot, last_seq, n, readings)
             VALUES ('press-01', 'PRESS-1', 1, 2, 1, 3, 2,
                     '[[1,2,null,2000,1,1,0,\"running\",null],[1,3,null,null,2,1,0,\"running\",null]]')"
            .to_string())
        .await;
        run(pack("press-02", 1, Some(500))).await;
        for seq in 2..=17 {
            run(pack("press-02", seq, None)).await;
        }
        run(pack("press-03", 1, None)).await;
        for (device, seq) in [("press-01", 3), ("press-02", 17), ("press-03", 1)] {
            run(format!(
                "INSERT INTO device_cursors (device, boot, seq, good, scrap, updated_ms) VALUES ('{device}', 1, {seq}, {seq}, 0, 0)"
            ))
            .await;
        }
        for f in &after {
            run(std::fs::read_to_string(f).expect("migration file")).await;
        }
        for (device, want) in [("press-01", Some(2_000)), ("press-02", Some(500)), ("press-03", None)] {
            assert_eq!(store.last_ts_of(device).await.expect("read"), want, "{url}: {device}");
        }
        store.pool.close().await;
    }
}

/// Queues `deltas` to a running writer at once (one batch, as the writer finds them) and
/// waits until each is committed.
async fn commit_batch(tx: &tokio::sync::mpsc::Sender<mes::db::writer::Job>, deltas: Vec<mes_actors::Delta>) {
    let mut done = Vec::new();
    for d in deltas {
        let (ok, r) = tokio::sync::oneshot::channel();
        tx.send(crate::harness::counted_job(d, ok)).await.expect("queue");
        done.push(r);
    }
    for r in done {
        r.await.expect("committed");
    }
}

/// The migration files of `url`'s database in order, split into those numbered before
/// `first` and the rest (tests that store data as an older schema held it, then migrate).
fn migrations_split(url: &str, first: &str) -> (Vec<std::path::PathBuf>, Vec<std::path::PathBuf>) {
    let backend = if url.starts_with("sqlite") { "sqlite" } else { "postgres" };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations").join(backend);
    let mut files: Vec<_> = std::fs::read_dir(&dir).expect("migrations").map(|e| e.expect("entry").path()).collect();
    files.sort();
    files.into_iter().partition(|f| f.file_name().is_some_and(|n| n.to_string_lossy().as_ref() < first))
}

/// A migrated store at `url` with the master data of `plant` (written to
/// `{name}-plant.toml` in `dir`), and its ledger: what a writer under test needs.
async fn writer_store(
    url: &str,
    dir: &std::path::Path,
    name: &str,
    plant: &str,
) -> (mes::db::Store, Arc<mes::settlement::Ledger>) {
    let plant_path = dir.join(format!("{name}-plant.toml"));
    std::fs::write(&plant_path, plant).expect("plant");
    let plant = mes::plant::Plant::load(Some(&plant_path)).expect("plant loads");
    let store = mes::db::Store::connect(url, 4).await.expect("connect");
    store.migrate().await.expect("migrate");
    store.upsert_plant(&plant).await.expect("master data");
    let ledger = Arc::new(mes::settlement::Ledger::from_plant(&plant));
    (store, ledger)
}

/// A fresh SQLite file `{name}.db` in `dir`, and a fresh PostgreSQL database when
/// `MES_TEST_DATABASE_URL` is set: the writer tests run on both.
pub(crate) async fn sqlite_and_postgres(dir: &std::path::Path, name: &str) -> Vec<String> {
    let mut urls = vec![format!("sqlite://{}", dir.join(format!("{name}.db")).display())];
    if std::env::var("MES_TEST_DATABASE_URL").is_ok_and(|s| !s.is_empty()) {
        urls.push(crate::harness::fresh_database(dir).await);
    }
    urls
}

async fn redo_on(url: &str, dir: &std::path::Path) {
    use mes::db::writer::Writer;
    use std::sync::atomic::Ordering::Relaxed;
    let (store, ledger) = writer_store(url, dir, "redo", &plant()).await;
    let job = |seq: u64, done| {
        crate::harness::counted_job(crate::harness::counted_delta("PRESS-1", "press-01", seq, 3, 1), done)
    };
    // One writer per batch: a batch is what the writer finds queued when it starts.
    let batch = |seqs: Vec<u64>| {
        let (store, ledger) = (store.clone(), ledger.clone());
        async move {
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            let metrics = Arc::new(mes::metrics::Metrics::default());
            let mut done = Vec::new();
            for s in seqs {
                let (d, r) = tokio::sync::oneshot::channel();
                tx.send(job(s, d)).await.expect("queue");
                done.push(r);
            }
            drop(tx);
            Writer::new(store, rx, metrics.clone(), Default::default(), 16, ledger).run().await;
            let mut completed = 0;
            for r in done {
                completed += usize::from(r.await.is_ok());
            }
            (completed, metrics.commits.load(Relaxed), metrics.commits_redone.load(Relaxed))
        }
    };
    assert_eq!(batch(vec![1, 2]).await, (2, 1, 0), "{url}: two new readings, one commit");
    // Seq 2 is stored already: the fast insert falls short, the batch is redone.
    assert_eq!(batch(vec![2, 3, 4]).await, (3, 1, 1), "{url}: one commit, after one redo");
    let w = store.work_center("PRESS-1").await.expect("read").expect("exists");
    assert_eq!((w.good_total, w.scrap_total), (12, 4), "{url}: seqs 1-4 once each");
    let one = |sql: &'static str| {
        let pool = store.pool.clone();
        async move {
            use sqlx::Row;
            sqlx::query(sql).fetch_one(&pool).await.and_then(|r| r.try_get::<i64, _>(0)).expect(sql)
        }
    };
    assert_eq!(one("SELECT COUNT(*) FROM telemetry").await, 4, "{url}");
    // 4 readings x (3 good + 1 scrap) x 2 SHEET each taken from RM; 12 WIDGET into FG.
    assert_eq!(one("SELECT on_hand FROM buffers WHERE id = 'RM'").await, 50_000 - 32, "{url}");
    assert_eq!(one("SELECT on_hand FROM buffers WHERE id = 'FG'").await, 12, "{url}");
    assert_eq!(
        one("SELECT CAST(COALESCE(SUM(qty), 0) AS BIGINT) FROM stock_movements WHERE source_kind = 'telemetry'").await,
        12 - 32,
        "{url}"
    );
    assert_eq!(one("SELECT COUNT(*) FROM device_cursors WHERE device = 'press-01' AND seq = 4").await, 1, "{url}");
    // The batch redone posted nothing twice: material issued is 32 sheets at 1.20 = 38.40
    // (minor units of 1/10,000).
    assert_eq!(
        one("SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM journal WHERE source_kind = 'telemetry' AND kind = 'material_issue'")
            .await,
        384_000,
        "{url}"
    );
}

/// Telemetry stored before packing (one row per reading, migrations 0001–0011) reads back
/// through the `telemetry` view exactly as it was stored, ids kept, once migration 0012
/// has packed it, and migration 0013 gives each pack the sums of its readings' good and
/// scrap units; the next pack's id follows the highest. On SQLite, and on PostgreSQL
/// when `MES_TEST_DATABASE_URL` is set.
#[tokio::test]
async fn telemetry_stored_before_packing_reads_back_the_same() {
    use sqlx::{Executor, Row};
    let dir = crate::harness::temp_dir();
    for url in sqlite_and_postgres(&dir, "packing").await {
        let store = mes::db::Store::connect(&url, 1).await.expect("connect");
        let backend = if url.starts_with("sqlite") { "sqlite" } else { "postgres" };
        let run = |name: &std::path::Path| {
            let (pool, sql) = (store.pool.clone(), std::fs::read_to_string(name).expect("migration file"));
            async move { pool.execute(sqlx::AssertSqlSafe(sql)).await.expect("migration runs") }
        };
        let (before, packing) = migrations_split(&url, "0012");
        for f in &before {
            run(f).await;
        }
        // ids 7, 9, 12: gaps as a rolled-back insert leaves them.
        type Old = (
            i64,
            &'static str,
            i64,
            i64,
            &'static str,
            Option<&'static str>,
            Option<i64>,
            i64,
            i64,
            i64,
            &'static str,
            Option<&'static str>,
        );
        let old: [Old; 3] = [
            (
                7,
                "press-01",
                1,
                1,
                "PRESS-1",
                Some("PO-1"),
                Some(1_700_000_000_123),
                1_700_000_000_200,
                5,
                1,
                "running",
                Some(r#"{"temp_c":71.5}"#),
            ),
            (9, "press-02", 2, 40, "PRESS-2", None, None, 1_700_000_000_300, 0, 0, "idle", None),
            (
                12,
                "press-01",
                1,
                2,
                "PRESS-1",
                Some("PO-1"),
                Some(1_700_000_001_000),
                1_700_000_001_050,
                7,
                0,
                "down",
                None,
            ),
        ];
        for o in &old {
            let sql = match backend {
                "sqlite" => "INSERT INTO telemetry (id, device, boot, seq, work_center, order_id, ts_ms, received_ms, good, scrap, state, metrics)
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                _ => "INSERT INTO telemetry (id, device, boot, seq, work_center, order_id, ts_ms, received_ms, good, scrap, state, metrics)
                      OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            };
            sqlx::query(sql)
                .bind(o.0)
                .bind(o.1)
                .bind(o.2)
                .bind(o.3)
                .bind(o.4)
                .bind(o.5)
                .bind(o.6)
                .bind(o.7)
                .bind(o.8)
                .bind(o.9)
                .bind(o.10)
                .bind(o.11)
                .execute(&store.pool)
                .await
                .expect("old row");
        }
        for f in &packing {
            run(f).await;
        }
        let rows = sqlx::query(
            "SELECT id, device, boot, seq, work_center, order_id, ts_ms, received_ms, good, scrap, state, metrics, pos
             FROM telemetry ORDER BY id",
        )
        .fetch_all(&store.pool)
        .await
        .expect("view");
        type Fields = (
            Option<String>,
            i64,
            i64,
            Option<String>,
            Option<String>,
            Option<i64>,
            i64,
            i64,
            i64,
            Option<String>,
            Option<serde_json::Value>,
        );
        type Row = ((i64, i64), Fields);
        let json = |m: Option<String>| m.map(|m| serde_json::from_str::<serde_json::Value>(&m).expect("metrics JSON"));
        let got: Vec<Row> = rows
            .iter()
            .map(|r| {
                let text = |c: &str| r.try_get::<Option<String>, _>(c).expect(c);
                let int = |c: &str| r.try_get::<i64, _>(c).expect(c);
                let fields = (
                    text("device"),
                    int("boot"),
                    int("seq"),
                    text("work_center"),
                    text("order_id"),
                    r.try_get::<Option<i64>, _>("ts_ms").expect("ts_ms"),
                    int("received_ms"),
                    int("good"),
                    int("scrap"),
                    text("state"),
                    json(text("metrics")),
                );
                ((int("id"), int("pos")), fields)
            })
            .collect();
        let s = |t: &str| Some(t.to_string());
        let want: Vec<Row> = old
            .iter()
            .map(|o| {
                let fields = (
                    s(o.1),
                    o.2,
                    o.3,
                    s(o.4),
                    o.5.map(str::to_string),
                    o.6,
                    o.7,
                    o.8,
                    o.9,
                    s(o.10),
                    json(o.11.map(str::to_string)),
                );
                ((o.0, 0), fields)
            })
            .collect();
        assert_eq!(got, want, "{url}");
        // Migration 0013: each pack's sums of good and scrap units.
        let sums: Vec<(i64, i64, i64)> = sqlx::query("SELECT id, good, scrap FROM telemetry_packs ORDER BY id")
            .fetch_all(&store.pool)
            .await
            .expect("pack sums")
            .iter()
            .map(|r| {
                (r.try_get("id").expect("id"), r.try_get("good").expect("good"), r.try_get("scrap").expect("scrap"))
            })
            .collect();
        assert_eq!(sums, vec![(7, 5, 1), (9, 0, 0), (12, 7, 0)], "{url}");
        let next: i64 = sqlx::query(
            "INSERT INTO telemetry_packs (device, work_center, t_min, t_max, last_boot, last_seq, n, readings)
             VALUES ('press-01', 'PRESS-1', 1, 1, 1, 3, 1, '[[1,3,null,null,1,0,0,\"running\",null]]') RETURNING id",
        )
        .fetch_one(&store.pool)
        .await
        .expect("a new pack")
        .try_get("id")
        .expect("id");
        assert_eq!(next, 13, "{url}: ids go on after the highest");
        store.pool.close().await;
    }
}

/// A batch spanning 6,000 devices (a restart after an outage of a large plant: the broker
/// hands back a backlog of every device at once, and `ingest.batch_max` was raised) commits
/// in one go. Its stock movements, journal lines and device cursors as one statement each
/// would take more values than SQLite allows in a statement (32,766), and the commit would
/// fail on every retry. One Modbus device polled twice in the batch keeps its newest raw
/// registers (PostgreSQL refuses an upsert that touches one row twice). On SQLite, and on
/// PostgreSQL when `MES_TEST_DATABASE_URL` is set.
#[tokio::test]
async fn a_batch_spanning_six_thousand_devices_commits_whole() {
    let dir = crate::harness::temp_dir();
    for url in sqlite_and_postgres(&dir, "wide").await {
        wide_batch_on(&url, &dir).await;
    }
}

async fn wide_batch_on(url: &str, dir: &std::path::Path) {
    use mes::db::writer::Writer;
    use mes_actors::counter::RawCounters;
    use std::sync::atomic::Ordering::Relaxed;
    const N: usize = 6_000;
    // The widget plant with N presses instead of one.
    let one = widget_plant(r#"{ mqtt = { id = "press-01" } }"#);
    let head = &one[..one.find("[[work_centers]]").expect("work center")];
    let mut plant = head.to_string();
    for i in 0..N {
        plant.push_str(&format!(
            "[[work_centers]]\nid = \"WC-{i:04}\"\nname = \"Press {i}\"\nideal_cycle_s = 1.0\n\
             conversion_rate_per_hour = \"60.00\"\ninputs = [\"RM\"]\noutput = \"FG\"\n\
             device = {{ mqtt = {{ id = \"d-{i:04}\" }} }}\n"
        ));
    }
    let (store, ledger) = writer_store(url, dir, "wide", &plant).await;
    let (tx, rx) = tokio::sync::mpsc::channel(N + 1);
    let metrics = Arc::new(mes::metrics::Metrics::default());
    let mut done = Vec::new();
    // Every device once (seq 1), device 0 twice in a row (seq 1, 2: its two polls in one
    // statement's rows), each with its raw registers.
    let readings = [(0, 1), (0, 2)].into_iter().chain((1..N).map(|i| (i, 1)));
    for (i, seq) in readings {
        let (d, r) = tokio::sync::oneshot::channel();
        let device = format!("d-{i:04}");
        let delta = crate::harness::counted_delta(&format!("WC-{i:04}"), &device, seq, 3, 1);
        let raw = RawCounters { good: 3 * seq, scrap: seq, boot: Some(1) };
        let job = mes::db::writer::Job { raw: Some((device, raw)), ..crate::harness::counted_job(delta, d) };
        tx.send(job).await.expect("queue");
        done.push(r);
    }
    drop(tx);
    // The writer takes everything queued as one batch (batch_max above N).
    let writer = Writer::new(store.clone(), rx, metrics.clone(), Default::default(), 10_000, ledger);
    tokio::time::timeout(Duration::from_secs(60), writer.run()).await.expect("writer finishes");
    let mut completed = 0;
    for r in done {
        completed += usize::from(r.await.is_ok());
    }
    assert_eq!(
        (completed, metrics.commits.load(Relaxed), metrics.commit_errors.load(Relaxed)),
        (N + 1, 1, 0),
        "{url}: every job, one commit, no error"
    );
    let one = |sql: &'static str| {
        let pool = store.pool.clone();
        async move {
            use sqlx::Row;
            sqlx::query(sql).fetch_one(&pool).await.and_then(|r| r.try_get::<i64, _>(0)).expect(sql)
        }
    };
    let (n, r) = (N as i64, N as i64 + 1);
    assert_eq!(one("SELECT COUNT(*) FROM telemetry").await, r, "{url}");
    assert_eq!(one("SELECT CAST(SUM(good_total) AS BIGINT) FROM work_centers").await, 3 * r, "{url}");
    // Each reading: 3 good + 1 scrap, 2 SHEET each taken from RM; 3 WIDGET into FG.
    assert_eq!(one("SELECT on_hand FROM buffers WHERE id = 'RM'").await, 50_000 - 8 * r, "{url}");
    assert_eq!(one("SELECT on_hand FROM buffers WHERE id = 'FG'").await, 3 * r, "{url}");
    // Per device and batch: one RM and one FG movement, journal lines from one source.
    assert_eq!(one("SELECT COUNT(*) FROM stock_movements WHERE source_kind = 'telemetry'").await, 2 * n, "{url}");
    assert_eq!(one("SELECT COUNT(DISTINCT source_id) FROM journal WHERE source_kind = 'telemetry'").await, n, "{url}");
    assert_eq!(one("SELECT COUNT(*) FROM device_cursors").await, n, "{url}");
    assert_eq!(one("SELECT seq FROM device_cursors WHERE device = 'd-0000'").await, 2, "{url}");
    assert_eq!(one("SELECT COUNT(*) FROM modbus_raw").await, n, "{url}");
    assert_eq!(one("SELECT good FROM modbus_raw WHERE device = 'd-0000'").await, 6, "{url}: the newest poll");
}
