//! The plant file: materials, BOMs, buffers and work centers with their devices.
//!
//! Loaded once at start, validated as a whole (every problem names its entry), then
//! upserted into the database as master data.

use crate::config::toml_message;
use mes_actors::{MachineState, Money};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The demo plant shipped in the binary (MQTT and Modbus devices).
pub const DEMO_PLANT: &str = include_str!("../plants/demo.toml");
/// The demo line with every device on MQTT (benchmarks, tests).
pub const MQTT_LINE: &str = include_str!("../plants/line-mqtt.toml");

#[derive(Debug, thiserror::Error)]
pub enum PlantError {
    #[error("plant file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("plant file {origin}: {message}")]
    Invalid { origin: String, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plant {
    #[serde(default)]
    pub materials: Vec<Material>,
    #[serde(default)]
    pub boms: Vec<Bom>,
    #[serde(default)]
    pub buffers: Vec<Buffer>,
    #[serde(default)]
    pub work_centers: Vec<WorkCenter>,
    /// Directory of the file, to resolve relative register-map paths.
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Material {
    pub sku: String,
    #[serde(default = "default_unit")]
    pub unit: String,
    pub standard_cost: Money,
}

fn default_unit() -> String {
    "ea".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bom {
    pub sku: String,
    pub components: Vec<Component>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Component {
    pub sku: String,
    /// Whole units of the component per unit of the parent (a decimal string or integer).
    pub quantity: Quantity,
}

/// An integer quantity written as `"2"` or `2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "toml::Value")]
pub struct Quantity(pub i64);

impl TryFrom<toml::Value> for Quantity {
    type Error = String;
    fn try_from(v: toml::Value) -> Result<Self, Self::Error> {
        let n = match &v {
            toml::Value::Integer(i) => *i,
            toml::Value::String(s) => {
                s.trim().parse::<i64>().map_err(|_| format!("quantity `{s}` is not a whole number"))?
            }
            other => return Err(format!("quantity `{other}` is not a whole number")),
        };
        if n <= 0 {
            return Err(format!("quantity {n} must be positive"));
        }
        Ok(Quantity(n))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Buffer {
    pub id: String,
    pub sku: String,
    pub capacity: i64,
    #[serde(default)]
    pub initial: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkCenter {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "default_cycle")]
    pub ideal_cycle_s: f64,
    #[serde(default)]
    pub conversion_rate_per_hour: Option<Money>,
    #[serde(default)]
    pub inputs: Vec<String>,
    pub output: String,
    pub device: Device,
    /// Plausibility limit: most units (good + scrap) one reading may add. A reading over it
    /// is held for review (a dead letter) instead of booked. None: no limit.
    #[serde(default)]
    pub max_units_per_reading: Option<u64>,
}

fn default_cycle() -> f64 {
    1.0
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
pub enum Device {
    Mqtt { id: String },
    Modbus(ModbusDevice),
    Sparkplug(SparkplugDevice),
}

/// A device behind a Sparkplug B edge node (`src/ingest/sparkplug`): where it publishes
/// and which of its metrics are the counters, the state and the order.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SparkplugDevice {
    pub group: String,
    pub edge_node: String,
    /// The Sparkplug device id; absent: the edge node's own metrics (NBIRTH/NDATA).
    #[serde(default)]
    pub device: Option<String>,
    /// Metric holding the cumulative good count.
    pub good: String,
    /// Metric holding the cumulative scrap count.
    pub scrap: String,
    /// Metric holding the machine state: a String (running, idle, setup, down, stopped), or
    /// an integer code named in `state_codes`.
    #[serde(default)]
    pub state: Option<String>,
    /// The machine state each integer code of the state metric stands for, as PLCs
    /// publish it (`{ 0 = "stopped", 1 = "running" }`); a code not listed is a dead letter.
    #[serde(default)]
    pub state_codes: BTreeMap<String, String>,
    /// Metric holding the order being worked on (a String); written by order dispatch.
    #[serde(default)]
    pub order: Option<String>,
    /// Metric that order dispatch writes the order quantity to.
    #[serde(default)]
    pub target: Option<String>,
    /// Device id used in telemetry and the API; defaults to the work center id.
    #[serde(default)]
    pub id: Option<String>,
}

impl SparkplugDevice {
    /// The state an integer code of the state metric stands for (`state_codes`, checked
    /// when the plant file is loaded).
    pub fn state_of_code(&self, code: i128) -> Option<MachineState> {
        self.state_codes.get(&code.to_string()).and_then(|s| s.parse().ok())
    }

    /// The bound metric names: good, scrap, then the optional ones.
    pub fn bound(&self) -> impl Iterator<Item = &str> {
        [Some(&self.good), Some(&self.scrap), self.state.as_ref(), self.order.as_ref(), self.target.as_ref()]
            .into_iter()
            .flatten()
            .map(String::as_str)
    }
}

/// A Sparkplug id (group, edge node, device) is one MQTT topic level: 1-128 characters,
/// none of `/ + #` and no control characters.
pub fn valid_sparkplug_id(s: &str) -> bool {
    !s.is_empty() && s.chars().count() <= 128 && !s.chars().any(|c| matches!(c, '/' | '+' | '#') || c.is_control())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusDevice {
    pub address: String,
    #[serde(default = "default_unit_id")]
    pub unit: u8,
    pub map: String,
    #[serde(default = "default_poll")]
    pub poll_ms: u64,
    /// Device id used in telemetry and the API; defaults to the work center id.
    #[serde(default)]
    pub id: Option<String>,
}

fn default_unit_id() -> u8 {
    1
}
fn default_poll() -> u64 {
    200
}

impl WorkCenter {
    /// The id under which the device reports.
    pub fn device_id(&self) -> String {
        match &self.device {
            Device::Mqtt { id } => id.clone(),
            Device::Modbus(m) => m.id.clone().unwrap_or_else(|| self.id.to_ascii_lowercase()),
            Device::Sparkplug(s) => s.id.clone().unwrap_or_else(|| self.id.to_ascii_lowercase()),
        }
    }

    pub fn device_kind(&self) -> &'static str {
        match self.device {
            Device::Mqtt { .. } => "mqtt",
            Device::Modbus(_) => "modbus",
            Device::Sparkplug(_) => "sparkplug",
        }
    }

    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.id.clone())
    }

    /// Ideal cycle in milliseconds (rounded).
    pub fn ideal_cycle_ms(&self) -> i64 {
        (self.ideal_cycle_s * 1000.0).round() as i64
    }
}

fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl Plant {
    pub fn load(path: Option<&Path>) -> Result<Plant, PlantError> {
        match path {
            None => Self::parse(DEMO_PLANT, "<demo plant>", None),
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).map_err(|source| PlantError::Read { path: p.to_path_buf(), source })?;
                Self::parse(&text, &p.display().to_string(), p.parent().map(Path::to_path_buf))
            }
        }
    }

    pub fn parse(text: &str, origin: &str, base_dir: Option<PathBuf>) -> Result<Plant, PlantError> {
        let mut plant: Plant = toml::from_str(text)
            .map_err(|e| PlantError::Invalid { origin: origin.to_string(), message: toml_message(&e, text) })?;
        plant.base_dir = base_dir;
        let problems = plant.problems();
        if problems.is_empty() {
            Ok(plant)
        } else {
            Err(PlantError::Invalid { origin: origin.to_string(), message: problems.join("; ") })
        }
    }

    /// Every inconsistency, each naming its entry.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut skus = BTreeSet::new();
        for m in &self.materials {
            if !valid_id(&m.sku) {
                out.push(format!("materials: sku `{}` must be 1-64 letters, digits, '-', '_' or '.'", m.sku));
            }
            if !skus.insert(m.sku.as_str()) {
                out.push(format!("materials: duplicate sku `{}`", m.sku));
            }
            if m.standard_cost.minor() < 0 {
                out.push(format!("materials `{}`: standard_cost must not be negative", m.sku));
            }
        }
        let mut bom_skus = BTreeSet::new();
        for b in &self.boms {
            if !skus.contains(b.sku.as_str()) {
                out.push(format!("boms: sku `{}` is not a material", b.sku));
            }
            if !bom_skus.insert(b.sku.as_str()) {
                out.push(format!("boms: duplicate BOM for `{}`", b.sku));
            }
            let mut seen = BTreeSet::new();
            for c in &b.components {
                if !skus.contains(c.sku.as_str()) {
                    out.push(format!("boms `{}`: component sku `{}` is not a material", b.sku, c.sku));
                }
                if c.sku == b.sku {
                    out.push(format!("boms `{}`: consumes itself", b.sku));
                }
                if !seen.insert(c.sku.as_str()) {
                    out.push(format!("boms `{}`: component `{}` listed twice", b.sku, c.sku));
                }
            }
        }
        let mut buffers = BTreeMap::new();
        for b in &self.buffers {
            if !valid_id(&b.id) {
                out.push(format!("buffers: id `{}` must be 1-64 letters, digits, '-', '_' or '.'", b.id));
            }
            if buffers.insert(b.id.as_str(), b).is_some() {
                out.push(format!("buffers: duplicate id `{}`", b.id));
            }
            if !skus.contains(b.sku.as_str()) {
                out.push(format!("buffers `{}`: sku `{}` is not a material", b.id, b.sku));
            }
            if b.capacity <= 0 {
                out.push(format!("buffers `{}`: capacity must be positive", b.id));
            }
            if b.initial < 0 || b.initial > b.capacity {
                out.push(format!(
                    "buffers `{}`: initial {} must be between 0 and capacity {}",
                    b.id, b.initial, b.capacity
                ));
            }
        }
        let mut wcs = BTreeSet::new();
        let mut devices = BTreeSet::new();
        let mut sparkplug = BTreeSet::new();
        for w in &self.work_centers {
            if !valid_id(&w.id) {
                out.push(format!("work_centers: id `{}` must be 1-64 letters, digits, '-', '_' or '.'", w.id));
            }
            if !wcs.insert(w.id.as_str()) {
                out.push(format!("work_centers: duplicate id `{}`", w.id));
            }
            let dev = w.device_id();
            if !valid_id(&dev) {
                out.push(format!(
                    "work_centers `{}`: device id `{dev}` must be 1-64 letters, digits, '-', '_' or '.'",
                    w.id
                ));
            }
            if !devices.insert(dev.clone()) {
                out.push(format!("work_centers `{}`: device `{dev}` is used by another work center", w.id));
            }
            if !(w.ideal_cycle_s.is_finite() && w.ideal_cycle_s > 0.0 && w.ideal_cycle_s <= 86_400.0) {
                out.push(format!("work_centers `{}`: ideal_cycle_s must be a positive number of seconds", w.id));
            }
            if w.max_units_per_reading == Some(0) {
                out.push(format!("work_centers `{}`: max_units_per_reading must be at least 1", w.id));
            }
            if w.conversion_rate_per_hour.is_some_and(|m| m.minor() < 0) {
                out.push(format!("work_centers `{}`: conversion_rate_per_hour must not be negative", w.id));
            }
            let out_sku = match buffers.get(w.output.as_str()) {
                Some(b) => Some(b.sku.as_str()),
                None => {
                    out.push(format!("work_centers `{}`: output buffer `{}` does not exist", w.id, w.output));
                    None
                }
            };
            for i in &w.inputs {
                if !buffers.contains_key(i.as_str()) {
                    out.push(format!("work_centers `{}`: input buffer `{i}` does not exist", w.id));
                }
            }
            if let Some(sku) = out_sku {
                if let Some(bom) = self.boms.iter().find(|b| b.sku == sku) {
                    for c in &bom.components {
                        let fed = w.inputs.iter().any(|i| buffers.get(i.as_str()).is_some_and(|b| b.sku == c.sku));
                        if !fed {
                            out.push(format!(
                                "work_centers `{}`: BOM of `{sku}` needs `{}` but no input buffer holds it",
                                w.id, c.sku
                            ));
                        }
                    }
                }
            }
            if let Device::Modbus(m) = &w.device {
                if m.address.parse::<std::net::SocketAddr>().is_err() {
                    out.push(format!("work_centers `{}`: modbus address `{}` is not host:port", w.id, m.address));
                }
                if m.poll_ms < 10 {
                    out.push(format!("work_centers `{}`: poll_ms must be at least 10", w.id));
                }
            }
            if let Device::Sparkplug(s) = &w.device {
                let ids = [("group", Some(&s.group)), ("edge_node", Some(&s.edge_node)), ("device", s.device.as_ref())];
                for (what, v) in ids {
                    if v.is_some_and(|v| !valid_sparkplug_id(v)) {
                        out.push(format!(
                            "work_centers `{}`: sparkplug {what} must be 1-128 characters without '/', '+', '#' or control characters",
                            w.id
                        ));
                    }
                }
                let mut names = BTreeSet::new();
                for m in s.bound() {
                    if m.is_empty() || m.chars().any(char::is_control) {
                        out.push(format!(
                            "work_centers `{}`: sparkplug metric name {m:?} is empty or holds a control character",
                            w.id
                        ));
                    }
                    if !names.insert(m) {
                        out.push(format!("work_centers `{}`: sparkplug metric `{m}` is bound twice", w.id));
                    }
                }
                if !s.state_codes.is_empty() && s.state.is_none() {
                    out.push(format!("work_centers `{}`: sparkplug state_codes without a state metric", w.id));
                }
                for (code, state) in &s.state_codes {
                    if code.parse::<i64>().map(|c| c.to_string()).as_deref() != Ok(code.as_str()) {
                        out.push(format!(
                            "work_centers `{}`: sparkplug state_codes key `{code}` must be an integer (like 0 or 3)",
                            w.id
                        ));
                    }
                    if state.parse::<MachineState>().is_err() {
                        out.push(format!(
                            "work_centers `{}`: sparkplug state_codes `{code}` = `{state}` is not a state (running, idle, setup, down, stopped)",
                            w.id
                        ));
                    }
                }
                if !sparkplug.insert((s.group.clone(), s.edge_node.clone(), s.device.clone())) {
                    out.push(format!(
                        "work_centers `{}`: sparkplug device {}/{}/{} is used by another work center",
                        w.id,
                        s.group,
                        s.edge_node,
                        s.device.as_deref().unwrap_or("(node)")
                    ));
                }
            }
        }
        out
    }

    pub fn material(&self, sku: &str) -> Option<&Material> {
        self.materials.iter().find(|m| m.sku == sku)
    }

    pub fn work_center(&self, id: &str) -> Option<&WorkCenter> {
        self.work_centers.iter().find(|w| w.id == id)
    }

    pub fn buffer(&self, id: &str) -> Option<&Buffer> {
        self.buffers.iter().find(|b| b.id == id)
    }

    /// The sku a work center produces (its output buffer's sku).
    pub fn output_sku(&self, wc: &WorkCenter) -> Option<&str> {
        self.buffer(&wc.output).map(|b| b.sku.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_plants_are_valid() {
        let p = Plant::load(None).expect("demo plant loads");
        assert_eq!(p.work_centers.iter().filter(|w| w.device_kind() == "modbus").count(), 2);
        let m = Plant::parse(MQTT_LINE, "line-mqtt", None).expect("MQTT line loads");
        assert!(m.work_centers.iter().all(|w| w.device_kind() == "mqtt"));
        assert_eq!(m.work_centers.len(), p.work_centers.len());
    }

    #[test]
    fn contract_example_parses() {
        let text = r#"
[[materials]]
sku = "SHEET"
unit = "ea"
standard_cost = "1.20"
[[materials]]
sku = "WIDGET"
unit = "ea"
standard_cost = "5.00"
[[boms]]
sku = "WIDGET"
components = [{ sku = "SHEET", quantity = "2" }]
[[buffers]]
id = "RM"
sku = "SHEET"
capacity = 100000
initial = 50000
[[buffers]]
id = "FG"
sku = "WIDGET"
capacity = 100000
initial = 0
[[work_centers]]
id = "PRESS-1"
name = "Press 1"
ideal_cycle_s = 1.0
conversion_rate_per_hour = "60.00"
inputs = ["RM"]
output = "FG"
device = { mqtt = { id = "press-01" } }
"#;
        let p = Plant::parse(text, "t", None).expect("parses");
        assert_eq!(p.work_centers[0].device_id(), "press-01");
        assert_eq!(p.boms[0].components[0].quantity, Quantity(2));
        assert_eq!(p.materials[0].standard_cost, Money(12_000));
    }

    #[test]
    fn problems_name_their_entry() {
        let text = r#"
[[materials]]
sku = "A"
standard_cost = "1"
[[boms]]
sku = "A"
components = [{ sku = "NOPE", quantity = 1 }]
[[buffers]]
id = "B"
sku = "A"
capacity = 10
[[buffers]]
id = "B"
sku = "A"
capacity = 10
[[work_centers]]
id = "W"
output = "MISSING"
device = { mqtt = { id = "d" } }
"#;
        let e = Plant::parse(text, "t", None).expect_err("invalid").to_string();
        assert!(e.contains("component sku `NOPE`"), "{e}");
        assert!(e.contains("duplicate id `B`"), "{e}");
        assert!(e.contains("output buffer `MISSING`"), "{e}");
    }

    #[test]
    fn sparkplug_devices_parse_and_validate() {
        let ok = widget("{ sparkplug = { group = \"Plant 1\", edge_node = \"edge-a\", device = \"press\", good = \"Counts/Good\", scrap = \"Counts/Scrap\", state = \"State\", order = \"Order\" } }");
        let p = Plant::parse(&ok, "t", None).expect("parses");
        assert_eq!(p.work_centers[0].device_kind(), "sparkplug");
        assert_eq!(p.work_centers[0].device_id(), "press-1");
        let bad = widget("{ sparkplug = { group = \"a/b\", edge_node = \"e\", good = \"G\", scrap = \"G\" } }");
        let e = Plant::parse(&bad, "t", None).expect_err("invalid").to_string();
        assert!(e.contains("sparkplug group"), "{e}");
        assert!(e.contains("metric `G` is bound twice"), "{e}");
    }

    fn widget(device: &str) -> String {
        format!(
            "[[materials]]\nsku = \"A\"\nstandard_cost = \"1\"\n[[buffers]]\nid = \"B\"\nsku = \"A\"\ncapacity = 10\n\
             [[work_centers]]\nid = \"PRESS-1\"\noutput = \"B\"\ndevice = {device}\n"
        )
    }

    #[test]
    fn syntax_errors_have_lines() {
        let e = Plant::parse("[[materials]]\nsku = \"A\"\nstandard_cost = 1.5\n", "t", None)
            .expect_err("float money")
            .to_string();
        assert!(e.contains("line 3"), "{e}");
    }
}
