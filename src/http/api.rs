//! Route handlers.

use super::{rfc3339, ApiError, Auth, Caller};
use crate::config::Role;
use crate::db::queries::{NewOrder, OrderRow, WorkCenterRow};
use crate::db::{queries::CommandError, Store};
use crate::events::Events;
use crate::ingest::modbus::{WriteError, WriteTarget};
use crate::ingest::mqtt::MqttHandle;
use crate::ingest::Router;
use crate::metrics::Metrics;
use crate::openapi::RouteDoc;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use mes_actors::actor::SetOrder;
use mes_actors::OrderCommand;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Everything a handler may use.
pub struct AppState {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub events: Events,
    pub auth: Auth,
    pub router: Arc<Router>,
    pub mqtt: Option<MqttHandle>,
    pub ledger: Arc<crate::settlement::Ledger>,
    pub plant: Arc<crate::plant::Plant>,
    pub modbus: crate::ingest::modbus::StatusBoard,
    pub live: Arc<crate::live::Live>,
    pub modbus_writers: crate::ingest::modbus::Writers,
    /// Live OEE per work center, refreshed in the background.
    pub oee: super::planner::OeeCache,
    /// This node, when it is one of a cluster's.
    pub cluster: Option<Arc<crate::cluster::Node>>,
}

type Res = Result<HttpResponse, ApiError>;
type State = web::Data<AppState>;

/// Seconds without a reading after which an MQTT device shows as offline.
const DEVICE_OFFLINE_AFTER_MS: i64 = 60_000;

/// Every route the server serves, with what the OpenAPI document says about it. The
/// server registers exactly these ([`routes`]) and the document is generated from them.
pub fn table() -> Vec<(RouteDoc, actix_web::Route)> {
    use super::planner as pl;
    const V: Option<Role> = Some(Role::Viewer);
    const O: Option<Role> = Some(Role::Operator);
    const P: Option<Role> = Some(Role::Planner);
    const A: Option<Role> = Some(Role::Admin);
    const LIMIT: &[(&str, &str)] = &[("limit", "integer")];
    let d = RouteDoc::new;
    vec![
        (d("GET", "/healthz", None, "Liveness"), web::get().to(healthz)),
        (d("GET", "/readyz", None, "Readiness: database, broker, writer"), web::get().to(readyz)),
        (d("GET", "/metrics", None, "Prometheus metrics"), web::get().to(metrics)),
        (d("GET", "/openapi.json", None, "This document"), web::get().to(openapi)),
        (d("GET", "/", None, "The live dashboard page"), web::get().to(dashboard)),
        (
            d("GET", "/api/v1/work-centers", V, "Work centers with state, totals, current order, live OEE")
                .ok(200, Some("[WorkCenter]")),
            web::get().to(list_work_centers),
        ),
        (
            d("GET", "/api/v1/work-centers/{id}", V, "One work center").ok(200, Some("WorkCenter")),
            web::get().to(get_work_center),
        ),
        (
            d("GET", "/api/v1/work-centers/{id}/oee", V, "OEE (ISO 22400) and the six big losses over a window")
                .query(&[("from", "string"), ("to", "string")])
                .ok(200, Some("Oee")),
            web::get().to(pl::work_center_oee),
        ),
        (
            d("GET", "/api/v1/work-centers/{id}/queue", V, "The work center's open orders in work order"),
            web::get().to(pl::work_center_queue),
        ),
        (
            d("POST", "/api/v1/work-centers/{id}/commands", O, "Start or stop the device (audited)")
                .body("Command")
                .ok(202, None),
            web::post().to(post_command),
        ),
        (
            d(
                "POST",
                "/api/v1/work-centers/{id}/points/{name}",
                O,
                "Write a writable Modbus point (audited, read back)",
            )
            .body("PointWrite"),
            web::post().to(write_point),
        ),
        (
            d("GET", "/api/v1/orders", V, "Orders, oldest first; next page in X-Next-Cursor")
                .query(&[
                    ("status", "string"),
                    ("sku", "string"),
                    ("work_center", "string"),
                    ("limit", "integer"),
                    ("cursor", "string"),
                ])
                .ok(200, Some("[Order]")),
            web::get().to(list_orders),
        ),
        (
            d("POST", "/api/v1/orders", P, "Create an order").body("NewOrder").ok(201, Some("Order")).idempotent(),
            web::post().to(create_order),
        ),
        (
            d("GET", "/api/v1/orders/{id}", V, "One order, with its dispatch").ok(200, Some("Order")),
            web::get().to(get_order),
        ),
        (
            d("POST", "/api/v1/orders/{id}/release", P, "Release (dispatches to the device)").ok(200, Some("Order")),
            web::post().to(release_order),
        ),
        (
            d("POST", "/api/v1/orders/{id}/close", P, "Close and settle variances").ok(200, Some("Order")),
            web::post().to(close_order),
        ),
        (d("POST", "/api/v1/orders/{id}/cancel", P, "Cancel").ok(200, Some("Order")), web::post().to(cancel_order)),
        (
            d("GET", "/api/v1/orders/{id}/cost", V, "Standard vs actual cost and variances").ok(200, Some("OrderCost")),
            web::get().to(order_cost),
        ),
        (
            d("GET", "/api/v1/orders/{id}/oee", V, "OEE of one order over its run").ok(200, Some("Oee")),
            web::get().to(pl::order_oee),
        ),
        (d("GET", "/api/v1/buffers", V, "Material buffers with levels and alerts"), web::get().to(list_buffers)),
        (
            d("GET", "/api/v1/inventory", V, "Inventory per sku").ok(200, Some("[InventoryRow]")),
            web::get().to(list_inventory),
        ),
        (
            d("GET", "/api/v1/inventory/{sku}", V, "Inventory of one sku").ok(200, Some("InventoryRow")),
            web::get().to(get_inventory),
        ),
        (
            d("GET", "/api/v1/inventory/{sku}/movements", V, "The sku's stock ledger (append-only, oldest first)")
                .query(&[("buffer", "string"), ("after", "integer"), ("limit", "integer")])
                .ok(200, Some("[StockMovement]")),
            web::get().to(list_movements),
        ),
        (
            d("POST", "/api/v1/inventory/adjustments", P, "Adjust a buffer's stock (audited; 409 below reserved)")
                .body("NewAdjustment")
                .ok(201, Some("Adjustment")),
            web::post().to(create_adjustment),
        ),
        (
            d("GET", "/api/v1/journal", V, "Double-entry postings").query(&[("order", "string"), ("limit", "integer")]),
            web::get().to(journal),
        ),
        (
            d("GET", "/api/v1/trial-balance", V, "Trial balance").ok(200, Some("TrialBalance")),
            web::get().to(trial_balance),
        ),
        (
            d("POST", "/api/v1/reservations", P, "Promise finished goods (409 when short; never oversells)")
                .body("NewReservation")
                .ok(201, Some("Reservation")),
            web::post().to(create_reservation),
        ),
        (
            d("GET", "/api/v1/reservations/{id}", V, "One reservation").ok(200, Some("Reservation")),
            web::get().to(get_reservation),
        ),
        (
            d("DELETE", "/api/v1/reservations/{id}", P, "Release a reservation").ok(200, Some("Reservation")),
            web::delete().to(release_reservation),
        ),
        (
            d("POST", "/api/v1/reservations/{id}/ship", P, "Goods issue").ok(200, Some("Reservation")),
            web::post().to(ship_reservation),
        ),
        (
            d("POST", "/api/v1/surge-plans", P, "Capacity and material check for a promotion")
                .body("NewSurgePlan")
                .ok(201, Some("SurgePlan")),
            web::post().to(pl::create_surge_plan),
        ),
        (
            d("GET", "/api/v1/surge-plans", V, "Surge plans, newest first").query(LIMIT),
            web::get().to(pl::list_surge_plans),
        ),
        (
            d("GET", "/api/v1/surge-plans/{id}", V, "One surge plan").ok(200, Some("SurgePlan")),
            web::get().to(pl::get_surge_plan),
        ),
        (
            d("POST", "/api/v1/surge-plans/{id}/release", P, "Create and release the proposed orders (idempotent)"),
            web::post().to(pl::release_surge_plan),
        ),
        (d("GET", "/api/v1/erp/outbox", V, "Settlement documents for the ERP").query(LIMIT), web::get().to(erp_outbox)),
        (d("GET", "/api/v1/dead-letters", V, "Invalid telemetry kept").query(LIMIT), web::get().to(dead_letters)),
        (d("GET", "/api/v1/events", V, "Server-Sent Events: counts, states, alerts, orders"), web::get().to(events)),
        (
            d("GET", "/api/v1/cluster", V, "Cluster nodes, their heartbeats and the work-center leases")
                .ok(200, Some("Cluster")),
            web::get().to(cluster_status),
        ),
        (
            d("GET", "/api/v1/audit", A, "The append-only audit log, newest first").query(&[
                ("limit", "integer"),
                ("before", "integer"),
                ("actor", "string"),
            ]),
            web::get().to(pl::audit),
        ),
    ]
}

/// The OpenAPI document of [`table`], built once.
pub fn openapi_document() -> &'static str {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DOC.get_or_init(|| {
        let docs: Vec<RouteDoc> = table().into_iter().map(|(d, _)| d).collect();
        crate::openapi::document(&docs).to_string()
    })
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    for (doc, route) in table() {
        cfg.route(doc.path, route);
    }
}

pub async fn not_found(req: HttpRequest) -> Res {
    Err(ApiError::not_found(format!("no route for {} {}", req.method(), req.path())))
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

async fn readyz(st: State) -> HttpResponse {
    let db = st.store.ping().await;
    let mqtt = st.metrics.mqtt_connected.load(Relaxed);
    let writer = st.metrics.writer_healthy.load(Relaxed) || st.metrics.commits.load(Relaxed) == 0;
    let body = json!({"status": if db && mqtt && writer { "ready" } else { "not_ready" },
        "checks": {"database": db, "mqtt": mqtt, "writer": writer}});
    if db && mqtt && writer {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn metrics(st: State) -> HttpResponse {
    let mut text = st.metrics.render();
    // Polled devices by status, and each unreachable device with the time it went so.
    if let Ok(board) = st.modbus.read() {
        use std::fmt::Write;
        let _ = writeln!(
            text,
            "# HELP mes_modbus_devices Polled Modbus devices by status.\n# TYPE mes_modbus_devices gauge"
        );
        for status in ["online", "unreachable", "connecting"] {
            let n = board.values().filter(|d| d.status == status).count();
            let _ = writeln!(text, "mes_modbus_devices{{status=\"{status}\"}} {n}");
        }
        let _ = writeln!(
            text,
            "# HELP mes_modbus_unreachable_since_seconds Unix time an unreachable device went unreachable.\n# TYPE mes_modbus_unreachable_since_seconds gauge"
        );
        let mut down: Vec<_> = board.iter().filter(|(_, d)| d.status == "unreachable").collect();
        down.sort_by(|a, b| a.0.cmp(b.0));
        for (device, d) in down {
            let _ = writeln!(text, "mes_modbus_unreachable_since_seconds{{device=\"{device}\"}} {}", d.since_ms / 1000);
        }
    }
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(text)
}

async fn openapi() -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(openapi_document())
}

async fn dashboard() -> HttpResponse {
    HttpResponse::Ok().content_type("text/html; charset=utf-8").body(crate::dashboard::PAGE)
}

fn wc_json(st: &AppState, w: &WorkCenterRow, now: i64) -> Value {
    let polled = st.modbus.read().ok().and_then(|b| b.get(&w.device_id).cloned());
    let (status, last_error, since) = match polled {
        Some(p) => (p.status, p.last_error, Some(rfc3339(p.since_ms))),
        None => (
            match w.last_seen_ms {
                None => "unknown",
                Some(t) if now - t <= DEVICE_OFFLINE_AFTER_MS => "online",
                Some(_) => "offline",
            },
            None,
            None,
        ),
    };
    json!({
        "id": w.id, "name": w.name, "state": w.state, "reason": w.reason,
        "good_total": w.good_total, "scrap_total": w.scrap_total, "current_order": w.current_order,
        "output_buffer": w.output_buffer, "inputs": st.plant.work_center(&w.id).map(|p| p.inputs.clone()).unwrap_or_default(),
        "ideal_cycle_s": w.ideal_cycle_ms as f64 / 1000.0,
        "device": {"id": w.device_id, "kind": w.device_kind, "status": status,
                   "last_seen": w.last_seen_ms.map(rfc3339), "last_error": last_error, "since": since},
        "oee": st.oee.get(&w.id).map(|o| super::planner::oee_summary(&o)),
    })
}

/// Cluster: hands a request about a work center owned by another node to that node (its
/// device connection lives there) and returns its answer; `None` when this node should
/// answer itself. A request is forwarded once at most.
async fn forward_to_owner(
    st: &AppState,
    req: &HttpRequest,
    body: &web::Bytes,
    wc: &str,
) -> Result<Option<HttpResponse>, ApiError> {
    const FORWARDED: &str = "x-mes-forwarded-by";
    let Some(node) = &st.cluster else { return Ok(None) };
    if req.headers().contains_key(FORWARDED) {
        return Err(ApiError::unavailable(format!(
            "work center `{wc}` is not owned by node `{}` any more; retry",
            node.node_id
        )));
    }
    let Some((owner, addr)) = st.store.cluster_owner(wc).await? else {
        return Err(ApiError::unavailable(format!(
            "work center `{wc}` has no live owner right now (a takeover is under way); retry"
        )));
    };
    if owner == node.node_id {
        return Ok(None);
    }
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let client = CLIENT.get_or_init(|| {
        reqwest::Client::builder().timeout(std::time::Duration::from_secs(10)).build().unwrap_or_default()
    });
    let url = format!("http://{addr}{}", req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"));
    let method = reqwest::Method::from_bytes(req.method().as_str().as_bytes())
        .map_err(|e| ApiError::bad_request("invalid_method", e.to_string()))?;
    let mut out = client.request(method, &url).header(FORWARDED, node.node_id.as_str()).body(body.to_vec());
    for h in ["authorization", "content-type", "idempotency-key"] {
        if let Some(v) = req.headers().get(h).and_then(|v| v.to_str().ok()) {
            out = out.header(h, v);
        }
    }
    tracing::debug!(work_center = wc, %owner, %url, "forwarded to the owner");
    let resp = out
        .send()
        .await
        .map_err(|e| ApiError::unavailable(format!("owner node `{owner}` of `{wc}` did not answer: {e}")))?;
    let status = actix_web::http::StatusCode::from_u16(resp.status().as_u16())
        .unwrap_or(actix_web::http::StatusCode::BAD_GATEWAY);
    let bytes =
        resp.bytes().await.map_err(|e| ApiError::unavailable(format!("owner node `{owner}` of `{wc}`: {e}")))?;
    Ok(Some(HttpResponse::build(status).content_type("application/json").body(bytes)))
}

/// The cluster as the database sees it (any node answers the same).
async fn cluster_status(req: HttpRequest, st: State) -> Res {
    st.auth.check(&req, Role::Viewer)?;
    let Some(node) = &st.cluster else {
        return Ok(HttpResponse::Ok().json(json!({"enabled": false, "node": null, "nodes": [], "leases": []})));
    };
    let (now, nodes, leases) = st.store.cluster_status().await?;
    Ok(HttpResponse::Ok().json(cluster_json(Some(&node.node_id), now, &nodes, &leases)))
}

/// The cluster document of `GET /api/v1/cluster` and `mes cluster status`.
pub fn cluster_json(
    this: Option<&str>,
    now: i64,
    nodes: &[crate::db::cluster::NodeRow],
    leases: &[crate::db::cluster::LeaseRow],
) -> Value {
    let held = |n: &str| leases.iter().filter(|l| l.node_id.as_deref() == Some(n) && l.expires_ms > now).count();
    json!({
        "enabled": true,
        "node": this,
        "now": rfc3339(now),
        "nodes": nodes.iter().map(|n| json!({
            "node_id": n.node_id, "http_addr": n.http_addr, "started": rfc3339(n.started_ms),
            "last_heartbeat": rfc3339(n.heartbeat_ms), "heartbeat_age_ms": now - n.heartbeat_ms,
            "lease_ms": n.lease_ms, "live": n.left_ms.is_none() && now - n.heartbeat_ms < n.lease_ms,
            "left": n.left_ms.map(rfc3339), "leases": held(&n.node_id),
        })).collect::<Vec<_>>(),
        "leases": leases.iter().map(|l| json!({
            "work_center": l.work_center, "node_id": l.node_id, "token": l.token,
            "expires": (l.expires_ms > 0).then(|| rfc3339(l.expires_ms)), "live": l.node_id.is_some() && l.expires_ms > now,
            "acquired": l.acquired_ms.map(rfc3339),
        })).collect::<Vec<_>>(),
    })
}

async fn list_work_centers(req: HttpRequest, st: State) -> Res {
    st.auth.check(&req, Role::Viewer)?;
    let now = crate::now_ms();
    let rows = st.store.work_centers().await?;
    Ok(HttpResponse::Ok().json(rows.iter().map(|w| wc_json(&st, w, now)).collect::<Vec<_>>()))
}

async fn get_work_center(req: HttpRequest, st: State, id: web::Path<String>) -> Res {
    st.auth.check(&req, Role::Viewer)?;
    let w = st
        .store
        .work_center(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("work center `{id}` does not exist")))?;
    Ok(HttpResponse::Ok().json(wc_json(&st, &w, crate::now_ms())))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandBody {
    cmd: String,
}

async fn post_command(req: HttpRequest, st: State, id: web::Path<String>, raw: web::Bytes) -> Res {
    let caller = st.auth.check(&req, Role::Operator)?;
    let body: CommandBody = super::json_body(&raw)?;
    if !matches!(body.cmd.as_str(), "start" | "stop") {
        return Err(ApiError::unprocessable(
            "invalid_command",
            format!("`{}` is not a command (start or stop)", body.cmd),
        ));
    }
    let w = st
        .store
        .work_center(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("work center `{id}` does not exist")))?;
    if w.device_kind == "modbus" && st.modbus_writers.get(&w.device_id).is_none() {
        // Polled by another node of the cluster: only its owner talks to the device.
        if let Some(r) = forward_to_owner(&st, &req, &raw, &w.id).await? {
            return Ok(r);
        }
    }
    let cmd_id = new_id("CMD");
    let msg = json!({"cmd": body.cmd, "id": cmd_id});
    let mut detail = json!({"cmd": body.cmd, "id": cmd_id, "device": w.device_id});
    let mut refused = false;
    let result = match (&st.mqtt, w.device_kind.as_str()) {
        (Some(m), "mqtt") => m.command(&w.device_id, &msg).await,
        (_, "modbus") => {
            let value = u64::from(body.cmd == "start");
            let handle = st.modbus_writers.get(&w.device_id);
            match handle {
                Some(h) => {
                    let target = WriteTarget::Role(mes_plc_maps::Role::Command);
                    let point = h.check(&target, value).ok();
                    let written = h.write(target, value).await;
                    // The `command` point, its value read back before and after.
                    if let Some(o) = detail.as_object_mut() {
                        o.insert("point".into(), json!(point));
                        o.insert("value".into(), json!(value));
                        if let Ok((_, before, after)) = &written {
                            o.insert("before".into(), json!(before));
                            o.insert("after".into(), json!(after));
                        }
                    }
                    match written {
                        Ok(_) => Ok(()),
                        Err(WriteError::Refused(m)) => {
                            refused = true;
                            Err(m)
                        }
                        Err(WriteError::Failed(m)) => Err(m),
                    }
                }
                None => Err("the device is not polled".into()),
            }
        }
        (_, kind) => Err(format!("commands to {kind} devices are not available")),
    };
    if let Some(o) = detail.as_object_mut() {
        o.insert("result".into(), result.as_ref().err().map_or_else(|| json!("ok"), |e| json!(e)));
    }
    st.store.audit(&caller.name, "command", &w.id, &detail.to_string()).await?;
    match result {
        Ok(()) => Ok(HttpResponse::Accepted()
            .json(json!({"id": cmd_id, "cmd": body.cmd, "work_center": w.id, "device": w.device_id}))),
        Err(e) if refused => Err(ApiError::unprocessable("not_writable", e)),
        Err(e) => Err(ApiError::unavailable(e)),
    }
}

/// A unique id: the prefix, the time in hex and a counter.
pub(crate) fn new_id(prefix: &str) -> String {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Relaxed);
    format!("{prefix}-{:x}{:04x}", crate::now_ms(), n & 0xffff)
}

async fn order_json(st: &AppState, o: &OrderRow) -> Result<Value, ApiError> {
    let consumed = st.store.order_consumption(o).await?;
    Ok(json!({
        "id": o.id, "sku": o.sku, "quantity": o.quantity, "work_center": o.work_center, "status": o.status,
        "good": o.good, "scrap": o.scrap, "consumed": consumed, "due": o.due, "priority": o.priority,
        "created_at": rfc3339(o.created_ms), "updated_at": rfc3339(o.updated_ms),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OrdersQuery {
    status: Option<String>,
    sku: Option<String>,
    work_center: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

/// Keyset paging: the cursor names the last order of the previous page.
fn encode_cursor(o: &OrderRow) -> String {
    format!("{}~{}", o.created_ms, o.id)
}

fn decode_cursor(c: &str) -> Result<(i64, String), ApiError> {
    c.split_once('~')
        .and_then(|(ms, id)| Some((ms.parse::<i64>().ok()?, id.to_string())))
        .filter(|(_, id)| valid_id(id))
        .ok_or_else(|| ApiError::bad_request("invalid_cursor", format!("`cursor` `{c}` is not a cursor this API gave")))
}

/// Orders, oldest first, filtered by `status`, `sku` and `work_center`; at most `limit`
/// (default 500). When more remain, the `X-Next-Cursor` header holds the `cursor` of the
/// next page (and a `Link: <…>; rel="next"`).
async fn list_orders(req: HttpRequest, st: State) -> Res {
    st.auth.check(&req, Role::Viewer)?;
    let q: OrdersQuery = super::query(&req)?;
    if let Some(s) = &q.status {
        if s.parse::<mes_actors::OrderStatus>().is_err() {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("`status` `{s}` is not one of planned, released, running, completed, closed, cancelled"),
            ));
        }
    }
    let limit = q.limit.unwrap_or(500);
    if !(1..=5000).contains(&limit) {
        return Err(ApiError::bad_request("invalid_query", "`limit` must be 1-5000"));
    }
    let filter = crate::db::planner::OrderFilter {
        status: q.status.clone(),
        sku: q.sku.clone(),
        work_center: q.work_center.clone(),
        after: q.cursor.as_deref().map(decode_cursor).transpose()?,
        limit: limit + 1,
    };
    let mut rows = st.store.orders_filtered(&filter).await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let mut out = Vec::with_capacity(rows.len());
    for o in &rows {
        out.push(order_json(&st, o).await?);
    }
    let mut resp = HttpResponse::Ok();
    if let (true, Some(last)) = (more, rows.last()) {
        let c = encode_cursor(last);
        resp.insert_header(("x-next-cursor", c.clone()));
        let mut params: Vec<(String, String)> = vec![("limit".into(), limit.to_string()), ("cursor".into(), c)];
        for (k, v) in [("status", &q.status), ("sku", &q.sku), ("work_center", &q.work_center)] {
            if let Some(v) = v {
                params.push((k.into(), v.clone()));
            }
        }
        let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={}", url_escape(v))).collect();
        resp.insert_header(("link", format!("</api/v1/orders?{}>; rel=\"next\"", query.join("&"))));
    }
    Ok(resp.json(out))
}

fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn get_order(req: HttpRequest, st: State, id: web::Path<String>) -> Res {
    st.auth.check(&req, Role::Viewer)?;
    let o = st.store.order(&id).await?.ok_or_else(|| ApiError::not_found(format!("order `{id}` does not exist")))?;
    let mut v = order_json(&st, &o).await?;
    let d = st.store.dispatch_of(&o.id).await?;
    if let Some(m) = v.as_object_mut() {
        m.insert(
            "dispatch".into(),
            d.map(|d| {
                json!({"id": d.id, "device": d.device, "channel": d.channel, "status": d.status, "error": d.error,
                       "sent_at": rfc3339(d.sent_ms), "acknowledged_at": d.acked_ms.map(rfc3339)})
            })
            .unwrap_or(Value::Null),
        );
    }
    Ok(HttpResponse::Ok().json(v))
}

fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

async fn create_order(req: HttpRequest, st: State, body: web::Bytes) -> Res {
    let caller = st.auth.check(&req, Role::Planner)?;
    let body: Value = super::json_body(&body)?;
    let idem = req.headers().get("idempotency-key").map(|v| v.to_str().map(str::to_string));
    let idem = match idem {
        None => None,
        Some(Ok(k)) if !k.is_empty() && k.len() <= 200 => Some(k),
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_idempotency_key",
                "Idempotency-Key must be 1-200 visible characters",
            ))
        }
    };
    if let Some(k) = &idem {
        if let Some((scope, status, body)) = st.store.idempotent_response(k).await? {
            if scope != "POST /orders" {
                return Err(ApiError::conflict(
                    "idempotency_key_reused",
                    format!("Idempotency-Key `{k}` was used for {scope}"),
                ));
            }
            let status = StatusCode::from_u16(status as u16).unwrap_or(StatusCode::CREATED);
            return Ok(HttpResponse::build(status).content_type("application/json").body(body));
        }
    }
    let o = parse_new_order(&body)?;
    if !st.store.sku_exists(&o.sku).await? {
        return Err(ApiError::unprocessable("unknown_sku", format!("sku `{}` is not a material of this plant", o.sku)));
    }
    // The sku must be made somewhere, and where the order names a work center, there.
    let makers: Vec<&str> = st
        .plant
        .work_centers
        .iter()
        .filter(|w| st.plant.output_sku(w) == Some(o.sku.as_str()))
        .map(|w| w.id.as_str())
        .collect();
    if let Some(wc) = &o.work_center {
        if st.store.work_center(wc).await?.is_none() {
            return Err(ApiError::unprocessable("unknown_work_center", format!("work center `{wc}` does not exist")));
        }
        if !makers.contains(&wc.as_str()) {
            return Err(ApiError::unprocessable(
                "not_producible",
                format!(
                    "work center `{wc}` does not make `{}` (made by: {})",
                    o.sku,
                    if makers.is_empty() { "none".to_string() } else { makers.join(", ") }
                ),
            ));
        }
    } else if makers.is_empty() {
        return Err(ApiError::unprocessable("not_producible", format!("no work center makes `{}`", o.sku)));
    }
    if let Some(due) = &o.due {
        if crate::time::due_ms(due).is_some_and(|d| d <= crate::now_ms()) {
            return Err(ApiError::unprocessable("due_in_past", format!("`due` {due} is not in the future")));
        }
    }
    let consumed_zero: BTreeMap<String, i64> = BTreeMap::new();
    let render = |row: &OrderRow| {
        json!({"id": row.id, "sku": row.sku, "quantity": row.quantity, "work_center": row.work_center, "status": row.status,
               "good": 0, "scrap": 0, "consumed": consumed_zero, "due": row.due, "priority": row.priority,
               "created_at": rfc3339(row.created_ms), "updated_at": rfc3339(row.updated_ms)})
        .to_string()
    };
    let created = match st.store.create_order(&o, idem.as_deref().map(|k| (k, "POST /orders")), render).await {
        Ok(c) => c,
        Err(e) => {
            // A concurrent request with the same key won the race: answer with its result.
            if let Some(k) = &idem {
                if let Some((_, status, body)) = st.store.idempotent_response(k).await? {
                    let status = StatusCode::from_u16(status as u16).unwrap_or(StatusCode::CREATED);
                    return Ok(HttpResponse::build(status).content_type("application/json").body(body));
                }
            }
            return Err(e.into());
        }
    };
    let Some(row) = created else {
        return Err(ApiError::conflict("order_exists", format!("order `{}` already exists", o.id)));
    };
    tracing::info!(order = %row.id, sku = %row.sku, quantity = row.quantity, "order created");
    let detail = json!({"after": {"status": row.status, "sku": row.sku, "quantity": row.quantity,
                                  "work_center": row.work_center, "due": row.due, "priority": row.priority}});
    st.store.audit(&caller.name, "order_create", &row.id, &detail.to_string()).await?;
    st.events.publish(json!({"type": "order_created", "order": row.id}));
    Ok(HttpResponse::Created().json(order_json(&st, &row).await?))
}

fn parse_new_order(v: &Value) -> Result<NewOrder, ApiError> {
    let obj = v.as_object().ok_or_else(|| ApiError::bad_request("invalid_body", "the body must be a JSON object"))?;
    for k in obj.keys() {
        if !["id", "sku", "quantity", "due", "priority", "work_center"].contains(&k.as_str()) {
            return Err(ApiError::unprocessable("unknown_field", format!("unknown field `{k}`")));
        }
    }
    let str_field = |k: &str| -> Result<Option<String>, ApiError> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(ApiError::unprocessable("invalid_field", format!("`{k}` must be a string"))),
        }
    };
    let id = match str_field("id")? {
        Some(id) if valid_id(&id) => id,
        Some(id) => {
            return Err(ApiError::unprocessable(
                "invalid_field",
                format!("`id` `{id}` must be 1-64 letters, digits, '-', '_' or '.'"),
            ))
        }
        None => new_id("PO"),
    };
    let sku = str_field("sku")?.ok_or_else(|| ApiError::unprocessable("missing_field", "`sku` is required"))?;
    let quantity = match obj.get("quantity") {
        Some(Value::Number(n)) => n.as_i64().filter(|q| *q > 0 && *q <= 1_000_000_000),
        _ => None,
    }
    .ok_or_else(|| ApiError::unprocessable("invalid_field", "`quantity` must be an integer from 1 to 1000000000"))?;
    let priority = match obj.get("priority") {
        None | Some(Value::Null) => 0,
        Some(Value::Number(n)) => {
            n.as_i64().ok_or_else(|| ApiError::unprocessable("invalid_field", "`priority` must be an integer"))?
        }
        Some(_) => return Err(ApiError::unprocessable("invalid_field", "`priority` must be an integer")),
    };
    let due = str_field("due")?;
    if let Some(d) = &due {
        if crate::time::due_ms(d).is_none() {
            return Err(ApiError::unprocessable(
                "invalid_field",
                format!("`due` `{d}` is not a date (YYYY-MM-DD) or RFC 3339 time"),
            ));
        }
    }
    Ok(NewOrder { id, sku, quantity, due, priority, work_center: str_field("work_center")? })
}

async fn order_command(req: HttpRequest, st: State, id: String, cmd: OrderCommand) -> Res {
    let caller = st.auth.check(&req, Role::Planner)?;
    let order = apply_order_command(&st, &id, cmd, &caller).await?;
    Ok(HttpResponse::Ok().json(order_json(&st, &order).await?))
}

/// Applies a planner command to an order (the database decides races), audits it with the
/// status before and after, and dispatches the order when it became its work center's
/// current one.
pub(crate) async fn apply_order_command(
    st: &AppState,
    id: &str,
    cmd: OrderCommand,
    caller: &Caller,
) -> Result<OrderRow, ApiError> {
    let (order, made_current, before) = st.store.order_command(id, cmd, &st.ledger).await.map_err(|e| match e {
        CommandError::NotFound(m) => ApiError::not_found(m),
        CommandError::Transition(t) => ApiError::conflict("invalid_transition", t.to_string()),
        CommandError::Conflict(m) => ApiError::conflict("conflict", m),
        CommandError::Db(d) => d.into(),
    })?;
    let detail = json!({"before": {"status": before.as_str()}, "after": {"status": order.status}}).to_string();
    st.store.audit(&caller.name, &format!("order_{cmd:?}").to_ascii_lowercase(), id, &detail).await?;
    if let Ok(status) = order.status.parse() {
        st.live.order(&order.id, order.quantity, order.good, order.scrap, status);
    }
    st.events.publish(json!({"type": "order", "order": order.id, "status": order.status}));
    if let (true, Some(wc)) = (made_current, order.work_center.as_deref()) {
        dispatch_order(st, &order, wc, &caller.name).await?;
    }
    Ok(order)
}

/// Makes `order` the work center's current order in its actor and sends it to the device
/// (MQTT `set_order`, or the Modbus `target` point); records the dispatch and audits it.
pub(crate) async fn dispatch_order(st: &AppState, order: &OrderRow, wc: &str, by: &str) -> Result<(), ApiError> {
    if let Some(addr) = st.router.work_center(wc) {
        if addr.send(SetOrder(Some(order.id.clone()))).await.is_err() {
            tracing::error!(work_center = wc, "work center actor unavailable");
        }
    }
    let Some(w) = st.store.work_center(wc).await? else {
        return Ok(());
    };
    let id = new_id("DSP");
    let mut write: Option<Value> = None;
    let (channel, result): (&str, Option<Result<(), String>>) = match (&st.mqtt, w.device_kind.as_str()) {
        (Some(m), "mqtt" | "sparkplug") => {
            let msg = json!({"cmd": "set_order", "order": order.id, "target": order.quantity, "id": id});
            ("mqtt", Some(m.command(&w.device_id, &msg).await))
        }
        (_, "modbus") => match st.modbus_writers.get(&w.device_id) {
            // The order's quantity goes to the device's `target` point, if its map has one.
            Some(h) if h.check(&WriteTarget::Role(mes_plc_maps::Role::Target), order.quantity as u64).is_ok() => {
                let value = order.quantity as u64;
                let r = h.write(WriteTarget::Role(mes_plc_maps::Role::Target), value).await;
                // The `target` point, its value read back before and after.
                write = Some(match &r {
                    Ok((point, before, after)) => json!({"point": point, "value": value, "before": before,
                                                         "after": after, "result": "ok"}),
                    Err(e) => json!({"point": h.check(&WriteTarget::Role(mes_plc_maps::Role::Target), value).ok(),
                                     "value": value, "result": e.to_string()}),
                });
                ("modbus", Some(r.map(|_| ()).map_err(|e| e.to_string())))
            }
            // Polled by another node: recorded `pending`, written by the owner (`cluster`).
            None if st.cluster.is_some() => ("modbus-pending", Some(Ok(()))),
            _ => ("modbus", None),
        },
        (_, kind) => (if kind == "mqtt" { "mqtt" } else { "none" }, Some(Err("no client for the device".into()))),
    };
    let Some(result) = result else {
        return Ok(()); // nothing to send to this device
    };
    let now = crate::now_ms();
    // A Modbus write is read back before it returns: acknowledged at once.
    let (status, acked) = match (&result, channel) {
        (Ok(()), "modbus") => ("acknowledged", Some(now)),
        (Ok(()), "modbus-pending") => ("pending", None),
        (Ok(()), _) => ("sent", None),
        (Err(_), _) => ("failed", None),
    };
    if let Err(e) = &result {
        tracing::warn!(work_center = wc, order = %order.id, error = %e, "order dispatch failed");
    }
    let d = crate::db::planner::DispatchRow {
        id: id.clone(),
        order_id: order.id.clone(),
        work_center: wc.to_string(),
        device: w.device_id.clone(),
        channel: channel.trim_end_matches("-pending").to_string(),
        status: status.to_string(),
        error: result.err(),
        sent_ms: now,
        acked_ms: acked,
    };
    st.store.record_dispatch(&d).await?;
    let detail = json!({"dispatch": d.id, "order": order.id, "device": d.device, "channel": d.channel,
                        "after": {"status": d.status}, "error": d.error, "write": write});
    st.store.audit(by, "dispatch", wc, &detail.to_string()).await?;
    st.events.publish(json!({"type": "dispatch", "order": order.id, "work_center": wc, "status": d.status}));
    Ok(())
}

async fn release_order(req: HttpRequest, st: State, id: web::Path<String>) -> Res {
    order_command(req, st, id.into_inner(), OrderCommand::Release).await
}
async fn close_order(req: HttpRequest, st: State, id: web::Path<String>) -> Res {
    order_command(req, st, id.into_inner(), OrderCommand::Close).await
}
async fn cancel_order(req: HttpRequest, st: State, id: web::Path<String>) -> Res {
    order_command(req, st, id.into_inner(), OrderCommand::Cancel).await
}

async fn list_buffers(req: HttpRequest, st: State) -> Res {
    st.auth.check(&req, Role::Viewer)?;
    let out: Vec<Value> = st
        .store
        .buffers()
        .await?
        .iter()
        .map(|b| {
            let alert = mes_actors::buffer::BufferState::new(&b.id, &b.sku, b.capacity, b.on_hand).alert;
            json!({"id": b.id, "sku": b.sku, "capacity": b.capacity, "on_hand": b.on_hand, "reserved": b.reserved,
                   "available": b.available, "shortfall": (-b.on_hand).max(0), "alert": alert.map(|a| a.as_str())})
        })
        .collect();
    Ok(HttpResponse::Ok().json(out))
}

async fn inventory_rows(st: &AppState) -> Result<Vec<Value>, ApiError> {
    let mut by_sku: BTreeMap<String, (i64, i64, Vec<Value>)> = BTreeMap::new();
    for b in st.store.buffers().await? {
        let e = by_sku.entry(b.sku.clone()).or_default();
        e.0 += b.on_hand;
        e.1 += b.reserved;
        e.2.push(json!({"buffer": b.id, "on_hand": b.on_hand, "reserved": b.reserved, "available": b.available}));
    }
    Ok(by_sku
        .into_iter()
        .map(|(sku, (on_hand, reserved, buffers))| {
            json!({"sku": sku, "on_hand": on_hand, "reserved": reserved, "available": on_hand - reserved, "buffers": buffers})
        })
        .collect())
}

async fn list_inventory(req: HttpRequest, st: State) -> Res {
    st.auth.check(&req, Role::Viewer)?;
    Ok(HttpResponse::Ok().json(inventory_rows(&st).await?))
}

async fn get_inventory(req: HttpRequest, st: State, sku: web::Path<String>) -> Res {
    st.auth.check(&req, Role::Viewer)?;
    let rows = inventory_rows(&st).await?;
    let row = rows
        .into_iter()
        .find(|r| r["sku"] == sku.as_str())
        .ok_or_else(|| ApiError::not_found(format!("sku `{sku}` has no buffer")))?;
    Ok(HttpResponse::Ok().json(row))
}

#[derive(Deserialize)]
struct LimitQuery {
    limit: Option<i64>,
}

async fn dead_letters(req: HttpRequest, st: State) -> Res {
    st.auth.check(&req, Role::Viewer)?;
    let q: LimitQuery = super::query(&req)?;
    let rows = st.store.dead_letters(q.limit.unwrap_or(1000).clamp(1, 10_000)).await?;
    let out: Vec<Value> = rows
        .iter()
        .map(|d| json!({"id": d.id, "received_at": rfc3339(d.received_ms), "topic": d.topic, "reason": d.reason, "payload": d.payload}))
        .collect();
    Ok(HttpResponse::Ok().json(out))
}

async fn events(req: HttpRequest, st: State) -> Res {
    st.auth.check(&req, Role::Viewer)?;
    let rx = st.events.subscribe();
    // Each client reads from the shared bounded ring; one that falls more than its
    // capacity behind is told how much it missed and dropped (it reconnects and reloads).
    // Ingest never waits for a listener.
    let stream = futures_util::stream::unfold(Some(rx), |rx| async move {
        use tokio::sync::broadcast::error::RecvError;
        let mut rx = rx?;
        let chunk = match tokio::time::timeout(std::time::Duration::from_secs(15), rx.recv()).await {
            Ok(Ok(ev)) => format!("data: {ev}\n\n"),
            Ok(Err(RecvError::Lagged(n))) => {
                return Some((
                    Ok::<_, actix_web::Error>(web::Bytes::from(format!(
                        "event: dropped\ndata: {{\"missed\": {n}, \"reason\": \"too slow; reconnect\"}}\n\n"
                    ))),
                    None,
                ));
            }
            Ok(Err(RecvError::Closed)) => return None,
            Err(_) => ": keep-alive\n\n".to_string(),
        };
        Some((Ok::<_, actix_web::Error>(web::Bytes::from(chunk)), Some(rx)))
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("cache-control", "no-cache"))
        .streaming(stream))
}

fn money(m: i64) -> String {
    mes_actors::Money(m).to_string()
}

async fn order_cost(req: HttpRequest, st: State, id: web::Path<String>) -> Res {
    st.auth.check(&req, Role::Viewer)?;
    let o = st.store.order(&id).await?.ok_or_else(|| ApiError::not_found(format!("order `{id}` does not exist")))?;
    let spec = st
        .ledger
        .for_order(o.work_center.as_deref(), &o.sku)
        .ok_or_else(|| ApiError::unprocessable("no_routing", format!("no work center makes `{}`", o.sku)))?;
    let (material, conversion, running_ms) = st.store.order_cost_totals(&id).await?;
    let c = mes_actors::ledger::order_cost(spec, o.good, o.scrap, material, conversion);
    Ok(HttpResponse::Ok().json(json!({
        "order": o.id, "sku": o.sku, "good": o.good, "scrap": o.scrap, "status": o.status,
        "standard": money(c.standard), "actual": money(c.actual),
        "variances": {"material_usage": money(c.material_usage), "efficiency": money(c.efficiency), "yield": money(c.yield_)},
        "actual_detail": {"material": money(material), "conversion": money(conversion), "running_s": running_ms as f64 / 1000.0},
        "standard_unit_cost": money(spec.standard_unit_cost),
    })))
}

#[derive(Deserialize)]
struct JournalQuery {
    order: Option<String>,
    limit: Option<i64>,
}

async fn journal(req: HttpRequest, st: State) -> Res {
    st.auth.check(&req, Role::Viewer)?;
    let q: JournalQuery = super::query(&req)?;
    let rows = st.store.journal(q.order.as_deref(), q.limit.unwrap_or(10_000).clamp(1, 100_000)).await?;
    let out: Vec<Value> = rows
        .iter()
        .map(|j| {
            json!({"id": j.id, "at": rfc3339(j.ts_ms), "kind": j.kind, "order": j.order_id,
                   "debit": j.debit, "credit": j.credit, "amount": money(j.amount),
                   "lines": [{"account": j.debit, "debit": money(j.amount), "credit": "0.00"},
                             {"account": j.credit, "debit": "0.00", "credit": money(j.amount)}],
                   "source": {"kind": j.source_kind, "id": j.source_id}})
        })
        .collect();
    Ok(HttpResponse::Ok().json(out))
}

async fn trial_balance(req: HttpRequest, st: State) -> Res {
    st.auth.check(&req, Role::Viewer)?;
    let rows = st.store.trial_balance().await?;
    let (mut d, mut c) = (0i64, 0i64);
    let accounts: Vec<Value> = rows
        .iter()
        .map(|(code, name, debit, credit)| {
            d += debit;
            c += credit;
            json!({"account": code, "name": name, "debit": money(*debit), "credit": money(*credit), "balance": money(debit - credit)})
        })
        .collect();
    Ok(HttpResponse::Ok()
        .json(json!({"accounts": accounts, "total_debits": money(d), "total_credits": money(c), "balanced": d == c})))
}

fn reservation_json(r: &crate::db::queries::ReservationRow) -> Value {
    json!({"id": r.id, "ref": r.reference, "sku": r.sku, "buffer": r.buffer, "quantity": r.quantity,
           "status": r.status, "created_at": rfc3339(r.created_ms)})
}

fn reserve_error(e: crate::db::queries::ReserveError) -> ApiError {
    use crate::db::queries::ReserveError as E;
    match e {
        E::Insufficient { available, requested, .. } => ApiError::conflict("insufficient_stock", e.to_string())
            .with("available", available)
            .with("requested", requested),
        E::UnknownSku(_) => ApiError::unprocessable("unknown_sku", e.to_string()),
        E::NotFound(m) => ApiError::not_found(m),
        E::Conflict(m) => ApiError::conflict("invalid_transition", m),
        E::Db(d) => d.into(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReservationBody {
    sku: String,
    quantity: i64,
    #[serde(rename = "ref")]
    reference: String,
}

async fn create_reservation(req: HttpRequest, st: State, body: web::Bytes) -> Res {
    let caller = st.auth.check(&req, Role::Planner)?;
    let body: ReservationBody = super::json_body(&body)?;
    if body.quantity <= 0 || body.quantity > 1_000_000_000 {
        return Err(ApiError::unprocessable("invalid_field", "`quantity` must be a positive integer"));
    }
    if body.reference.is_empty() || body.reference.len() > 200 {
        return Err(ApiError::unprocessable("invalid_field", "`ref` must be 1-200 characters"));
    }
    match st.store.reserve(&body.sku, body.quantity, &body.reference).await {
        Ok((r, created)) => {
            if created {
                tracing::info!(reservation = %r.id, sku = %r.sku, quantity = r.quantity, by = %caller.name, "reserved");
                let detail =
                    json!({"after": {"status": r.status, "sku": r.sku, "quantity": r.quantity, "ref": r.reference}});
                st.store.audit(&caller.name, "reservation_create", &r.id, &detail.to_string()).await?;
                st.events.publish(json!({"type": "reservation", "id": r.id, "sku": r.sku, "quantity": r.quantity}));
            }
            Ok(HttpResponse::Created().json(reservation_json(&r)))
        }
        Err(e) => Err(reserve_error(e)),
    }
}

async fn get_reservation(req: HttpRequest, st: State, id: web::Path<String>) -> Res {
    st.auth.check(&req, Role::Viewer)?;
    let r = st
        .store
        .reservation(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("reservation `{id}` does not exist")))?;
    Ok(HttpResponse::Ok().json(reservation_json(&r)))
}

async fn ship_reservation(req: HttpRequest, st: State, id: web::Path<String>) -> Res {
    let caller = st.auth.check(&req, Role::Planner)?;
    let unit = match st.store.reservation(&id).await? {
        Some(r) => st.ledger.unit_cost(&st.plant, &r.sku),
        None => 0,
    };
    let r = st.store.finish_reservation(&id, true, unit).await.map_err(reserve_error)?;
    if let Some(b) = st.store.buffers().await?.into_iter().find(|b| b.id == r.buffer) {
        st.live.balance(&b.id, b.on_hand);
    }
    let detail = json!({"before": {"status": "reserved"}, "after": {"status": r.status, "quantity": r.quantity}});
    st.store.audit(&caller.name, "reservation_ship", &r.id, &detail.to_string()).await?;
    st.events.publish(json!({"type": "goods_issue", "reservation": r.id, "sku": r.sku, "quantity": r.quantity}));
    Ok(HttpResponse::Ok().json(reservation_json(&r)))
}

async fn release_reservation(req: HttpRequest, st: State, id: web::Path<String>) -> Res {
    let caller = st.auth.check(&req, Role::Planner)?;
    let r = st.store.finish_reservation(&id, false, 0).await.map_err(reserve_error)?;
    let detail = json!({"before": {"status": "reserved"}, "after": {"status": r.status}});
    st.store.audit(&caller.name, "reservation_release", &r.id, &detail.to_string()).await?;
    Ok(HttpResponse::Ok().json(reservation_json(&r)))
}

#[derive(Deserialize)]
struct MovementQuery {
    buffer: Option<String>,
    after: Option<i64>,
    limit: Option<i64>,
}

async fn list_movements(req: HttpRequest, st: State, sku: web::Path<String>) -> Res {
    st.auth.check(&req, Role::Viewer)?;
    let q: MovementQuery = super::query(&req)?;
    if !st.plant.buffers.iter().any(|b| b.sku == sku.as_str()) {
        return Err(ApiError::not_found(format!("sku `{sku}` has no buffer")));
    }
    let rows = st
        .store
        .movements(&sku, q.buffer.as_deref(), q.after.unwrap_or(0), q.limit.unwrap_or(10_000).clamp(1, 100_000))
        .await?;
    let out: Vec<Value> = rows
        .iter()
        .map(|m| {
            json!({"id": m.id, "at": rfc3339(m.ts_ms), "buffer": m.buffer, "sku": m.sku, "quantity": m.qty,
                   "kind": m.kind, "order": m.order_id, "source": {"kind": m.source_kind, "id": m.source_id}})
        })
        .collect();
    Ok(HttpResponse::Ok().json(out))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdjustmentBody {
    buffer: String,
    sku: Option<String>,
    quantity: i64,
    reason: String,
    #[serde(rename = "ref")]
    reference: String,
}

fn adjustment_json(a: &crate::db::queries::AdjustmentRow) -> Value {
    json!({"id": a.id, "ref": a.reference, "buffer": a.buffer, "sku": a.sku, "quantity": a.quantity,
           "reason": a.reason, "on_hand": a.on_hand_after, "by": a.actor, "created_at": rfc3339(a.created_ms)})
}

async fn create_adjustment(req: HttpRequest, st: State, body: web::Bytes) -> Res {
    use crate::db::queries::{AdjustError, NewAdjustment};
    let caller = st.auth.check(&req, Role::Planner)?;
    let body: AdjustmentBody = super::json_body(&body)?;
    if body.quantity == 0 || body.quantity.unsigned_abs() > 1_000_000_000 {
        return Err(ApiError::unprocessable(
            "invalid_field",
            "`quantity` must be a non-zero integer within ±1000000000",
        ));
    }
    if body.reference.is_empty() || body.reference.len() > 200 {
        return Err(ApiError::unprocessable("invalid_field", "`ref` must be 1-200 characters"));
    }
    if body.reason.trim().is_empty() || body.reason.len() > 500 {
        return Err(ApiError::unprocessable("invalid_field", "`reason` must be 1-500 characters"));
    }
    let Some(buffer) = st.plant.buffer(&body.buffer) else {
        return Err(ApiError::not_found(format!("buffer `{}` does not exist", body.buffer)));
    };
    if let Some(sku) = body.sku.as_deref().filter(|s| *s != buffer.sku) {
        return Err(ApiError::unprocessable(
            "invalid_field",
            format!("buffer `{}` holds `{}`, not `{sku}`", buffer.id, buffer.sku),
        ));
    }
    let new = NewAdjustment {
        buffer: buffer.id.clone(),
        quantity: body.quantity,
        reason: body.reason,
        reference: body.reference,
        actor: caller.name.clone(),
        unit_cost: st.ledger.unit_cost(&st.plant, &buffer.sku),
        account: st.ledger.account(&buffer.sku),
    };
    match st.store.adjust(&new).await {
        Ok((a, created)) => {
            if created {
                tracing::info!(adjustment = %a.id, buffer = %a.buffer, quantity = a.quantity, by = %caller.name, "stock adjusted");
                st.live.balance(&a.buffer, a.on_hand_after);
                st.events.publish(json!({"type": "adjustment", "id": a.id, "buffer": a.buffer, "sku": a.sku,
                                         "quantity": a.quantity, "on_hand": a.on_hand_after}));
            }
            Ok(HttpResponse::Created().json(adjustment_json(&a)))
        }
        Err(e @ AdjustError::Insufficient { available, on_hand, reserved, .. }) => {
            Err(ApiError::conflict("insufficient_stock", e.to_string())
                .with("available", available)
                .with("on_hand", on_hand)
                .with("reserved", reserved))
        }
        Err(AdjustError::NotFound(b)) => Err(ApiError::not_found(format!("buffer `{b}` does not exist"))),
        Err(AdjustError::Db(d)) => Err(d.into()),
    }
}

async fn erp_outbox(req: HttpRequest, st: State) -> Res {
    st.auth.check(&req, Role::Viewer)?;
    let q: LimitQuery = super::query(&req)?;
    let rows = st.store.outbox(q.limit.unwrap_or(1000).clamp(1, 10_000)).await?;
    let out: Vec<Value> = rows
        .iter()
        .map(|d| {
            json!({"id": d.id, "kind": d.kind, "order": d.order_id, "status": d.status, "attempts": d.attempts,
                   "last_error": d.last_error, "document": serde_json::from_str::<Value>(&d.payload).unwrap_or(Value::Null)})
        })
        .collect();
    Ok(HttpResponse::Ok().json(out))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PointWrite {
    value: u64,
}

/// Writes one point of a Modbus device: only points its map marks `writable`; every
/// attempt is audited (who, what, value before and after, result).
async fn write_point(req: HttpRequest, st: State, path: web::Path<(String, String)>, raw: web::Bytes) -> Res {
    let caller = st.auth.check(&req, Role::Operator)?;
    let body: PointWrite = super::json_body(&raw)?;
    let (id, name) = path.into_inner();
    let w = st
        .store
        .work_center(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("work center `{id}` does not exist")))?;
    if w.device_kind == "modbus" && st.modbus_writers.get(&w.device_id).is_none() {
        if let Some(r) = forward_to_owner(&st, &req, &raw, &w.id).await? {
            return Ok(r);
        }
    }
    let h = st
        .modbus_writers
        .get(&w.device_id)
        .ok_or_else(|| ApiError::unprocessable("not_modbus", format!("work center `{id}` has no Modbus device")))?;
    let result = h.write(WriteTarget::Name(name.clone()), body.value).await;
    let detail = match &result {
        Ok((p, before, after)) => {
            json!({"point": p, "value": body.value, "before": before, "after": after, "result": "ok"})
        }
        Err(e) => json!({"point": name, "value": body.value, "result": e.to_string()}),
    };
    st.store.audit(&caller.name, "modbus_write", &w.id, &detail.to_string()).await?;
    match result {
        Ok((p, before, after)) => {
            Ok(HttpResponse::Ok().json(json!({"work_center": w.id, "point": p, "before": before, "after": after})))
        }
        Err(WriteError::Refused(m)) => Err(ApiError::unprocessable("not_writable", m)),
        Err(WriteError::Failed(m)) => Err(ApiError::unavailable(m)),
    }
}
