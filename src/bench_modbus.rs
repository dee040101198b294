//! `mes bench-modbus`: polling many Modbus TCP devices on loopback.
//!
//! N simulated presses (`press-v1`, a tokio-modbus server each, counters moving every
//! 100 ms) are polled by the MES every `poll_ms`, every reading settled and committed.
//! Measured over the same interval, in the same process: the MES's polls per second and
//! CPU per polled point, next to a raw tokio-modbus read loop issuing the same reads at
//! the same pace with nothing after them; and the poll-to-commit p99.

use crate::app::Handle;
use mes_plc_maps::{plan, RegisterMap};
use std::future::{ready, Ready};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_modbus::prelude::*;

/// Process CPU time (user + system), seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after ')'.
    (ticks(11) + ticks(12)) / 100.0
}

#[derive(Clone)]
struct Image(Arc<Mutex<Vec<u16>>>);

impl tokio_modbus::server::Service for Image {
    type Request = SlaveRequest<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: SlaveRequest<'static>) -> Self::Future {
        let regs = match self.0.lock() {
            Ok(r) => r,
            Err(_) => return ready(Err(ExceptionCode::ServerDeviceFailure)),
        };
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

/// Starts `n` press servers on free ports; their good counters grow every 100 ms.
pub async fn start_devices(n: usize) -> anyhow::Result<(Vec<SocketAddr>, Vec<tokio::task::JoinHandle<()>>)> {
    let mut addrs = Vec::with_capacity(n);
    let mut tasks = Vec::new();
    let mut images = Vec::with_capacity(n);
    for _ in 0..n {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        addrs.push(listener.local_addr()?);
        let image = Image(Arc::new(Mutex::new(vec![0u16; 128])));
        if let Ok(mut r) = image.0.lock() {
            r[0] = 1; // running
            r[7] = 1; // boot
        }
        images.push(image.clone());
        tasks.push(tokio::spawn(async move {
            let server = tokio_modbus::server::tcp::Server::new(listener);
            let on_connected = |stream, peer| {
                let image = image.clone();
                async move {
                    tokio_modbus::server::tcp::accept_tcp_connection(stream, peer, move |_| Ok(Some(image.clone())))
                }
            };
            let _ = server.serve(&on_connected, |_e| {}).await;
        }));
    }
    tasks.push(tokio::spawn(async move {
        let mut good: u32 = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            good = good.wrapping_add(1);
            for im in &images {
                if let Ok(mut r) = im.0.lock() {
                    r[2] = (good & 0xFFFF) as u16; // CDAB: low word first
                    r[3] = (good >> 16) as u16;
                }
            }
        }
    }));
    Ok((addrs, tasks))
}

/// A plant of `addrs.len()` presses polled every `poll_ms`.
pub fn plant(addrs: &[SocketAddr], poll_ms: u64) -> String {
    let mut s = String::from(
        "[[materials]]\nsku = \"SHEET\"\nstandard_cost = \"1.20\"\n[[materials]]\nsku = \"WIDGET\"\nstandard_cost = \"5.00\"\n\
         [[boms]]\nsku = \"WIDGET\"\ncomponents = [{ sku = \"SHEET\", quantity = \"2\" }]\n\
         [[buffers]]\nid = \"RM\"\nsku = \"SHEET\"\ncapacity = 1000000000\ninitial = 1000000000\n\
         [[buffers]]\nid = \"FG\"\nsku = \"WIDGET\"\ncapacity = 1000000000\n",
    );
    for (i, a) in addrs.iter().enumerate() {
        s.push_str(&format!(
            "[[work_centers]]\nid = \"PRESS-{i}\"\nconversion_rate_per_hour = \"60.00\"\ninputs = [\"RM\"]\noutput = \"FG\"\n\
             device = {{ modbus = {{ address = \"{a}\", unit = 1, map = \"press-v1\", poll_ms = {poll_ms}, id = \"press-{i}\" }} }}\n"
        ));
    }
    s
}

/// The raw baseline: the same reads at the same pace, nothing done with the replies.
async fn raw_loop(addrs: &[SocketAddr], poll: Duration, for_: Duration) -> anyhow::Result<u64> {
    let map = RegisterMap::shipped("press-v1")
        .ok_or_else(|| anyhow::anyhow!("press-v1 missing"))?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let requests = Arc::new(plan(&map));
    let polls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let deadline = Instant::now() + for_;
    let mut tasks = Vec::new();
    for a in addrs {
        let (a, requests, polls) = (*a, requests.clone(), polls.clone());
        tasks.push(tokio::spawn(async move {
            let Ok(mut ctx) = tokio_modbus::client::tcp::connect_slave(a, Slave(1)).await else { return };
            let mut tick = tokio::time::interval(poll);
            while Instant::now() < deadline {
                tick.tick().await;
                let mut ok = true;
                for r in requests.iter() {
                    let res = match r.kind {
                        mes_plc_maps::Kind::Input => ctx.read_input_registers(r.start, r.count).await,
                        _ => ctx.read_holding_registers(r.start, r.count).await,
                    };
                    ok &= matches!(res, Ok(Ok(_)));
                }
                if ok {
                    polls.fetch_add(1, Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Ok(polls.load(Relaxed))
}

/// The figures of one Modbus run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Figures {
    pub devices: usize,
    pub poll_ms: u64,
    pub seconds: u64,
    pub target_polls_per_s: f64,
    pub mes_polls_per_s: f64,
    pub mes_points_per_cpu_s: f64,
    pub raw_polls_per_s: f64,
    pub raw_points_per_cpu_s: f64,
    pub ratio: f64,
    /// Histogram bucket bounds (≤), ms.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub errors: u64,
}

/// Measures the running MES (already polling `addrs`) and then the raw loop.
pub async fn run(handle: &Handle, addrs: &[SocketAddr], poll_ms: u64, seconds: u64) -> anyhow::Result<Figures> {
    let n = addrs.len();
    let points = RegisterMap::shipped("press-v1").and_then(|r| r.ok()).map(|m| m.points.len()).unwrap_or(0) as f64;
    // Let every device come online and settle.
    let deadline = Instant::now() + Duration::from_secs(60);
    while handle.metrics.modbus_polls.load(Relaxed) < 3 * n as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let span = Duration::from_secs(seconds);
    let (p0, c0, t0) = (handle.metrics.modbus_polls.load(Relaxed), cpu_seconds(), Instant::now());
    tokio::time::sleep(span).await;
    let (p1, c1, secs) = (handle.metrics.modbus_polls.load(Relaxed), cpu_seconds(), t0.elapsed().as_secs_f64());
    let mes_polls = (p1 - p0) as f64;
    let mes_cpu = (c1 - c0).max(0.01);
    let p99 = handle.metrics.modbus_poll_to_commit.quantile(0.99);
    let p50 = handle.metrics.modbus_poll_to_commit.quantile(0.50);
    let errors = handle.metrics.modbus_errors.load(Relaxed);

    // Raw baseline in the same process (the MES keeps polling meanwhile, so the raw loop's
    // CPU is taken as the difference over a second interval of the same length).
    let c2 = cpu_seconds();
    let raw_polls = raw_loop(addrs, Duration::from_millis(poll_ms), span).await? as f64;
    let c3 = cpu_seconds();
    let raw_cpu = ((c3 - c2) - mes_cpu).max(0.01);
    let target = n as f64 * 1000.0 / poll_ms as f64;
    println!("\nModbus polling: {n} devices × {points} points (press-v1), every {poll_ms} ms, {seconds} s");
    println!("  target polls/s:                 {target:>10.0}");
    println!(
        "  MES polls/s (read, settled, committed): {:>10.0}  ({:.0} points/s)",
        mes_polls / secs,
        mes_polls * points / secs
    );
    println!("  MES CPU: {mes_cpu:.2} s over {secs:.1} s; {:.0} points per CPU-second", mes_polls * points / mes_cpu);
    println!(
        "  raw tokio-modbus loop polls/s:  {:>10.0}; {:.0} points per CPU-second",
        raw_polls / secs,
        raw_polls * points / raw_cpu
    );
    println!("  ratio (points per CPU-second, MES / raw): {:.2}", (mes_polls / mes_cpu) / (raw_polls / raw_cpu));
    println!(
        "  poll-to-commit p50 ≤ {} ms, p99 ≤ {} ms; {} Modbus errors",
        p50.map(|v| format!("{:.1}", v * 1000.0)).unwrap_or_else(|| "-".into()),
        p99.map(|v| format!("{:.1}", v * 1000.0)).unwrap_or_else(|| "-".into()),
        errors
    );
    Ok(Figures {
        devices: n,
        poll_ms,
        seconds,
        target_polls_per_s: target,
        mes_polls_per_s: mes_polls / secs,
        mes_points_per_cpu_s: mes_polls * points / mes_cpu,
        raw_polls_per_s: raw_polls / secs,
        raw_points_per_cpu_s: raw_polls * points / raw_cpu,
        ratio: (mes_polls / mes_cpu) / (raw_polls / raw_cpu),
        p50_ms: p50.map(|v| v * 1000.0),
        p99_ms: p99.map(|v| v * 1000.0),
        errors,
    })
}
