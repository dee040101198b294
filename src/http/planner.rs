//! Planner endpoints: OEE, work-center queues, surge plans and the audit log; and the
//! background tasks behind them (live OEE cache, queue advance).

use super::api::{apply_order_command, dispatch_order, AppState};
use super::{rfc3339, ApiError, Caller};
use crate::config::Role;
use crate::db::queries::{NewOrder, OrderRow, WorkCenterRow};
use crate::oee_live::{self, LiveCounts};
use actix_web::{web, HttpRequest, HttpResponse};
use mes_actors::oee::{self, Count, Oee, OeeInput, OeeParams, StateAt, StateChange};
use mes_actors::planning::{self, Demand, Stock, WorkCenterCapacity};
use mes_actors::OrderCommand;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

type Res = Result<HttpResponse, ApiError>;
type State = web::Data<AppState>;

/// Window of the live OEE shown with each work center.
pub const LIVE_OEE_WINDOW_MS: i64 = 3_600_000;
/// Longest window `GET …/oee` computes.
const MAX_OEE_WINDOW_MS: i64 = 31 * 24 * 3_600_000;
/// How often the live OEE cache and the queues are refreshed.
const REFRESH: Duration = Duration::from_secs(5);

/// Live OEE per work center over the last [`LIVE_OEE_WINDOW_MS`], refreshed in the
/// background so that listing work centers costs no query per work center.
#[derive(Clone, Default)]
pub struct OeeCache(Arc<RwLock<HashMap<String, Oee>>>);

impl OeeCache {
    pub fn get(&self, wc: &str) -> Option<Oee> {
        self.0.read().ok().and_then(|m| m.get(wc).cloned())
    }
    fn set(&self, wc: &str, o: Oee) {
        if let Ok(mut m) = self.0.write() {
            m.insert(wc.to_string(), o);
        }
    }
}

/// The compact OEE shown with a work center.
pub fn oee_summary(o: &Oee) -> Value {
    json!({
        "window_s": (o.to_ms - o.from_ms) / 1000,
        "from": rfc3339(o.from_ms), "to": rfc3339(o.to_ms),
        "availability": o.availability, "performance": o.performance, "quality": o.quality, "oee": o.oee,
    })
}

fn oee_json(wc: &WorkCenterRow, order: Option<&str>, o: Oee) -> Value {
    let mut v = serde_json::to_value(&o).unwrap_or(Value::Null);
    if let Some(m) = v.as_object_mut() {
        m.insert("work_center".into(), json!(wc.id));
        m.insert("order".into(), json!(order));
        m.insert("from".into(), json!(rfc3339(o.from_ms)));
        m.insert("to".into(), json!(rfc3339(o.to_ms)));
        m.insert("ideal_cycle_s".into(), json!(wc.ideal_cycle_ms as f64 / 1000.0));
    }
    v
}

/// OEE of a work center (or of one order on it) over `[from, to)`, from the recorded
/// state changes and counts.
pub async fn compute_oee(
    st: &AppState,
    wc: &WorkCenterRow,
    order: Option<&str>,
    from: i64,
    to: i64,
) -> Result<Oee, ApiError> {
    // Counts summed per second of device time (per minute beyond a day): start-up reject
    // windows resolve to the bucket, and the rows read stay bounded on a busy line.
    let bucket = if to - from > 86_400_000 { 60_000 } else { 1_000 };
    let counts: Vec<Count> = st
        .store
        .counts(&wc.id, order, from, to, bucket)
        .await?
        .into_iter()
        .map(|(ts_ms, good, scrap)| Count { ts_ms, good, scrap })
        .collect();
    oee_with_counts(st, wc, from, to, &counts).await
}

/// OEE over `[from, to)` from the recorded state changes and the given counts.
async fn oee_with_counts(
    st: &AppState,
    wc: &WorkCenterRow,
    from: i64,
    to: i64,
    counts: &[Count],
) -> Result<Oee, ApiError> {
    let t = st.store.timeline(&wc.id, from, to).await?;
    let initial = t.initial.map(|(state, reason)| StateAt { state, reason });
    let changes: Vec<StateChange> =
        t.changes.into_iter().map(|(ts_ms, state, reason)| StateChange { ts_ms, state, reason }).collect();
    let input = OeeInput {
        from_ms: from,
        to_ms: to,
        initial: initial.as_ref(),
        changes: &changes,
        counts,
        ideal_cycle_ms: wc.ideal_cycle_ms.max(1),
    };
    oee::oee(&input, &OeeParams::default())
        .map(Oee::rounded)
        .map_err(|e| ApiError::unprocessable("invalid_window", e.to_string()))
}

/// A time given as RFC 3339, a date (its start, UTC), or Unix milliseconds.
fn parse_time(key: &str, s: &str) -> Result<i64, ApiError> {
    crate::time::instant_ms(s, crate::time::Day::Start).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_query",
            format!("`{key}` `{s}` is not an RFC 3339 time, a date or Unix milliseconds"),
        )
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WindowQuery {
    from: Option<String>,
    to: Option<String>,
}

fn window(q: &WindowQuery) -> Result<(i64, i64), ApiError> {
    let now = crate::now_ms();
    let to = q.to.as_deref().map(|s| parse_time("to", s)).transpose()?.unwrap_or(now);
    let from = q.from.as_deref().map(|s| parse_time("from", s)).transpose()?.unwrap_or(to - LIVE_OEE_WINDOW_MS);
    if from >= to {
        return Err(ApiError::bad_request("invalid_window", "`from` must be before `to`"));
    }
    if to - from > MAX_OEE_WINDOW_MS {
        return Err(ApiError::bad_request("invalid_window", "the window may be at most 31 days"));
    }
    Ok((from, to))
}

async fn work_center(st: &AppState, id: &str) -> Result<WorkCenterRow, ApiError> {
    st.store.work_center(id).await?.ok_or_else(|| ApiError::not_found(format!("work center `{id}` does not exist")))
}

pub(super) async fn work_center_oee(req: HttpRequest, st: State, id: web::Path<String>) -> Res {
    st.auth.check(&req, Role::Viewer)?;
    let q: WindowQuery = super::query(&req)?;
    let wc = work_center(&st, &id).await?;
    let (from, to) = window(&q)?;
    let o = compute_oee(&st, &wc, None, from, to).await?;
    Ok(HttpResponse::Ok().json(oee_json(&wc, None, o)))
}

/// OEE of one order: over the span its output was counted (to now while it is open).
pub(super) async fn order_oee(req: HttpRequest, st: State, id: web::Path<String>) -> Res {
    st.auth.check(&req, Role::Viewer)?;
    let o = st.store.order(&id).await?.ok_or_else(|| ApiError::not_found(format!("order `{id}` does not exist")))?;
    let Some(wc_id) = o.work_center.as_deref() else {
        return Err(ApiError::unprocessable("no_work_center", format!("order `{id}` has no work center")));
    };
    let wc = work_center(&st, wc_id).await?;
    let Some((first, last)) = st.store.order_span(&o.id, wc_id).await? else {
        return Ok(HttpResponse::Ok().json(json!({"work_center": wc.id, "order": o.id, "oee": null,
            "message": "no output counted for this order yet"})));
    };
    let open = matches!(o.status.as_str(), "released" | "running");
    let to = if open { crate::now_ms().max(last + 1) } else { last + 1 };
    let from = first.min(to - 1).max(to - MAX_OEE_WINDOW_MS);
    let r = compute_oee(&st, &wc, Some(&o.id), from, to).await?;
    Ok(HttpResponse::Ok().json(oee_json(&wc, Some(&o.id), r)))
}

pub(super) async fn work_center_queue(req: HttpRequest, st: State, id: web::Path<String>) -> Res {
    st.auth.check(&req, Role::Viewer)?;
    let wc = work_center(&st, &id).await?;
    let q = st.store.work_center_queue(&wc.id).await?;
    let items: Vec<Value> = q
        .iter()
        .enumerate()
        .map(|(i, o)| {
            json!({"position": i + 1, "id": o.id, "sku": o.sku, "quantity": o.quantity, "good": o.good,
                   "status": o.status, "priority": o.priority, "due": o.due,
                   "current": wc.current_order.as_deref() == Some(o.id.as_str())})
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({"work_center": wc.id, "current_order": wc.current_order, "orders": items})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    limit: Option<i64>,
    before: Option<i64>,
    actor: Option<String>,
}

pub(super) async fn audit(req: HttpRequest, st: State) -> Res {
    st.auth.check(&req, Role::Admin)?;
    let q: AuditQuery = super::query(&req)?;
    let limit = q.limit.unwrap_or(200).clamp(1, 5000);
    let rows = st.store.audit_log(q.actor.as_deref(), q.before, limit).await?;
    let out: Vec<Value> = rows
        .iter()
        .map(|a| {
            json!({"id": a.id, "at": rfc3339(a.ts_ms), "actor": a.actor, "action": a.action, "target": a.target,
                   "detail": serde_json::from_str::<Value>(&a.detail).unwrap_or_else(|_| json!(a.detail))})
        })
        .collect();
    Ok(HttpResponse::Ok().json(out))
}

// ---- surge plans ----

fn surge_error(e: planning::PlanError) -> ApiError {
    ApiError::unprocessable("plan_error", e.to_string())
}

/// Plans `demand` against the plant as it is now: stock, open orders and measured OEE.
async fn plan(st: &AppState, demand: &Demand) -> Result<planning::SurgePlan, ApiError> {
    let plant = &st.plant;
    let mut bom = planning::Bom::new();
    for b in &plant.boms {
        let comps = b.components.iter().map(|c| (c.sku.clone(), c.quantity.0.max(0) as u64)).collect();
        bom.insert(b.sku.clone(), comps);
    }
    let buffers = st.store.buffers().await?;
    let sku_of: BTreeMap<&str, &str> = buffers.iter().map(|b| (b.id.as_str(), b.sku.as_str())).collect();
    let mut stock: BTreeMap<String, Stock> = BTreeMap::new();
    for b in &buffers {
        let s = stock.entry(b.sku.clone()).or_default();
        s.on_hand += b.on_hand;
        s.reserved += b.reserved;
    }
    let load: BTreeMap<String, i64> = st.store.open_load().await?.into_iter().collect();
    let mut work_centers = Vec::new();
    for w in st.store.work_centers().await? {
        let Some(sku) = sku_of.get(w.output_buffer.as_str()) else { continue };
        let measured = st.oee.get(&w.id).and_then(|o| o.oee).filter(|x| *x > 0.0);
        work_centers.push(WorkCenterCapacity {
            id: w.id.clone(),
            output_sku: sku.to_string(),
            ideal_cycle_ms: w.ideal_cycle_ms.max(1),
            oee: measured,
            committed_load_units: load.get(&w.id).copied().unwrap_or(0).max(0) as u64,
        });
    }
    let open_supply =
        st.store.open_supply().await?.into_iter().map(|(sku, n)| (sku, n.max(0) as u64)).collect::<BTreeMap<_, _>>();
    let p = planning::Plant { bom, work_centers, stock, open_supply };
    planning::plan_surge(demand, &p).map_err(surge_error)
}

fn plan_json(row: &crate::db::planner::SurgePlanRow) -> Value {
    let mut v: Value = serde_json::from_str(&row.plan).unwrap_or(Value::Null);
    if let Some(m) = v.as_object_mut() {
        m.insert("id".into(), json!(row.id));
        m.insert("status".into(), json!(row.status));
        m.insert("due".into(), json!(rfc3339(row.due_ms)));
        m.insert("created_at".into(), json!(rfc3339(row.created_ms)));
        m.insert("created_by".into(), json!(row.created_by));
        m.insert("released_at".into(), json!(row.released_ms.map(rfc3339)));
    }
    v
}

pub(super) async fn create_surge_plan(req: HttpRequest, st: State, body: web::Bytes) -> Res {
    let caller = st.auth.check(&req, Role::Planner)?;
    let body: Value = super::json_body(&body)?;
    let obj =
        body.as_object().ok_or_else(|| ApiError::bad_request("invalid_body", "the body must be a JSON object"))?;
    for k in obj.keys() {
        if !["sku", "quantity", "due"].contains(&k.as_str()) {
            return Err(ApiError::unprocessable("unknown_field", format!("unknown field `{k}`")));
        }
    }
    let sku = obj
        .get("sku")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::unprocessable("missing_field", "`sku` is required (a string)"))?;
    let quantity = obj
        .get("quantity")
        .and_then(Value::as_i64)
        .filter(|q| *q > 0 && *q <= 1_000_000_000)
        .ok_or_else(|| ApiError::unprocessable("invalid_field", "`quantity` must be a positive integer"))?;
    let due = obj
        .get("due")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::unprocessable("missing_field", "`due` is required (RFC 3339 time or date)"))?;
    let due_ms = parse_time("due", due).map_err(|e| ApiError::unprocessable("invalid_field", e.message))?;
    let now = crate::now_ms();
    if due_ms <= now {
        return Err(ApiError::unprocessable("due_in_past", format!("`due` {due} is not in the future")));
    }
    if !st.store.sku_exists(sku).await? {
        return Err(ApiError::unprocessable("unknown_sku", format!("sku `{sku}` is not a material of this plant")));
    }
    let demand = Demand { sku: sku.to_string(), quantity: quantity as u64, due_ms, now_ms: now };
    let p = plan(&st, &demand).await?;
    if p.requirements.first().is_none_or(|r| r.purchased) {
        return Err(ApiError::unprocessable("not_producible", format!("no work center makes `{sku}`")));
    }
    let row = crate::db::planner::SurgePlanRow {
        id: super::api::new_id("SP"),
        sku: sku.to_string(),
        quantity,
        due_ms,
        status: "proposed".into(),
        plan: serde_json::to_string(&p).map_err(|e| ApiError::unprocessable("plan_error", e.to_string()))?,
        created_by: caller.name.clone(),
        created_ms: now,
        released_ms: None,
    };
    st.store.insert_surge_plan(&row).await?;
    let detail = json!({"after": {"sku": sku, "quantity": quantity, "due": due, "feasible": p.feasible,
                                  "bottleneck": p.bottleneck, "orders": p.proposed_orders.len()}});
    st.store.audit(&caller.name, "surge_plan_create", &row.id, &detail.to_string()).await?;
    tracing::info!(plan = %row.id, sku, quantity, feasible = p.feasible, bottleneck = ?p.bottleneck, "surge plan");
    Ok(HttpResponse::Created().json(plan_json(&row)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<i64>,
}

pub(super) async fn list_surge_plans(req: HttpRequest, st: State) -> Res {
    st.auth.check(&req, Role::Viewer)?;
    let q: ListQuery = super::query(&req)?;
    let rows = st.store.surge_plans(q.limit.unwrap_or(100).clamp(1, 1000)).await?;
    Ok(HttpResponse::Ok().json(rows.iter().map(plan_json).collect::<Vec<_>>()))
}

pub(super) async fn get_surge_plan(req: HttpRequest, st: State, id: web::Path<String>) -> Res {
    st.auth.check(&req, Role::Viewer)?;
    let row = st
        .store
        .surge_plan(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("surge plan `{id}` does not exist")))?;
    Ok(HttpResponse::Ok().json(plan_json(&row)))
}

/// Creates and releases the plan's proposed orders. Idempotent: the orders have ids
/// derived from the plan (`{plan}-01`, …), so a repeated call creates nothing new and
/// answers with the same orders.
pub(super) async fn release_surge_plan(req: HttpRequest, st: State, id: web::Path<String>) -> Res {
    let caller = st.auth.check(&req, Role::Planner)?;
    let row = st
        .store
        .surge_plan(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("surge plan `{id}` does not exist")))?;
    let p: planning::SurgePlan =
        serde_json::from_str(&row.plan).map_err(|e| ApiError::unprocessable("plan_error", e.to_string()))?;
    let due = rfc3339(p.due_ms);
    let mut orders: Vec<OrderRow> = Vec::new();
    for (i, po) in p.proposed_orders.iter().enumerate() {
        let order_id = format!("{}-{:02}", row.id, i + 1);
        let new = NewOrder {
            id: order_id.clone(),
            sku: po.sku.clone(),
            quantity: po.quantity.min(i64::MAX as u64) as i64,
            due: Some(due.clone()),
            priority: 10,
            work_center: Some(po.work_center.clone()),
        };
        let render = |_: &OrderRow| String::new();
        if let Some(created) = st.store.create_order(&new, None, render).await? {
            let detail = json!({"after": {"status": created.status, "sku": created.sku, "quantity": created.quantity,
                                          "work_center": created.work_center, "surge_plan": row.id}});
            st.store.audit(&caller.name, "order_create", &created.id, &detail.to_string()).await?;
        }
        let current = st.store.order(&order_id).await?;
        let o = match current {
            Some(o) if o.status == "planned" => {
                apply_order_command(&st, &order_id, OrderCommand::Release, &caller).await?
            }
            Some(o) => o,
            None => return Err(ApiError::conflict("conflict", format!("order `{order_id}` vanished"))),
        };
        orders.push(o);
    }
    let first = st.store.mark_plan_released(&row.id).await?;
    if first {
        let detail = json!({"before": {"status": "proposed"}, "after": {"status": "released", "orders": orders.len()}});
        st.store.audit(&caller.name, "surge_plan_release", &row.id, &detail.to_string()).await?;
    }
    let row = st.store.surge_plan(&row.id).await?.unwrap_or(row);
    let list: Vec<Value> = orders
        .iter()
        .map(|o| {
            json!({"id": o.id, "sku": o.sku, "quantity": o.quantity, "work_center": o.work_center,
                   "status": o.status, "due": o.due, "priority": o.priority})
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({"plan": plan_json(&row), "orders": list})))
}

// ---- background ----

/// Refreshes the live OEE cache and advances idle work-center queues, every few seconds,
/// until `shutdown`.
pub async fn run_background(st: web::Data<AppState>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let system = Caller { name: "mes".into(), role: Role::Admin };
    // A single node keeps the live OEE's counts from new rows only (`oee_live`).
    let mut counts = st.cluster.is_none().then(LiveCounts::default);
    // An order that ends hands its work center to the next one at once, not at the next
    // refresh: a line at a promo's pace makes hundreds of parts in 5 s.
    let mut events = Some(st.events.subscribe());
    let advance = || async {
        if let Err(e) = advance_queues(&st, &system).await {
            tracing::warn!(error = %e, "work-center queues not advanced");
        }
    };
    loop {
        let refreshed = match counts.as_mut() {
            Some(c) => refresh_oee_incremental(&st, c).await,
            None => refresh_oee(&st).await,
        };
        if let Err(e) = refreshed {
            tracing::warn!(error = %e, "live OEE not refreshed");
        }
        advance().await;
        let next = tokio::time::Instant::now() + REFRESH;
        loop {
            use tokio::sync::broadcast::error::RecvError;
            let ended = async {
                match events.as_mut() {
                    Some(rx) => Some(rx.recv().await),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep_until(next) => break,
                e = ended => match e {
                    Some(Ok(e)) if ends_an_order(&e) => advance().await,
                    // Missed events may have held one.
                    Some(Err(RecvError::Lagged(_))) => advance().await,
                    Some(Err(RecvError::Closed)) | None => events = None,
                    Some(Ok(_)) => {}
                },
            }
        }
    }
}

/// Whether a live event tells of an order that ended (completed, closed or cancelled), so
/// its work center may take the next order of its queue.
fn ends_an_order(e: &serde_json::Value) -> bool {
    let status = match e["type"].as_str() {
        Some("order_status") => &e["to"],
        Some("order") => &e["status"],
        _ => return false,
    };
    matches!(status.as_str(), Some("completed" | "closed" | "cancelled"))
}

/// Live OEE: the last hour up to now, or up to the device's latest reading when its clock
/// runs ahead (a simulator at 10× speed). A cluster node: counts read from the table.
async fn refresh_oee(st: &AppState) -> Result<(), ApiError> {
    let now = crate::now_ms();
    for w in st.store.work_centers().await? {
        let to = st.store.latest_time(&w.id).await?.map_or(now, |t| t.saturating_add(1).max(now));
        let o = compute_oee(st, &w, None, to - LIVE_OEE_WINDOW_MS, to).await?;
        st.oee.set(&w.id, o);
    }
    Ok(())
}

/// Row ids summed per read of new telemetry (a bound on each read's time).
const LIVE_IDS_PER_READ: i64 = 50_000;
/// Rows received this long before the window are read at the first fill too (a device's
/// time may lag its receive time).
const LIVE_FILL_SLACK_MS: i64 = 600_000;

/// Live OEE as [`refresh_oee`], over whole minutes (`oee_live::window_start`), with the
/// counts kept in `counts` and only the rows committed since the last refresh read.
async fn refresh_oee_incremental(st: &AppState, counts: &mut LiveCounts) -> Result<(), ApiError> {
    let now = crate::now_ms();
    let mut after = match counts.last_id {
        Some(id) => id,
        None => st.store.telemetry_id_since(now - LIVE_OEE_WINDOW_MS - LIVE_FILL_SLACK_MS).await? - 1,
    };
    let top = st.store.telemetry_max_id().await?;
    while after < top {
        let upto = top.min(after.saturating_add(LIVE_IDS_PER_READ));
        let c = st.store.telemetry_counts(after, upto).await?;
        for (wc, minute, good, latest) in &c.good {
            counts.add_good(wc, *minute, *good, *latest);
        }
        for (wc, ts_ms, scrap) in &c.scrap {
            counts.add(wc, *ts_ms, 0, *scrap);
        }
        after = upto;
        counts.last_id = Some(after);
    }
    for w in st.store.work_centers().await? {
        let to = counts.latest(&w.id).map_or(now, |t| t.saturating_add(1).max(now));
        let from = oee_live::window_start(to, LIVE_OEE_WINDOW_MS);
        let o = oee_with_counts(st, &w, from, to, &counts.counts(&w.id, from, to)).await?;
        counts.prune(&w.id, from);
        st.oee.set(&w.id, o);
    }
    Ok(())
}

/// A work center whose current order finished takes the next released order of its queue
/// (priority, then due date) and sends it to the device.
pub async fn advance_queues(st: &AppState, by: &Caller) -> Result<(), ApiError> {
    for wc in st.store.idle_queues().await? {
        if let Some(next) = st.store.advance_queue(&wc).await? {
            tracing::info!(work_center = %wc, order = %next.id, "next order from the queue");
            let detail = json!({"after": {"current_order": next.id}});
            st.store.audit(&by.name, "queue_advance", &wc, &detail.to_string()).await?;
            dispatch_order(st, &next, &wc, &by.name).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::ends_an_order;
    use serde_json::json;

    #[test]
    fn an_order_ends_when_it_completes_or_is_closed_or_cancelled() {
        for e in [
            json!({"type": "order_status", "order": "PO-1", "from": "running", "to": "completed"}),
            json!({"type": "order", "order": "PO-1", "status": "closed"}),
            json!({"type": "order", "order": "PO-1", "status": "cancelled"}),
        ] {
            assert!(ends_an_order(&e), "{e}");
        }
        for e in [
            json!({"type": "order_status", "order": "PO-1", "from": "released", "to": "running"}),
            json!({"type": "order", "order": "PO-1", "status": "released"}),
            json!({"type": "counts", "work_center": "BLANK-1", "status": "completed"}),
            json!("completed"),
        ] {
            assert!(!ends_an_order(&e), "{e}");
        }
    }
}
