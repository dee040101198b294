//! The planner's order API: validation, idempotency, transitions, auth.

use crate::harness::{Mes, MesOptions};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_returns_the_first_result() {
    let mes = Mes::start(MesOptions::default()).await;
    let body =
        json!({"sku": "BASE-BOXED", "quantity": 500, "due": "2027-11-11", "priority": 5, "work_center": "PACK-1"});
    let (s1, a) = mes.post("/api/v1/orders", body.clone(), &[("Idempotency-Key", "promo-1")]).await;
    let (s2, b) = mes.post("/api/v1/orders", body.clone(), &[("Idempotency-Key", "promo-1")]).await;
    assert_eq!((s1, s2), (201, 201));
    assert_eq!(a["id"], b["id"]);
    assert_eq!(a["status"], "planned");
    let (_, all) = mes.get("/api/v1/orders").await;
    assert_eq!(all.as_array().map(Vec::len), Some(1));
    let (s3, c) = mes.post("/api/v1/orders", body, &[("Idempotency-Key", "promo-2")]).await;
    assert_eq!(s3, 201);
    assert_ne!(a["id"], c["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transitions_and_bad_requests_are_clear() {
    let mes = Mes::start(MesOptions::default()).await;
    let (s, _) = mes.post("/api/v1/orders", json!({"id": "PO-1", "sku": "BLANK", "quantity": 10}), &[]).await;
    assert_eq!(s, 201);
    let (s, e) = mes.post("/api/v1/orders", json!({"id": "PO-1", "sku": "BLANK", "quantity": 10}), &[]).await;
    assert_eq!((s, e["error"]["code"].as_str()), (409, Some("order_exists")));
    let (s, e) = mes.post("/api/v1/orders/PO-1/close", json!({}), &[]).await;
    assert_eq!((s, e["error"]["code"].as_str()), (409, Some("invalid_transition")));
    assert_eq!(e["error"]["message"], "cannot close an order that is planned (planned → closed is not allowed)");
    let (s, _) = mes.post("/api/v1/orders/PO-1/release", json!({}), &[]).await;
    assert_eq!(s, 200);
    let (s, _) = mes.post("/api/v1/orders/PO-1/release", json!({}), &[]).await;
    assert_eq!(s, 409);
    let (s, o) = mes.post("/api/v1/orders/PO-1/cancel", json!({}), &[]).await;
    assert_eq!((s, o["status"].as_str()), (200, Some("cancelled")));

    for (body, code) in [
        (json!({"sku": "BLANK", "quantity": -3}), "invalid_field"),
        (json!({"sku": "BLANK", "quantity": 1.5}), "invalid_field"),
        (json!({"sku": "NOPE", "quantity": 3}), "unknown_sku"),
        (json!({"sku": "BLANK", "quantity": 3, "work_center": "X"}), "unknown_work_center"),
        (json!({"quantity": 3}), "missing_field"),
        (json!({"sku": "BLANK", "quantity": 3, "colour": "red"}), "unknown_field"),
        (json!({"sku": "BLANK", "quantity": 3, "due": "soon"}), "invalid_field"),
    ] {
        let (s, e) = mes.post("/api/v1/orders", body.clone(), &[]).await;
        assert_eq!((s, e["error"]["code"].as_str()), (422, Some(code)), "{body} -> {e}");
        assert!(e["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let r = mes
        .client
        .post(format!("{}/api/v1/orders", mes.http))
        .header("content-type", "application/json")
        .body("{oops")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 400);
    let e: serde_json::Value = r.json().await.expect("json");
    assert_eq!(e["error"]["code"], "invalid_json");
    let (s, e) = mes.get("/api/v1/orders/NOPE").await;
    assert_eq!((s, e["error"]["code"].as_str()), (404, Some("not_found")));
    let (s, e) = mes.get("/api/v1/nothing-here").await;
    assert_eq!((s, e["error"]["code"].as_str()), (404, Some("not_found")));
    // Nothing above created anything.
    let (_, all) = mes.get("/api/v1/orders").await;
    assert_eq!(all.as_array().map(Vec::len), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles_are_enforced() {
    let extra = r#"
[[auth.tokens]]
name = "viewer-1"
role = "viewer"
token = "view-token-1"
[[auth.tokens]]
name = "planner-1"
role = "planner"
token = "plan-token-1"
"#;
    let mes = Mes::start(MesOptions { extra_config: extra.into(), ..Default::default() }).await;
    let body = json!({"sku": "BLANK", "quantity": 5});
    let (s, e) = mes.post("/api/v1/orders", body.clone(), &[]).await;
    assert_eq!((s, e["error"]["code"].as_str()), (401, Some("unauthorized")));
    let (s, e) = mes.post("/api/v1/orders", body.clone(), &[("Authorization", "Bearer view-token-1")]).await;
    assert_eq!((s, e["error"]["code"].as_str()), (403, Some("forbidden")));
    let (s, _) = mes.post("/api/v1/orders", body, &[("Authorization", "Bearer plan-token-1")]).await;
    assert_eq!(s, 201);
    let r =
        mes.client.get(format!("{}/api/v1/orders", mes.http)).bearer_auth("view-token-1").send().await.expect("get");
    assert_eq!(r.status().as_u16(), 200);
    // Probes and metrics stay open.
    let (s, _) = mes.get("/healthz").await;
    assert_eq!(s, 200);
    assert_eq!(mes.metric("mes_dead_letters_total").await, 0);
}
