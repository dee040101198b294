//! The planner's API: the auth matrix over every documented route, OEE of a scripted run
//! against a hand computation, surge plans, order lists, the audit log, and a seeded fuzz
//! run that must never produce a 5xx.

use crate::harness::{widget_plant, Device, Lcg, Mes, MesOptions};
use serde_json::{json, Value};

const TOKENS: &str = r#"
[[auth.tokens]]
name = "v"
role = "viewer"
token = "viewer-token-123"
[[auth.tokens]]
name = "o"
role = "operator"
token = "operator-token-123"
[[auth.tokens]]
name = "p"
role = "planner"
token = "planner-token-123"
[[auth.tokens]]
name = "a"
role = "admin"
token_sha256 = "f0bd7f5ecfa4d4ad1d5ac52bc3a4dfb35c15a1d8ee0e5e4cf6ac7e38fb8b1c3d"
"#;

/// sha256("admin-token-123") is in TOKENS above; the test checks it.
const ADMIN: &str = "admin-token-123";

fn rank(role: &str) -> u8 {
    match role {
        "viewer" => 1,
        "operator" => 2,
        "planner" => 3,
        "admin" => 4,
        _ => 0,
    }
}

/// Every (method, path, least role) the served OpenAPI document lists.
async fn documented(mes: &Mes) -> Vec<(String, String, Option<String>)> {
    let (s, doc) = mes.get("/openapi.json").await;
    assert_eq!(s, 200);
    let mut out = Vec::new();
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        for (method, op) in ops.as_object().expect("ops") {
            let role = op["description"]
                .as_str()
                .and_then(|d| d.strip_prefix("Role: "))
                .and_then(|d| d.split(' ').next())
                .map(str::to_string);
            out.push((method.to_ascii_uppercase(), path.clone(), role));
        }
    }
    out.sort();
    out
}

fn concrete(path: &str) -> String {
    let mut out = String::new();
    let mut in_param = false;
    for c in path.chars() {
        match c {
            '{' => in_param = true,
            '}' => {
                in_param = false;
                out.push_str("NOPE-1");
            }
            _ if in_param => {}
            c => out.push(c),
        }
    }
    out
}

async fn send(mes: &Mes, method: &str, path: &str, token: Option<&str>, body: Option<&[u8]>) -> (u16, Value) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut req = mes.client.request(m, format!("{}{path}", mes.http)).timeout(std::time::Duration::from_secs(10));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b.to_vec());
    }
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    if status == 200 && path.contains("/events") {
        return (status, Value::Null); // a stream: the status is enough
    }
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_matrix_over_every_documented_route_and_role() {
    use sha2::Digest;
    let hex: String = sha2::Sha256::digest(ADMIN.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    let tokens = TOKENS.replace("f0bd7f5ecfa4d4ad1d5ac52bc3a4dfb35c15a1d8ee0e5e4cf6ac7e38fb8b1c3d", &hex);
    let mes = Mes::start(MesOptions { extra_config: tokens, ..Default::default() }).await;
    let routes = documented(&mes).await;
    assert!(routes.len() >= 36, "{} routes documented", routes.len());
    let callers: [(&str, Option<&str>); 6] = [
        ("none", None),
        ("bad", Some("not-a-token-at-all")),
        ("viewer", Some("viewer-token-123")),
        ("operator", Some("operator-token-123")),
        ("planner", Some("planner-token-123")),
        ("admin", Some(ADMIN)),
    ];
    let mut checked = 0;
    for (method, path, role) in &routes {
        let url = concrete(path);
        for (who, token) in callers {
            // An empty object: a write an allowed caller makes is rejected for its body or
            // its unknown id, so the matrix changes nothing.
            let body = (method != "GET").then_some(&b"{}"[..]);
            let (s, v) = send(&mes, method, &url, token, body).await;
            let want = match role.as_deref() {
                None => None,
                Some(_) if rank(who) == 0 => Some(401),
                Some(r) if rank(who) < rank(r) => Some(403),
                Some(_) => None,
            };
            match want {
                Some(code) => {
                    assert_eq!(s, code, "{who} {method} {url}: {v}");
                    let expect = if code == 401 { "unauthorized" } else { "forbidden" };
                    assert_eq!(v["error"]["code"], expect, "{who} {method} {url}");
                }
                None => {
                    // (`/readyz` may say 503 while the broker connects.)
                    let ok = s != 401 && s != 403 && (s < 500 || url == "/readyz");
                    assert!(ok, "{who} {method} {url}: {s} {v}");
                    // Every documented route exists.
                    let no_route = v["error"]["message"].as_str().is_some_and(|m| m.starts_with("no route"));
                    assert!(!no_route, "{method} {path} is documented but not served");
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, routes.len() * 6);
    // Nothing changed: no order, no reservation, and not one audit line.
    let (_, orders) = send(&mes, "GET", "/api/v1/orders", Some("viewer-token-123"), None).await;
    assert_eq!(orders, json!([]));
    let (s, audit) = send(&mes, "GET", "/api/v1/audit", Some(ADMIN), None).await;
    assert_eq!((s, audit), (200, json!([])));
    // An undocumented route is not served.
    let (s, v) = send(&mes, "GET", "/api/v1/secret-things", Some(ADMIN), None).await;
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("not_found")));
}

/// Unix ms of 2026-11-20T08:00:00Z, the start of the scripted hour.
const T0: i64 = 1_795_680_000_000;

fn at(s: i64) -> String {
    let t = chrono::DateTime::from_timestamp_millis(T0 + s * 1000).expect("time");
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// One scripted reading a row, (second, state, reason, good, scrap) with cumulative counters,
/// published by `press-01` (boot 1, seq from 1) and committed (totals 1400 good, 10 scrap).
async fn publish_script(mes: &Mes, dev: &mut Device, at: &dyn Fn(i64) -> String, script: &[Scripted]) {
    for (i, (sec, state, reason, good, scrap)) in script.iter().enumerate() {
        let payload = json!({"boot": 1, "seq": i + 1, "ts": at(*sec), "state": state, "reason": reason,
                             "good": good, "scrap": scrap});
        dev.publish_raw("press-01", payload.to_string()).await;
    }
    dev.flush().await;
    assert_eq!(mes.wait_totals("PRESS-1", (1400, 10)).await, (1400, 10));
}

type Scripted = (i64, &'static str, Option<&'static str>, u64, u64);

/// The live OEE shown with a work center is kept from new rows only (`mes::oee_live`); it
/// must equal `GET …/oee`, computed from the table, over the same window. The scripted hour
/// below, ending just before now, so that the live window holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_oee_equals_the_oee_computed_from_the_table_over_its_window() {
    let plant = widget_plant(r#"{ mqtt = { id = "press-01" } }"#);
    let mes = Mes::start(MesOptions { plant: Some(plant), ..Default::default() }).await;
    let mut dev = mes.device("live-oee");
    let base = chrono::Utc::now().timestamp_millis() - 3_560_000;
    let at = |s: i64| mes::http::rfc3339(base + s * 1000);
    let script: [(i64, &str, Option<&str>, u64, u64); 8] = [
        (0, "setup", Some("changeover"), 0, 0),
        (600, "running", None, 0, 0),
        (900, "running", None, 300, 5),
        (1800, "idle", Some("starved"), 700, 5),
        (1920, "running", None, 700, 5),
        (2400, "down", Some("jam"), 1100, 8),
        (3000, "running", None, 1100, 8),
        (3500, "running", None, 1400, 10),
    ];
    publish_script(&mes, &mut dev, &at, &script).await;
    let committed = chrono::Utc::now().timestamp_millis();
    // The first refresh that began after the commit (every 5 s).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let live = loop {
        let (_, w) = mes.get("/api/v1/work-centers/PRESS-1").await;
        let to = w["oee"]["to"].as_str().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
        if to.is_some_and(|t| t.timestamp_millis() > committed + 1000) {
            break w["oee"].clone();
        }
        assert!(std::time::Instant::now() < deadline, "no live OEE refreshed after the commit: {w}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let (from, to) = (live["from"].as_str().unwrap_or_default(), live["to"].as_str().unwrap_or_default());
    let window = live["window_s"].as_i64().unwrap_or_default();
    assert!((3600..3660).contains(&window), "{live}");
    let (s, o) = mes.get(&format!("/api/v1/work-centers/PRESS-1/oee?from={from}&to={to}")).await;
    assert_eq!(s, 200, "{o}");
    for k in ["availability", "performance", "quality", "oee"] {
        assert_eq!(live[k], o[k], "{k}: live {live} / table {o}");
    }
    // Every reading is inside the window: quality 1400 / 1410.
    assert_eq!(o["quality"].as_f64(), Some(0.9929), "{o}");
    assert_eq!((o["good"].as_u64(), o["scrap"].as_u64()), (Some(1400), Some(10)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oee_of_a_scripted_hour_equals_the_hand_computation() {
    let plant = widget_plant(r#"{ mqtt = { id = "press-01" } }"#);
    let mes = Mes::start(MesOptions { plant: Some(plant), ..Default::default() }).await;
    let mut dev = mes.device("oee");
    // (second, state, reason, good, scrap): cumulative counters, ideal cycle 1 s.
    let script: [(i64, &str, Option<&str>, u64, u64); 9] = [
        (0, "setup", Some("changeover"), 0, 0),
        (600, "running", None, 0, 0),
        (900, "running", None, 200, 5),
        (1800, "idle", Some("starved"), 700, 5),
        (1920, "running", None, 700, 5),
        (2400, "down", Some("jam"), 1100, 8),
        (3000, "running", None, 1100, 8),
        (3300, "running", None, 1300, 10),
        (3500, "stopped", Some("end_of_shift"), 1400, 10),
    ];
    publish_script(&mes, &mut dev, &at, &script).await;
    let (s, o) = mes.get(&format!("/api/v1/work-centers/PRESS-1/oee?from={}&to={}", at(0), at(3600))).await;
    assert_eq!(s, 200, "{o}");
    // By hand, over [0 s, 3600 s):
    //   setup 0–600 (600 s), running 600–1800, idle 1800–1920 (120 s < 5 min: a micro
    //   stop), running 1920–2400, down 2400–3000 (600 s), running 3000–3500, stopped
    //   3500–3600 (100 s, planned downtime, excluded).
    //   planned busy = 3600 − 100 = 3500 s; run = 3500 − 600 − 600 = 2300 s.
    //   good 1400, scrap 10, total 1410.
    //   A = 2300/3500 = 0.6571; P = 1410 × 1 s / 2300 s = 0.6130; Q = 1400/1410 = 0.9929;
    //   OEE = 1400 × 1 s / 3500 s = 0.4.
    //   reduced speed = 2300 − 120 − 1410 = 770 s.
    //   start-up rejects: scrap within 10 min of entering running from setup (600 s: the
    //   5 at 900 s) or from down (3000 s: the 2 at 3300 s) = 7; production rejects 3 (at 2400 s).
    assert_eq!(o["availability"].as_f64(), Some(0.6571));
    assert_eq!(o["performance"].as_f64(), Some(0.613));
    assert_eq!(o["quality"].as_f64(), Some(0.9929));
    assert_eq!(o["oee"].as_f64(), Some(0.4));
    assert_eq!((o["good"].as_u64(), o["scrap"].as_u64()), (Some(1400), Some(10)));
    assert_eq!(o["planned_busy_ms"], 3_500_000);
    assert_eq!(o["run_ms"], 2_300_000);
    assert_eq!(o["planned_downtime_ms"], 100_000);
    let l = &o["losses"];
    assert_eq!(l["breakdowns_ms"], 600_000);
    assert_eq!(l["setup_changeover_ms"], 600_000);
    assert_eq!(l["micro_stops_ms"], 120_000);
    assert_eq!(l["reduced_speed_ms"], 770_000);
    assert_eq!(l["startup_rejects"], 7);
    assert_eq!(l["production_rejects"], 3);
    let by_reason = o["downtime_by_reason"].as_array().expect("downtime_by_reason");
    let find = |st: &str| by_reason.iter().find(|r| r["state"] == st).map(|r| (r["reason"].clone(), r["ms"].clone()));
    assert_eq!(find("down"), Some((json!("jam"), json!(600_000))));
    assert_eq!(find("setup"), Some((json!("changeover"), json!(600_000))));
    assert_eq!(find("idle"), Some((json!("starved"), json!(120_000))));
    // A window in the future or reversed is refused with a clear error.
    let (s, e) = mes.get(&format!("/api/v1/work-centers/PRESS-1/oee?from={}&to={}", at(3600), at(0))).await;
    assert_eq!((s, e["error"]["code"].as_str()), (400, Some("invalid_window")));
    let (s, _) = mes.get("/api/v1/work-centers/NOPE/oee").await;
    assert_eq!(s, 404);
}

fn due_in(hours: i64) -> String {
    let t = chrono::Utc::now() + chrono::Duration::hours(hours);
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn surge_plan_names_the_bottleneck_and_short_materials_and_releases_once() {
    let mes = Mes::start(MesOptions::default()).await;
    // 300,000 boxed bases in an hour: far above capacity and above motor and carton stock.
    let (s, p) =
        mes.post("/api/v1/surge-plans", json!({"sku": "BASE-BOXED", "quantity": 300000, "due": due_in(1)}), &[]).await;
    assert_eq!(s, 201, "{p}");
    assert_eq!(p["feasible"], false);
    // Net requirements down the BOM: ASSY 300,000 − 200 in stock = 299,800 at the 1.0 s
    // cycle is the highest load (PACK 300,000 × 0.8 s, FORM 299,300 × 1 s, BLANK
    // 596,600 × 0.5 s).
    assert_eq!(p["bottleneck"], "ASSY-1");
    let req = |sku: &str| p["requirements"].as_array().and_then(|a| a.iter().find(|r| r["sku"] == sku).cloned());
    assert_eq!(req("BASE-ASSY").map(|r| r["net"].clone()), Some(json!(299800)));
    assert_eq!(req("HOUSING").map(|r| r["net"].clone()), Some(json!(299300)));
    assert_eq!(req("BLANK").map(|r| r["net"].clone()), Some(json!(596600)));
    assert_eq!(req("MOTOR").map(|r| r["shortfall"].clone()), Some(json!(99800)));
    assert_eq!(req("CARTON").map(|r| r["shortfall"].clone()), Some(json!(100000)));
    assert_eq!(req("COIL-STEEL").map(|r| r["shortfall"].clone()), Some(json!(0)));
    let wc = |id: &str| p["work_centers"].as_array().and_then(|a| a.iter().find(|w| w["id"] == id).cloned());
    let assy = wc("ASSY-1").expect("ASSY-1 load");
    assert_eq!(assy["required_units"], 299800);
    assert_eq!(assy["oee_source"], "default");
    // Capacity = horizon × OEE 0.6 / 1.0 s, and what does not fit is short.
    let horizon = p["horizon_ms"].as_i64().expect("horizon");
    let cap = horizon * 600_000 / 1_000_000 / 1000;
    assert_eq!(assy["capacity_units"].as_i64(), Some(cap));
    assert_eq!(assy["short_units"].as_i64(), Some(299800 - cap));

    // A plan that fits: 1,000 boxed bases in a day.
    let (s, p) =
        mes.post("/api/v1/surge-plans", json!({"sku": "BASE-BOXED", "quantity": 1000, "due": due_in(24)}), &[]).await;
    assert_eq!(s, 201, "{p}");
    assert_eq!(p["feasible"], true);
    let id = p["id"].as_str().expect("plan id").to_string();
    // PACK 1000; ASSY 1000 − 200 = 800; FORM 800 − 500 = 300; BLANK 600 − 2000 → none.
    let proposed: Vec<(String, i64)> = p["proposed_orders"]
        .as_array()
        .expect("proposed")
        .iter()
        .map(|o| (o["work_center"].as_str().unwrap_or("").to_string(), o["quantity"].as_i64().unwrap_or(0)))
        .collect();
    assert_eq!(proposed, vec![("FORM-1".into(), 300), ("ASSY-1".into(), 800), ("PACK-1".into(), 1000)]);
    let (s, r1) = mes.post(&format!("/api/v1/surge-plans/{id}/release"), json!({}), &[]).await;
    assert_eq!(s, 200, "{r1}");
    let (s, r2) = mes.post(&format!("/api/v1/surge-plans/{id}/release"), json!({}), &[]).await;
    assert_eq!(s, 200, "{r2}");
    assert_eq!(r1["orders"], r2["orders"], "a repeated release answers the same");
    let (_, orders) = mes.get("/api/v1/orders").await;
    let orders = orders.as_array().cloned().unwrap_or_default();
    assert_eq!(orders.len(), 3, "released once: {orders:?}");
    assert!(orders.iter().all(|o| o["status"] == "released"));
    // Each became its work center's current order and was dispatched over MQTT.
    let (_, o) = mes.get(&format!("/api/v1/orders/{id}-01")).await;
    assert_eq!(o["dispatch"]["status"], "sent", "{o}");
    assert_eq!(o["dispatch"]["channel"], "mqtt");
    let (_, w) = mes.get("/api/v1/work-centers/FORM-1").await;
    assert_eq!(w["current_order"].as_str(), Some(format!("{id}-01").as_str()));
    // Bad requests.
    let (s, e) = mes.post("/api/v1/surge-plans", json!({"sku": "MOTOR", "quantity": 10, "due": due_in(1)}), &[]).await;
    assert_eq!((s, e["error"]["code"].as_str()), (422, Some("not_producible")));
    let (s, e) =
        mes.post("/api/v1/surge-plans", json!({"sku": "BASE-BOXED", "quantity": 10, "due": due_in(-1)}), &[]).await;
    assert_eq!((s, e["error"]["code"].as_str()), (422, Some("due_in_past")));
    let (s, _) = mes.post("/api/v1/surge-plans/SP-NOPE/release", json!({}), &[]).await;
    assert_eq!(s, 404);
    // Every write is in the audit log, with who and before/after.
    let (_, audit) = mes.get("/api/v1/audit?limit=100").await;
    let actions: Vec<&str> = audit.as_array().expect("audit").iter().filter_map(|a| a["action"].as_str()).collect();
    assert_eq!(actions.iter().filter(|a| **a == "surge_plan_create").count(), 2);
    assert_eq!(actions.iter().filter(|a| **a == "surge_plan_release").count(), 1);
    assert_eq!(actions.iter().filter(|a| **a == "order_create").count(), 3);
    assert_eq!(actions.iter().filter(|a| **a == "order_release").count(), 3);
    let release = audit.as_array().and_then(|a| a.iter().find(|x| x["action"] == "order_release").cloned());
    let release = release.expect("an order_release line");
    assert_eq!(release["detail"]["before"]["status"], "planned");
    assert_eq!(release["detail"]["after"]["status"], "released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_filter_page_validate_and_queue() {
    let mes = Mes::start(MesOptions::default()).await;
    for (i, (sku, wc, prio)) in [
        ("BLANK", "BLANK-1", 0),
        ("HOUSING", "FORM-1", 0),
        ("BLANK", "BLANK-1", 5),
        ("BLANK", "BLANK-1", 1),
        ("HOUSING", "FORM-1", 0),
    ]
    .iter()
    .enumerate()
    {
        let body =
            json!({"id": format!("PO-{i}"), "sku": sku, "quantity": 10 + i, "work_center": wc, "priority": prio});
        let (s, v) = mes.post("/api/v1/orders", body, &[]).await;
        assert_eq!(s, 201, "{v}");
    }
    // Rejected: nothing is created.
    let bad = [
        (json!({"sku": "BLANK", "quantity": 5, "work_center": "FORM-1"}), 422, "not_producible"),
        (json!({"sku": "COIL-STEEL", "quantity": 5}), 422, "not_producible"),
        (json!({"sku": "BLANK", "quantity": 5, "due": "2020-01-01"}), 422, "due_in_past"),
        (json!({"sku": "BLANK", "quantity": 0}), 422, "invalid_field"),
        (json!({"sku": "NOPE", "quantity": 5}), 422, "unknown_sku"),
        (json!({"sku": "BLANK", "quantity": 5, "colour": "red"}), 422, "unknown_field"),
    ];
    for (body, status, code) in bad {
        let (s, e) = mes.post("/api/v1/orders", body.clone(), &[]).await;
        assert_eq!((s, e["error"]["code"].as_str()), (status, Some(code)), "{body}");
    }
    let (_, all) = mes.get("/api/v1/orders").await;
    assert_eq!(all.as_array().map(Vec::len), Some(5));
    // Filters.
    let ids = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().filter_map(|o| o["id"].as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    };
    let (_, v) = mes.get("/api/v1/orders?sku=HOUSING").await;
    assert_eq!(ids(&v), ["PO-1", "PO-4"]);
    let (_, v) = mes.get("/api/v1/orders?work_center=BLANK-1&status=planned").await;
    assert_eq!(ids(&v), ["PO-0", "PO-2", "PO-3"]);
    let (s, e) = mes.get("/api/v1/orders?status=lost").await;
    assert_eq!((s, e["error"]["code"].as_str()), (400, Some("invalid_query")));
    // Keyset paging through all five, two at a time.
    let mut seen = Vec::new();
    let mut url = "/api/v1/orders?limit=2".to_string();
    for _ in 0..5 {
        let r = mes.client.get(format!("{}{url}", mes.http)).send().await.expect("page");
        let next = r.headers().get("x-next-cursor").and_then(|h| h.to_str().ok()).map(str::to_string);
        let page: Value = r.json().await.expect("json");
        seen.extend(ids(&page));
        match next {
            Some(c) => url = format!("/api/v1/orders?limit=2&cursor={}", c.replace('~', "%7E")),
            None => break,
        }
    }
    assert_eq!(seen, ["PO-0", "PO-1", "PO-2", "PO-3", "PO-4"]);
    let (s, e) = mes.get("/api/v1/orders?cursor=garbage").await;
    assert_eq!((s, e["error"]["code"].as_str()), (400, Some("invalid_cursor")));
    // Releasing all three BLANK orders: the first released becomes current; the queue
    // orders the rest by priority.
    for id in ["PO-0", "PO-3", "PO-2"] {
        let (s, v) = mes.post(&format!("/api/v1/orders/{id}/release"), json!({}), &[]).await;
        assert_eq!(s, 200, "{v}");
    }
    let (_, q) = mes.get("/api/v1/work-centers/BLANK-1/queue").await;
    assert_eq!(q["current_order"], "PO-0");
    let order: Vec<&str> = q["orders"].as_array().expect("queue").iter().filter_map(|o| o["id"].as_str()).collect();
    assert_eq!(order, ["PO-2", "PO-3", "PO-0"], "released by priority (5, 1, 0)");
    // A transition that is not allowed names from and to; nothing changes.
    let (s, e) = mes.post("/api/v1/orders/PO-1/close", json!({}), &[]).await;
    assert_eq!((s, e["error"]["code"].as_str()), (409, Some("invalid_transition")));
    let msg = e["error"]["message"].as_str().unwrap_or("");
    assert!(msg.contains("planned") && msg.contains("close"), "{msg}");
    // Cancelling the current order hands the work center to the next in its queue (PO-2,
    // priority 5) at once, not at the next 5 s refresh; twice, so a refresh that happened
    // to fall in the second after a cancel cannot pass for it.
    for (cancel, next) in [("PO-0", "PO-2"), ("PO-2", "PO-3")] {
        let (s, _) = mes.post(&format!("/api/v1/orders/{cancel}/cancel"), json!({}), &[]).await;
        assert_eq!(s, 200);
        let asked = std::time::Instant::now();
        let mut current = Value::Null;
        while asked.elapsed() < std::time::Duration::from_secs(1) {
            let (_, w) = mes.get("/api/v1/work-centers/BLANK-1").await;
            current = w["current_order"].clone();
            if current == next {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(current, next, "within a second of cancelling {cancel}");
    }
}

/// Seeded random requests over every documented route: wrong methods, odd ids, hostile
/// query strings and bodies. None may produce a 5xx, and the process stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_fuzz_of_the_api_finds_no_5xx() {
    let mes = Mes::start(MesOptions::default()).await;
    let routes = documented(&mes).await;
    let seed = std::env::var("MES_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261125u64);
    let mut rng = Lcg(seed);
    let ids = [
        "BLANK-1",
        "PO-1",
        "x",
        "%00",
        "%F0%9F%92%A5",
        "a%2Fb",
        "..%2F..",
        &"z".repeat(300),
        "'; DROP TABLE orders;--",
    ];
    let queries = [
        "",
        "?limit=-1",
        "?limit=99999999999999999999",
        "?from=yesterday&to=now",
        "?status=%00",
        "?cursor=1~x",
        "?cursor=~",
        "?from=0&to=1",
        "?order=PO-1&limit=1",
        "?unknown=1",
        "?before=-5&actor=%F0%9F%98%80",
    ];
    let bodies: Vec<Vec<u8>> = vec![
        b"{}".to_vec(),
        b"[]".to_vec(),
        b"null".to_vec(),
        b"{\"sku\": \"BLANK\", \"quantity\": 1e309}".to_vec(),
        b"{\"sku\": \"BLANK\", \"quantity\": -1}".to_vec(),
        b"{\"sku\": \"BLANK\", \"quantity\": 18446744073709551616}".to_vec(),
        b"{\"sku\": \"\xF0\x9F\x98\x80\", \"quantity\": 3, \"due\": \"9999-99-99\"}".to_vec(),
        b"{\"sku\": \"BASE-BOXED\", \"quantity\": 1000000000, \"due\": \"2999-01-01\"}".to_vec(),
        b"{\"cmd\": \"start\"}".to_vec(),
        b"{\"value\": 4294967296}".to_vec(),
        format!("{}1{}", "[".repeat(5000), "]".repeat(5000)).into_bytes(),
        vec![0xff, 0xfe, 0x00, 0x01],
        b"{\"sku\": \"BLANK\", \"quantity\": 2, \"ref\": \"fuzz\"}".to_vec(),
    ];
    let methods = ["GET", "POST", "DELETE", "PUT", "PATCH"];
    let mut n5xx = Vec::new();
    for _ in 0..400 {
        let (m0, path, _) = &routes[rng.below(routes.len())];
        let method = if rng.below(4) == 0 { methods[rng.below(methods.len())] } else { m0.as_str() };
        let mut url = String::new();
        let mut in_param = false;
        for c in path.chars() {
            match c {
                '{' => in_param = true,
                '}' => {
                    in_param = false;
                    url.push_str(ids[rng.below(ids.len())]);
                }
                _ if in_param => {}
                c => url.push(c),
            }
        }
        url.push_str(queries[rng.below(queries.len())]);
        let body = (method != "GET").then(|| bodies[rng.below(bodies.len())].clone());
        let (s, v) = send(&mes, method, &url, None, body.as_deref()).await;
        if s >= 500 {
            n5xx.push(format!("{method} {url} → {s} {v}"));
        }
    }
    assert!(n5xx.is_empty(), "seed {seed}: {n5xx:#?}");
    let (s, _) = mes.get("/healthz").await;
    assert_eq!(s, 200);
}

/// The live OEE's counts of new telemetry (`Store::telemetry_counts`) are the same whether a
/// pack counts from its sums (its readings within one second) or is unpacked (readings in
/// different seconds, or before the epoch with different times): good units per work center
/// and minute with the latest time, scrap per reading (per pack where summed) in id order.
/// On SQLite, and on PostgreSQL when `MES_TEST_DATABASE_URL` is set.
#[tokio::test]
async fn telemetry_counts_from_pack_sums_equal_the_unpacked_readings() {
    use sqlx::Row;
    let dir = crate::harness::temp_dir();
    const M: i64 = 1_700_000_040_000; // a minute's start
                                      // (t_min, t_max, good, scrap, readings [boot, seq, order, ts_ms, received_ms, good, scrap, state, metrics])
    let packs: [(i64, i64, i64, i64, String); 4] = [
        // Within one second: counted from the sums.
        (
            M + 100,
            M + 900,
            7,
            2,
            format!("[[1,1,null,{},0,3,0,\"running\",null],[1,2,null,{},0,4,2,\"running\",null]]", M + 100, M + 900),
        ),
        // Two seconds and two minutes: unpacked.
        (
            M + 59_500,
            M + 61_000,
            11,
            1,
            format!(
                "[[1,3,null,{},0,5,1,\"running\",null],[1,4,null,{},0,6,0,\"running\",null]]",
                M + 59_500,
                M + 61_000
            ),
        ),
        // Before the epoch, one time: from the sums.
        (-1_500, -1_500, 2, 1, "[[1,5,null,-1500,0,2,1,\"running\",null]]".to_string()),
        // Before the epoch, two times in one second: unpacked.
        (
            -1_500,
            -1_200,
            2,
            2,
            "[[1,6,null,-1500,0,1,1,\"running\",null],[1,7,null,-1200,0,1,1,\"running\",null]]".to_string(),
        ),
    ];
    for url in crate::settlement::sqlite_and_postgres(&dir, "pack-sums").await {
        let store = mes::db::Store::connect(&url, 1).await.expect("connect");
        store.migrate().await.expect("migrate");
        for (i, (t_min, t_max, good, scrap, readings)) in packs.iter().enumerate() {
            sqlx::query(
                "INSERT INTO telemetry_packs (device, work_center, t_min, t_max, last_boot, last_seq, n, good, scrap, readings)
                 VALUES ('press-01', 'PRESS-1', $1, $2, 1, $3, 2, $4, $5, $6)",
            )
            .bind(t_min)
            .bind(t_max)
            .bind(i as i64 + 1)
            .bind(good)
            .bind(scrap)
            .bind(readings.as_str())
            .execute(&store.pool)
            .await
            .expect("pack");
        }
        let top: i64 = sqlx::query("SELECT MAX(id) AS m FROM telemetry_packs")
            .fetch_one(&store.pool)
            .await
            .expect("max")
            .try_get("m")
            .expect("m");
        let c = store.telemetry_counts(top - 4, top).await.expect("counts");
        let mut good = c.good.clone();
        good.sort();
        let wc = || "PRESS-1".to_string();
        assert_eq!(
            good,
            vec![(wc(), -60_000, 4, -1_200), (wc(), M, 12, M + 59_500), (wc(), M + 60_000, 6, M + 61_000)],
            "{url}"
        );
        assert_eq!(
            c.scrap,
            vec![(wc(), M + 900, 2), (wc(), M + 59_500, 1), (wc(), -1_500, 1), (wc(), -1_500, 1), (wc(), -1_200, 1)],
            "{url}"
        );
        store.pool.close().await;
    }
}

/// Migration 0015: on a PostgreSQL server built with LZ4, a pack whose row passes the 2 KB
/// at which TOAST compresses is stored compressed with LZ4 and reads back through the
/// `telemetry` view reading for reading; on a server without LZ4 the migration keeps the
/// default and the pack still reads back the same. Only with `MES_TEST_DATABASE_URL`.
#[tokio::test]
async fn large_packs_are_compressed_with_lz4_where_postgresql_has_it() {
    use sqlx::{Executor, Row};
    if std::env::var("MES_TEST_DATABASE_URL").map_or(true, |s| s.is_empty()) {
        return;
    }
    let dir = crate::harness::temp_dir();
    let url = crate::harness::fresh_database(&dir).await;
    let store = mes::db::Store::connect(&url, 1).await.expect("connect");
    store.migrate().await.expect("migrate");
    // 60 readings, ~4.3 KB of JSON: over the TOAST threshold.
    let readings: Vec<String> = (1..=60)
        .map(|seq| {
            format!(
                "[2,{seq},\"PO-7\",{},{},{},0,\"running\",{{\"temp_c\":{}.5}}]",
                1_700_000_000_000i64 + seq,
                1_700_000_000_100i64 + seq,
                seq % 3,
                60 + seq % 7
            )
        })
        .collect();
    let text = format!("[{}]", readings.join(","));
    assert!(text.len() > 4_000, "{}", text.len());
    sqlx::query(
        "INSERT INTO telemetry_packs (device, work_center, t_min, t_max, last_boot, last_seq, n, good, scrap, readings)
         VALUES ('press-01', 'PRESS-1', 1700000000001, 1700000000060, 2, 60, 60, 60, 0, $1)",
    )
    .bind(text.as_str())
    .execute(&store.pool)
    .await
    .expect("pack");
    let has_lz4 = store.pool.execute("CREATE TEMP TABLE lz4_probe (t TEXT COMPRESSION lz4)").await.is_ok();
    let method: Option<String> = sqlx::query("SELECT pg_column_compression(readings) AS m FROM telemetry_packs")
        .fetch_one(&store.pool)
        .await
        .expect("compression")
        .try_get("m")
        .expect("m");
    assert_eq!(method.as_deref(), Some(if has_lz4 { "lz4" } else { "pglz" }));
    let stored: String = sqlx::query("SELECT readings FROM telemetry_packs")
        .fetch_one(&store.pool)
        .await
        .expect("pack")
        .try_get("readings")
        .expect("readings");
    assert_eq!(stored, text);
    let rows = sqlx::query("SELECT seq, good, metrics FROM telemetry ORDER BY seq")
        .fetch_all(&store.pool)
        .await
        .expect("telemetry view");
    assert_eq!(rows.len(), 60);
    for (i, r) in rows.iter().enumerate() {
        let seq = i as i64 + 1;
        assert_eq!(r.try_get::<i64, _>("seq").expect("seq"), seq);
        assert_eq!(r.try_get::<i64, _>("good").expect("good"), seq % 3);
        let metrics: String = r.try_get("metrics").expect("metrics");
        let temp = serde_json::from_str::<serde_json::Value>(&metrics).expect("json")["temp_c"].as_f64();
        assert_eq!(temp, Some((60 + seq % 7) as f64 + 0.5));
    }
}
