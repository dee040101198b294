//! Modbus TCP polling against a real Modbus TCP server (tokio-modbus's), by the shipped
//! `press-v1` map: wraps, device restarts, MES restarts and an outage count exactly.

use crate::harness::{free_port, Mes, MesOptions};
use std::future::{ready, Ready};
use std::net::SocketAddr;
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

pub(crate) fn serve(addr: SocketAddr, press: Press) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let server = Server::new(listener);
        let on_connected = |stream, peer| {
            let press = press.clone();
            async move { accept_tcp_connection(stream, peer, move |_| Ok(Some(press.clone()))) }
        };
        let _ = server.serve(&on_connected, |_e| {}).await;
    })
}

pub(crate) fn plant(addr: SocketAddr) -> String {
    crate::harness::widget_plant(&format!(
        r#"{{ modbus = {{ address = "{addr}", unit = 1, map = "press-v1", poll_ms = 50 }} }}"#
    ))
}

async fn device_status(mes: &Mes) -> String {
    let (_, w) = mes.get("/api/v1/work-centers/PRESS-1").await;
    w["device"]["status"].as_str().unwrap_or("").to_string()
}

async fn wait_status(mes: &Mes, want: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let s = device_status(mes).await;
        if s == want || Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

    // Outage: unreachable within 3 poll periods (plus the API's own latency), exact afterwards.
    server.abort();
    let _ = server.await;
    let t = Instant::now();
    assert_eq!(wait_status(&mes, "unreachable", Duration::from_secs(5)).await, "unreachable");
    assert!(t.elapsed() < Duration::from_millis(1500), "took {:?}", t.elapsed());
    let (_, w) = mes.get("/api/v1/work-centers/PRESS-1").await;
    assert!(w["device"]["last_error"].as_str().is_some_and(|e| !e.is_empty()), "{w}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_only_writable_points_audited_and_read_back() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let press = Press::new();
    press.set(0, 0, 1, 2);
    let server = serve(addr, press.clone());
    let mes = Mes::start(MesOptions { plant: Some(plant(addr)), ..Default::default() }).await;
    assert_eq!(wait_status(&mes, "online", Duration::from_secs(10)).await, "online");

    // A counter is not writable: refused, and nothing reaches the device.
    let (s, e) = mes.post("/api/v1/work-centers/PRESS-1/points/good_count", serde_json::json!({"value": 5}), &[]).await;
    assert_eq!((s, e["error"]["code"].as_str()), (422, Some("not_writable")), "{e}");
    let (s, _) = mes.post("/api/v1/work-centers/PRESS-1/points/nope", serde_json::json!({"value": 5}), &[]).await;
    assert_eq!(s, 422);
    assert_eq!(press.writes(), 0);

    // A writable u32 in CDAB order, read back.
    let (s, r) =
        mes.post("/api/v1/work-centers/PRESS-1/points/order_target", serde_json::json!({"value": 70_000}), &[]).await;
    assert_eq!((s, r["after"].as_u64(), r["before"].as_u64()), (200, Some(70_000), Some(0)), "{r}");
    assert_eq!(press.u32_at(100), 70_000);

    // start/stop go to the `command` point.
    let (s, _) = mes.post("/api/v1/work-centers/PRESS-1/commands", serde_json::json!({"cmd": "start"}), &[]).await;
    assert_eq!(s, 202);
    assert_eq!(press.reg(102), 1);
    let (s, _) = mes.post("/api/v1/work-centers/PRESS-1/commands", serde_json::json!({"cmd": "stop"}), &[]).await;
    assert_eq!(s, 202);
    assert_eq!(press.reg(102), 0);

    // Releasing an order dispatches its quantity to the `target` point.
    let (s, _) = mes
        .post(
            "/api/v1/orders",
            serde_json::json!({"id": "PO-M", "sku": "WIDGET", "quantity": 500, "work_center": "PRESS-1"}),
            &[],
        )
        .await;
    assert_eq!(s, 201);
    let (s, _) = mes.post("/api/v1/orders/PO-M/release", serde_json::json!({}), &[]).await;
    assert_eq!(s, 200);
    assert_eq!(press.u32_at(100), 500);
    assert_eq!(press.writes(), 4);
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
