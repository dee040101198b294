//! Modbus TCP polling against a real Modbus TCP server (tokio-modbus's), by the shipped
//! `press-v1` map: wraps, device restarts, MES restarts and an outage count exactly; a
//! stopped or hung device is unreachable within 3 poll periods and delays no other; an
//! exception reply is shown by name; writes are refused unless writable, read back and
//! audited.

use crate::harness::{free_port, Mes, MesOptions};
use serde_json::{json, Value};
use std::future::{ready, Future, Ready};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_modbus::prelude::*;
use tokio_modbus::server::tcp::{accept_tcp_connection, Server};

/// Register image of one press (`press-v1`: CDAB u32 good at 2, u16 scrap at 4, u16 boot at 7).
#[derive(Clone)]
pub(crate) struct Press(pub(crate) Arc<Mutex<Vec<u16>>>, pub(crate) Arc<Mutex<u32>>);

impl Press {
    pub(crate) fn new() -> Self {
        Press(Arc::new(Mutex::new(vec![0; 200])), Arc::new(Mutex::new(0)))
    }
    pub(crate) fn writes(&self) -> u32 {
        *self.1.lock().expect("lock")
    }
    pub(crate) fn u32_at(&self, a: usize) -> u32 {
        let r = self.0.lock().expect("lock");
        u32::from(r[a]) | (u32::from(r[a + 1]) << 16)
    }
    pub(crate) fn reg(&self, a: usize) -> u16 {
        self.0.lock().expect("lock")[a]
    }
    pub(crate) fn set(&self, good: u32, scrap: u16, boot: u16, state: u16) {
        let mut r = self.0.lock().expect("lock");
        r[0] = state;
        r[2] = (good & 0xFFFF) as u16; // CDAB: low word first
        r[3] = (good >> 16) as u16;
        r[4] = scrap;
        r[7] = boot;
    }
}

impl tokio_modbus::server::Service for Press {
    type Request = SlaveRequest<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: SlaveRequest<'static>) -> Self::Future {
        let mut regs = self.0.lock().expect("lock");
        match &req.request {
            Request::WriteMultipleRegisters(a, words) => {
                *self.1.lock().expect("lock") += 1;
                let a = usize::from(*a);
                if a + words.len() > regs.len() {
                    return ready(Err(ExceptionCode::IllegalDataAddress));
                }
                regs[a..a + words.len()].copy_from_slice(words);
                return ready(Ok(Response::WriteMultipleRegisters(a as u16, words.len() as u16)));
            }
            Request::WriteSingleRegister(a, w) => {
                *self.1.lock().expect("lock") += 1;
                regs[usize::from(*a)] = *w;
                return ready(Ok(Response::WriteSingleRegister(*a, *w)));
            }
            _ => {}
        }
        let words = |a: u16, n: u16| -> Result<Vec<u16>, ExceptionCode> {
            let (a, n) = (usize::from(a), usize::from(n));
            regs.get(a..a + n).map(<[u16]>::to_vec).ok_or(ExceptionCode::IllegalDataAddress)
        };
        ready(match req.request {
            Request::ReadHoldingRegisters(a, n) => words(a, n).map(Response::ReadHoldingRegisters),
            Request::ReadInputRegisters(a, n) => words(a, n).map(Response::ReadInputRegisters),
            _ => Err(ExceptionCode::IllegalFunction),
        })
    }
}

/// A press that can go silent: while `hung` is set, every request it receives waits
/// forever (the TCP connection stays open, no reply, no exception), like a stalled PLC.
#[derive(Clone)]
struct Hangable {
    press: Press,
    hung: Arc<AtomicBool>,
}

impl tokio_modbus::server::Service for Hangable {
    type Request = SlaveRequest<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Result<Response, ExceptionCode>> + Send>>;

    fn call(&self, req: SlaveRequest<'static>) -> Self::Future {
        if self.hung.load(Ordering::SeqCst) {
            return Box::pin(std::future::pending());
        }
        Box::pin(tokio_modbus::server::Service::call(&self.press, req))
    }
}

pub(crate) fn serve(addr: SocketAddr, press: Press) -> tokio::task::JoinHandle<()> {
    serve_service(addr, press)
}

/// Serves `service` on `addr` (retrying the bind while the port is still taken); aborting
/// the task closes the listener and every open connection.
fn serve_service<S>(addr: SocketAddr, service: S) -> tokio::task::JoinHandle<()>
where
    S: tokio_modbus::server::Service<Request = SlaveRequest<'static>, Response = Response, Exception = ExceptionCode>
        + Clone
        + Send
        + Sync
        + 'static,
{
    tokio::spawn(async move {
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let server = Server::new(listener);
        let on_connected = |stream, peer| {
            let service = service.clone();
            async move { accept_tcp_connection(stream, peer, move |_| Ok(Some(service.clone()))) }
        };
        let _ = server.serve(&on_connected, |_e| {}).await;
    })
}

pub(crate) fn plant(addr: SocketAddr) -> String {
    crate::harness::widget_plant(&format!(
        r#"{{ modbus = {{ address = "{addr}", unit = 1, map = "press-v1", poll_ms = 50 }} }}"#
    ))
}

/// The plant of [`plant`] with a second press, PRESS-2 (device `press-2`), at `b`; each
/// polled every `*_poll_ms`.
fn two_presses(a: SocketAddr, a_poll_ms: u64, b: SocketAddr, b_poll_ms: u64) -> String {
    let mut text = crate::harness::widget_plant(&format!(
        r#"{{ modbus = {{ address = "{a}", unit = 1, map = "press-v1", poll_ms = {a_poll_ms} }} }}"#
    ));
    text.push_str(&format!(
        r#"
[[work_centers]]
id = "PRESS-2"
name = "Press 2"
ideal_cycle_s = 1.0
conversion_rate_per_hour = "60.00"
inputs = ["RM"]
output = "FG"
device = {{ modbus = {{ address = "{b}", unit = 1, map = "press-v1", poll_ms = {b_poll_ms} }} }}
"#
    ));
    text
}

/// GET with an optional bearer token: (status, body).
async fn get_as(mes: &Mes, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = mes.client.get(format!("{}{path}", mes.http));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.expect("GET");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A work center's device status and last error, as `GET /work-centers/{id}` shows them.
async fn status_of(mes: &Mes, wc: &str, token: Option<&str>) -> (String, Option<String>) {
    let (s, w) = get_as(mes, &format!("/api/v1/work-centers/{wc}"), token).await;
    assert_eq!(s, 200, "{w}");
    let status = w["device"]["status"].as_str().unwrap_or("").to_string();
    (status, w["device"]["last_error"].as_str().map(str::to_string))
}

/// Polls (every 10 ms, bounded by `within`) until `wc`'s device shows `want`; returns
/// what it shows last.
pub(crate) async fn wait_status_of(mes: &Mes, wc: &str, token: Option<&str>, want: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let (s, _) = status_of(mes, wc, token).await;
        if s == want || Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn device_status(mes: &Mes) -> String {
    status_of(mes, "PRESS-1", None).await.0
}

async fn wait_status(mes: &Mes, want: &str, within: Duration) -> String {
    wait_status_of(mes, "PRESS-1", None, want, within).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wraps_restarts_and_outages_count_exactly() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let press = Press::new();
    press.set(0xFFFF_FFFA, 65_530, 1, 1);
    let mut server = serve(addr, press.clone());
    let mut mes = Mes::start(MesOptions { plant: Some(plant(addr)), ..Default::default() }).await;
    assert_eq!(wait_status(&mes, "online", Duration::from_secs(10)).await, "online");
    // The first reading is the baseline: nothing counted.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(mes.totals("PRESS-1").await, (0, 0));

    // u32 good crosses 2^32 and a word boundary; u16 scrap wraps.
    press.set(4, 2, 1, 1);
    assert_eq!(mes.wait_totals("PRESS-1", (10, 8)).await, (10, 8));

    // Device restart: boot + 1, counters from zero.
    press.set(7, 1, 2, 1);
    assert_eq!(mes.wait_totals("PRESS-1", (17, 9)).await, (17, 9));

    // MES restart: what the device counted while the MES was down is counted, once.
    let (status, _) = mes.terminate();
    assert!(status.success());
    press.set(20, 1, 2, 1);
    mes.spawn().await;
    assert_eq!(mes.wait_totals("PRESS-1", (30, 9)).await, (30, 9));

    // Outage: unreachable within 3 poll periods (50 ms here) plus 100 ms for the API side
    // (this loop polls every 10 ms; each GET is a database read), exact afterwards.
    server.abort();
    let _ = server.await;
    let t = Instant::now();
    assert_eq!(wait_status(&mes, "unreachable", Duration::from_secs(5)).await, "unreachable");
    let took = t.elapsed();
    eprintln!("server stopped → unreachable in the API: {took:?} (poll 50 ms)");
    assert!(took <= Duration::from_millis(3 * 50 + 100), "took {took:?}");
    let (_, w) = mes.get("/api/v1/work-centers/PRESS-1").await;
    let e = w["device"]["last_error"].as_str().unwrap_or("");
    assert!(e.starts_with("read ") || e.starts_with("connect: "), "{w}");
    assert_eq!(mes.metric("mes_modbus_devices{status=\"unreachable\"}").await, 1);
    press.set(25, 3, 2, 1);
    server = serve(addr, press.clone());
    assert_eq!(mes.wait_totals("PRESS-1", (35, 11)).await, (35, 11));
    assert_eq!(device_status(&mes).await, "online");
    // Settled like any other output: 35 WIDGET in, 2 × 46 SHEET out.
    let (_, b) = mes.get("/api/v1/buffers").await;
    let on_hand = |id: &str| b.as_array().and_then(|a| a.iter().find(|x| x["id"] == id)).map(|x| x["on_hand"].clone());
    assert_eq!(on_hand("FG"), Some(serde_json::json!(35)));
    assert_eq!(on_hand("RM"), Some(serde_json::json!(50_000 - 2 * 46)));
    assert!(mes.metric("mes_modbus_polls_total").await > 0);
    server.abort();
}

#[test]
fn a_bad_map_stops_start_up_naming_the_work_center() {
    let dir = crate::harness::temp_dir();
    let text = plant("127.0.0.1:1".parse().expect("addr")).replace("map = \"press-v1\"", "map = \"no-such-map\"");
    std::fs::write(dir.join("plant.toml"), text).expect("write");
    std::fs::write(
        dir.join("c.toml"),
        format!(
            "[database]\nurl = \"sqlite://{}/db.sqlite\"\n[plant]\nfile = \"{}/plant.toml\"\n",
            dir.display(),
            dir.display()
        ),
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mes"))
        .args(["migrate", "--config"])
        .arg(dir.join("c.toml"))
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("work center `PRESS-1`") && err.contains("no-such-map"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Named callers, so that the audit log's `actor` is checked, not a default.
const WRITE_TOKENS: &str = r#"
[[auth.tokens]]
name = "op-ann"
role = "operator"
token = "operator-token-ann"
[[auth.tokens]]
name = "plan-bob"
role = "planner"
token = "planner-token-bob"
[[auth.tokens]]
name = "admin-cy"
role = "admin"
token = "admin-token-cy"
"#;
const OPERATOR: &str = "operator-token-ann";
const PLANNER: &str = "planner-token-bob";
const ADMIN: &str = "admin-token-cy";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_only_writable_points_audited_and_read_back() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let press = Press::new();
    press.set(0, 0, 1, 2);
    let server = serve(addr, press.clone());
    let opts = MesOptions { plant: Some(plant(addr)), extra_config: WRITE_TOKENS.into(), ..Default::default() };
    let mes = Mes::start(opts).await;
    assert_eq!(wait_status_of(&mes, "PRESS-1", Some(ADMIN), "online", Duration::from_secs(10)).await, "online");
    let (op, planner) = (format!("Bearer {OPERATOR}"), format!("Bearer {PLANNER}"));
    let as_op = [("Authorization", op.as_str())];
    let as_planner = [("Authorization", planner.as_str())];

    // A counter is not writable: refused, and nothing reaches the device.
    let (s, refused) = mes.post("/api/v1/work-centers/PRESS-1/points/good_count", json!({"value": 5}), &as_op).await;
    assert_eq!((s, refused["error"]["code"].as_str()), (422, Some("not_writable")), "{refused}");
    let (s, unknown) = mes.post("/api/v1/work-centers/PRESS-1/points/nope", json!({"value": 5}), &as_op).await;
    assert_eq!((s, unknown["error"]["code"].as_str()), (422, Some("not_writable")), "{unknown}");
    assert_eq!(press.writes(), 0);

    // A writable u32 in CDAB order, read back.
    let (s, r) = mes.post("/api/v1/work-centers/PRESS-1/points/order_target", json!({"value": 70_000}), &as_op).await;
    assert_eq!((s, r["after"].as_u64(), r["before"].as_u64()), (200, Some(70_000), Some(0)), "{r}");
    assert_eq!(press.u32_at(100), 70_000);

    // start/stop go to the `command` point.
    let (s, start) = mes.post("/api/v1/work-centers/PRESS-1/commands", json!({"cmd": "start"}), &as_op).await;
    assert_eq!(s, 202, "{start}");
    assert_eq!(press.reg(102), 1);
    let (s, stop) = mes.post("/api/v1/work-centers/PRESS-1/commands", json!({"cmd": "stop"}), &as_op).await;
    assert_eq!(s, 202, "{stop}");
    assert_eq!(press.reg(102), 0);

    // Releasing an order dispatches its quantity to the `target` point.
    let (s, _) = mes
        .post(
            "/api/v1/orders",
            json!({"id": "PO-M", "sku": "WIDGET", "quantity": 500, "work_center": "PRESS-1"}),
            &as_planner,
        )
        .await;
    assert_eq!(s, 201);
    let (s, _) = mes.post("/api/v1/orders/PO-M/release", json!({}), &as_planner).await;
    assert_eq!(s, 200);
    assert_eq!(press.u32_at(100), 500);
    assert_eq!(press.writes(), 4);

    // The audit log: who, what, the value before and after (read back), the result.
    let (s, audit) = get_as(&mes, "/api/v1/audit?limit=100", Some(ADMIN)).await;
    assert_eq!(s, 200, "{audit}");
    let mut lines: Vec<Value> = audit.as_array().expect("audit lines").clone();
    lines.reverse(); // oldest first
    let writes: Vec<Value> = lines
        .iter()
        .filter(|l| matches!(l["action"].as_str(), Some("modbus_write" | "command" | "dispatch")))
        .map(|l| json!([l["actor"], l["action"], l["target"], l["detail"]]))
        .collect();
    let dispatch_id = lines
        .iter()
        .find(|l| l["action"] == "dispatch")
        .and_then(|l| l["detail"]["dispatch"].as_str())
        .expect("a dispatch line")
        .to_string();
    assert!(dispatch_id.starts_with("DSP"), "{dispatch_id}");
    let expected = vec![
        json!(["op-ann", "modbus_write", "PRESS-1",
               {"point": "good_count", "value": 5, "result": refused["error"]["message"]}]),
        json!(["op-ann", "modbus_write", "PRESS-1",
               {"point": "nope", "value": 5, "result": unknown["error"]["message"]}]),
        json!(["op-ann", "modbus_write", "PRESS-1",
               {"point": "order_target", "value": 70_000, "before": 0, "after": 70_000, "result": "ok"}]),
        json!(["op-ann", "command", "PRESS-1",
               {"cmd": "start", "id": start["id"], "device": "press-1", "point": "command", "value": 1,
                "before": 0, "after": 1, "result": "ok"}]),
        json!(["op-ann", "command", "PRESS-1",
               {"cmd": "stop", "id": stop["id"], "device": "press-1", "point": "command", "value": 0,
                "before": 1, "after": 0, "result": "ok"}]),
        json!(["plan-bob", "dispatch", "PRESS-1",
               {"dispatch": dispatch_id, "order": "PO-M", "device": "press-1", "channel": "modbus",
                "after": {"status": "acknowledged"}, "error": null,
                "write": {"point": "order_target", "value": 500, "before": 70_000, "after": 500, "result": "ok"}}]),
    ];
    assert_eq!(writes, expected, "{audit:#}");
    // The refusals name the point and why.
    assert!(refused["error"]["message"].as_str().is_some_and(|m| m.contains("good_count")), "{refused}");
    server.abort();
}

/// Every type × word order, encoded into a real server's registers and read back over
/// Modbus TCP by the map's read plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_and_word_order_decodes_over_the_wire() {
    use mes_plc_maps::{encode, plan, RegisterMap, Snapshot, Value};
    use tokio_modbus::client::Reader;
    let mut text = String::from("name = \"all-types\"\nversion = 1\n");
    let mut expect: Vec<(String, Value)> = Vec::new();
    let mut address = 0u32;
    let samples: [(&str, u32, Value); 4] = [
        ("u32", 2, Value::U64(0x1234_5678)),
        ("i32", 2, Value::I64(-123_456_789)),
        ("f32", 2, Value::F64(-1234.5)),
        ("u64", 4, Value::U64(0x0102_0304_0506_0708)),
    ];
    for order in ["ABCD", "CDAB", "BADC", "DCBA"] {
        for (ty, width, v) in &samples {
            let name = format!("{ty}_{order}");
            text.push_str(&format!(
                "[[points]]\nname = \"{name}\"\nkind = \"holding\"\naddress = {address}\ntype = \"{ty}\"\nword_order = \"{order}\"\n"
            ));
            expect.push((name, v.clone()));
            address += width;
        }
    }
    for (ty, v) in [("u16", Value::U64(65_000)), ("i16", Value::I64(-32_000)), ("bool", Value::Bool(true))] {
        let name = format!("{ty}_one");
        text.push_str(&format!(
            "[[points]]\nname = \"{name}\"\nkind = \"holding\"\naddress = {address}\ntype = \"{ty}\"\n"
        ));
        expect.push((name, v));
        address += 1;
    }
    let map = RegisterMap::from_str(&text, "all-types.toml").unwrap_or_else(|e| panic!("{e}"));
    let press = Press::new();
    {
        let mut regs = press.0.lock().expect("lock");
        for (name, v) in &expect {
            let p = map.point(name).expect("point");
            let words = encode(p, v).unwrap_or_else(|e| panic!("{name}: {e}"));
            let a = usize::from(p.address);
            regs[a..a + words.len()].copy_from_slice(&words);
        }
    }
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let server = serve(addr, press);
    let mut ctx = loop {
        if let Ok(c) = tokio_modbus::client::tcp::connect_slave(addr, Slave(1)).await {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut replies = Vec::new();
    for r in plan(&map) {
        let words = ctx.read_holding_registers(r.start, r.count).await.expect("io").expect("no exception");
        replies.push((r, mes_plc_maps::RawData::Registers(words)));
    }
    let snap = Snapshot::extract(&map, &replies);
    for (name, want) in &expect {
        assert_eq!(snap.get(name), Some(want), "{name}");
    }
    server.abort();
}

/// A map whose first read is refused by the device: the Modbus exception reaches the API
/// by name, and nothing is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exception_replies_are_reported_by_name() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let press = Press::new(); // 200 holding registers: address 500 is refused
    press.set(10, 0, 1, 1);
    let server = serve(addr, press.clone());
    let dir = crate::harness::temp_dir();
    let map = dir.join("press-short.toml");
    std::fs::write(
        &map,
        "name = \"press-short\"\nversion = 1\nword_order = \"CDAB\"\n\n\
         [[points]]\nname = \"good_count\"\nkind = \"holding\"\naddress = 2\ntype = \"u32\"\nrole = \"good\"\n\n\
         [[points]]\nname = \"beyond\"\nkind = \"holding\"\naddress = 500\ntype = \"u16\"\n",
    )
    .expect("write map");
    let text = plant(addr).replace("map = \"press-v1\"", &format!("map = \"{}\"", map.display()));
    let mes = Mes::start(MesOptions { plant: Some(text), ..Default::default() }).await;
    assert_eq!(wait_status(&mes, "unreachable", Duration::from_secs(10)).await, "unreachable");
    // The counter is read last in a poll: the refused read (holding 500, one register)
    // comes first and is the error shown, with the exception's code and name.
    let want = Some("read Holding 500+1: exception 0x02 IllegalDataAddress".to_string());
    assert_eq!(status_of(&mes, "PRESS-1", None).await, ("unreachable".to_string(), want.clone()));
    // Still so after reconnecting (backoff 200 ms, then 400 ms): the device answers every
    // time, with the same exception.
    let errors = mes.metric("mes_modbus_errors_total").await;
    assert!(mes.wait_metric("mes_modbus_errors_total", errors + 2).await >= errors + 2);
    assert_eq!(status_of(&mes, "PRESS-1", None).await, ("unreachable".to_string(), want));
    assert_eq!(mes.metric("mes_modbus_polls_total").await, 0);
    assert_eq!(mes.totals("PRESS-1").await, (0, 0));
    server.abort();
    let _ = std::fs::remove_dir_all(dir);
}

/// PRESS-2 goes silent mid-run (connection open, no reply): it is marked unreachable with
/// a timeout once its request times out (1.5 × its 1 s poll period), within 3 poll periods,
/// while PRESS-1 (100 ms) keeps being polled and counted on schedule the whole time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_device_never_delays_another() {
    let (a, b): (SocketAddr, SocketAddr) = (
        format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
        format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
    );
    let (healthy, silent) = (Press::new(), Press::new());
    healthy.set(1_000, 0, 1, 1);
    silent.set(5_000, 0, 1, 1);
    let hung = Arc::new(AtomicBool::new(false));
    let server_a = serve(a, healthy.clone());
    let server_b = serve_service(b, Hangable { press: silent.clone(), hung: hung.clone() });
    let mes = Mes::start(MesOptions { plant: Some(two_presses(a, 100, b, 1_000)), ..Default::default() }).await;
    for wc in ["PRESS-1", "PRESS-2"] {
        assert_eq!(wait_status_of(&mes, wc, None, "online", Duration::from_secs(10)).await, "online", "{wc}");
    }
    // Both baselines are taken (first readings count nothing); PRESS-2 counts before it hangs.
    silent.set(5_007, 0, 1, 1);
    assert_eq!(mes.wait_totals("PRESS-2", (7, 0)).await, (7, 0));

    hung.store(true, Ordering::SeqCst);
    let hung_at = Instant::now();
    silent.set(5_100, 0, 1, 1); // not read while it hangs
    let polls_before = mes.metric("mes_modbus_polls_total").await;
    let window = Instant::now();
    // PRESS-1 counts, step by step (about 5 s), while PRESS-2 spends most of that time
    // inside a 1.5 s request timeout, reconnecting in between (backoff 200 ms, 400 ms, ...).
    let counting = async {
        let (mut good, mut expected, mut slowest) = (1_000u32, 0i64, Duration::ZERO);
        for step in 1..=25u32 {
            good += step;
            expected += i64::from(step);
            healthy.set(good, 0, 1, 1);
            let t = Instant::now();
            let deadline = t + Duration::from_secs(5);
            let got = loop {
                let got = mes.totals("PRESS-1").await;
                if got == (expected, 0) || Instant::now() > deadline {
                    break got;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            assert_eq!(got, (expected, 0), "step {step}");
            slowest = slowest.max(t.elapsed());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (expected, slowest)
    };
    // Meanwhile, when does PRESS-2 show as unreachable? (checked every 10 ms)
    let watching = async {
        loop {
            if status_of(&mes, "PRESS-2", None).await.0 == "unreachable" {
                return hung_at.elapsed();
            }
            if hung_at.elapsed() > Duration::from_secs(10) {
                panic!("PRESS-2 not unreachable 10 s after it hung");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let ((expected, slowest), took) = tokio::join!(counting, watching);
    let window = window.elapsed();
    let polls = mes.metric("mes_modbus_polls_total").await - polls_before;
    eprintln!("hung PRESS-2 → unreachable in the API: {took:?} (poll 1 s, request timeout 1.5 s)");
    eprintln!("PRESS-1 meanwhile: slowest count {slowest:?}, {polls} polls in {window:?} (poll 100 ms)");
    // Each count of PRESS-1 shows within 1 s (poll 100 ms, commit, API): under the 1.5 s
    // PRESS-2 waits on each of its requests, so a PRESS-1 poll that waited on PRESS-2
    // would fail this.
    assert!(slowest < Duration::from_secs(1), "slowest {slowest:?}");
    // PRESS-1 is polled on schedule: only its polls complete (PRESS-2's time out), and at
    // 100 ms window/100 ms are due; at least 60 % of them (a 2-core shared machine; polls
    // that waited on PRESS-2 would make it about 5 %).
    let due = window.as_millis() as u64 / 100;
    assert!(polls * 10 >= due * 6, "{polls} polls in {window:?}, {due} due");
    assert_eq!(status_of(&mes, "PRESS-1", None).await.0, "online");
    // PRESS-2: unreachable no sooner than its request timeout (1.5 s; a request may have
    // been sent a moment before the hang) and within 3 poll periods (the next poll within
    // 1 s, then the 1.5 s timeout: 2.5 s by design), plus 100 ms for this side (10 ms
    // sampling, an HTTP GET).
    assert!(took >= Duration::from_millis(1_450) && took <= Duration::from_millis(3_100), "took {took:?}");
    let (status, error) = status_of(&mes, "PRESS-2", None).await;
    assert_eq!(status, "unreachable");
    let timeouts = ["read Input 0+2: timed out", "read Holding 100+3: timed out", "read Holding 0+8: timed out"];
    assert!(error.as_deref().is_some_and(|e| timeouts.contains(&e)), "{error:?}");
    // Nothing it counted after it hung is invented.
    assert_eq!(mes.totals("PRESS-2").await, (7, 0));

    // It answers again: the counts it made meanwhile arrive, exactly.
    hung.store(false, Ordering::SeqCst);
    assert_eq!(mes.wait_totals("PRESS-2", (100, 0)).await, (100, 0));
    assert_eq!(mes.totals("PRESS-1").await, (expected, 0));
    server_a.abort();
    server_b.abort();
}

/// A server stopped mid-run (listener and connections closed): its device is unreachable
/// within 3 poll periods, the other device counts on, exactly; and after the server
/// returns, what it counted meanwhile arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_is_unreachable_within_three_polls_and_others_count_on() {
    const POLL_MS: u64 = 200;
    let (a, b): (SocketAddr, SocketAddr) = (
        format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
        format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
    );
    let (p1, p2) = (Press::new(), Press::new());
    p1.set(100, 10, 1, 1);
    p2.set(200, 20, 1, 1);
    let server_a = serve(a, p1.clone());
    let mut server_b = serve(b, p2.clone());
    let mes = Mes::start(MesOptions { plant: Some(two_presses(a, POLL_MS, b, POLL_MS)), ..Default::default() }).await;
    for wc in ["PRESS-1", "PRESS-2"] {
        assert_eq!(wait_status_of(&mes, wc, None, "online", Duration::from_secs(10)).await, "online", "{wc}");
    }
    p1.set(105, 11, 1, 1);
    p2.set(203, 20, 1, 1);
    assert_eq!(mes.wait_totals("PRESS-1", (5, 1)).await, (5, 1));
    assert_eq!(mes.wait_totals("PRESS-2", (3, 0)).await, (3, 0));

    server_b.abort();
    let _ = server_b.await;
    let t = Instant::now();
    let seen = wait_status_of(&mes, "PRESS-2", None, "unreachable", Duration::from_secs(5)).await;
    let took = t.elapsed();
    eprintln!("server stopped → unreachable in the API: {took:?} (poll {POLL_MS} ms)");
    assert_eq!(seen, "unreachable");
    // 3 poll periods, plus 100 ms for this side: the loop polls every 10 ms and each GET is
    // an HTTP request and a database read.
    assert!(took <= Duration::from_millis(3 * POLL_MS + 100), "took {took:?}");
    let (_, error) = status_of(&mes, "PRESS-2", None).await;
    let error = error.unwrap_or_default();
    assert!(error.starts_with("read ") || error.starts_with("connect: "), "{error}");

    // PRESS-1 is unaffected: it counts on, exactly, while PRESS-2 is down.
    for (good, scrap) in [(110, 11), (130, 15), (131, 15)] {
        p1.set(good, scrap, 1, 1);
        let want = (i64::from(good) - 100, i64::from(scrap) - 10);
        assert_eq!(mes.wait_totals("PRESS-1", want).await, want);
        assert_eq!(status_of(&mes, "PRESS-1", None).await.0, "online");
    }
    assert_eq!(status_of(&mes, "PRESS-2", None).await.0, "unreachable");
    assert_eq!(mes.metric("mes_modbus_devices{status=\"unreachable\"}").await, 1);
    assert_eq!(mes.metric("mes_modbus_devices{status=\"online\"}").await, 1);

    // PRESS-2 returns, having counted meanwhile: counted once, exactly.
    p2.set(250, 24, 1, 1);
    server_b = serve(b, p2.clone());
    assert_eq!(mes.wait_totals("PRESS-2", (50, 4)).await, (50, 4));
    assert_eq!(status_of(&mes, "PRESS-2", None).await.0, "online");
    assert_eq!(mes.totals("PRESS-1").await, (31, 5));
    server_a.abort();
    server_b.abort();
}
