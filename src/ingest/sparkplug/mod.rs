//! Sparkplug B 3.0: the MES as a primary host application.
//!
//! Edge nodes publish births, deaths and data under `spBv1.0/{group}/{type}/{edge}[/{device}]`
//! (QoS 0 by the specification, QoS 1 accepted). The MQTT event loop hands every such
//! publish to [`handle`], in receive order, with the same in-flight permit and completion
//! as a JSON telemetry message. [`Host::decide`] follows each bound edge node's session
//! (births define names, aliases and datatypes; `bdSeq` ties NBIRTH to NDEATH; `seq` runs
//! 0-255) and turns the bound device's current metric values into a cumulative [`Reading`]
//! that takes the JSON path from there (actor, writer, commit, then ack).
//!
//! # Mapping a Sparkplug session onto `(boot, seq)`
//!
//! Sparkplug counters are cumulative on the edge and keep counting across rebirths and
//! reconnects, so a new session must not look like a device restart: every reading of a
//! Sparkplug device has `boot` [`BOOT`], and a counter that falls (the edge restarted and
//! its counters restarted from 0) is the pipeline's unannounced restart: the new value
//! counts from zero. `seq` is the payload timestamp (ms, which the specification requires
//! on births and data) × 65 536 plus the message's position among the edge node's messages
//! of that millisecond ([`SeqClock`]). Redelivered after a restart of the MES, a message maps
//! to the same key or a lower one, never a higher, so the cursor rule "at or below the
//! cursor is stale" makes redeliveries, duplicates and late messages count nothing, and a
//! lost message loses nothing the next one carries. Assumption: an edge node's payload
//! timestamps do not go
//! backwards (a clock stepped back defers counting until it passes the last key again).
//!
//! Data before a birth (for instance after the MES restarted), an unknown alias or a gap
//! in `seq` make the node stale: its data is not counted until its next NBIRTH, and a
//! rebirth request (`NCMD`, `Node Control/Rebirth = true`) is published, at most one per
//! [`REBIRTH_EVERY_MS`] per node, and recorded in the audit log. Nothing is lost by
//! skipping: the births carry the current cumulative values.

pub mod proto;

use self::proto::{datatype, Metric, Payload, Value};
use super::{InFlight, Pipeline};
use crate::db::writer::{AckSender, Completion, Job, Work};
use crate::db::Store;
use crate::ingest::modbus::{set_status, StatusBoard};
use crate::plant::{Device, Plant, SparkplugDevice};
use mes_actors::reading::MAX_METRICS;
use mes_actors::{MachineState, Reading};
use prost::Message as _;
use rumqttc::{AsyncClient, QoS};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// The Sparkplug B topic namespace.
pub const NAMESPACE: &str = "spBv1.0";
/// The `boot` of every Sparkplug reading (see the module documentation).
pub const BOOT: u64 = 0;
/// Shortest interval between two rebirth requests to one edge node.
pub const REBIRTH_EVERY_MS: i64 = 2000;
/// Largest payload timestamp accepted (ms; year 6429), so that `ts × 65 536` fits a BIGINT.
const MAX_TS_MS: u64 = 1 << 47;
const REBIRTH_METRIC: &str = "Node Control/Rebirth";
const BD_SEQ: &str = "bdSeq";

/// The message types of the topic namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    NBirth,
    NDeath,
    DBirth,
    DDeath,
    NData,
    DData,
    NCmd,
    DCmd,
}

/// A parsed Sparkplug topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topic<'a> {
    pub group: &'a str,
    pub kind: Kind,
    pub edge_node: &'a str,
    pub device: Option<&'a str>,
}

/// `spBv1.0/{group}/{type}/{edge_node}[/{device}]`, or why the topic is not one.
pub fn parse_topic(topic: &str) -> Result<Topic<'_>, String> {
    let parts: Vec<&str> = topic.splitn(6, '/').collect();
    let bad = || format!("topic is not {NAMESPACE}/{{group}}/{{type}}/{{edge_node}}[/{{device}}]");
    if parts.len() < 4 || parts.len() > 5 || parts[0] != NAMESPACE || parts.iter().any(|p| p.is_empty()) {
        return Err(bad());
    }
    let kind = match parts[2] {
        "NBIRTH" => Kind::NBirth,
        "NDEATH" => Kind::NDeath,
        "DBIRTH" => Kind::DBirth,
        "DDEATH" => Kind::DDeath,
        "NDATA" => Kind::NData,
        "DDATA" => Kind::DData,
        "NCMD" => Kind::NCmd,
        "DCMD" => Kind::DCmd,
        _ => return Err(format!("unknown Sparkplug message type in topic: {}", bad())),
    };
    let device_level = matches!(kind, Kind::DBirth | Kind::DDeath | Kind::DData | Kind::DCmd);
    if device_level != (parts.len() == 5) {
        return Err(bad());
    }
    Ok(Topic { group: parts[1], kind, edge_node: parts[3], device: parts.get(4).copied() })
}

/// Turns an edge node's messages into keys that grow with every message: the payload
/// timestamp (ms) × 65 536 plus the message's position among the node's keyed messages of
/// that millisecond. Only messages whose `seq` follows the previous one get here (a gap
/// makes the node stale), so positions count the node's messages in order. After a
/// restart of the MES the count of a millisecond starts at 0 again with whichever message
/// comes first, so a redelivered message maps to its first key or lower, never higher.
#[derive(Debug, Clone, Copy, Default)]
pub struct SeqClock {
    ts: u64,
    pos: u64,
    started: bool,
}

impl SeqClock {
    pub fn key(&mut self, ts: u64) -> u64 {
        let base = ts << 16;
        if !self.started || ts > self.ts {
            *self = SeqClock { ts, pos: 0, started: true };
        } else if ts == self.ts {
            // Past 65 535 messages in one millisecond the key stops growing: later ones
            // are stale until the clock moves on (deferred to the next message, not lost).
            self.pos = (self.pos + 1).min(0xffff);
        } else {
            // The edge's clock went back: stale until it passes the last key again.
            return base;
        }
        base + self.pos
    }
}

/// Metric definitions of a birth and the bound values last seen.
#[derive(Debug, Default)]
struct Session {
    by_alias: HashMap<u64, usize>,
    by_name: HashMap<String, usize>,
    defs: Vec<(String, u32)>,
    current: Current,
}

#[derive(Debug, Default, Clone)]
struct Current {
    good: Option<u64>,
    scrap: Option<u64>,
    state: Option<MachineState>,
    order: Option<String>,
}

/// One bound edge node's session.
#[derive(Debug, Default)]
struct Node {
    bd_seq: Option<u64>,
    born: bool,
    last_seq: u8,
    /// The node's own metrics (a work center bound to the node without a device).
    metrics: Session,
    /// Bound devices born in this session.
    devices: HashMap<String, Session>,
    rebirth_ms: Option<i64>,
    clock: SeqClock,
}

/// What becomes of one publish.
#[derive(Debug)]
pub enum Action {
    /// A reading for the pipeline.
    Submit(Reading),
    /// Nothing to commit; acknowledge in turn.
    Ack,
    /// Invalid: keep as a dead letter with this reason.
    DeadLetter(String),
}

/// The action, and a rebirth request to publish (edge node, reason).
#[derive(Debug)]
pub struct Decision {
    pub action: Action,
    pub rebirth: Option<Rebirth>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebirth {
    pub group: String,
    pub edge_node: String,
    pub reason: String,
}

impl Decision {
    fn ack() -> Self {
        Decision { action: Action::Ack, rebirth: None }
    }
    fn dead(reason: impl Into<String>) -> Self {
        Decision { action: Action::DeadLetter(reason.into()), rebirth: None }
    }
}

type NodeKey = (String, String);

/// The bindings of the plant file, shared with the command side.
#[derive(Debug, Default)]
pub struct Bindings {
    /// (group, edge node, device) → (MES device id, binding).
    by_topic: HashMap<(String, String, Option<String>), (String, SparkplugDevice)>,
    /// MES device id → binding.
    by_device: HashMap<String, SparkplugDevice>,
    /// Bound devices per edge node (MES device ids).
    by_node: HashMap<NodeKey, Vec<String>>,
}

impl Bindings {
    pub fn from_plant(plant: &Plant) -> Self {
        let mut b = Bindings::default();
        for w in &plant.work_centers {
            let Device::Sparkplug(s) = &w.device else { continue };
            let id = w.device_id();
            b.by_topic.insert((s.group.clone(), s.edge_node.clone(), s.device.clone()), (id.clone(), s.clone()));
            b.by_node.entry((s.group.clone(), s.edge_node.clone())).or_default().push(id.clone());
            b.by_device.insert(id, s.clone());
        }
        b
    }

    pub fn is_empty(&self) -> bool {
        self.by_device.is_empty()
    }

    /// The binding of an MES device id, if it is a Sparkplug device.
    pub fn device(&self, id: &str) -> Option<&SparkplugDevice> {
        self.by_device.get(id)
    }

    /// Subscriptions: one filter per bound group, `spBv1.0/{group}/#`. One filter, not one
    /// per message type: `seq` orders all of a node's messages, and a broker orders only
    /// what one subscription delivers (rumqttd serves each filter from its own log, so
    /// DDATA could overtake the DBIRTH before it). Commands that come back are ignored.
    pub fn filters(&self) -> Vec<String> {
        let mut groups: Vec<&str> = self.by_node.keys().map(|(g, _)| g.as_str()).collect();
        groups.sort_unstable();
        groups.dedup();
        groups.into_iter().map(|g| format!("{NAMESPACE}/{g}/#")).collect()
    }

    /// A `DCMD` writing the bound metrics for an MES command (`set_order`: the order and
    /// its target quantity): topic and payload.
    pub fn command(&self, device: &str, body: &serde_json::Value, now_ms: i64) -> Result<(String, Vec<u8>), String> {
        let s = self.by_device.get(device).ok_or_else(|| format!("`{device}` is not a Sparkplug device"))?;
        let mut metrics = Vec::new();
        match body.get("cmd").and_then(|c| c.as_str()) {
            Some("set_order") => {
                if let (Some(m), Some(o)) = (&s.order, body.get("order").and_then(|o| o.as_str())) {
                    metrics.push(Metric::named(m, datatype::STRING, Value::StringValue(o.to_string())));
                }
                if let (Some(m), Some(t)) = (&s.target, body.get("target").and_then(|t| t.as_u64())) {
                    metrics.push(Metric::named(m, datatype::UINT64, Value::LongValue(t)));
                }
            }
            other => return Err(format!("command {other:?} has no Sparkplug metric (only set_order)")),
        }
        if metrics.is_empty() {
            return Err("the binding names no `order` or `target` metric to write".into());
        }
        let payload = Payload { timestamp: Some(now_ms.max(0) as u64), metrics, ..Default::default() };
        let topic = match &s.device {
            Some(d) => format!("{NAMESPACE}/{}/DCMD/{}/{d}", s.group, s.edge_node),
            None => format!("{NAMESPACE}/{}/NCMD/{}", s.group, s.edge_node),
        };
        Ok((topic, payload.encode_to_vec()))
    }
}

/// `NCMD` topic and payload asking an edge node to publish its births again.
pub fn rebirth_request(group: &str, edge_node: &str, now_ms: i64) -> (String, Vec<u8>) {
    let payload = Payload {
        timestamp: Some(now_ms.max(0) as u64),
        metrics: vec![Metric::named(REBIRTH_METRIC, datatype::BOOLEAN, Value::BooleanValue(true))],
        ..Default::default()
    };
    (format!("{NAMESPACE}/{group}/NCMD/{edge_node}"), payload.encode_to_vec())
}

/// The primary host's `STATE` topic for `host_id` (a topic level: `/ + #` replaced).
pub fn state_topic(host_id: &str) -> String {
    let id: String = host_id.chars().map(|c| if matches!(c, '/' | '+' | '#') { '_' } else { c }).collect();
    format!("{NAMESPACE}/STATE/{id}")
}

/// The `STATE` payload (Sparkplug 3.0: JSON, the birth and its will carry one timestamp).
pub fn state_payload(online: bool, timestamp_ms: i64) -> Vec<u8> {
    serde_json::json!({"online": online, "timestamp": timestamp_ms}).to_string().into_bytes()
}

/// The primary host: the sessions of the bound edge nodes.
pub struct Host {
    bindings: Arc<Bindings>,
    nodes: HashMap<NodeKey, Node>,
    board: StatusBoard,
    store: Option<Store>,
}

impl Host {
    pub fn new(bindings: Arc<Bindings>, board: StatusBoard, store: Option<Store>) -> Self {
        Host { bindings, nodes: HashMap::new(), board, store }
    }

    pub fn bindings(&self) -> &Bindings {
        &self.bindings
    }

    pub fn bindings_arc(&self) -> Arc<Bindings> {
        self.bindings.clone()
    }

    /// Decides what one publish on a Sparkplug topic means. Pure but for the session
    /// state and the device status board.
    pub fn decide(&mut self, topic: &str, payload: &[u8], now_ms: i64) -> Decision {
        let t = match parse_topic(topic) {
            Ok(t) => t,
            Err(e) => return Decision::dead(e),
        };
        if matches!(t.kind, Kind::NCmd | Kind::DCmd) {
            return Decision::ack(); // commands are for edge nodes
        }
        let key = (t.group.to_string(), t.edge_node.to_string());
        let Some(bound) = self.bindings.by_node.get(&key) else {
            return Decision::ack(); // another application's edge node
        };
        let p = match Payload::decode(payload) {
            Ok(p) => p,
            Err(e) => return Decision::dead(format!("invalid Sparkplug B payload: {e}")),
        };
        let node = self.nodes.entry(key).or_default();
        let rebirth = |node: &mut Node, reason: String| -> Decision {
            let due = !matches!(node.rebirth_ms, Some(t) if now_ms - t < REBIRTH_EVERY_MS);
            if due {
                node.rebirth_ms = Some(now_ms);
            }
            Decision {
                action: Action::Ack,
                rebirth: due.then(|| Rebirth {
                    group: t.group.to_string(),
                    edge_node: t.edge_node.to_string(),
                    reason,
                }),
            }
        };
        match t.kind {
            Kind::NDeath => {
                let bd = p.metrics.iter().find(|m| m.name.as_deref() == Some(BD_SEQ)).and_then(|m| integer(m).ok());
                if let (Some(mine), Some(theirs)) = (node.bd_seq, bd) {
                    if mine != theirs {
                        return Decision::ack(); // the death of an earlier session
                    }
                }
                node.born = false;
                node.devices.clear();
                let why = format!("NDEATH (bdSeq {})", bd.map(|b| b.to_string()).unwrap_or_else(|| "?".into()));
                for id in bound {
                    set_status(&self.board, id, "unreachable", Some(why.clone()));
                }
                Decision::ack()
            }
            Kind::NBirth => {
                let ts = match timestamp(&p) {
                    Ok(ts) => ts,
                    Err(e) => return Decision::dead(e),
                };
                let session = match Session::from_birth(&p.metrics) {
                    Ok(s) => s,
                    Err(e) => return Decision::dead(format!("NBIRTH: {e}")),
                };
                node.bd_seq =
                    p.metrics.iter().find(|m| m.name.as_deref() == Some(BD_SEQ)).and_then(|m| integer(m).ok());
                node.born = true;
                node.last_seq = (p.seq.unwrap_or(0) & 0xff) as u8;
                node.metrics = session;
                node.devices.clear();
                node.rebirth_ms = None;
                let node_binding = self.bindings.by_topic.get(&(t.group.into(), t.edge_node.into(), None));
                match node_binding {
                    Some((id, b)) => {
                        set_status(&self.board, id, "online", None);
                        let key = node.clock.key(ts);
                        let s = &mut node.metrics;
                        match s.apply(&p.metrics, b, true) {
                            Applied::Values(m) => s.decision(id, key, ts, m, "NBIRTH"),
                            Applied::Invalid(e) | Applied::Unknown(e) => Decision::dead(format!("NBIRTH: {e}")),
                        }
                    }
                    None => Decision::ack(),
                }
            }
            Kind::DBirth | Kind::DDeath | Kind::NData | Kind::DData => {
                if !node.born {
                    let what = format!("{:?} from {}/{} before its NBIRTH", t.kind, t.group, t.edge_node);
                    return rebirth(node, what);
                }
                let Some(seq) = p.seq.filter(|s| *s <= 255) else {
                    node.born = false;
                    return rebirth(node, format!("{:?} without a seq in 0-255", t.kind));
                };
                let expected = node.last_seq.wrapping_add(1);
                node.last_seq = seq as u8;
                if seq as u8 != expected {
                    node.born = false;
                    return rebirth(node, format!("seq gap: expected {expected}, got {seq}"));
                }
                let binding =
                    self.bindings.by_topic.get(&(t.group.into(), t.edge_node.into(), t.device.map(Into::into)));
                let Some((id, b)) = binding else {
                    return Decision::ack(); // a device of the node that no work center follows
                };
                if t.kind == Kind::DDeath {
                    node.devices.remove(t.device.unwrap_or_default());
                    set_status(&self.board, id, "unreachable", Some("DDEATH".into()));
                    return Decision::ack();
                }
                let ts = match timestamp(&p) {
                    Ok(ts) => ts,
                    Err(e) => return Decision::dead(e),
                };
                let key = node.clock.key(ts);
                let what = if t.kind == Kind::DBirth { "DBIRTH" } else { "data" };
                let s = match (t.kind, t.device) {
                    (Kind::DBirth, Some(d)) => {
                        let session = match Session::from_birth(&p.metrics) {
                            Ok(s) => s,
                            Err(e) => return Decision::dead(format!("DBIRTH: {e}")),
                        };
                        set_status(&self.board, id, "online", None);
                        node.devices.insert(d.to_string(), session);
                        node.devices.get_mut(d)
                    }
                    (_, Some(d)) => node.devices.get_mut(d),
                    (_, None) => Some(&mut node.metrics),
                };
                let Some(s) = s else {
                    return rebirth(node, format!("DDATA from {id} before its DBIRTH"));
                };
                match s.apply(&p.metrics, b, t.kind == Kind::DBirth) {
                    Applied::Values(m) => s.decision(id, key, ts, m, what),
                    Applied::Invalid(e) => Decision::dead(format!("{what}: {e}")),
                    Applied::Unknown(e) => {
                        node.born = false;
                        rebirth(node, e)
                    }
                }
            }
            Kind::NCmd | Kind::DCmd => Decision::ack(),
        }
    }
}

/// A message's metrics applied to a session.
enum Applied {
    /// Applied; the other numeric metrics, for the time series.
    Values(BTreeMap<String, f64>),
    /// A value that cannot be read (nothing applied).
    Invalid(String),
    /// A metric the birth did not define (nothing applied).
    Unknown(String),
}

impl Session {
    fn from_birth(metrics: &[Metric]) -> Result<Session, String> {
        let mut s = Session::default();
        for m in metrics {
            let name = m.name.clone().ok_or("a birth metric has no name")?;
            let dt = m.datatype.or_else(|| m.value.as_ref().map(value_type)).unwrap_or(0);
            let i = s.defs.len();
            if let Some(a) = m.alias {
                if s.by_alias.insert(a, i).is_some() {
                    return Err(format!("alias {a} is used twice"));
                }
            }
            s.by_name.insert(name.clone(), i);
            s.defs.push((name, dt));
        }
        Ok(s)
    }

    /// Applies a message's metrics to the current values (only if all of them decode);
    /// returns the other numeric metrics for the time series.
    fn apply(&mut self, metrics: &[Metric], b: &SparkplugDevice, birth: bool) -> Applied {
        let mut next = if birth { Current::default() } else { self.current.clone() };
        let mut other = BTreeMap::new();
        for m in metrics {
            let found = match (m.alias, &m.name) {
                (Some(a), _) => self.by_alias.get(&a).copied().ok_or_else(|| format!("unknown alias {a}")),
                (None, Some(n)) => {
                    self.by_name.get(n).copied().ok_or_else(|| format!("metric `{}` is not in the birth", clip(n)))
                }
                (None, None) => return Applied::Invalid("a metric has neither name nor alias".into()),
            };
            let i = match found {
                Ok(i) => i,
                Err(e) => return Applied::Unknown(e),
            };
            let (name, dt) = &self.defs[i];
            let dt = m.datatype.unwrap_or(*dt);
            if m.is_null == Some(true) || m.is_historical == Some(true) || m.value.is_none() {
                continue;
            }
            let r = if *name == b.good {
                count(m, dt).map(|v| next.good = Some(v))
            } else if *name == b.scrap {
                count(m, dt).map(|v| next.scrap = Some(v))
            } else if b.state.as_ref() == Some(name) {
                match (&m.value, whole(m, dt)) {
                    (Some(Value::StringValue(v)), _) => {
                        v.parse::<MachineState>().map(|s| next.state = Some(s)).map_err(|e| e.to_string())
                    }
                    (_, Some(code)) if !b.state_codes.is_empty() => match b.state_of_code(code) {
                        Some(s) => {
                            next.state = Some(s);
                            Ok(())
                        }
                        None => Err(format!("state metric `{}`: code {code} is not in the work center's state_codes", clip(name))),
                    },
                    (_, Some(code)) => Err(format!(
                        "state metric `{}` is the code {code}; name the codes in the work center's sparkplug state_codes",
                        clip(name)
                    )),
                    _ => Err(format!("state metric `{}` must be a String or an integer code", clip(name))),
                }
            } else if b.order.as_ref() == Some(name) {
                match &m.value {
                    Some(Value::StringValue(v)) => {
                        next.order = Some(v.clone()).filter(|o| !o.is_empty());
                        Ok(())
                    }
                    _ => Err(format!("order metric `{}` must be a String", clip(name))),
                }
            } else {
                if name != BD_SEQ
                    && !name.starts_with("Node Control/")
                    && !name.starts_with("Device Control/")
                    && other.len() < MAX_METRICS
                {
                    if let Some(x) = number(m, dt) {
                        other.insert(name.clone(), x);
                    }
                }
                Ok(())
            };
            if let Err(e) = r {
                return Applied::Invalid(e);
            }
        }
        self.current = next;
        Applied::Values(other)
    }

    fn decision(&self, id: &str, key: u64, ts: u64, metrics: BTreeMap<String, f64>, what: &str) -> Decision {
        let c = &self.current;
        let (Some(good), Some(scrap)) = (c.good, c.scrap) else {
            return if what == "data" {
                Decision::ack() // no counters known yet (the birth lacked them)
            } else {
                Decision::dead(format!("{what} lacks a bound counter metric (good and scrap)"))
            };
        };
        let r = Reading {
            device: id.to_string(),
            boot: BOOT,
            seq: key,
            ts_ms: Some(ts as i64),
            good,
            scrap,
            state: c.state,
            reason: None,
            order: c.order.clone(),
            metrics,
        };
        match r.validate() {
            Ok(()) => Decision { action: Action::Submit(r), rebirth: None },
            Err(e) => Decision::dead(format!("{what}: {e}")),
        }
    }
}

fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

fn timestamp(p: &Payload) -> Result<u64, String> {
    match p.timestamp {
        None => Err("payload has no timestamp (required on births and data)".into()),
        Some(ts) if ts > MAX_TS_MS => Err(format!("payload timestamp {ts} is out of range")),
        Some(ts) => Ok(ts),
    }
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::IntValue(_) => datatype::UINT32,
        Value::LongValue(_) => datatype::UINT64,
        Value::FloatValue(_) => datatype::FLOAT,
        Value::DoubleValue(_) => datatype::DOUBLE,
        Value::BooleanValue(_) => datatype::BOOLEAN,
        Value::StringValue(_) => datatype::STRING,
        Value::BytesValue(_) => 17,
    }
}

/// An integer metric value, with the sign its datatype gives it.
fn integer(m: &Metric) -> Result<u64, String> {
    count(m, m.datatype.unwrap_or(datatype::UINT64))
}

/// A counter: a non-negative whole number within the database's range.
fn count(m: &Metric, dt: u32) -> Result<u64, String> {
    let name = clip(m.name.as_deref().unwrap_or("(alias)"));
    let Some(v) = whole(m, dt) else {
        return Err(format!("counter metric `{name}` must be a whole number"));
    };
    if !(0..=i128::from(crate::ingest::parse::MAX_COUNTER)).contains(&v) {
        return Err(format!("counter metric `{name}` is {v}, not a non-negative count"));
    }
    Ok(v as u64)
}

/// A metric's value as a whole number: an integer of any width and signedness, or a float
/// with no fraction (within the range it holds exactly).
fn whole(m: &Metric, dt: u32) -> Option<i128> {
    Some(match (&m.value, dt) {
        (Some(Value::IntValue(v)), datatype::INT8 | datatype::INT16 | datatype::INT32) => i128::from(*v as i32),
        (Some(Value::IntValue(v)), _) => i128::from(*v),
        (Some(Value::LongValue(v)), datatype::INT64) => i128::from(*v as i64),
        (Some(Value::LongValue(v)), _) => i128::from(*v),
        (Some(Value::DoubleValue(x)), _) if x.fract() == 0.0 && x.abs() < 9.0e15 => *x as i128,
        (Some(Value::FloatValue(x)), _) if x.fract() == 0.0 && x.abs() < 1.6e7 => *x as i128,
        _ => return None,
    })
}

/// A numeric metric value for the time series.
fn number(m: &Metric, dt: u32) -> Option<f64> {
    let x = match (&m.value, dt) {
        (Some(Value::IntValue(v)), datatype::INT8 | datatype::INT16 | datatype::INT32) => f64::from(*v as i32),
        (Some(Value::IntValue(v)), _) => f64::from(*v),
        (Some(Value::LongValue(v)), datatype::INT64) => *v as i64 as f64,
        (Some(Value::LongValue(_)), datatype::DATETIME) => return None,
        (Some(Value::LongValue(v)), _) => *v as f64,
        (Some(Value::FloatValue(v)), _) => f64::from(*v),
        (Some(Value::DoubleValue(v)), _) => *v,
        (Some(Value::BooleanValue(v)), _) => f64::from(u8::from(*v)),
        _ => return None,
    };
    x.is_finite().then_some(x)
}

/// Handles one publish on a Sparkplug topic, inline in the event loop (receive order):
/// every path ends in the writer, so the publish is acknowledged only after commit.
#[allow(clippy::too_many_arguments)]
pub async fn handle(
    host: &mut Host,
    pipeline: &Pipeline,
    client: &AsyncClient,
    max_payload: usize,
    p: rumqttc::Publish,
    done: Completion,
    slot: InFlight,
    ack_tx: &AckSender,
) {
    let received_ms = crate::now_ms();
    let decision = if p.payload.len() > max_payload {
        Decision::dead(format!("payload of {} bytes exceeds the limit of {max_payload}", p.payload.len()))
    } else {
        host.decide(&p.topic, &p.payload, received_ms)
    };
    if let Some(r) = decision.rebirth {
        request_rebirth(client, host.store.clone(), r, received_ms);
    }
    match decision.action {
        Action::Submit(reading) => {
            let span = tracing::debug_span!("sparkplug", device = %reading.device, seq = reading.seq);
            let abandoned = span.in_scope(|| pipeline.submit_reading(reading, received_ms, done, slot, None));
            if let Some(Completion::Mqtt(mut a)) = abandoned {
                a.pkid = None;
                ack_tx.submit(vec![a]);
            }
        }
        Action::Ack => {
            if matches!(done, Completion::None) {
                return; // QoS 0: nothing to acknowledge; the permit is freed here
            }
            let writer = pipeline.writer.clone();
            let job = Job {
                work: Work::Duplicate,
                received_ms,
                done,
                slot: Some(slot),
                raw: None,
                metrics: Default::default(),
                lease: None,
            };
            tokio::spawn(async move {
                if writer.send(job).await.is_err() {
                    tracing::error!("writer stopped; input will be redelivered by its source");
                }
            });
        }
        Action::DeadLetter(reason) => {
            // Protobuf is binary: kept as hex (at most `max_payload` characters).
            let keep = p.payload.len().min(max_payload / 2);
            let text: String = p.payload[..keep].iter().map(|b| format!("{b:02x}")).collect();
            let (pipeline, topic, dup) = (pipeline.clone(), p.topic.clone(), p.dup);
            tokio::spawn(async move {
                pipeline.submit_dead_letter(topic, reason, text, dup, received_ms, done, slot).await;
            });
        }
    }
}

/// Publishes a rebirth request (`NCMD`, QoS 0 as the specification asks) and records it in
/// the audit log.
fn request_rebirth(client: &AsyncClient, store: Option<Store>, r: Rebirth, now_ms: i64) {
    let (topic, payload) = rebirth_request(&r.group, &r.edge_node, now_ms);
    tracing::warn!(group = %r.group, edge_node = %r.edge_node, reason = %r.reason, "Sparkplug rebirth requested");
    let sent = client.try_publish(topic.clone(), QoS::AtMostOnce, false, payload).map_err(|e| e.to_string());
    if let Some(store) = store {
        let target = format!("{}/{}", r.group, r.edge_node);
        let detail = serde_json::json!({"topic": topic, "reason": r.reason, "error": sent.as_ref().err()}).to_string();
        tokio::spawn(async move {
            if let Err(e) = store.audit("sparkplug-host", "sparkplug_rebirth", &target, &detail).await {
                tracing::warn!(error = %e, "rebirth request not recorded");
            }
        });
    }
}

#[cfg(test)]
mod tests;
