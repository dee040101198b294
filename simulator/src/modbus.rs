//! Modbus TCP devices: each Modbus work center of the plant is served as a Modbus TCP
//! server (one listener per address, dispatching on the unit id), its registers laid out
//! by its register map (`mes_plc_maps`). The MES is the client: it reads the counters and
//! state and may write the writable points (`command`: start/stop, `target`).
//!
//! A polled device only tells what its registers hold when they are read, so some
//! changes must be seen before the next one happens: the final counters of a boot before
//! the device restarts, and a counter before it could advance by half its range. The
//! simulator asks [`Devices::must_wait`] after each step and then waits for the MES to
//! read ([`Devices::wait_observed`]) before it shows the new values.
//!
//! [`Image`] (the register tables and the request handling) is pure; [`Devices`] does the
//! networking.

use crate::model::{reason, Command, DeviceView, Line, State};
use crate::plant::{Device, Plant};
use anyhow::{anyhow, bail, Context};
use mes_plc_maps::{
    decode, decode_bits, encode, encode_bits, DataType, Kind, Point, RegisterMap, Role, Value, COMMAND_START,
    COMMAND_STOP,
};
use std::collections::BTreeMap;
use std::future::{ready, Ready};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio_modbus::prelude::{ExceptionCode, Request, Response, SlaveRequest};

const TABLE: usize = 1 << 16;
const MAX_READ_REGISTERS: u16 = 125;
const MAX_READ_BITS: u16 = 2000;
const MAX_WRITE_REGISTERS: usize = 123;
const MAX_WRITE_BITS: usize = 1968;
/// Shortest real time a silent Modbus server gives no replies, so that a poller's timeout
/// (the MES's is at most 2 s) fires even when simulated time runs far faster than real time.
pub const MIN_SILENCE: Duration = Duration::from_millis(2500);

/// A counter point the MES must see, and the image generation it last read.
#[derive(Debug, Clone)]
struct Watched {
    point: usize,
    seen_gen: u64,
}

/// The register tables of one device.
#[derive(Debug, Clone)]
pub struct Image {
    map: RegisterMap,
    coils: Vec<bool>,
    discrete: Vec<bool>,
    input: Vec<u16>,
    holding: Vec<u16>,
    online: bool,
    /// Bumped whenever the counters shown change.
    gen: u64,
    watched: Vec<Watched>,
    /// (boot, good, scrap) in the tables now.
    shown: Option<(u64, u64, u64)>,
    /// (boot, good, scrap) when all counters were last read.
    seen: Option<(u64, u64, u64)>,
    commands: Vec<Command>,
    /// Since when the server gives no replies (a communication fault), if it is silent.
    silent_since: Option<Instant>,
    /// Told to answer again before the model's silence ended (the MES must read now).
    forced_answer: bool,
    /// Requests left without a reply.
    unanswered: u64,
}

fn lock(m: &Mutex<Image>) -> MutexGuard<'_, Image> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `n` reduced to what a counter point of this type can hold.
fn counter_value(p: &Point, n: u64) -> Value {
    match p.ty {
        DataType::U16 | DataType::U32 | DataType::U64 => {
            let bits = p.ty.bits();
            Value::U64(if bits >= 64 { n } else { n & ((1u64 << bits) - 1) })
        }
        DataType::I16 | DataType::I32 => Value::I64((n % (1u64 << (p.ty.bits() - 1))) as i64),
        DataType::F32 => Value::F64(n as f64),
        DataType::Bool => Value::Bool(n % 2 == 1),
    }
}

/// A code as a value of the point's type.
fn code_value(p: &Point, code: u16) -> Value {
    match p.ty {
        DataType::I16 | DataType::I32 => Value::I64(i64::from(code)),
        DataType::F32 => Value::F64(f64::from(code)),
        DataType::Bool => Value::Bool(code != 0),
        _ => Value::U64(u64::from(code)),
    }
}

fn state_value(p: &Point, state: State) -> Option<Value> {
    // A map without the state's label shows the nearest one it has.
    let candidates: &[&str] = match state {
        State::Setup => &["setup", "idle", "stopped"],
        State::Down => &["down", "stopped", "idle"],
        State::Stopped => &["stopped", "idle", "down"],
        State::Idle => &["idle", "stopped"],
        State::Running => &["running"],
    };
    let code = candidates.iter().find_map(|l| p.enum_code(l))?;
    Some(code_value(p, code))
}

fn reason_value(p: &Point, r: Option<&str>) -> Value {
    let code = if p.enum_values.is_empty() { reason::code(r) } else { r.and_then(|r| p.enum_code(r)).unwrap_or(0) };
    code_value(p, code)
}

/// Process values for plain metric points, recognised by name.
fn metric_value(p: &Point, v: &DeviceView) -> Option<Value> {
    let name = p.name.to_ascii_lowercase();
    let x = if name.contains("temp") {
        v.temp_c
    } else if name.contains("cycle") {
        v.cycle_s
    } else if name.contains("speed") || name.contains("rpm") {
        if v.state == State::Running {
            1500.0 * v.speed
        } else {
            0.0
        }
    } else {
        return None;
    };
    if p.ty == DataType::Bool {
        return None;
    }
    // Integer points without a scale take whole numbers.
    let x = if p.ty.is_integer() && p.scale.is_none() { x.round() } else { x };
    Some(Value::F64(x))
}

impl Image {
    pub fn new(map: RegisterMap) -> Image {
        let watched = map
            .points
            .iter()
            .enumerate()
            .filter(|(_, p)| matches!(p.role, Some(Role::Good | Role::Scrap | Role::Boot)))
            .map(|(point, _)| Watched { point, seen_gen: 0 })
            .collect();
        Image {
            map,
            coils: vec![false; TABLE],
            discrete: vec![false; TABLE],
            input: vec![0; TABLE],
            holding: vec![0; TABLE],
            online: true,
            gen: 0,
            watched,
            shown: None,
            seen: None,
            commands: Vec::new(),
            silent_since: None,
            forced_answer: false,
            unanswered: 0,
        }
    }

    fn put(&mut self, point: usize, value: &Value) {
        let Some(p) = self.map.points.get(point) else {
            return;
        };
        let at = usize::from(p.address);
        if p.kind.is_bit() {
            let Ok(bit) = encode_bits(p, value) else {
                return;
            };
            let table = if p.kind == Kind::Coil { &mut self.coils } else { &mut self.discrete };
            if let Some(slot) = table.get_mut(at) {
                *slot = bit;
            }
        } else {
            // A value that does not fit its point is left out.
            let Ok(words) = encode(p, value) else {
                return;
            };
            let table = if p.kind == Kind::Holding { &mut self.holding } else { &mut self.input };
            if let Some(slots) = table.get_mut(at..at + words.len()) {
                slots.copy_from_slice(&words);
            }
        }
    }

    /// Shows the device's condition in its registers. Writable points keep what the MES
    /// wrote.
    pub fn show(&mut self, v: &DeviceView) {
        let mut values = Vec::new();
        for (i, p) in self.map.points.iter().enumerate() {
            if p.writable {
                continue;
            }
            let value = match p.role {
                Some(Role::State) => state_value(p, v.state),
                Some(Role::Good) => Some(counter_value(p, v.good)),
                Some(Role::Scrap) => Some(counter_value(p, v.scrap)),
                Some(Role::Boot) => Some(counter_value(p, v.boot)),
                Some(Role::Reason) => Some(reason_value(p, v.reason)),
                Some(Role::Target | Role::Command | Role::Order) => None,
                None => metric_value(p, v),
            };
            if let Some(value) = value {
                values.push((i, value));
            }
        }
        for (i, value) in values {
            self.put(i, &value);
        }
        self.online = v.online;
        // Silence: as the model says, but at least MIN_SILENCE of real time.
        if v.answering {
            self.forced_answer = false;
        }
        match (!v.answering && !self.forced_answer, self.silent_since) {
            (true, None) => self.silent_since = Some(Instant::now()),
            (false, Some(since)) if since.elapsed() >= MIN_SILENCE => self.silent_since = None,
            _ => {}
        }
        let now = (v.boot, v.good, v.scrap);
        if self.shown != Some(now) {
            self.shown = Some(now);
            self.gen += 1;
        }
    }

    /// The MES has read every counter since they last changed.
    pub fn observed(&self) -> bool {
        self.watched.iter().all(|w| w.seen_gen == self.gen)
    }

    /// Whether the counters now shown must be read before `next` replaces them: the
    /// device restarts, or a counter would advance by half its range or more since the
    /// MES last read it.
    pub fn must_be_seen_before(&self, next: &DeviceView) -> bool {
        let Some(shown) = self.shown else {
            return false;
        };
        if self.observed() {
            return false;
        }
        if next.boot != shown.0 {
            return true;
        }
        let (base_good, base_scrap) = match self.seen {
            Some((boot, g, s)) if boot == next.boot => (g, s),
            _ => (0, 0),
        };
        let half =
            |role| self.map.wrap_bits(role).map_or(u64::MAX, |b| if b >= 64 { u64::MAX } else { 1u64 << (b - 1) });
        next.good.saturating_sub(base_good) >= half(Role::Good)
            || next.scrap.saturating_sub(base_scrap) >= half(Role::Scrap)
    }

    /// Whether the server gives no replies now.
    pub fn silent(&self) -> bool {
        self.silent_since.is_some()
    }

    /// Ends a silence at once (until the model's silence is over): the MES must read the
    /// counters now.
    pub fn answer_now(&mut self) {
        if self.silent_since.take().is_some() {
            self.forced_answer = true;
        }
    }

    /// Answers one request the way the server does: nothing at all (`None`) while it is
    /// silent, else [`Image::handle`]'s reply.
    pub fn serve(&mut self, req: Request<'_>) -> Result<Option<Response>, ExceptionCode> {
        if self.silent() {
            self.unanswered += 1;
            return Ok(None);
        }
        self.handle(req).map(Some)
    }

    /// Commands the MES wrote since the last call.
    pub fn take_commands(&mut self) -> Vec<Command> {
        std::mem::take(&mut self.commands)
    }

    fn saw(&mut self, kind: Kind, start: u16, count: u16) {
        let end = u32::from(start) + u32::from(count);
        for w in &mut self.watched {
            if let Some(p) = self.map.points.get(w.point) {
                if p.kind == kind && p.address >= start && p.last_address() < end {
                    w.seen_gen = self.gen;
                }
            }
        }
        if self.observed() {
            self.seen = self.shown;
        }
    }

    /// Whether every address in `start..start + count` of `kind` belongs to a writable
    /// point.
    fn writable(&self, kind: Kind, start: usize, count: usize) -> bool {
        (start..start + count).all(|a| {
            self.map
                .points
                .iter()
                .any(|p| p.kind == kind && p.writable && usize::from(p.address) <= a && a as u32 <= p.last_address())
        })
    }

    /// The MES wrote `kind` registers or coils at `start..start + count`: act on the
    /// writable points touched.
    fn written(&mut self, kind: Kind, start: usize, count: usize) {
        let end = start + count;
        for p in &self.map.points {
            let (first, last) = (usize::from(p.address), p.last_address() as usize);
            if p.kind != kind || !p.writable || last < start || first >= end {
                continue;
            }
            let value = if p.kind.is_bit() {
                self.coils.get(first..=last).and_then(|bits| decode_bits(p, bits).ok())
            } else {
                self.holding.get(first..=last).and_then(|words| decode(p, words).ok())
            };
            let Some(value) = value else {
                continue;
            };
            match p.role {
                Some(Role::Command) => {
                    let code = value.as_u64().or_else(|| value.as_bool().map(u64::from));
                    let label = value.label().map(str::to_ascii_lowercase);
                    if code == Some(u64::from(COMMAND_STOP)) || label.as_deref() == Some("stop") {
                        self.commands.push(Command::Stop);
                    } else if code == Some(u64::from(COMMAND_START)) || label.as_deref() == Some("start") {
                        self.commands.push(Command::Start);
                    }
                }
                Some(Role::Target) => {
                    if let Some(t) = value.as_u64() {
                        self.commands.push(Command::SetTarget(t));
                    }
                }
                _ => {}
            }
        }
    }

    fn write_words(&mut self, start: u16, words: &[u16]) -> Result<(), ExceptionCode> {
        if words.is_empty() || words.len() > MAX_WRITE_REGISTERS {
            return Err(ExceptionCode::IllegalDataValue);
        }
        let at = usize::from(start);
        if at + words.len() > TABLE || !self.writable(Kind::Holding, at, words.len()) {
            return Err(ExceptionCode::IllegalDataAddress);
        }
        self.holding[at..at + words.len()].copy_from_slice(words);
        self.written(Kind::Holding, at, words.len());
        Ok(())
    }

    fn write_bits(&mut self, start: u16, bits: &[bool]) -> Result<(), ExceptionCode> {
        if bits.is_empty() || bits.len() > MAX_WRITE_BITS {
            return Err(ExceptionCode::IllegalDataValue);
        }
        let at = usize::from(start);
        if at + bits.len() > TABLE || !self.writable(Kind::Coil, at, bits.len()) {
            return Err(ExceptionCode::IllegalDataAddress);
        }
        self.coils[at..at + bits.len()].copy_from_slice(bits);
        self.written(Kind::Coil, at, bits.len());
        Ok(())
    }

    /// Answers one Modbus request.
    pub fn handle(&mut self, req: Request<'_>) -> Result<Response, ExceptionCode> {
        if !self.online {
            return Err(ExceptionCode::ServerDeviceFailure);
        }
        match req {
            Request::ReadCoils(a, n) => read_bits(&self.coils, a, n).map(Response::ReadCoils),
            Request::ReadDiscreteInputs(a, n) => read_bits(&self.discrete, a, n).map(Response::ReadDiscreteInputs),
            Request::ReadInputRegisters(a, n) => {
                let words = read_words(&self.input, a, n)?;
                self.saw(Kind::Input, a, n);
                Ok(Response::ReadInputRegisters(words))
            }
            Request::ReadHoldingRegisters(a, n) => {
                let words = read_words(&self.holding, a, n)?;
                self.saw(Kind::Holding, a, n);
                Ok(Response::ReadHoldingRegisters(words))
            }
            Request::WriteSingleRegister(a, w) => {
                self.write_words(a, &[w])?;
                Ok(Response::WriteSingleRegister(a, w))
            }
            Request::WriteMultipleRegisters(a, words) => {
                self.write_words(a, &words)?;
                Ok(Response::WriteMultipleRegisters(a, words.len() as u16))
            }
            Request::WriteSingleCoil(a, b) => {
                self.write_bits(a, &[b])?;
                Ok(Response::WriteSingleCoil(a, b))
            }
            Request::WriteMultipleCoils(a, bits) => {
                self.write_bits(a, &bits)?;
                Ok(Response::WriteMultipleCoils(a, bits.len() as u16))
            }
            Request::MaskWriteRegister(a, and, or) => {
                let current = *self.holding.get(usize::from(a)).ok_or(ExceptionCode::IllegalDataAddress)?;
                self.write_words(a, &[(current & and) | (or & !and)])?;
                Ok(Response::MaskWriteRegister(a, and, or))
            }
            Request::ReadWriteMultipleRegisters(ra, rn, wa, words) => {
                self.write_words(wa, &words)?;
                let read = read_words(&self.holding, ra, rn)?;
                self.saw(Kind::Holding, ra, rn);
                Ok(Response::ReadWriteMultipleRegisters(read))
            }
            _ => Err(ExceptionCode::IllegalFunction),
        }
    }
}

fn read_words(table: &[u16], start: u16, count: u16) -> Result<Vec<u16>, ExceptionCode> {
    if count == 0 || count > MAX_READ_REGISTERS {
        return Err(ExceptionCode::IllegalDataValue);
    }
    let at = usize::from(start);
    table.get(at..at + usize::from(count)).map(<[u16]>::to_vec).ok_or(ExceptionCode::IllegalDataAddress)
}

fn read_bits(table: &[bool], start: u16, count: u16) -> Result<Vec<bool>, ExceptionCode> {
    if count == 0 || count > MAX_READ_BITS {
        return Err(ExceptionCode::IllegalDataValue);
    }
    let at = usize::from(start);
    table.get(at..at + usize::from(count)).map(<[bool]>::to_vec).ok_or(ExceptionCode::IllegalDataAddress)
}

/// A register map by name (shipped with `mes-plc-maps`) or by path (contains `/` or
/// ends in `.toml`; relative to the plant file).
pub fn load_map(name: &str, base_dir: Option<&Path>) -> anyhow::Result<RegisterMap> {
    if name.contains('/') || name.ends_with(".toml") {
        let path = match base_dir {
            Some(base) if Path::new(name).is_relative() => base.join(name),
            _ => Path::new(name).to_path_buf(),
        };
        return RegisterMap::load(&path).map_err(|e| anyhow!("register map {}: {e}", path.display()));
    }
    match RegisterMap::shipped(name) {
        Some(Ok(map)) => Ok(map),
        Some(Err(e)) => Err(anyhow!("shipped register map {name}: {e}")),
        None => bail!("unknown register map `{name}` (not shipped with mes-plc-maps, and not a path)"),
    }
}

/// The devices behind one listening address, by unit id.
#[derive(Clone)]
struct Gateway {
    units: Arc<BTreeMap<u8, Arc<Mutex<Image>>>>,
}

impl tokio_modbus::server::Service for Gateway {
    type Request = SlaveRequest<'static>;
    /// `None`: no reply at all (a silent server).
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Ready<Result<Option<Response>, ExceptionCode>>;

    fn call(&self, req: SlaveRequest<'static>) -> Self::Future {
        let image = self.units.get(&req.slave).or_else(|| {
            // Unit 0 and 255 address "the" device when only one sits behind the address.
            let broadcast = req.slave == 0 || req.slave == 255;
            (broadcast && self.units.len() == 1).then(|| self.units.values().next()).flatten()
        });
        ready(match image {
            Some(image) => lock(image).serve(req.request),
            None => Err(ExceptionCode::GatewayTargetDevice),
        })
    }
}

struct Served {
    device: String,
    work_center: String,
    address: SocketAddr,
    unit: u8,
    image: Arc<Mutex<Image>>,
}

/// One unit behind an address: device id, work center id, registers.
type Unit = (String, String, Arc<Mutex<Image>>);

/// The plant's Modbus devices, served while this value lives.
pub struct Devices {
    devices: Vec<Served>,
    servers: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Devices {
    fn drop(&mut self) {
        for s in &self.servers {
            s.abort();
        }
    }
}

impl Devices {
    /// Loads the register maps and starts a server on each address the plant names.
    pub async fn start(plant: &Plant) -> anyhow::Result<Devices> {
        let mut by_address: BTreeMap<String, BTreeMap<u8, Unit>> = BTreeMap::new();
        for w in &plant.work_centers {
            let Device::Modbus(m) = &w.device else {
                continue;
            };
            let map = load_map(&m.map, plant.base_dir.as_deref()).with_context(|| format!("work center {}", w.id))?;
            let units = by_address.entry(m.address.clone()).or_default();
            if units.contains_key(&m.unit) {
                bail!("work center {}: Modbus address {} unit {} is used twice", w.id, m.address, m.unit);
            }
            units.insert(m.unit, (w.device_id(), w.id.clone(), Arc::new(Mutex::new(Image::new(map)))));
        }
        let mut devices = Vec::new();
        let mut servers = Vec::new();
        for (address, units) in by_address {
            let listener = tokio::net::TcpListener::bind(&address)
                .await
                .with_context(|| format!("cannot listen for Modbus TCP on {address}"))?;
            let local = listener.local_addr()?;
            let gateway = Gateway { units: Arc::new(units.iter().map(|(u, (_, _, i))| (*u, i.clone())).collect()) };
            for (unit, (device, work_center, image)) in units {
                devices.push(Served { device, work_center, address: local, unit, image });
            }
            servers.push(tokio::spawn(serve(listener, gateway)));
        }
        Ok(Devices { devices, servers })
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// `(work center, device, address, unit)` of each device.
    pub fn describe(&self) -> Vec<(String, String, SocketAddr, u8)> {
        self.devices.iter().map(|d| (d.work_center.clone(), d.device.clone(), d.address, d.unit)).collect()
    }

    /// Shows the line's current condition in every device's registers.
    pub fn show(&self, line: &Line) {
        for d in &self.devices {
            if let Some(v) = line.device_view(&d.device) {
                lock(&d.image).show(&v);
            }
        }
    }

    /// Whether some device's counters must be read before the line's current condition
    /// is shown.
    pub fn must_wait(&self, line: &Line) -> bool {
        self.devices.iter().any(|d| line.device_view(&d.device).is_some_and(|v| lock(&d.image).must_be_seen_before(&v)))
    }

    /// Devices whose current counters the MES has not read yet.
    pub fn unobserved(&self) -> Vec<String> {
        self.devices.iter().filter(|d| !lock(&d.image).observed()).map(|d| d.device.clone()).collect()
    }

    /// Waits until the MES has read every device's current counters, at most `limit`.
    pub async fn wait_observed(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.unobserved().is_empty() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Whether any device's server gives no replies right now.
    #[cfg(test)]
    pub fn any_silent(&self) -> bool {
        self.devices.iter().any(|d| lock(&d.image).silent())
    }

    /// Ends every silence now, so the MES can read (before a restart and at the end).
    pub fn answer_all(&self) {
        for d in &self.devices {
            lock(&d.image).answer_now();
        }
    }

    /// Requests left without a reply during silences, over all devices.
    pub fn unanswered(&self) -> u64 {
        self.devices.iter().map(|d| lock(&d.image).unanswered).sum()
    }

    /// Commands the MES wrote, as `(device, command)`.
    pub fn take_commands(&self) -> Vec<(String, Command)> {
        let mut out = Vec::new();
        for d in &self.devices {
            for c in lock(&d.image).take_commands() {
                out.push((d.device.clone(), c));
            }
        }
        out
    }
}

async fn serve(listener: tokio::net::TcpListener, gateway: Gateway) {
    let server = tokio_modbus::server::tcp::Server::new(listener);
    let on_connected = |stream, socket_addr| {
        let gateway = gateway.clone();
        async move {
            tokio_modbus::server::tcp::accept_tcp_connection(stream, socket_addr, move |_| Ok(Some(gateway.clone())))
        }
    };
    let on_error = |e: std::io::Error| eprintln!("[line-sim] Modbus connection error: {e}");
    if let Err(e) = server.serve(&on_connected, on_error).await {
        eprintln!("[line-sim] Modbus server stopped: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mes_plc_maps::{plan, RawData, Snapshot};

    fn view(boot: u64, good: u64, scrap: u64, state: State) -> DeviceView {
        DeviceView {
            boot,
            good,
            scrap,
            state,
            reason: None,
            temp_c: 61.25,
            cycle_s: 0.75,
            speed: 1.0,
            target: None,
            online: true,
            answering: true,
        }
    }

    /// Polls the image the way the MES plans its reads, and decodes the replies.
    fn poll(image: &mut Image) -> Snapshot {
        let map = image.map.clone();
        let mut replies = Vec::new();
        for r in plan(&map) {
            let req = match r.kind {
                Kind::Coil => Request::ReadCoils(r.start, r.count),
                Kind::Discrete => Request::ReadDiscreteInputs(r.start, r.count),
                Kind::Input => Request::ReadInputRegisters(r.start, r.count),
                Kind::Holding => Request::ReadHoldingRegisters(r.start, r.count),
            };
            let data = match image.handle(req).expect("read") {
                Response::ReadCoils(b) | Response::ReadDiscreteInputs(b) => RawData::Bits(b),
                Response::ReadInputRegisters(w) | Response::ReadHoldingRegisters(w) => RawData::Registers(w),
                other => panic!("unexpected {other:?}"),
            };
            replies.push((r, data));
        }
        Snapshot::extract(&map, &replies)
    }

    fn shipped(name: &str) -> Image {
        Image::new(load_map(name, None).expect("shipped map"))
    }

    #[test]
    fn counters_and_state_decode_as_the_mes_reads_them() {
        for name in ["press-v1", "former-v2"] {
            let mut image = shipped(name);
            let mut v = view(1_795_626_927_543, 70_000, 65_539, State::Down);
            v.reason = Some(reason::BREAKDOWN);
            image.show(&v);
            let c = poll(&mut image).counters();
            assert_eq!(c.good, Some(70_000), "{name}");
            let scrap_bits = image.map.wrap_bits(Role::Scrap).expect("unsigned");
            assert_eq!(c.scrap, Some(65_539 % (1u64 << scrap_bits)), "{name}");
            assert_eq!(c.boot, Some(1_795_626_927_543 & 0xFFFF), "{name}");
            assert_eq!(c.state.as_deref(), Some("down"), "{name}");
            assert_eq!(c.reason, Some(4), "{name}");
            assert!(image.observed());
        }
        let mut image = shipped("press-v1");
        image.show(&view(1, 5, 0, State::Running));
        let snap = poll(&mut image);
        let temp = snap.get("temperature").map(Value::as_f64).expect("temperature");
        assert!((temp - 61.25).abs() < 0.01, "{temp}");
        assert_eq!(snap.counters().state.as_deref(), Some("running"));
        let mut former = shipped("former-v2");
        former.show(&view(1, 0, 0, State::Setup));
        assert_eq!(poll(&mut former).counters().state.as_deref(), Some("setup"));
        // A map without a state's label shows the nearest one it has.
        let mut p = former.map.point_by_role(Role::State).expect("state").clone();
        p.enum_values.retain(|_, l| l != "setup");
        assert_eq!(state_value(&p, State::Setup).and_then(|v| v.as_u64()), Some(30));
    }

    #[test]
    fn writes_become_commands_and_read_back() {
        let mut image = shipped("press-v1");
        image.show(&view(1, 0, 0, State::Running));
        let target = image.map.point_by_role(Role::Target).expect("target").clone();
        let words = encode(&target, &Value::U64(500)).expect("encode");
        let r = image.handle(Request::WriteMultipleRegisters(target.address, words.clone().into()));
        assert_eq!(r, Ok(Response::WriteMultipleRegisters(target.address, 2)));
        let cmd = image.map.point_by_role(Role::Command).expect("command").clone();
        image.handle(Request::WriteSingleRegister(cmd.address, COMMAND_STOP)).expect("stop");
        image.handle(Request::WriteSingleRegister(cmd.address, COMMAND_START)).expect("start");
        assert_eq!(image.take_commands(), vec![Command::SetTarget(500), Command::Stop, Command::Start]);
        assert!(image.take_commands().is_empty());
        assert_eq!(poll(&mut image).counters().target, Some(500));
        // The device's own registers are not writable.
        let good = image.map.point_by_role(Role::Good).expect("good").address;
        assert_eq!(image.handle(Request::WriteSingleRegister(good, 1)), Err(ExceptionCode::IllegalDataAddress));
        // The MES' own values survive the device's updates.
        image.show(&view(1, 10, 0, State::Running));
        assert_eq!(poll(&mut image).counters().target, Some(500));
    }

    #[test]
    fn bad_requests_get_exceptions() {
        let mut image = shipped("press-v1");
        assert_eq!(image.handle(Request::ReadHoldingRegisters(0, 0)), Err(ExceptionCode::IllegalDataValue));
        assert_eq!(image.handle(Request::ReadHoldingRegisters(0, 126)), Err(ExceptionCode::IllegalDataValue));
        assert_eq!(image.handle(Request::ReadHoldingRegisters(65_535, 2)), Err(ExceptionCode::IllegalDataAddress));
        assert_eq!(image.handle(Request::ReportServerId), Err(ExceptionCode::IllegalFunction));
        assert!(image.handle(Request::ReadCoils(0, 10)).is_ok());
        let mut v = view(1, 0, 0, State::Down);
        v.online = false;
        image.show(&v);
        assert_eq!(image.handle(Request::ReadHoldingRegisters(0, 1)), Err(ExceptionCode::ServerDeviceFailure));
    }

    #[test]
    fn a_silent_server_gives_no_reply_for_at_least_the_minimum() {
        let mut image = shipped("press-v1");
        image.show(&view(1, 5, 0, State::Running));
        assert!(matches!(image.serve(Request::ReadHoldingRegisters(0, 8)), Ok(Some(_))));
        let quiet = |good| DeviceView { answering: false, ..view(1, good, 0, State::Running) };
        image.show(&quiet(6));
        assert!(image.silent());
        assert_eq!(image.serve(Request::ReadHoldingRegisters(0, 8)), Ok(None));
        assert_eq!(image.serve(Request::ReadInputRegisters(0, 2)), Ok(None));
        assert_eq!(image.unanswered, 2);
        assert!(!image.observed(), "nothing was read");
        // The model's silence is over, but the server stays silent for MIN_SILENCE.
        image.show(&view(1, 7, 0, State::Running));
        assert!(image.silent());
        std::thread::sleep(MIN_SILENCE);
        image.show(&view(1, 7, 0, State::Running));
        assert!(!image.silent());
        assert_eq!(poll(&mut image).counters().good, Some(7));
        // Told to answer (a restart is coming): at once, and the model's silence still
        // going on does not start it again.
        image.show(&quiet(8));
        assert!(image.silent());
        image.answer_now();
        image.show(&quiet(9));
        assert!(!image.silent());
        assert_eq!(poll(&mut image).counters().good, Some(9));
        // The next silence starts as usual.
        image.show(&view(1, 9, 0, State::Running));
        image.show(&quiet(10));
        assert!(image.silent());
        assert_eq!(image.unanswered, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_server_accepts_connections_and_lets_reads_time_out() {
        use tokio_modbus::prelude::{Reader, Slave};
        let plant = Plant::parse(
            r#"
            [[buffers]]
            id = "OUT"
            sku = "B"
            capacity = 10
            [[work_centers]]
            id = "PRESS-9"
            output = "OUT"
            device = { modbus = { address = "127.0.0.1:0", unit = 1, map = "press-v1" } }
            "#,
            "t",
        )
        .expect("plant");
        let devices = Devices::start(&plant).await.expect("serve");
        let (_, _, addr, _) = devices.describe().remove(0);
        let image = devices.devices[0].image.clone();
        lock(&image).show(&DeviceView { answering: false, ..view(1, 3, 0, State::Running) });
        let mut ctx = tokio_modbus::client::tcp::connect_slave(addr, Slave(1)).await.expect("accepted while silent");
        let read = tokio::time::timeout(Duration::from_millis(300), ctx.read_holding_registers(0, 8)).await;
        assert!(read.is_err(), "no reply: the read times out");
        assert_eq!(devices.unanswered(), 1);
        devices.answer_all();
        let mut ctx = tokio_modbus::client::tcp::connect_slave(addr, Slave(1)).await.expect("connect");
        let words = tokio::time::timeout(Duration::from_secs(5), ctx.read_holding_registers(0, 8))
            .await
            .expect("answered again")
            .expect("transport")
            .expect("no exception");
        assert_eq!(words.len(), 8);
        assert_eq!(devices.unanswered(), 1);
    }

    #[test]
    fn a_restart_waits_until_the_last_counters_were_read() {
        let mut image = shipped("press-v1");
        image.show(&view(7, 0, 0, State::Running));
        poll(&mut image);
        image.show(&view(7, 40, 1, State::Running));
        assert!(!image.observed());
        // Further output in the same boot need not wait...
        assert!(!image.must_be_seen_before(&view(7, 41, 1, State::Running)));
        // ...a restart must.
        assert!(image.must_be_seen_before(&view(8, 0, 0, State::Down)));
        poll(&mut image);
        assert!(image.observed());
        assert!(!image.must_be_seen_before(&view(8, 0, 0, State::Down)));
        // A u16 scrap counter may not run half its range ahead of the last read.
        assert!(!image.must_be_seen_before(&view(7, 41, 32_768, State::Running)));
        image.show(&view(7, 41, 2, State::Running));
        assert!(image.must_be_seen_before(&view(7, 41, 32_769, State::Running)));
        assert!(!image.must_be_seen_before(&view(7, 41, 32_000, State::Running)));
    }

    /// Polls one device over TCP like the MES (CONTRACT §5): the first reading is the
    /// baseline; a changed boot counts the counters from 0; a fall within a boot is a wrap.
    async fn mes_like_poller(
        addr: SocketAddr,
        map: RegisterMap,
        stop: Arc<std::sync::atomic::AtomicBool>,
    ) -> (u64, u64, u64, u64) {
        use tokio_modbus::prelude::{Reader, Slave};
        let mut ctx = tokio_modbus::client::tcp::connect_slave(addr, Slave(1)).await.expect("connect");
        let reads = plan(&map);
        let bits = |role| map.wrap_bits(role).unwrap_or(64);
        let (mut last, mut good, mut scrap, mut polls) = (None::<(u64, u64, u64)>, 0u64, 0u64, 0u64);
        let mut timeouts = 0u64;
        let delta = |prev: u64, now: u64, b: u32| if now >= prev { now - prev } else { (1u64 << b) - prev + now };
        loop {
            let stopping = stop.load(std::sync::atomic::Ordering::SeqCst);
            // A silent server never replies: time the poll out and reconnect, as the MES does.
            let polled = tokio::time::timeout(Duration::from_millis(100), async {
                let mut replies = Vec::new();
                for r in &reads {
                    let data = match r.kind {
                        Kind::Holding => ctx
                            .read_holding_registers(r.start, r.count)
                            .await
                            .ok()
                            .and_then(Result::ok)
                            .map(RawData::Registers),
                        Kind::Input => ctx
                            .read_input_registers(r.start, r.count)
                            .await
                            .ok()
                            .and_then(Result::ok)
                            .map(RawData::Registers),
                        Kind::Coil => {
                            ctx.read_coils(r.start, r.count).await.ok().and_then(Result::ok).map(RawData::Bits)
                        }
                        Kind::Discrete => ctx
                            .read_discrete_inputs(r.start, r.count)
                            .await
                            .ok()
                            .and_then(Result::ok)
                            .map(RawData::Bits),
                    };
                    if let Some(d) = data {
                        replies.push((*r, d));
                    }
                }
                replies
            })
            .await;
            let Ok(replies) = polled else {
                timeouts += 1;
                if let Ok(c) = tokio_modbus::client::tcp::connect_slave(addr, Slave(1)).await {
                    ctx = c;
                }
                continue;
            };
            let c = Snapshot::extract(&map, &replies).counters();
            if let (Some(b), Some(g), Some(s)) = (c.boot, c.good, c.scrap) {
                polls += 1;
                match last {
                    Some((pb, _, _)) if pb != b => {
                        good += g;
                        scrap += s;
                    }
                    Some((_, pg, ps)) => {
                        good += delta(pg, g, bits(Role::Good));
                        scrap += delta(ps, s, bits(Role::Scrap));
                    }
                    None => {}
                }
                last = Some((b, g, s));
            }
            if stopping {
                return (good, scrap, polls, timeouts);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_polling_mes_counts_exactly_through_restarts() {
        use crate::scenario::Scenario;
        let plant = Plant::parse(
            r#"
            [[boms]]
            sku = "B"
            components = [{ sku = "A", quantity = 1 }]
            [[buffers]]
            id = "IN"
            sku = "A"
            capacity = 1000000
            initial = 1000000
            [[buffers]]
            id = "OUT"
            sku = "B"
            capacity = 1000000
            [[work_centers]]
            id = "PRESS-9"
            ideal_cycle_s = 0.5
            inputs = ["IN"]
            output = "OUT"
            device = { modbus = { address = "127.0.0.1:0", unit = 1, map = "press-v1" } }
            "#,
            "t",
        )
        .expect("plant");
        let mut sc = Scenario::resolve("faults").expect("faults");
        sc.faults.reboots_per_hour = 120.0;
        sc.faults.reboot_s = 1.0;
        sc.faults.modbus_silences_per_hour = 30.0;
        sc.faults.modbus_silence_s = 5.0;
        sc.line.scrap_rate = 0.05;
        let (mut line, _) = Line::new(&plant, &sc, 11, 900_000, 1_000);
        let devices = Devices::start(&plant).await.expect("serve");
        let (_, device, addr, _) = devices.describe().remove(0);
        assert_eq!(device, "press-9");
        devices.show(&line);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let poller = tokio::spawn(mes_like_poller(addr, load_map("press-v1", None).expect("map"), stop.clone()));
        assert!(devices.wait_observed(Duration::from_secs(10)).await, "first read");
        let mut out = Vec::new();
        let mut outlasted = false;
        while !line.done() {
            line.step(&mut out);
            if devices.must_wait(&line) {
                devices.answer_all();
                assert!(devices.wait_observed(Duration::from_secs(10)).await, "read before a restart");
            }
            devices.show(&line);
            if !outlasted && devices.any_silent() {
                // Simulated time runs far ahead of real time here, and a restart that must
                // be read ends a silence at once: whether any read timed out was left to
                // the scheduler (1 run in 4 saw none). The first silence outlasts the
                // poller's 100 ms timeout, so every run covers reads that time out.
                tokio::time::sleep(Duration::from_millis(300)).await;
                outlasted = true;
            }
            tokio::task::yield_now().await;
        }
        devices.show(&line);
        devices.answer_all();
        assert!(devices.wait_observed(Duration::from_secs(10)).await, "final read");
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (good, scrap, polls, timeouts) = poller.await.expect("poller");
        // The server fell silent now and then; the poller's reads timed out meanwhile.
        assert!(line.truth().faults.modbus_timeouts > 2, "{:?}", line.truth().faults);
        assert!(timeouts > 0 && devices.unanswered() > 0, "{timeouts} timeouts");
        let truth = line.truth();
        let t = &truth.work_centers["PRESS-9"];
        let boot = line.device_view("press-9").expect("device").boot;
        assert!(boot >= 1_010, "restarts happened: boot {boot}");
        assert!(t.good > 1000 && t.scrap > 50, "{t:?}");
        assert_eq!((good, scrap), (t.good, t.scrap), "after {polls} polls");
        assert!(out.is_empty(), "Modbus devices publish nothing over MQTT");
    }

    #[test]
    fn maps_by_path_are_relative_to_the_plant() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plc-maps");
        assert!(load_map("maps/press-v1.toml", Some(&dir)).is_ok());
        assert!(load_map("maps/nope.toml", Some(&dir)).is_err());
        let e = load_map("no-such-map", None).expect_err("unknown");
        assert!(e.to_string().contains("unknown register map"), "{e}");
    }
}
