//! The plant file (CONTRACT §3), read tolerantly: only what the simulator needs is
//! parsed and unknown keys are ignored, so the simulator works with any plant file the
//! MES accepts.

use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
pub struct Plant {
    #[serde(default)]
    pub boms: Vec<Bom>,
    #[serde(default)]
    pub buffers: Vec<Buffer>,
    #[serde(default)]
    pub work_centers: Vec<WorkCenter>,
    /// Directory of the plant file, for relative register-map paths.
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Bom {
    pub sku: String,
    #[serde(default)]
    pub components: Vec<Component>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Component {
    pub sku: String,
    pub quantity: Quantity,
}

/// A whole, positive quantity written as `"2"` or `2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "toml::Value")]
pub struct Quantity(pub u64);

impl TryFrom<toml::Value> for Quantity {
    type Error = String;
    fn try_from(v: toml::Value) -> Result<Self, Self::Error> {
        let n = match &v {
            toml::Value::Integer(i) => *i,
            toml::Value::String(s) => {
                let t = s.trim();
                // Accept "2" and "2.0"/"2.000", not "2.5".
                let whole = match t.split_once('.') {
                    Some((w, frac)) if !frac.is_empty() && frac.bytes().all(|b| b == b'0') => w,
                    _ => t,
                };
                whole.parse::<i64>().map_err(|_| format!("quantity `{s}` is not a whole number"))?
            }
            other => return Err(format!("quantity `{other}` is not a whole number")),
        };
        u64::try_from(n).ok().filter(|q| *q > 0).map(Quantity).ok_or_else(|| format!("quantity {n} must be positive"))
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Buffer {
    pub id: String,
    pub sku: String,
    pub capacity: u64,
    #[serde(default)]
    pub initial: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WorkCenter {
    pub id: String,
    #[serde(default = "default_cycle")]
    pub ideal_cycle_s: f64,
    #[serde(default)]
    pub inputs: Vec<String>,
    pub output: String,
    pub device: Device,
}

fn default_cycle() -> f64 {
    1.0
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Mqtt { id: String },
    Modbus(ModbusDevice),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModbusDevice {
    pub address: String,
    #[serde(default = "default_unit")]
    pub unit: u8,
    pub map: String,
    #[serde(default)]
    pub id: Option<String>,
}

fn default_unit() -> u8 {
    1
}

impl WorkCenter {
    /// The id the device reports under (for Modbus, defaults to the lower-cased
    /// work-center id, as the MES does).
    pub fn device_id(&self) -> String {
        match &self.device {
            Device::Mqtt { id } => id.clone(),
            Device::Modbus(m) => m.id.clone().unwrap_or_else(|| self.id.to_ascii_lowercase()),
        }
    }
}

impl Plant {
    /// Reads and checks a plant file.
    pub fn load(path: &Path) -> anyhow::Result<Plant> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read plant file {}: {e}", path.display()))?;
        let mut plant = Plant::parse(&text, &path.display().to_string())?;
        plant.base_dir = path.parent().map(Path::to_path_buf);
        Ok(plant)
    }

    /// Parses and checks plant TOML; `origin` names it in messages.
    pub fn parse(text: &str, origin: &str) -> anyhow::Result<Plant> {
        let plant: Plant =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("plant file {origin} is not valid: {e}"))?;
        let problems = plant.problems();
        if !problems.is_empty() {
            anyhow::bail!("plant file {origin}: {}", problems.join("; "));
        }
        Ok(plant)
    }

    /// What makes the plant unusable for simulation.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        for b in &self.buffers {
            if !seen.insert(b.id.as_str()) {
                out.push(format!("buffer `{}` is defined twice", b.id));
            }
            if b.initial > b.capacity {
                out.push(format!("buffer `{}`: initial {} exceeds capacity {}", b.id, b.initial, b.capacity));
            }
        }
        let mut boms = BTreeSet::new();
        for b in &self.boms {
            if !boms.insert(b.sku.as_str()) {
                out.push(format!("bom for `{}` is defined twice", b.sku));
            }
        }
        let mut wcs = BTreeSet::new();
        let mut devices = BTreeSet::new();
        for w in &self.work_centers {
            if !wcs.insert(w.id.as_str()) {
                out.push(format!("work center `{}` is defined twice", w.id));
            }
            if !devices.insert(w.device_id()) {
                out.push(format!("work center `{}`: device `{}` is used twice", w.id, w.device_id()));
            }
            if w.device_id().is_empty() || w.device_id().contains(['/', '+', '#']) {
                out.push(format!(
                    "work center `{}`: device id `{}` cannot be used in an MQTT topic",
                    w.id,
                    w.device_id()
                ));
            }
            if !(w.ideal_cycle_s.is_finite() && w.ideal_cycle_s > 0.0) {
                out.push(format!("work center `{}`: ideal_cycle_s must be positive", w.id));
            }
            if self.buffer(&w.output).is_none() {
                out.push(format!("work center `{}`: output buffer `{}` does not exist", w.id, w.output));
            }
            for i in &w.inputs {
                if self.buffer(i).is_none() {
                    out.push(format!("work center `{}`: input buffer `{i}` does not exist", w.id));
                }
            }
        }
        out
    }

    pub fn buffer(&self, id: &str) -> Option<&Buffer> {
        self.buffers.iter().find(|b| b.id == id)
    }

    /// What one unit of `sku` consumes, merged per component sku (empty for a raw sku).
    pub fn bom(&self, sku: &str) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        if let Some(b) = self.boms.iter().find(|b| b.sku == sku) {
            for c in &b.components {
                *out.entry(c.sku.clone()).or_insert(0) += c.quantity.0;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_plant_parses() {
        let text = include_str!("../../plants/line-mqtt.toml");
        let p = Plant::parse(text, "demo.toml").expect("demo plant");
        assert_eq!(p.work_centers.len(), 4);
        assert_eq!(p.bom("BASE-ASSY").get("MOTOR"), Some(&1));
        assert_eq!(p.bom("HOUSING").get("BLANK"), Some(&2));
        assert!(p.bom("COIL-STEEL").is_empty());
        assert_eq!(p.work_centers[0].device_id(), "blank-01");
    }

    #[test]
    fn tolerant_but_checked() {
        let text = r#"
            unknown_top = 1
            [[materials]]
            sku = "A"
            extra = "ignored"
            [[boms]]
            sku = "B"
            components = [{ sku = "A", quantity = "2.0" }]
            [[buffers]]
            id = "IN"
            sku = "A"
            capacity = 10
            initial = 10
            [[buffers]]
            id = "OUT"
            sku = "B"
            capacity = 10
            [[work_centers]]
            id = "WC"
            inputs = ["IN"]
            output = "OUT"
            conversion_rate_per_hour = "1.00"
            device = { modbus = { address = "127.0.0.1:1502", map = "press-v1", poll_ms = 100 } }
        "#;
        let p = Plant::parse(text, "t").expect("valid");
        assert_eq!(p.bom("B").get("A"), Some(&2));
        assert_eq!(p.work_centers[0].device_id(), "wc");
        assert_eq!(p.work_centers[0].ideal_cycle_s, 1.0);

        let bad = text.replace("output = \"OUT\"", "output = \"NOPE\"");
        let e = Plant::parse(&bad, "t").expect_err("missing buffer");
        assert!(e.to_string().contains("`NOPE` does not exist"), "{e}");
        let bad = text.replace("\"2.0\"", "\"2.5\"");
        assert!(Plant::parse(&bad, "t").is_err());
        let bad = text.replace("initial = 10", "initial = 11");
        assert!(Plant::parse(&bad, "t").is_err());
    }
}
