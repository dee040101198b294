//! The line model: stations (one per work center) moving material between buffers in
//! fixed steps of simulated time. Pure: no I/O and no clocks; everything random comes
//! from seeded [`Rng`]s, so a plant, a scenario and a seed replay the same run.
//!
//! Each step the model also decides which telemetry messages the devices send (CONTRACT
//! §4), including the faults a scenario asks for (reboots, duplicates, out-of-order
//! messages), and returns them in publish order.

use crate::plant::{Device, Plant};
use crate::rng::Rng;
use crate::scenario::{Faults, Scenario, StationParams};
use crate::truth::{DemandTruth, FaultTruth, Truth, WorkCenterTruth};
use crate::units::days_from_civil;
use serde::Serialize;
use std::collections::BTreeMap;

/// The simulated clock starts at 2026-11-25T06:00:00Z (the start of a morning shift).
pub const SIM_EPOCH_MS: i64 = days_from_civil(2026, 11, 25) * 86_400_000 + 6 * 3_600_000;

/// Longest order id the MES accepts.
const MAX_ORDER_LEN: usize = 128;
/// Shortest possible cycle, so a step always ends.
const MIN_CYCLE_S: f64 = 0.001;
/// Random streams of the line-wide draws (stations use `2 i` and `2 i + 1`, their Modbus
/// link `COMM_STREAM + i`), far from the stations' so that adding one changes no other.
const LINK_STREAM: u64 = u64::MAX;
const DEMAND_STREAM: u64 = u64::MAX - 1;
const COMM_STREAM: u64 = 1 << 40;

/// Machine state as reported in telemetry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Running,
    Idle,
    Setup,
    Down,
    Stopped,
}

/// Downtime reason codes the simulator reports (see README).
pub mod reason {
    pub const STARVED: &str = "starved";
    pub const BLOCKED: &str = "blocked";
    pub const MICRO_STOP: &str = "micro_stop";
    pub const BREAKDOWN: &str = "breakdown";
    pub const CHANGEOVER: &str = "changeover";
    pub const ORDER_COMPLETE: &str = "order_complete";
    pub const OPERATOR_STOP: &str = "operator_stop";
    pub const REBOOT: &str = "reboot";

    /// Every reason with its numeric code, for register-mapped devices whose reason
    /// register has no `enum` (0 = no reason).
    pub const CODES: [(&str, u16); 8] = [
        (STARVED, 1),
        (BLOCKED, 2),
        (MICRO_STOP, 3),
        (BREAKDOWN, 4),
        (CHANGEOVER, 5),
        (ORDER_COMPLETE, 6),
        (OPERATOR_STOP, 7),
        (REBOOT, 8),
    ];

    /// The numeric code of a reason (0 for none).
    pub fn code(reason: Option<&str>) -> u16 {
        reason.and_then(|r| CODES.iter().find(|(name, _)| *name == r)).map_or(0, |(_, c)| *c)
    }
}

/// One telemetry message of one device.
#[derive(Debug, Clone, PartialEq)]
pub struct Telemetry {
    pub device: String,
    pub work_center: String,
    pub boot: u64,
    pub seq: u64,
    /// Simulated milliseconds since the start of the run.
    pub sim_ms: u64,
    pub state: State,
    pub good: u64,
    pub scrap: u64,
    pub order: Option<String>,
    pub reason: Option<&'static str>,
    pub metrics: BTreeMap<&'static str, f64>,
}

#[derive(Serialize)]
struct Wire<'a> {
    boot: u64,
    seq: u64,
    ts: String,
    state: State,
    good: u64,
    scrap: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    order: Option<&'a str>,
    reason: Option<&'a str>,
    metrics: &'a BTreeMap<&'static str, f64>,
}

impl Telemetry {
    /// The CONTRACT §4 JSON payload.
    pub fn to_json(&self) -> String {
        let wire = Wire {
            boot: self.boot,
            seq: self.seq,
            ts: crate::units::rfc3339_ms(SIM_EPOCH_MS + self.sim_ms as i64),
            state: self.state,
            good: self.good,
            scrap: self.scrap,
            order: self.order.as_deref(),
            reason: self.reason,
            metrics: &self.metrics,
        };
        // Serializing plain numbers and strings cannot fail.
        serde_json::to_string(&wire).unwrap_or_default()
    }
}

/// A command from the MES (CONTRACT §4, `{prefix}/devices/{id}/cmd`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Start,
    Stop,
    SetOrder {
        order: String,
        target: Option<u64>,
    },
    /// A new batch with this target (Modbus `target` register); 0 means no target.
    SetTarget(u64),
}

impl Command {
    /// Parses a command payload; says why when it is not one.
    pub fn parse(payload: &[u8]) -> Result<Command, String> {
        let v: serde_json::Value = serde_json::from_slice(payload).map_err(|e| format!("command is not JSON: {e}"))?;
        let cmd = v.get("cmd").and_then(|c| c.as_str()).ok_or("command has no `cmd` string")?;
        match cmd {
            "start" => Ok(Command::Start),
            "stop" => Ok(Command::Stop),
            "set_order" => {
                let order = v.get("order").and_then(|o| o.as_str()).ok_or("set_order has no `order` string")?;
                if order.is_empty() || order.chars().count() > MAX_ORDER_LEN {
                    return Err(format!("set_order: order id must have 1 to {MAX_ORDER_LEN} characters"));
                }
                let target = match v.get("target") {
                    None | Some(serde_json::Value::Null) => None,
                    Some(t) => Some(t.as_u64().ok_or("set_order: `target` must be a non-negative integer")?),
                };
                Ok(Command::SetOrder { order: order.to_string(), target })
            }
            other => Err(format!("unknown command `{}`", other.chars().take(40).collect::<String>())),
        }
    }
}

/// A material buffer.
#[derive(Debug, Clone)]
pub struct BufferState {
    pub id: String,
    pub sku: String,
    pub capacity: u64,
    pub initial: u64,
    pub level: u64,
    /// Units promised to cycles in progress (still in `level`).
    reserved_out: u64,
    /// Space promised to cycles in progress (not yet in `level`).
    reserved_in: u64,
    /// Good units that entered the buffer.
    pub produced: u64,
    /// Units taken out by consuming stations.
    pub consumed: u64,
}

impl BufferState {
    fn available(&self) -> u64 {
        self.level - self.reserved_out
    }
    fn space(&self) -> u64 {
        self.capacity.saturating_sub(self.level).saturating_sub(self.reserved_in)
    }
}

#[derive(Debug, Clone)]
struct BomLine {
    sku: String,
    qty: u64,
    /// Input buffers holding this sku; none means an unlimited outside supply.
    sources: Vec<usize>,
}

#[derive(Debug, Clone)]
struct Cycle {
    left_s: f64,
    /// (buffer, quantity) taken when the cycle completes.
    take: Vec<(usize, u64)>,
}

#[derive(Debug, Clone)]
struct Order {
    /// The order id from `set_order`; none for a batch target written over Modbus.
    id: Option<String>,
    target: Option<u64>,
    good: u64,
}

/// What was last sent, to decide whether a step has news.
#[derive(Debug, Clone, PartialEq)]
struct Sent {
    good: u64,
    scrap: u64,
    state: State,
    reason: Option<&'static str>,
    order: Option<String>,
}

#[derive(Debug, Clone)]
struct Station {
    wc: String,
    device: String,
    /// Whether this station's device publishes over MQTT (Modbus devices are read).
    mqtt: bool,
    ideal_cycle_s: f64,
    params: StationParams,
    output: usize,
    bom: Vec<BomLine>,
    rng: Rng,
    fault_rng: Rng,
    /// Draws of the Modbus server's silences (its own stream).
    comm_rng: Rng,
    /// Simulated time until the Modbus server next stops answering.
    silence_in_s: f64,
    /// Simulated time the Modbus server still gives no replies.
    silence_left_s: f64,
    reboots: u64,
    silences: u64,
    // The device's counters.
    boot: u64,
    seq: u64,
    good: u64,
    scrap: u64,
    // Lifetime totals.
    total_good: u64,
    total_scrap: u64,
    running_ms: u64,
    down_ms: u64,
    // Control and condition.
    stopped: bool,
    order: Option<Order>,
    setup_left_s: f64,
    down_left_s: f64,
    microstop_left_s: f64,
    rebooting_left_s: f64,
    /// Running time until the next breakdown.
    ttf_s: f64,
    /// Simulated time until the next reboot.
    ttr_s: f64,
    cycle: Option<Cycle>,
    state: State,
    reason: Option<&'static str>,
    last_cycle_s: f64,
    temp_c: f64,
    speed: f64,
    // Telemetry bookkeeping.
    sent: Option<Sent>,
    since_sent_s: f64,
    held: Option<Telemetry>,
    /// Per-order output (what the device made while it had the order).
    orders: BTreeMap<String, (u64, u64)>,
}

/// The whole line.
#[derive(Debug, Clone)]
pub struct Line {
    seed: u64,
    scenario: Scenario,
    tick_ms: u64,
    duration_ms: u64,
    now_ms: u64,
    buffers: Vec<BufferState>,
    stations: Vec<Station>,
    consumed: BTreeMap<String, u64>,
    /// Draws of the MQTT connection drops.
    link_rng: Rng,
    /// Simulated time until the MQTT connection is next cut.
    drop_in_s: f64,
    mqtt_drops: u64,
    /// Drops due that the I/O side has not taken yet.
    drops_due: u64,
    demand: Option<DemandModel>,
}

/// A sales order for finished goods, to be reserved at the MES.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SalesOrder {
    /// 1, 2, … in the order placed.
    pub n: u64,
    pub sku: String,
    pub quantity: u64,
    /// Simulated milliseconds since the start of the run.
    pub sim_ms: u64,
}

/// The promo demand: Poisson arrivals at `orders_per_hour × demand factor`.
#[derive(Debug, Clone)]
struct DemandModel {
    rng: Rng,
    per_hour: f64,
    lot: [u64; 2],
    /// Buffers holding the sku (their level is the line's finished stock).
    buffers: Vec<usize>,
    /// Stock promised to earlier sales orders.
    promised: u64,
    truth: DemandTruth,
    placed: Vec<SalesOrder>,
}

/// A station's condition, for devices that are read rather than publish (Modbus).
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceView {
    pub boot: u64,
    pub good: u64,
    pub scrap: u64,
    pub state: State,
    pub reason: Option<&'static str>,
    pub temp_c: f64,
    pub cycle_s: f64,
    pub speed: f64,
    pub target: Option<u64>,
    pub online: bool,
    /// False while the device's Modbus server gives no replies (a communication fault).
    pub answering: bool,
}

impl Line {
    /// Builds the line for `plant` (all its work centers) under `scenario`.
    ///
    /// `boot_base` is the first `boot` every device reports. Returns the line and
    /// warnings about the plant (e.g. a component no input buffer supplies).
    pub fn new(plant: &Plant, scenario: &Scenario, seed: u64, duration_ms: u64, boot_base: u64) -> (Line, Vec<String>) {
        let mut warnings = Vec::new();
        let buffers: Vec<BufferState> = plant
            .buffers
            .iter()
            .map(|b| BufferState {
                id: b.id.clone(),
                sku: b.sku.clone(),
                capacity: b.capacity,
                initial: b.initial,
                level: b.initial,
                reserved_out: 0,
                reserved_in: 0,
                produced: 0,
                consumed: 0,
            })
            .collect();
        let index = |id: &str| buffers.iter().position(|b| b.id == id);
        let mut stations = Vec::new();
        let mut consumed = BTreeMap::new();
        for (i, w) in plant.work_centers.iter().enumerate() {
            let Some(output) = index(&w.output) else {
                warnings.push(format!("work center {}: output buffer {} is unknown; skipped", w.id, w.output));
                continue;
            };
            let sku = buffers[output].sku.clone();
            let mut bom = Vec::new();
            for (csku, qty) in plant.bom(&sku) {
                let sources: Vec<usize> =
                    w.inputs.iter().filter_map(|id| index(id)).filter(|&b| buffers[b].sku == csku).collect();
                if sources.is_empty() {
                    warnings.push(format!(
                        "work center {}: no input buffer holds {csku}; it is supplied from outside",
                        w.id
                    ));
                }
                consumed.entry(csku.clone()).or_insert(0);
                bom.push(BomLine { sku: csku, qty, sources });
            }
            let params = scenario.station(&w.id);
            let stream = i as u64 * 2;
            let mut rng = Rng::new(seed, stream);
            let mut fault_rng = Rng::new(seed, stream + 1);
            let ttf_s = rng.exponential(params.mtbf_s);
            let ttr_s = fault_rng.exponential(3600.0 / params.reboots_per_hour);
            let mqtt = matches!(w.device, Device::Mqtt { .. });
            let mut comm_rng = Rng::new(seed, COMM_STREAM + i as u64);
            let silence_in_s = if mqtt {
                f64::INFINITY
            } else {
                comm_rng.exponential(3600.0 / scenario.faults.modbus_silences_per_hour)
            };
            stations.push(Station {
                wc: w.id.clone(),
                device: w.device_id(),
                mqtt,
                ideal_cycle_s: w.ideal_cycle_s,
                params,
                output,
                bom,
                rng,
                fault_rng,
                comm_rng,
                silence_in_s,
                silence_left_s: 0.0,
                reboots: 0,
                silences: 0,
                boot: boot_base,
                seq: 0,
                good: 0,
                scrap: 0,
                total_good: 0,
                total_scrap: 0,
                running_ms: 0,
                down_ms: 0,
                stopped: false,
                order: None,
                setup_left_s: 0.0,
                down_left_s: 0.0,
                microstop_left_s: 0.0,
                rebooting_left_s: 0.0,
                ttf_s,
                ttr_s,
                cycle: None,
                state: State::Idle,
                reason: None,
                last_cycle_s: 0.0,
                temp_c: 25.0,
                speed: 1.0,
                sent: None,
                since_sent_s: 0.0,
                held: None,
                orders: BTreeMap::new(),
            });
        }
        for w in &scenario.work_centers {
            if !plant.work_centers.iter().any(|p| &p.id == w.0) {
                warnings.push(format!("scenario names work center {} which the plant does not have", w.0));
            }
        }
        let mut link_rng = Rng::new(seed, LINK_STREAM);
        let drop_in_s = if stations.iter().any(|s| s.mqtt) {
            link_rng.exponential(3600.0 / scenario.faults.mqtt_drops_per_hour)
        } else {
            f64::INFINITY
        };
        let demand = DemandModel::new(plant, scenario, seed, &buffers, &mut warnings);
        let line = Line {
            seed,
            scenario: scenario.clone(),
            tick_ms: scenario.tick_ms.max(1),
            duration_ms,
            now_ms: 0,
            buffers,
            stations,
            consumed,
            link_rng,
            drop_in_s,
            mqtt_drops: 0,
            drops_due: 0,
            demand,
        };
        (line, warnings)
    }

    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }
    pub fn duration_ms(&self) -> u64 {
        self.duration_ms
    }
    pub fn done(&self) -> bool {
        self.now_ms >= self.duration_ms
    }
    pub fn buffers(&self) -> &[BufferState] {
        &self.buffers
    }
    /// Good plus scrap units made so far, over all stations.
    pub fn units_made(&self) -> u64 {
        self.stations.iter().map(|s| s.total_good + s.total_scrap).sum()
    }
    /// The devices, as `(device id, work center id, publishes over MQTT)`.
    pub fn devices(&self) -> impl Iterator<Item = (&str, &str, bool)> {
        self.stations.iter().map(|s| (s.device.as_str(), s.wc.as_str(), s.mqtt))
    }

    /// The current condition of a device, for register-mapped devices.
    pub fn device_view(&self, device: &str) -> Option<DeviceView> {
        let s = self.stations.iter().find(|s| s.device == device)?;
        Some(DeviceView {
            boot: s.boot,
            good: s.good,
            scrap: s.scrap,
            state: s.state,
            reason: s.reason,
            temp_c: s.temp_c,
            cycle_s: s.last_cycle_s,
            speed: s.speed,
            target: s.order.as_ref().and_then(|o| o.target),
            online: s.rebooting_left_s <= 0.0,
            answering: s.silence_left_s <= 0.0,
        })
    }

    /// Stops every station (state `stopped`, reason `operator_stop`) until a `start`
    /// reaches it: a line waiting for its shift to begin.
    pub fn stop_all(&mut self) {
        for s in &mut self.stations {
            s.stopped = true;
        }
    }

    /// MQTT connection drops that fell due since the last call.
    pub fn take_mqtt_drops(&mut self) -> u64 {
        std::mem::take(&mut self.drops_due)
    }

    /// Sales orders placed since the last call.
    pub fn take_sales_orders(&mut self) -> Vec<SalesOrder> {
        self.demand.as_mut().map(|d| std::mem::take(&mut d.placed)).unwrap_or_default()
    }

    /// The promo demand's sku, if the scenario has demand.
    pub fn demand_sku(&self) -> Option<&str> {
        self.demand.as_ref().map(|d| d.truth.sku.as_str())
    }

    /// Applies a command for `device`.
    pub fn command(&mut self, device: &str, cmd: Command) -> Result<(), String> {
        let changeover = self.scenario.changeover_s;
        let s = self
            .stations
            .iter_mut()
            .find(|s| s.device == device)
            .ok_or_else(|| format!("no simulated device `{device}`"))?;
        match cmd {
            Command::Start => s.stopped = false,
            Command::Stop => s.stopped = true,
            Command::SetOrder { order, target } => {
                let target = target.filter(|t| *t > 0);
                match &mut s.order {
                    Some(o) if o.id.as_deref() == Some(order.as_str()) => o.target = target,
                    _ => {
                        s.order = Some(Order { id: Some(order), target, good: 0 });
                        s.setup_left_s = changeover;
                    }
                }
            }
            Command::SetTarget(t) => {
                let target = Some(t).filter(|t| *t > 0);
                match &mut s.order {
                    Some(o) => {
                        o.target = target;
                        o.good = 0;
                    }
                    None => s.order = Some(Order { id: None, target, good: 0 }),
                }
            }
        }
        Ok(())
    }

    /// Advances the line by one tick and appends the messages sent during it, in
    /// publish order.
    pub fn step(&mut self, out: &mut Vec<Telemetry>) {
        if self.done() {
            return;
        }
        let dt_ms = self.tick_ms.min(self.duration_ms - self.now_ms);
        let dt = dt_ms as f64 / 1000.0;
        let fraction = self.now_ms as f64 / self.duration_ms as f64;
        let line_speed = self.scenario.speed_at(fraction);
        let end_ms = self.now_ms + dt_ms;
        let heartbeat = self.scenario.heartbeat_s;
        let faults = &self.scenario.faults;
        for s in &mut self.stations {
            s.advance(dt, line_speed, &mut self.buffers, &mut self.consumed, end_ms, faults, out);
            match s.state {
                State::Running => s.running_ms += dt_ms,
                State::Down => s.down_ms += dt_ms,
                _ => {}
            }
            s.since_sent_s += dt;
            if s.mqtt && s.online() {
                let news = s.sent.as_ref() != Some(&s.snapshot());
                if news || s.since_sent_s + 1e-9 >= heartbeat {
                    s.emit(end_ms, faults, false, out);
                }
            }
            if !s.mqtt {
                // The Modbus server's silences (the line itself goes on).
                if s.silence_left_s > 0.0 {
                    s.silence_left_s = (s.silence_left_s - dt).max(0.0);
                } else {
                    s.silence_in_s -= dt;
                    if s.silence_in_s <= 0.0 {
                        s.silence_in_s = s.comm_rng.exponential(3600.0 / faults.modbus_silences_per_hour);
                        s.silence_left_s = faults.modbus_silence_s;
                        s.silences += 1;
                    }
                }
            }
        }
        self.drop_in_s -= dt;
        if self.drop_in_s <= 0.0 {
            self.drop_in_s = self.link_rng.exponential(3600.0 / faults.mqtt_drops_per_hour);
            self.mqtt_drops += 1;
            self.drops_due += 1;
        }
        if let Some(d) = &mut self.demand {
            d.step(dt, self.scenario.demand_at(fraction), end_ms, &self.buffers);
        }
        self.now_ms = end_ms;
    }

    /// Ends the run: every live device sends its final counters, and anything held back
    /// goes out first.
    pub fn finish(&mut self, out: &mut Vec<Telemetry>) {
        let now = self.now_ms;
        let faults = &self.scenario.faults;
        for s in &mut self.stations {
            if !s.mqtt {
                continue;
            }
            if let Some(h) = s.held.take() {
                out.push(h);
            }
            if s.online() {
                s.emit(now, faults, true, out);
            }
        }
    }

    /// What really happened so far.
    pub fn truth(&self) -> Truth {
        let mut t = Truth { seed: self.seed, ..Truth::default() };
        for s in &self.stations {
            t.work_centers.insert(
                s.wc.clone(),
                WorkCenterTruth {
                    good: s.total_good,
                    scrap: s.total_scrap,
                    running_s: s.running_ms as f64 / 1000.0,
                    down_s: s.down_ms as f64 / 1000.0,
                },
            );
            for (o, (g, sc)) in &s.orders {
                let e = t.orders.entry(o.clone()).or_default();
                e.good += g;
                e.scrap += sc;
            }
        }
        t.consumed = self.consumed.clone();
        t.buffers = self.buffers.iter().map(|b| (b.id.clone(), b.level)).collect();
        t.faults = FaultTruth {
            reboots: self.stations.iter().map(|s| s.reboots).sum(),
            mqtt_drops: self.mqtt_drops,
            modbus_timeouts: self.stations.iter().map(|s| s.silences).sum(),
        };
        t.demand = self.demand.as_ref().map(|d| d.truth.clone());
        t
    }
}

impl DemandModel {
    /// The scenario's demand on this plant; `None` when it has none.
    fn new(
        plant: &Plant,
        scenario: &Scenario,
        seed: u64,
        buffers: &[BufferState],
        warnings: &mut Vec<String>,
    ) -> Option<DemandModel> {
        let d = &scenario.demand;
        if d.orders_per_hour <= 0.0 {
            return None;
        }
        // Finished goods: the output of a work center that no work center consumes.
        let finished = || {
            plant
                .work_centers
                .iter()
                .map(|w| &w.output)
                .find(|out| !plant.work_centers.iter().any(|w| w.inputs.contains(out)))
                .and_then(|id| buffers.iter().find(|b| &b.id == id))
                .map(|b| b.sku.clone())
        };
        let Some(sku) = d.sku.clone().or_else(finished) else {
            warnings.push("the scenario has demand but the plant has no finished goods; no demand".into());
            return None;
        };
        let held: Vec<usize> = buffers.iter().enumerate().filter(|(_, b)| b.sku == sku).map(|(i, _)| i).collect();
        if held.is_empty() {
            warnings.push(format!("no buffer holds the demanded sku {sku}; every sales order will be short"));
        }
        Some(DemandModel {
            rng: Rng::new(seed, DEMAND_STREAM),
            per_hour: d.orders_per_hour,
            lot: d.lot,
            buffers: held,
            promised: 0,
            truth: DemandTruth { sku, ..DemandTruth::default() },
            placed: Vec::new(),
        })
    }

    /// Places the sales orders arriving during one step and promises what the line's
    /// finished stock (not yet promised) covers.
    fn step(&mut self, dt: f64, factor: f64, end_ms: u64, buffers: &[BufferState]) {
        if !self.rng.chance(self.per_hour * factor * dt / 3600.0) {
            return;
        }
        let [lo, hi] = self.lot;
        let quantity = (self.rng.uniform(lo as f64, hi as f64 + 1.0).floor() as u64).clamp(lo, hi);
        let stock: u64 = self.buffers.iter().map(|&b| buffers[b].level).sum();
        let t = &mut self.truth;
        t.requests += 1;
        t.requested += quantity;
        if stock.saturating_sub(self.promised) >= quantity {
            self.promised += quantity;
            t.promised += quantity;
        } else {
            t.short_requests += 1;
        }
        self.placed.push(SalesOrder { n: t.requests, sku: t.sku.clone(), quantity, sim_ms: end_ms });
    }
}

impl Station {
    fn online(&self) -> bool {
        self.rebooting_left_s <= 0.0
    }

    fn snapshot(&self) -> Sent {
        Sent {
            good: self.good,
            scrap: self.scrap,
            state: self.state,
            reason: self.reason,
            order: self.order.as_ref().and_then(|o| o.id.clone()),
        }
    }

    fn set(&mut self, state: State, reason: Option<&'static str>) {
        self.state = state;
        self.reason = reason;
    }

    #[allow(clippy::too_many_arguments)]
    fn advance(
        &mut self,
        dt: f64,
        line_speed: f64,
        buffers: &mut [BufferState],
        consumed: &mut BTreeMap<String, u64>,
        end_ms: u64,
        faults: &Faults,
        out: &mut Vec<Telemetry>,
    ) {
        self.speed = line_speed * self.params.speed_factor;
        self.produce(dt, buffers, consumed, end_ms, faults, out);
        // The machine warms up while it runs and cools down otherwise.
        let target = if self.state == State::Running { 40.0 + 2.0 * self.speed.min(10.0) } else { 25.0 };
        self.temp_c += (target - self.temp_c) * (1.0 - (-dt / 120.0).exp()) + 0.02 * self.rng.std_normal();
    }

    fn produce(
        &mut self,
        dt: f64,
        buffers: &mut [BufferState],
        consumed: &mut BTreeMap<String, u64>,
        end_ms: u64,
        faults: &Faults,
        out: &mut Vec<Telemetry>,
    ) {
        // Device reboots: offline for a while, then back with fresh counters.
        if self.rebooting_left_s > 0.0 {
            self.rebooting_left_s -= dt;
            if self.rebooting_left_s > 0.0 {
                return;
            }
            self.rebooting_left_s = 0.0;
        } else {
            self.ttr_s -= dt;
            if self.ttr_s <= 0.0 {
                self.ttr_s = self.fault_rng.exponential(3600.0 / self.params.reboots_per_hour);
                self.reboot(buffers, end_ms, faults, out);
                return;
            }
        }
        if self.down_left_s > 0.0 {
            self.down_left_s -= dt;
            if self.down_left_s > 0.0 {
                return self.set(State::Down, Some(reason::BREAKDOWN));
            }
            self.down_left_s = 0.0;
        }
        if self.stopped {
            return self.set(State::Stopped, Some(reason::OPERATOR_STOP));
        }
        if self.setup_left_s > 0.0 {
            self.setup_left_s -= dt;
            if self.setup_left_s > 0.0 {
                return self.set(State::Setup, Some(reason::CHANGEOVER));
            }
            self.setup_left_s = 0.0;
        }
        if self.microstop_left_s > 0.0 {
            self.microstop_left_s -= dt;
            if self.microstop_left_s > 0.0 {
                return self.set(State::Idle, Some(reason::MICRO_STOP));
            }
            self.microstop_left_s = 0.0;
        }
        let mut budget = dt;
        let mut ran = 0.0;
        let mut why_not = None;
        while budget > 1e-12 {
            if self.cycle.is_none() {
                match self.try_start(buffers) {
                    Ok(c) => self.cycle = Some(c),
                    Err(r) => {
                        why_not = Some(r);
                        break;
                    }
                }
            }
            let Some(c) = self.cycle.as_mut() else {
                break;
            };
            let step = budget.min(c.left_s);
            c.left_s -= step;
            budget -= step;
            ran += step;
            if c.left_s <= 1e-12 {
                if let Some(c) = self.cycle.take() {
                    self.complete(c, buffers, consumed);
                }
            }
        }
        if ran <= 0.0 {
            return self.set(State::Idle, why_not);
        }
        // Failures happen while running.
        self.ttf_s -= ran;
        if self.ttf_s <= 0.0 {
            self.ttf_s = self.rng.exponential(self.params.mtbf_s);
            self.down_left_s = self.rng.exponential(self.params.mttr_s).min(1e9);
            return self.set(State::Down, Some(reason::BREAKDOWN));
        }
        if self.rng.chance(self.params.microstops_per_hour * ran / 3600.0) {
            let [lo, hi] = self.params.microstop_s;
            self.microstop_left_s = self.rng.uniform(lo, hi);
            return self.set(State::Idle, Some(reason::MICRO_STOP));
        }
        self.set(State::Running, None)
    }

    /// Starts a cycle if the order, the inputs and the output buffer allow it, reserving
    /// the material and the space it needs.
    fn try_start(&mut self, buffers: &mut [BufferState]) -> Result<Cycle, &'static str> {
        if let Some(Order { target: Some(t), good, .. }) = &self.order {
            if good >= t {
                return Err(reason::ORDER_COMPLETE);
            }
        }
        for line in &self.bom {
            if line.sources.is_empty() {
                continue;
            }
            let available: u64 = line.sources.iter().map(|&b| buffers[b].available()).sum();
            if available < line.qty {
                return Err(reason::STARVED);
            }
        }
        if buffers[self.output].space() == 0 {
            return Err(reason::BLOCKED);
        }
        let mut take = Vec::new();
        for line in &self.bom {
            let mut need = line.qty;
            for &b in &line.sources {
                let t = need.min(buffers[b].available());
                if t > 0 {
                    buffers[b].reserved_out += t;
                    take.push((b, t));
                    need -= t;
                }
                if need == 0 {
                    break;
                }
            }
        }
        buffers[self.output].reserved_in += 1;
        let jitter = (1.0 + self.params.cycle_jitter * self.rng.std_normal()).max(0.2);
        let duration = (self.ideal_cycle_s / self.speed * jitter).max(MIN_CYCLE_S);
        self.last_cycle_s = duration;
        Ok(Cycle { left_s: duration, take })
    }

    /// A cycle ends: the unit is good (into the output buffer) or scrap; either way its
    /// material is consumed.
    fn complete(&mut self, c: Cycle, buffers: &mut [BufferState], consumed: &mut BTreeMap<String, u64>) {
        for (b, q) in c.take {
            let buf = &mut buffers[b];
            buf.reserved_out -= q;
            buf.level -= q;
            buf.consumed += q;
        }
        for line in &self.bom {
            *consumed.entry(line.sku.clone()).or_insert(0) += line.qty;
        }
        let out = &mut buffers[self.output];
        out.reserved_in -= 1;
        let scrap = self.rng.chance(self.params.scrap_rate);
        if scrap {
            self.scrap += 1;
            self.total_scrap += 1;
        } else {
            out.level += 1;
            out.produced += 1;
            self.good += 1;
            self.total_good += 1;
        }
        if let Some(o) = &mut self.order {
            if !scrap {
                o.good += 1;
            }
            if let Some(id) = &o.id {
                let e = self.orders.entry(id.clone()).or_insert((0, 0));
                if scrap {
                    e.1 += 1;
                } else {
                    e.0 += 1;
                }
            }
        }
    }

    /// Releases what an unfinished cycle had reserved.
    fn abort_cycle(&mut self, buffers: &mut [BufferState]) {
        if let Some(c) = self.cycle.take() {
            for (b, q) in c.take {
                buffers[b].reserved_out -= q;
            }
            buffers[self.output].reserved_in -= 1;
        }
    }

    /// The device restarts: it says it is going down, then comes back with `boot + 1` and
    /// counters at 0. The unit in the machine is lost (its material stays in the buffers).
    fn reboot(&mut self, buffers: &mut [BufferState], end_ms: u64, faults: &Faults, out: &mut Vec<Telemetry>) {
        self.reboots += 1;
        self.abort_cycle(buffers);
        self.microstop_left_s = 0.0;
        self.set(State::Down, Some(reason::REBOOT));
        if self.mqtt {
            if let Some(h) = self.held.take() {
                out.push(h);
            }
            self.emit(end_ms, faults, true, out);
        }
        self.boot += 1;
        self.seq = 0;
        self.good = 0;
        self.scrap = 0;
        self.sent = None;
        self.rebooting_left_s = self.params.reboot_s;
    }

    /// Sends the current counters. Out of order: a message may be held back and sent
    /// after the next one of the same boot and order (never across a boot or an order
    /// change, where the earlier message carries output the later one does not). A
    /// `last` message (end of a boot or of the run) is never held.
    fn emit(&mut self, end_ms: u64, faults: &Faults, last: bool, out: &mut Vec<Telemetry>) {
        self.seq += 1;
        let mut metrics = BTreeMap::new();
        metrics.insert("speed_factor", (self.speed * 1000.0).round() / 1000.0);
        metrics.insert("cycle_s", (self.last_cycle_s * 1000.0).round() / 1000.0);
        metrics.insert("temp_c", (self.temp_c * 10.0).round() / 10.0);
        let msg = Telemetry {
            device: self.device.clone(),
            work_center: self.wc.clone(),
            boot: self.boot,
            seq: self.seq,
            sim_ms: end_ms,
            state: self.state,
            good: self.good,
            scrap: self.scrap,
            order: self.order.as_ref().and_then(|o| o.id.clone()),
            reason: self.reason,
            metrics,
        };
        self.sent = Some(self.snapshot());
        self.since_sent_s = 0.0;
        let mut batch = Vec::with_capacity(2);
        if let Some(h) = self.held.take() {
            if h.boot == msg.boot && h.order == msg.order {
                batch.push(msg);
                batch.push(h);
            } else {
                batch.push(h);
                batch.push(msg);
            }
        } else if !last && self.fault_rng.chance(faults.out_of_order_rate) {
            self.held = Some(msg);
        } else {
            batch.push(msg);
        }
        for m in batch {
            if self.fault_rng.chance(faults.duplicate_rate) {
                out.push(m.clone());
            }
            out.push(m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::truth::Ledger;

    const DEMO: &str = include_str!("../../plants/line-mqtt.toml");

    fn demo() -> Plant {
        Plant::parse(DEMO, "demo.toml").expect("demo plant")
    }

    fn scenario(name: &str) -> Scenario {
        Scenario::resolve(name).expect("shipped scenario")
    }

    /// Runs a whole line; returns it and every message in publish order.
    fn run(plant: &Plant, sc: &Scenario, seed: u64, duration_ms: u64) -> (Line, Vec<Telemetry>) {
        let (mut line, _) = Line::new(plant, sc, seed, duration_ms, 1);
        let mut out = Vec::new();
        while !line.done() {
            line.step(&mut out);
        }
        line.finish(&mut out);
        (line, out)
    }

    fn ledger(msgs: &[Telemetry]) -> Ledger {
        let mut l = Ledger::default();
        for m in msgs {
            l.record(m);
        }
        l
    }

    fn all_wcs(line: &Line) -> Vec<&str> {
        line.devices().map(|(_, wc, _)| wc).collect()
    }

    #[test]
    fn same_seed_same_truth_and_messages() {
        for name in ["steady", "faults"] {
            let (a, ma) = run(&demo(), &scenario(name), 42, 300_000);
            let (b, mb) = run(&demo(), &scenario(name), 42, 300_000);
            assert_eq!(a.truth().to_json(), b.truth().to_json(), "{name}");
            assert_eq!(ma, mb, "{name}");
            assert!(a.units_made() > 1000, "{name}: {}", a.units_made());
        }
    }

    #[test]
    fn different_seed_different_truth() {
        let (a, _) = run(&demo(), &scenario("steady"), 42, 300_000);
        let (b, _) = run(&demo(), &scenario("steady"), 43, 300_000);
        assert_ne!(a.truth().to_json(), b.truth().to_json());
        assert_eq!(b.truth().seed, 43);
    }

    #[test]
    fn material_is_conserved() {
        for name in ["steady", "promo-surge", "breakdowns", "faults"] {
            let (line, _) = run(&demo(), &scenario(name), 7, 1_800_000);
            let truth = line.truth();
            let mut consumed_by_sku: BTreeMap<&str, u64> = BTreeMap::new();
            for b in line.buffers() {
                assert_eq!(b.initial + b.produced - b.consumed, b.level, "{name}: buffer {}", b.id);
                assert!(b.level <= b.capacity, "{name}: buffer {} overfull", b.id);
                *consumed_by_sku.entry(&b.sku).or_insert(0) += b.consumed;
                assert_eq!(truth.buffers[&b.id], b.level);
            }
            // Every component in the demo plant comes from a buffer, so what the buffers
            // gave equals BOM × (good + scrap).
            for (sku, qty) in &truth.consumed {
                assert_eq!(consumed_by_sku.get(sku.as_str()), Some(qty), "{name}: {sku}");
            }
            // Good output equals what entered the output buffers.
            let plant = demo();
            for w in &plant.work_centers {
                let produced = line.buffers().iter().find(|b| b.id == w.output).map(|b| b.produced);
                assert_eq!(produced, Some(truth.work_centers[&w.id].good), "{name}");
            }
            // BOM × (good + scrap) for the demo's housing press: 2 blanks each.
            let form = &truth.work_centers["FORM-1"];
            let assy = &truth.work_centers["ASSY-1"];
            assert_eq!(truth.consumed["BLANK"], 2 * (form.good + form.scrap), "{name}");
            assert_eq!(truth.consumed["MOTOR"], assy.good + assy.scrap, "{name}");
        }
    }

    #[test]
    fn reboots_duplicates_and_reordering_keep_the_truth_exact() {
        let mut sc = scenario("faults");
        sc.faults.reboots_per_hour = 60.0;
        sc.faults.duplicate_rate = 0.2;
        sc.faults.out_of_order_rate = 0.2;
        let (mut line, mut msgs) = run(&demo(), &sc, 9, 1_800_000);
        // Orders change mid-run too.
        let mut out = Vec::new();
        let (mut line2, _) = Line::new(&demo(), &sc, 9, 1_800_000, 1);
        let mut n = 0u64;
        while !line2.done() {
            n += 1;
            if n.rem_euclid(2000) == 0 {
                let id = format!("PO-{n}");
                line2.command("form-01", Command::SetOrder { order: id, target: Some(400) }).expect("known device");
            }
            line2.step(&mut out);
        }
        line2.finish(&mut out);

        for (line, msgs) in [(&mut line, &mut msgs), (&mut line2, &mut out)] {
            let truth = line.truth();
            let l = ledger(msgs);
            assert_eq!(l.differences(&truth, all_wcs(line)), Vec::<String>::new());
            assert!(l.stale > 100, "duplicates and reordering happened: {}", l.stale);
            // Independently: the sum over boots of each boot's last counters.
            let mut last: BTreeMap<(&str, u64), (u64, u64, u64)> = BTreeMap::new();
            for m in msgs.iter() {
                let e = last.entry((m.work_center.as_str(), m.boot)).or_default();
                if m.seq >= e.0 {
                    *e = (m.seq, m.good, m.scrap);
                }
            }
            let boots = last.len();
            assert!(boots > 4 * 10, "many reboots happened: {boots}");
            for (wc, t) in &truth.work_centers {
                let (g, s) =
                    last.iter().filter(|((w, _), _)| w == wc).fold((0, 0), |(g, s), (_, v)| (g + v.1, s + v.2));
                assert_eq!((g, s), (t.good, t.scrap), "{wc}");
            }
        }
        let truth2 = line2.truth();
        assert!(truth2.orders.len() > 3, "{:?}", truth2.orders);
        for (o, t) in &truth2.orders {
            assert!(t.good <= 400, "{o} stops at its target: {t:?}");
        }
    }

    /// The demo plant with its Modbus devices (FORM-1, PACK-1).
    fn mixed() -> Plant {
        Plant::parse(include_str!("../../plants/demo.toml"), "demo.toml").expect("demo plant")
    }

    #[test]
    fn connection_drops_and_modbus_silences_are_scheduled_and_change_no_count() {
        let sc = scenario("faults");
        let (mut line, _) = Line::new(&mixed(), &sc, 21, 3 * 3_600_000, 1);
        let mut out = Vec::new();
        let (mut drops, mut silences, mut silent_ticks) = (0u64, 0u64, 0u64);
        let mut was_answering: BTreeMap<String, bool> = BTreeMap::new();
        while !line.done() {
            line.step(&mut out);
            drops += line.take_mqtt_drops();
            for dev in ["form-01", "pack-01"] {
                let answering = line.device_view(dev).expect("device").answering;
                let before = was_answering.insert(dev.to_string(), answering).unwrap_or(true);
                if before && !answering {
                    silences += 1;
                }
                if !answering {
                    silent_ticks += 1;
                }
            }
            // MQTT devices are never silent: they are not polled.
            assert!(line.device_view("blank-01").expect("device").answering);
        }
        assert_eq!(line.take_mqtt_drops(), 0, "taken");
        line.finish(&mut out);
        let t = line.truth();
        assert_eq!(t.faults.mqtt_drops, drops);
        assert_eq!(t.faults.modbus_timeouts, silences);
        // 6 drops an hour and 3 silences an hour per Modbus device over 3 h.
        assert!((5..=40).contains(&drops), "{drops}");
        assert!((5..=40).contains(&silences), "{silences}");
        // Each silence lasts modbus_silence_s = 20 s = 200 ticks (one may be cut by the end).
        assert!(silent_ticks <= silences * 200 && silent_ticks > (silences - 1) * 200, "{silent_ticks}");

        // The same run without them: everything else is identical (own random streams).
        let mut calm = sc.clone();
        calm.faults.mqtt_drops_per_hour = 0.0;
        calm.faults.modbus_silences_per_hour = 0.0;
        let (calm_line, calm_out) = run(&mixed(), &calm, 21, 3 * 3_600_000);
        let mut calm_truth = calm_line.truth();
        assert_eq!((calm_truth.faults.mqtt_drops, calm_truth.faults.modbus_timeouts), (0, 0));
        calm_truth.faults = t.faults.clone();
        assert_eq!(calm_truth, t);
        assert_eq!(calm_out, out);
    }

    #[test]
    fn promo_demand_ramps_with_the_surge_and_promises_only_stock() {
        let sc = scenario("promo-surge");
        assert!(sc.demand.orders_per_hour > 0.0);
        let duration = 4 * 3_600_000;
        let (mut line, _) = Line::new(&demo(), &sc, 8, duration, 1);
        let fg = line.buffers().iter().position(|b| b.id == "FG-BOXED").expect("finished goods");
        assert_eq!(line.demand_sku(), Some("BASE-BOXED"));
        let mut out = Vec::new();
        let mut orders = Vec::new();
        let (mut promised, mut short) = (0u64, 0u64);
        while !line.done() {
            line.step(&mut out);
            let stock = line.buffers()[fg].level;
            for o in line.take_sales_orders() {
                // Nothing else changes the stock within a step after production.
                if stock.saturating_sub(promised) >= o.quantity {
                    promised += o.quantity;
                } else {
                    short += 1;
                }
                orders.push(o);
            }
        }
        let t = line.truth();
        let d = t.demand.expect("demand");
        assert_eq!(d.sku, "BASE-BOXED");
        assert_eq!(d.requests, orders.len() as u64);
        assert_eq!(d.requested, orders.iter().map(|o| o.quantity).sum::<u64>());
        assert_eq!((d.promised, d.short_requests), (promised, short));
        assert!(d.mes.is_none());
        assert!(orders.iter().enumerate().all(|(i, o)| o.n == i as u64 + 1 && o.sku == "BASE-BOXED"));
        assert!(orders.iter().all(|o| (100..=400).contains(&o.quantity)), "lot sizes");
        assert!(orders.windows(2).all(|w| w[0].sim_ms <= w[1].sim_ms));
        // 12 an hour at 1x, ramping to 10x: about 12 × 5.5 × 4 = 264 in all; the last
        // quarter of the run (8.9x on average) sees far more than the first (2.1x).
        let quarter = |q: u64| orders.iter().filter(|o| o.sim_ms * 4 / duration == q).count();
        assert!((180..=360).contains(&orders.len()), "{}", orders.len());
        assert!(quarter(3) > 2 * quarter(0), "{} vs {}", quarter(3), quarter(0));
        assert!(short > 0 && promised > 0, "some orders are short during the surge: {d:?}");
        // Demand is deterministic, and depends on the seed.
        let (again, _) = run(&demo(), &sc, 8, duration);
        assert_eq!(again.truth().to_json(), line.truth().to_json());
        let (other, _) = run(&demo(), &sc, 9, duration);
        assert_ne!(other.truth().demand, line.truth().demand);
        // Steady has no demand.
        assert!(run(&demo(), &scenario("steady"), 8, 60_000).0.truth().demand.is_none());
    }

    #[test]
    fn start_stopped_makes_nothing_until_started() {
        let (mut line, _) = Line::new(&demo(), &scenario("steady"), 4, 600_000, 1);
        line.stop_all();
        let mut out = Vec::new();
        for _ in 0..600 {
            line.step(&mut out);
        }
        assert_eq!(line.units_made(), 0);
        assert!(out.iter().all(|m| m.state == State::Stopped && m.reason == Some(reason::OPERATOR_STOP)));
        line.command("blank-01", Command::Start).expect("device");
        for _ in 0..600 {
            line.step(&mut out);
        }
        let t = line.truth();
        assert!(t.work_centers["BLANK-1"].good > 50);
        assert_eq!(t.work_centers["ASSY-1"].good + t.work_centers["ASSY-1"].scrap, 0);
    }

    #[test]
    fn commands_stop_start_and_orders() {
        let sc = scenario("steady");
        let (mut line, _) = Line::new(&demo(), &sc, 1, 600_000, 1);
        let mut out = Vec::new();
        line.command("pack-01", Command::SetOrder { order: "PO-1".into(), target: Some(50) }).expect("device");
        line.command("blank-01", Command::Stop).expect("device");
        assert!(line.command("nope", Command::Start).is_err());
        for _ in 0..1200 {
            line.step(&mut out);
        }
        let t = line.truth();
        assert_eq!(t.work_centers["BLANK-1"].good, 0);
        assert_eq!(t.work_centers["BLANK-1"].scrap, 0);
        assert_eq!(t.orders["PO-1"].good, 50);
        assert_eq!(t.work_centers["PACK-1"].good, 50);
        let last_pack = out.iter().rev().find(|m| m.device == "pack-01").expect("msg");
        assert_eq!(last_pack.state, State::Idle);
        assert_eq!(last_pack.reason, Some(reason::ORDER_COMPLETE));
        assert_eq!(last_pack.order.as_deref(), Some("PO-1"));
        let last_blank = out.iter().rev().find(|m| m.device == "blank-01").expect("msg");
        assert_eq!(last_blank.state, State::Stopped);
        // A stopped device still sends a heartbeat at least every second.
        let blank_times: Vec<u64> = out.iter().filter(|m| m.device == "blank-01").map(|m| m.sim_ms).collect();
        assert!(blank_times.windows(2).all(|w| w[1] - w[0] <= 1000));
        assert!(blank_times.len() >= 119);

        line.command("blank-01", Command::Start).expect("device");
        for _ in 0..600 {
            line.step(&mut out);
        }
        assert!(line.truth().work_centers["BLANK-1"].good > 50);
    }

    #[test]
    fn surge_speeds_the_line_up() {
        let (steady, _) = run(&demo(), &scenario("steady"), 5, 600_000);
        let (surge, _) = run(&demo(), &scenario("promo-surge"), 5, 600_000);
        let s = steady.truth().work_centers["BLANK-1"].good;
        let p = surge.truth().work_centers["BLANK-1"].good;
        // 1x to 10x linearly averages 5.5x.
        assert!(p > 4 * s, "surge {p} vs steady {s}");
    }

    #[test]
    fn starvation_and_blocking() {
        let plant = Plant::parse(
            r#"
            [[boms]]
            sku = "B"
            components = [{ sku = "A", quantity = 1 }]
            [[buffers]]
            id = "IN"
            sku = "A"
            capacity = 100
            initial = 5
            [[buffers]]
            id = "MID"
            sku = "B"
            capacity = 3
            [[work_centers]]
            id = "WC"
            ideal_cycle_s = 0.5
            inputs = ["IN"]
            output = "MID"
            device = { mqtt = { id = "wc" } }
            "#,
            "t",
        )
        .expect("plant");
        let mut sc = scenario("steady");
        sc.line.scrap_rate = 0.0;
        sc.line.microstops_per_hour = 0.0;
        let (line, msgs) = run(&plant, &sc, 1, 60_000);
        let t = line.truth();
        assert_eq!(t.work_centers["WC"].good, 3);
        assert_eq!(t.buffers["MID"], 3);
        assert_eq!(t.buffers["IN"], 2);
        assert_eq!(t.consumed["A"], 3);
        assert!(msgs.iter().any(|m| m.reason == Some(reason::BLOCKED)));

        let mut plant = plant;
        plant.buffers[1].capacity = 100;
        let (line, msgs) = run(&plant, &sc, 1, 60_000);
        assert_eq!(line.truth().work_centers["WC"].good, 5);
        assert_eq!(line.truth().buffers["IN"], 0);
        let last = msgs.last().expect("msg");
        assert_eq!((last.state, last.reason), (State::Idle, Some(reason::STARVED)));
    }

    #[test]
    fn breakdowns_take_stations_down() {
        let (line, msgs) = run(&demo(), &scenario("breakdowns"), 3, 4 * 3_600_000);
        let t = line.truth();
        let down: f64 = t.work_centers.values().map(|w| w.down_s).sum();
        assert!(down > 600.0, "down {down}");
        assert!(msgs.iter().any(|m| m.reason == Some(reason::BREAKDOWN)));
        assert!(msgs.iter().any(|m| m.reason == Some(reason::MICRO_STOP)));
        for w in t.work_centers.values() {
            assert!(w.running_s + w.down_s <= 4.0 * 3600.0 + 1e-6);
        }
    }

    #[test]
    fn telemetry_payload_follows_the_contract() {
        let mut metrics = BTreeMap::new();
        metrics.insert("temp_c", 71.5);
        let t = Telemetry {
            device: "press-01".into(),
            work_center: "PRESS-1".into(),
            boot: 3,
            seq: 1042,
            sim_ms: 4 * 3_600_000 + 123,
            state: State::Running,
            good: 12345,
            scrap: 12,
            order: Some("PO-1001".into()),
            reason: None,
            metrics,
        };
        let v: serde_json::Value = serde_json::from_str(&t.to_json()).expect("json");
        assert_eq!(v["boot"], 3);
        assert_eq!(v["seq"], 1042);
        assert_eq!(v["good"], 12345);
        assert_eq!(v["scrap"], 12);
        assert_eq!(v["state"], "running");
        assert_eq!(v["order"], "PO-1001");
        assert!(v["reason"].is_null());
        assert_eq!(v["metrics"]["temp_c"], 71.5);
        assert_eq!(v["ts"], "2026-11-25T10:00:00.123Z");
        let none = Telemetry { order: None, ..t };
        assert!(!none.to_json().contains("order"));
    }

    #[test]
    fn commands_parse() {
        assert_eq!(Command::parse(br#"{"cmd":"start","id":"x"}"#), Ok(Command::Start));
        assert_eq!(Command::parse(br#"{"cmd":"stop"}"#), Ok(Command::Stop));
        assert_eq!(
            Command::parse(br#"{"cmd":"set_order","order":"PO-1","target":500,"id":"c1"}"#),
            Ok(Command::SetOrder { order: "PO-1".into(), target: Some(500) })
        );
        assert_eq!(
            Command::parse(br#"{"cmd":"set_order","order":"PO-1"}"#),
            Ok(Command::SetOrder { order: "PO-1".into(), target: None })
        );
        for bad in [
            &b"nope"[..],
            br#"{"cmd":"explode"}"#,
            br#"{"cmd":"set_order"}"#,
            br#"{"cmd":"set_order","order":""}"#,
            br#"{"cmd":"set_order","order":"A","target":-1}"#,
            br#"{"cmd":"set_order","order":"A","target":"5"}"#,
            br#"[1]"#,
        ] {
            assert!(Command::parse(bad).is_err());
        }
    }

    #[test]
    fn epoch() {
        assert_eq!(crate::units::rfc3339_ms(SIM_EPOCH_MS), "2026-11-25T06:00:00.000Z");
    }
}
