//! Modbus TCP adapter: one polling task per device, reading by its register map.
//!
//! Each poll reads the map's planned requests under a timeout. Counter registers wrap at
//! their width and restart with the device; [`mes_actors::counter::raw_delta`] turns two
//! raw readings into exact counts, and the poller folds them into a virtual cumulative
//! reading (boot 0, `seq` growing) that takes the same path as MQTT telemetry. The raw
//! registers are committed with that reading, and the poller waits for the commit before
//! it moves its baseline: after a crash the stored raw values are the baseline, so what the
//! device counted meanwhile is counted, once. A device that stops answering is marked
//! `unreachable` and retried with capped backoff, in its own task: it never delays another.

use super::Pipeline;
use crate::db::writer::Completion;
use crate::db::Store;
use crate::metrics::Metrics;
use crate::plant::{Device, ModbusDevice, Plant};
use mes_actors::counter::{raw_delta, Cursor, RawCounters};
use mes_actors::{MachineState, Reading};
use mes_plc_maps::{plan, Kind, RawData, ReadRequest, RegisterMap, Role, Snapshot};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio_modbus::client::{Context, Reader};
use tokio_modbus::prelude::*;

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A reading is submitted at least this often even when nothing changed (liveness).
const HEARTBEAT: Duration = Duration::from_secs(10);

/// A write asked of a polled device: a point by name (only `writable` points of its map)
/// or by role (`command`, `target`).
pub struct WriteCmd {
    pub point: WriteTarget,
    pub value: u64,
    /// `(point, value read back before, value read back after)`, or why not.
    pub reply: oneshot::Sender<WriteResult>,
}

/// A write's outcome: `(point, value read back before, value read back after)`.
pub type WriteResult = Result<(String, Option<u64>, u64), WriteError>;

pub enum WriteTarget {
    Name(String),
    Role(Role),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// Refused before anything was sent.
    #[error("{0}")]
    Refused(String),
    /// Sent, but it failed or did not read back.
    #[error("{0}")]
    Failed(String),
}

/// A polled device's write queue and its map (to refuse a write before anything is sent).
#[derive(Clone)]
pub struct WriterHandle {
    pub tx: tokio::sync::mpsc::Sender<WriteCmd>,
    pub map: Arc<RegisterMap>,
}

impl WriterHandle {
    /// The point a write would go to, or why it is refused (nothing is sent then).
    pub fn check(&self, target: &WriteTarget, value: u64) -> Result<String, WriteError> {
        resolve(&self.map, target, value).map(|r| r.point)
    }

    /// Checks, queues (bounded wait) and waits for the device's answer (bounded).
    pub async fn write(&self, target: WriteTarget, value: u64) -> WriteResult {
        self.check(&target, value)?;
        let (reply, rx) = oneshot::channel();
        let cmd = WriteCmd { point: target, value, reply };
        match tokio::time::timeout(Duration::from_secs(2), self.tx.send(cmd)).await {
            Ok(Ok(())) => {}
            _ => return Err(WriteError::Failed("the device's write queue is full or closed".into())),
        }
        match tokio::time::timeout(Duration::from_secs(5), rx).await {
            Ok(Ok(r)) => r,
            _ => Err(WriteError::Failed("the device did not answer (unreachable?)".into())),
        }
    }
}

/// The write request for a point named directly or by role; refused unless the map marks
/// the point `writable` and the value fits it.
fn resolve(map: &RegisterMap, target: &WriteTarget, value: u64) -> Result<mes_plc_maps::WriteRequest, WriteError> {
    let name = match target {
        WriteTarget::Name(n) => n.clone(),
        WriteTarget::Role(r) => map
            .point_by_role(*r)
            .map(|p| p.name.clone())
            .ok_or_else(|| WriteError::Refused(format!("map `{}` has no `{r:?}` point", map.name)))?,
    };
    map.write_request(&name, &mes_plc_maps::Value::U64(value)).map_err(|e| WriteError::Refused(e.to_string()))
}

/// Write handles of the polled devices, by device id.
/// The write handles of the devices polled on this node, by device id. Devices come and
/// go with the work centers a cluster node owns.
#[derive(Clone, Default)]
pub struct Writers(Arc<RwLock<HashMap<String, WriterHandle>>>);

impl Writers {
    pub fn get(&self, device: &str) -> Option<WriterHandle> {
        self.0.read().ok().and_then(|m| m.get(device).cloned())
    }

    fn insert(&self, device: String, h: WriterHandle) {
        if let Ok(mut m) = self.0.write() {
            m.insert(device, h);
        }
    }

    pub fn remove(&self, device: &str) {
        if let Ok(mut m) = self.0.write() {
            m.remove(device);
        }
    }
}

/// What the API shows about a polled device.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceStatus {
    pub status: &'static str,
    pub last_error: Option<String>,
    pub since_ms: i64,
    pub polls: u64,
}

/// Live status of every polled device, by device id.
pub type StatusBoard = Arc<RwLock<HashMap<String, DeviceStatus>>>;

/// Records a device's status (`online`, `unreachable`, `connecting`) on the board shared by
/// the Modbus pollers and the Sparkplug host; `since` moves only when the status changes.
pub(crate) fn set_status(board: &StatusBoard, device: &str, status: &'static str, err: Option<String>) {
    if let Ok(mut b) = board.write() {
        let now = crate::now_ms();
        let e =
            b.entry(device.to_string()).or_insert(DeviceStatus { status, last_error: None, since_ms: now, polls: 0 });
        if e.status != status {
            e.status = status;
            e.since_ms = now;
        }
        if err.is_some() {
            e.last_error = err;
        }
        if status == "online" {
            e.polls += 1;
        }
    }
}

/// Loads the register map a device names: a shipped map's name, or a path (it contains
/// '/' or ends in .toml; relative to the plant file).
pub fn load_map(dev: &ModbusDevice, plant_dir: Option<&Path>) -> Result<RegisterMap, String> {
    let is_path = dev.map.contains('/') || dev.map.ends_with(".toml");
    if is_path {
        let p = Path::new(&dev.map);
        let p = match (p.is_relative(), plant_dir) {
            (true, Some(dir)) => dir.join(p),
            _ => p.to_path_buf(),
        };
        RegisterMap::load(&p).map_err(|e| e.to_string())
    } else {
        match RegisterMap::shipped(&dev.map) {
            Some(r) => r.map_err(|e| e.to_string()),
            None => Err(format!("no shipped register map named `{}`", dev.map)),
        }
    }
}

/// Checks every Modbus device's map at start-up; the error names the work center and map.
pub fn check_maps(plant: &Plant) -> Result<(), String> {
    for w in &plant.work_centers {
        if let Device::Modbus(m) = &w.device {
            let map = load_map(m, plant.base_dir.as_deref())
                .map_err(|e| format!("work center `{}`: map `{}`: {e}", w.id, m.map))?;
            if map.point_by_role(Role::Good).is_none() {
                return Err(format!("work center `{}`: map `{}` has no `good` counter", w.id, m.map));
            }
        }
    }
    Ok(())
}

struct Poller {
    writes: tokio::sync::mpsc::Receiver<WriteCmd>,
    device: String,
    addr: SocketAddr,
    unit: u8,
    poll: Duration,
    map: RegisterMap,
    requests: Vec<ReadRequest>,
    good_bits: u32,
    scrap_bits: u32,
    pipeline: Pipeline,
    board: StatusBoard,
    /// Baseline: the last committed raw registers.
    last_raw: Option<RawCounters>,
    /// The device's virtual cumulative reading (the committed cursor).
    cursor: Option<Cursor>,
    last_state: Option<String>,
    last_reason: Option<u64>,
    last_submit: tokio::time::Instant,
}

/// Starts one poller per Modbus device of the plant.
pub async fn start(
    plant: &Plant,
    store: &Store,
    pipeline: Pipeline,
    board: StatusBoard,
    shutdown: watch::Receiver<bool>,
) -> Result<(Vec<tokio::task::JoinHandle<()>>, Writers), String> {
    let cursors = store.cursors().await.map_err(|e| e.to_string())?;
    let raws = store.modbus_raw().await.map_err(|e| e.to_string())?;
    let writers = Writers::default();
    let mut tasks = Vec::new();
    for w in &plant.work_centers {
        let device = w.device_id();
        let (cursor, raw) = (cursors.get(&device).map(|c| c.0), raws.get(&device).copied());
        if let Some(t) = start_one(plant, &w.id, cursor, raw, &pipeline, &board, &writers, shutdown.clone())? {
            tasks.push(t);
        }
    }
    Ok((tasks, writers))
}

/// Starts the poller of one work center's device, if it is a Modbus device: from its
/// committed cursor and raw registers (`cursor`, `last_raw`), so a device taken over by
/// another node (or polled again after a restart) goes on from what was committed.
#[allow(clippy::too_many_arguments)]
pub fn start_one(
    plant: &Plant,
    wc: &str,
    cursor: Option<Cursor>,
    last_raw: Option<RawCounters>,
    pipeline: &Pipeline,
    board: &StatusBoard,
    writers: &Writers,
    shutdown: watch::Receiver<bool>,
) -> Result<Option<tokio::task::JoinHandle<()>>, String> {
    let Some(w) = plant.work_center(wc) else { return Ok(None) };
    let Device::Modbus(m) = &w.device else { return Ok(None) };
    let map = load_map(m, plant.base_dir.as_deref())?;
    let addr: SocketAddr =
        m.address.parse().map_err(|_| format!("work center `{}`: bad modbus address `{}`", w.id, m.address))?;
    let device = w.device_id();
    // Counter registers are read last in each poll: a poll that reaches them is
    // complete, so counters that were read are always counted (a device that fails
    // half-way through a poll fails before its counters are read, not after).
    let mut requests = plan(&map);
    let counters: Vec<&mes_plc_maps::Point> =
        map.points.iter().filter(|p| matches!(p.role, Some(Role::Good | Role::Scrap | Role::Boot))).collect();
    requests.sort_by_key(|r| counters.iter().any(|p| r.covers(p)));
    let good_bits = map.wrap_bits(Role::Good).unwrap_or(64);
    let scrap_bits = map.wrap_bits(Role::Scrap).unwrap_or(64);
    set_status(board, &device, "connecting", None);
    let (wtx, wrx) = tokio::sync::mpsc::channel(16);
    writers.insert(device.clone(), WriterHandle { tx: wtx, map: Arc::new(map.clone()) });
    let p = Poller {
        writes: wrx,
        device: device.clone(),
        addr,
        unit: m.unit,
        poll: Duration::from_millis(m.poll_ms),
        map,
        requests,
        good_bits,
        scrap_bits,
        pipeline: pipeline.clone(),
        board: board.clone(),
        last_raw,
        cursor,
        last_state: None,
        last_reason: None,
        last_submit: tokio::time::Instant::now(),
    };
    let span = tracing::info_span!("modbus", work_center = %w.id, device = %device, addr = %addr);
    Ok(Some(tokio::spawn(tracing::Instrument::instrument(p.run(shutdown), span))))
}

impl Poller {
    /// Each request's timeout: 1.5 poll periods (100 ms to 2 s). A device that falls silent
    /// is polled again within one period and times out 1.5 later, so it shows
    /// `unreachable` within 2.5 periods: inside the contract's 3 with room for scheduling.
    fn timeout(&self) -> Duration {
        (self.poll * 3 / 2).clamp(Duration::from_millis(100), Duration::from_secs(2))
    }

    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let connected = tokio::time::timeout(self.timeout(), tcp::connect_slave(self.addr, Slave(self.unit))).await;
            let mut ctx = match connected {
                Ok(Ok(ctx)) => ctx,
                Ok(Err(e)) => {
                    self.unreachable(format!("connect: {e}"));
                    if wait(&mut shutdown, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
                Err(_) => {
                    self.unreachable("connect: timed out".into());
                    if wait(&mut shutdown, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            let mut ticker = tokio::time::interval(self.poll);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = ticker.tick() => {}
                    Some(cmd) = self.writes.recv() => {
                        let result = self.write(&mut ctx, &cmd.point, cmd.value).await;
                        let failed = matches!(result, Err(WriteError::Failed(_)));
                        let _ = cmd.reply.send(result);
                        if failed {
                            self.unreachable("write failed".into());
                            break;
                        }
                        continue;
                    }
                }
                match self.poll_once(&mut ctx).await {
                    Ok(()) => backoff = BACKOFF_MIN,
                    Err(e) => {
                        // Drop the connection and start over.
                        self.unreachable(e);
                        break;
                    }
                }
            }
            if wait(&mut shutdown, backoff).await {
                return;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn unreachable(&self, err: String) {
        tracing::warn!(device = %self.device, error = %err, "Modbus device unreachable");
        Metrics::inc(&self.pipeline.metrics.modbus_errors);
        set_status(&self.board, &self.device, "unreachable", Some(err));
    }

    async fn read(&self, ctx: &mut Context, r: &ReadRequest) -> Result<RawData, String> {
        let t = self.timeout();
        let res = match r.kind {
            Kind::Holding => tokio::time::timeout(t, ctx.read_holding_registers(r.start, r.count))
                .await
                .map(|x| x.map(|y| y.map(RawData::Registers))),
            Kind::Input => tokio::time::timeout(t, ctx.read_input_registers(r.start, r.count))
                .await
                .map(|x| x.map(|y| y.map(RawData::Registers))),
            Kind::Coil => {
                tokio::time::timeout(t, ctx.read_coils(r.start, r.count)).await.map(|x| x.map(|y| y.map(RawData::Bits)))
            }
            Kind::Discrete => tokio::time::timeout(t, ctx.read_discrete_inputs(r.start, r.count))
                .await
                .map(|x| x.map(|y| y.map(RawData::Bits))),
        };
        match res {
            Err(_) => Err(format!("read {:?} {}+{}: timed out", r.kind, r.start, r.count)),
            Ok(Err(e)) => Err(format!("read {:?} {}+{}: {e}", r.kind, r.start, r.count)),
            Ok(Ok(Err(code))) => Err(format!("read {:?} {}+{}: {}", r.kind, r.start, r.count, exception_text(code))),
            Ok(Ok(Ok(data))) => {
                let n = match &data {
                    RawData::Registers(w) => w.len(),
                    RawData::Bits(b) => b.len(),
                };
                if n < usize::from(r.count) {
                    return Err(format!("read {:?} {}+{}: short reply of {n}", r.kind, r.start, r.count));
                }
                Ok(data)
            }
        }
    }

    /// Writes one point, only if the map marks it writable, and reads it back.
    async fn write(&self, ctx: &mut Context, target: &WriteTarget, value: u64) -> WriteResult {
        let req = resolve(&self.map, target, value)?;
        let name = req.point.clone();
        let point = self.map.point(&name).ok_or_else(|| WriteError::Refused(format!("no point `{name}`")))?;
        let read_req = ReadRequest { kind: point.kind, start: point.address, count: point.width() };
        let read_value = |data: RawData| -> Option<u64> {
            Snapshot::extract(&self.map, &[(read_req, data)]).get(&name).and_then(|v| v.as_u64())
        };
        let before = self.read(ctx, &read_req).await.ok().and_then(read_value);
        let t = self.timeout();
        let sent = match &req.data {
            RawData::Registers(words) => {
                tokio::time::timeout(t, ctx.write_multiple_registers(req.address, words)).await
            }
            RawData::Bits(bits) => {
                let bit = bits.first().copied().unwrap_or(false);
                tokio::time::timeout(t, ctx.write_single_coil(req.address, bit)).await
            }
        };
        match sent {
            Err(_) => return Err(WriteError::Failed(format!("write `{name}`: timed out"))),
            Ok(Err(e)) => return Err(WriteError::Failed(format!("write `{name}`: {e}"))),
            Ok(Ok(Err(code))) => return Err(WriteError::Failed(format!("write `{name}`: {}", exception_text(code)))),
            Ok(Ok(Ok(()))) => {}
        }
        let after = self.read(ctx, &read_req).await.map_err(WriteError::Failed)?;
        match read_value(after) {
            Some(v) if v == value => Ok((name, before, v)),
            other => Err(WriteError::Failed(format!("write `{name}` = {value} read back as {other:?}"))),
        }
    }

    async fn poll_once(&mut self, ctx: &mut Context) -> Result<(), String> {
        let started = std::time::Instant::now();
        let mut replies = Vec::with_capacity(self.requests.len());
        for r in &self.requests {
            let data = self.read(ctx, r).await?;
            replies.push((*r, data));
        }
        Metrics::inc(&self.pipeline.metrics.modbus_polls);
        set_status(&self.board, &self.device, "online", None);
        let snap = Snapshot::extract(&self.map, &replies);
        let c = snap.counters();
        let Some(good) = c.good else {
            return Err("the good counter could not be decoded".into());
        };
        let raw = RawCounters { good, scrap: c.scrap.unwrap_or(0), boot: c.boot };
        let delta = raw_delta(self.last_raw.as_ref(), &raw, self.good_bits, self.scrap_bits);
        let (dg, ds) = delta.unwrap_or((0, 0));
        let changed = dg > 0
            || ds > 0
            || self.last_raw != Some(raw)
            || c.state != self.last_state
            || c.reason != self.last_reason
            || self.last_submit.elapsed() >= HEARTBEAT;
        if !changed {
            return Ok(());
        }
        let base = self.cursor.unwrap_or(Cursor { boot: 0, seq: 0, good: 0, scrap: 0 });
        let next = Cursor { boot: 0, seq: base.seq + 1, good: base.good + dg, scrap: base.scrap + ds };
        let mut metrics = BTreeMap::new();
        for r in snap.readings() {
            if r.role.is_none() {
                let x = r.value.as_f64();
                if x.is_finite() {
                    metrics.insert(r.name.clone(), x);
                }
            }
        }
        let reading = Reading {
            device: self.device.clone(),
            boot: next.boot,
            seq: next.seq,
            ts_ms: Some(crate::now_ms()),
            good: next.good,
            scrap: next.scrap,
            state: c.state.as_deref().and_then(|s| s.parse::<MachineState>().ok()),
            reason: c.reason.map(|r| r.to_string()),
            order: None,
            metrics,
        };
        let Some(slot) = self.pipeline.admit().await else {
            return Err("intake closed".into());
        };
        let (tx, rx) = oneshot::channel();
        let abandoned = self.pipeline.submit_reading(
            reading,
            crate::now_ms(),
            Completion::Notify(tx),
            slot,
            Some((self.device.clone(), raw)),
        );
        if abandoned.is_some() {
            return Err("reading not applied".into());
        }
        // Move the baseline only once the reading and its raw registers are committed.
        if rx.await.is_err() {
            return Err("writer stopped before committing".into());
        }
        self.pipeline.metrics.modbus_poll_to_commit.observe(started.elapsed().as_secs_f64());
        self.last_raw = Some(raw);
        self.cursor = Some(next);
        self.last_state = c.state;
        self.last_reason = c.reason;
        self.last_submit = tokio::time::Instant::now();
        Ok(())
    }
}

/// A Modbus exception reply by code and name, e.g. `exception 0x02 IllegalDataAddress`;
/// a code the protocol does not define is shown by its number.
fn exception_text(code: ExceptionCode) -> String {
    let n = u8::from(code);
    match code {
        ExceptionCode::Custom(_) => format!("exception 0x{n:02X} (not a standard exception code)"),
        named => format!("exception 0x{n:02X} {named:?}"),
    }
}

/// Sleeps for `d`; true when shutdown was asked meanwhile.
async fn wait(shutdown: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = shutdown.changed() => true,
        _ = tokio::time::sleep(d) => *shutdown.borrow(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exceptions_are_named_with_their_code() {
        assert_eq!(exception_text(ExceptionCode::IllegalFunction), "exception 0x01 IllegalFunction");
        assert_eq!(exception_text(ExceptionCode::IllegalDataAddress), "exception 0x02 IllegalDataAddress");
        assert_eq!(exception_text(ExceptionCode::ServerDeviceBusy), "exception 0x06 ServerDeviceBusy");
        assert_eq!(exception_text(ExceptionCode::GatewayTargetDevice), "exception 0x0B GatewayTargetDevice");
        assert_eq!(exception_text(ExceptionCode::Custom(0x42)), "exception 0x42 (not a standard exception code)");
    }
}
