//! Scenarios as data: what happens on the line during a run (speed profile, scrap,
//! micro-stops, breakdowns, device faults). The shipped scenarios live in
//! `simulator/scenarios/*.toml` and are embedded in the binary; any other scenario file
//! can be given by path. The keys are documented in `simulator/README.md`.

use crate::units::parse_duration_ms;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// The scenarios built into the binary, as `(name, TOML text)`.
pub const SHIPPED: &[(&str, &str)] = &[
    ("steady", include_str!("../scenarios/steady.toml")),
    ("promo-surge", include_str!("../scenarios/promo-surge.toml")),
    ("breakdowns", include_str!("../scenarios/breakdowns.toml")),
    ("faults", include_str!("../scenarios/faults.toml")),
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Default run length in simulated time (`--duration` overrides it).
    #[serde(default = "default_duration")]
    pub duration: String,
    /// Simulated milliseconds per model step.
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
    /// Longest simulated time between two telemetry messages of a live device.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_s: f64,
    /// Set-up time after a `set_order` for a different order.
    #[serde(default)]
    pub changeover_s: f64,
    #[serde(default)]
    pub line: Line,
    #[serde(default)]
    pub breakdowns: Breakdowns,
    #[serde(default)]
    pub faults: Faults,
    /// Sales demand for finished goods (promo orders); none by default.
    #[serde(default)]
    pub demand: Demand,
    /// Per-work-center overrides, keyed by work-center id.
    #[serde(default)]
    pub work_centers: BTreeMap<String, Override>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Line {
    /// Standard deviation of a cycle's duration, relative to its nominal duration.
    #[serde(default = "default_jitter")]
    pub cycle_jitter: f64,
    /// Probability that a finished unit is scrap.
    #[serde(default = "default_scrap")]
    pub scrap_rate: f64,
    /// Line speed factor over the run: points `(at, factor)` with `at` the fraction of the
    /// run (0..=1), linear in between. A cycle lasts `ideal_cycle_s / factor`.
    #[serde(default = "default_speed")]
    pub speed: Vec<SpeedPoint>,
    /// Mean number of micro-stops per hour of running.
    #[serde(default)]
    pub microstops_per_hour: f64,
    /// Range of a micro-stop's duration, in seconds.
    #[serde(default = "default_microstop_s")]
    pub microstop_s: [f64; 2],
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpeedPoint {
    pub at: f64,
    pub factor: f64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Breakdowns {
    /// Mean running time between failures, in seconds; 0 = no breakdowns.
    #[serde(default)]
    pub mtbf_s: f64,
    /// Mean time to repair, in seconds.
    #[serde(default = "default_mttr")]
    pub mttr_s: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Mean number of device reboots per hour, per device (boot + 1, counters to 0).
    #[serde(default)]
    pub reboots_per_hour: f64,
    /// How long a rebooting device is offline, in seconds.
    #[serde(default = "default_reboot_s")]
    pub reboot_s: f64,
    /// Probability that a telemetry message is published twice.
    #[serde(default)]
    pub duplicate_rate: f64,
    /// Probability that a telemetry message is held back and published after the next.
    #[serde(default)]
    pub out_of_order_rate: f64,
    /// Mean number of times per hour the simulator's MQTT connection is cut abruptly (TCP
    /// reset, no DISCONNECT) while publishes are in flight; it reconnects and resends them.
    #[serde(default)]
    pub mqtt_drops_per_hour: f64,
    /// Mean number of times per hour, per Modbus device, that its server stops answering
    /// (connections are accepted, requests get no reply) for `modbus_silence_s`.
    #[serde(default)]
    pub modbus_silences_per_hour: f64,
    /// How long a silent Modbus server gives no replies, in simulated seconds (at least
    /// [`crate::modbus::MIN_SILENCE`] of real time, so a poller's timeout fires at any speed).
    #[serde(default = "default_silence_s")]
    pub modbus_silence_s: f64,
}

/// Promo demand: sales orders for finished goods arrive at random (a Poisson process
/// whose rate follows `ramp`), each for a lot size drawn from `lot`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Demand {
    /// Mean sales orders per hour at ramp factor 1; 0 = no demand.
    #[serde(default)]
    pub orders_per_hour: f64,
    /// Range of an order's quantity, in units (inclusive).
    #[serde(default = "default_lot")]
    pub lot: [u64; 2],
    /// The sku ordered; default: the plant's finished goods (the output of a work center
    /// that no work center consumes).
    #[serde(default)]
    pub sku: Option<String>,
    /// The demand's factor over the run, as `line.speed`; default: the line's speed profile
    /// (demand ramps with the surge).
    #[serde(default)]
    pub ramp: Option<Vec<SpeedPoint>>,
}

/// Per-work-center values that replace the scenario-wide ones.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    pub cycle_jitter: Option<f64>,
    pub scrap_rate: Option<f64>,
    pub microstops_per_hour: Option<f64>,
    pub mtbf_s: Option<f64>,
    pub mttr_s: Option<f64>,
    pub reboots_per_hour: Option<f64>,
    /// Multiplies the line speed factor for this work center only.
    pub speed_factor: Option<f64>,
}

/// The effective parameters of one work center.
#[derive(Debug, Clone, PartialEq)]
pub struct StationParams {
    pub cycle_jitter: f64,
    pub scrap_rate: f64,
    pub microstops_per_hour: f64,
    pub microstop_s: [f64; 2],
    pub mtbf_s: f64,
    pub mttr_s: f64,
    pub reboots_per_hour: f64,
    pub reboot_s: f64,
    pub speed_factor: f64,
}

fn default_duration() -> String {
    "600s".into()
}
fn default_tick_ms() -> u64 {
    100
}
fn default_heartbeat() -> f64 {
    1.0
}
fn default_jitter() -> f64 {
    0.05
}
fn default_scrap() -> f64 {
    0.01
}
fn default_speed() -> Vec<SpeedPoint> {
    vec![SpeedPoint { at: 0.0, factor: 1.0 }]
}
fn default_microstop_s() -> [f64; 2] {
    [2.0, 20.0]
}
fn default_mttr() -> f64 {
    300.0
}
fn default_reboot_s() -> f64 {
    5.0
}
fn default_silence_s() -> f64 {
    30.0
}
fn default_lot() -> [u64; 2] {
    [1, 1]
}

impl Default for Line {
    fn default() -> Line {
        Line {
            cycle_jitter: default_jitter(),
            scrap_rate: default_scrap(),
            speed: default_speed(),
            microstops_per_hour: 0.0,
            microstop_s: default_microstop_s(),
        }
    }
}

impl Default for Demand {
    fn default() -> Demand {
        Demand { orders_per_hour: 0.0, lot: default_lot(), sku: None, ramp: None }
    }
}

impl Default for Faults {
    fn default() -> Faults {
        Faults {
            reboots_per_hour: 0.0,
            reboot_s: default_reboot_s(),
            duplicate_rate: 0.0,
            out_of_order_rate: 0.0,
            mqtt_drops_per_hour: 0.0,
            modbus_silences_per_hour: 0.0,
            modbus_silence_s: default_silence_s(),
        }
    }
}

impl Scenario {
    /// A shipped scenario by name, or a scenario file by path.
    pub fn resolve(name_or_path: &str) -> anyhow::Result<Scenario> {
        if let Some((name, text)) = SHIPPED.iter().find(|(n, _)| *n == name_or_path) {
            return Scenario::parse(text, name);
        }
        let path = Path::new(name_or_path);
        let looks_like_path = name_or_path.contains(['/', '\\']) || name_or_path.ends_with(".toml");
        if looks_like_path || path.is_file() {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read scenario file {}: {e}", path.display()))?;
            let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            return Scenario::parse(&text, &stem);
        }
        let names: Vec<&str> = SHIPPED.iter().map(|(n, _)| *n).collect();
        anyhow::bail!("unknown scenario `{name_or_path}`: use one of {} or a path to a scenario file", names.join(", "))
    }

    /// Parses and checks scenario TOML; `default_name` is used when it has no `name`.
    pub fn parse(text: &str, default_name: &str) -> anyhow::Result<Scenario> {
        let mut s: Scenario =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("scenario `{default_name}` is not valid: {e}"))?;
        if s.name.is_empty() {
            s.name = default_name.to_string();
        }
        s.line.speed.sort_by(|a, b| a.at.total_cmp(&b.at));
        if let Some(ramp) = &mut s.demand.ramp {
            ramp.sort_by(|a, b| a.at.total_cmp(&b.at));
        }
        let problems = s.problems();
        if !problems.is_empty() {
            anyhow::bail!("scenario `{}`: {}", s.name, problems.join("; "));
        }
        Ok(s)
    }

    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Err(e) = parse_duration_ms(&self.duration) {
            out.push(format!("duration: {e}"));
        }
        if self.tick_ms == 0 || self.tick_ms > 60_000 {
            out.push("tick_ms must be between 1 and 60000".into());
        }
        let non_negative = |name: &str, v: f64, out: &mut Vec<String>| {
            if !(v.is_finite() && v >= 0.0) {
                out.push(format!("{name} must be a non-negative number"));
            }
        };
        let probability = |name: &str, v: f64, out: &mut Vec<String>| {
            if !(0.0..=1.0).contains(&v) {
                out.push(format!("{name} must be between 0 and 1"));
            }
        };
        if !(self.heartbeat_s.is_finite() && self.heartbeat_s > 0.0) {
            out.push("heartbeat_s must be positive".into());
        }
        non_negative("changeover_s", self.changeover_s, &mut out);
        non_negative("line.cycle_jitter", self.line.cycle_jitter, &mut out);
        probability("line.scrap_rate", self.line.scrap_rate, &mut out);
        non_negative("line.microstops_per_hour", self.line.microstops_per_hour, &mut out);
        let [lo, hi] = self.line.microstop_s;
        if !(lo.is_finite() && hi.is_finite() && lo >= 0.0 && hi >= lo) {
            out.push("line.microstop_s must be [min, max] with 0 <= min <= max".into());
        }
        let profile = |name: &str, pts: &[SpeedPoint], out: &mut Vec<String>| {
            if pts.is_empty() {
                out.push(format!("{name} needs at least one point"));
            }
            for p in pts {
                if !(0.0..=1.0).contains(&p.at) {
                    out.push(format!("{name}: at = {} is not within 0..=1", p.at));
                }
                if !(p.factor.is_finite() && p.factor > 0.0) {
                    out.push(format!("{name}: factor {} must be positive", p.factor));
                }
            }
        };
        profile("line.speed", &self.line.speed, &mut out);
        if let Some(ramp) = &self.demand.ramp {
            profile("demand.ramp", ramp, &mut out);
        }
        non_negative("demand.orders_per_hour", self.demand.orders_per_hour, &mut out);
        let [lo, hi] = self.demand.lot;
        if lo == 0 || hi < lo {
            out.push("demand.lot must be [min, max] with 1 <= min <= max".into());
        }
        if self.demand.sku.as_deref() == Some("") {
            out.push("demand.sku must not be empty".into());
        }
        non_negative("breakdowns.mtbf_s", self.breakdowns.mtbf_s, &mut out);
        non_negative("breakdowns.mttr_s", self.breakdowns.mttr_s, &mut out);
        non_negative("faults.reboots_per_hour", self.faults.reboots_per_hour, &mut out);
        non_negative("faults.reboot_s", self.faults.reboot_s, &mut out);
        probability("faults.duplicate_rate", self.faults.duplicate_rate, &mut out);
        probability("faults.out_of_order_rate", self.faults.out_of_order_rate, &mut out);
        non_negative("faults.mqtt_drops_per_hour", self.faults.mqtt_drops_per_hour, &mut out);
        non_negative("faults.modbus_silences_per_hour", self.faults.modbus_silences_per_hour, &mut out);
        if !(self.faults.modbus_silence_s.is_finite() && self.faults.modbus_silence_s > 0.0) {
            out.push("faults.modbus_silence_s must be positive".into());
        }
        for (wc, o) in &self.work_centers {
            for (k, v) in [
                ("cycle_jitter", o.cycle_jitter),
                ("microstops_per_hour", o.microstops_per_hour),
                ("mtbf_s", o.mtbf_s),
                ("mttr_s", o.mttr_s),
                ("reboots_per_hour", o.reboots_per_hour),
            ] {
                if let Some(v) = v {
                    non_negative(&format!("work_centers.{wc}.{k}"), v, &mut out);
                }
            }
            if let Some(v) = o.scrap_rate {
                probability(&format!("work_centers.{wc}.scrap_rate"), v, &mut out);
            }
            if let Some(v) = o.speed_factor {
                if !(v.is_finite() && v > 0.0) {
                    out.push(format!("work_centers.{wc}.speed_factor must be positive"));
                }
            }
        }
        out
    }

    /// The run length the scenario asks for, in milliseconds.
    pub fn duration_ms(&self) -> u64 {
        parse_duration_ms(&self.duration).unwrap_or(600_000)
    }

    /// The line speed factor at `fraction` (0..=1) of the run.
    pub fn speed_at(&self, fraction: f64) -> f64 {
        profile_at(&self.line.speed, fraction)
    }

    /// The demand factor at `fraction` (0..=1) of the run: `demand.ramp`, else the line's
    /// speed profile.
    pub fn demand_at(&self, fraction: f64) -> f64 {
        profile_at(self.demand.ramp.as_deref().unwrap_or(&self.line.speed), fraction)
    }

    /// The effective parameters for work center `wc`.
    pub fn station(&self, wc: &str) -> StationParams {
        let o = self.work_centers.get(wc).cloned().unwrap_or_default();
        StationParams {
            cycle_jitter: o.cycle_jitter.unwrap_or(self.line.cycle_jitter),
            scrap_rate: o.scrap_rate.unwrap_or(self.line.scrap_rate),
            microstops_per_hour: o.microstops_per_hour.unwrap_or(self.line.microstops_per_hour),
            microstop_s: self.line.microstop_s,
            mtbf_s: o.mtbf_s.unwrap_or(self.breakdowns.mtbf_s),
            mttr_s: o.mttr_s.unwrap_or(self.breakdowns.mttr_s),
            reboots_per_hour: o.reboots_per_hour.unwrap_or(self.faults.reboots_per_hour),
            reboot_s: self.faults.reboot_s,
            speed_factor: o.speed_factor.unwrap_or(1.0),
        }
    }
}

/// A piecewise linear profile at `fraction` (0..=1) of the run; flat outside its points.
fn profile_at(pts: &[SpeedPoint], fraction: f64) -> f64 {
    let Some(first) = pts.first() else {
        return 1.0;
    };
    if fraction <= first.at {
        return first.factor;
    }
    for w in pts.windows(2) {
        let (a, b) = (w[0], w[1]);
        if fraction <= b.at {
            let span = b.at - a.at;
            if span <= 0.0 {
                return b.factor;
            }
            return a.factor + (b.factor - a.factor) * (fraction - a.at) / span;
        }
    }
    pts.last().map_or(1.0, |p| p.factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_scenarios_parse() {
        for (name, _) in SHIPPED {
            let s = Scenario::resolve(name).expect(name);
            assert_eq!(&s.name, name);
        }
        let surge = Scenario::resolve("promo-surge").expect("surge");
        assert_eq!(surge.speed_at(0.0), 1.0);
        assert!((surge.speed_at(0.5) - 5.5).abs() < 1e-9);
        assert_eq!(surge.speed_at(1.0), 10.0);
        let faults = Scenario::resolve("faults").expect("faults");
        assert!(faults.faults.reboots_per_hour > 0.0);
        assert!(faults.faults.duplicate_rate > 0.0);
        assert!(faults.faults.out_of_order_rate > 0.0);
        assert_eq!(faults.faults.mqtt_drops_per_hour, 6.0);
        assert_eq!(faults.faults.modbus_silences_per_hour, 3.0);
        assert_eq!(faults.faults.modbus_silence_s, 20.0);
        assert_eq!(surge.demand.orders_per_hour, 12.0);
        assert_eq!(surge.demand.lot, [100, 400]);
        // Demand ramps with the line's speed unless it has a ramp of its own.
        assert_eq!(surge.demand_at(0.0), 1.0);
        assert!((surge.demand_at(0.5) - 5.5).abs() < 1e-9);
        assert_eq!(surge.demand_at(1.0), 10.0);
        let steady = Scenario::resolve("steady").expect("steady");
        assert_eq!(steady.demand.orders_per_hour, 0.0);
        assert_eq!(steady.faults.mqtt_drops_per_hour, 0.0);
        assert!(Scenario::resolve("breakdowns").expect("b").breakdowns.mtbf_s > 0.0);
    }

    #[test]
    fn unknown_names_and_keys_are_errors() {
        let e = Scenario::resolve("nope").expect_err("unknown");
        assert!(e.to_string().contains("steady"), "{e}");
        assert!(Scenario::parse("[line]\nscrap_rat = 0.1\n", "t").is_err());
        assert!(Scenario::parse("[line]\nscrap_rate = 1.5\n", "t").is_err());
        assert!(Scenario::parse("duration = \"soon\"\n", "t").is_err());
        assert!(Scenario::parse("[faults]\nmqtt_drops_per_hour = -1\n", "t").is_err());
        assert!(Scenario::parse("[faults]\nmodbus_silence_s = 0\n", "t").is_err());
        assert!(Scenario::parse("[faults]\nmodbus_timeouts = 1\n", "t").is_err());
        assert!(Scenario::parse("[demand]\nlot = [0, 5]\n", "t").is_err());
        assert!(Scenario::parse("[demand]\nlot = [5, 4]\n", "t").is_err());
        assert!(Scenario::parse("[demand]\nramp = []\n", "t").is_err());
        let d =
            Scenario::parse("[demand]\norders_per_hour = 2\nsku = \"X\"\nramp = [{ at = 0.0, factor = 3.0 }]\n", "t")
                .expect("valid");
        assert_eq!(d.demand.sku.as_deref(), Some("X"));
        assert_eq!(d.demand_at(0.7), 3.0);
        assert_eq!(d.speed_at(0.7), 1.0);
    }

    #[test]
    fn defaults_speed_profile_and_overrides() {
        let s = Scenario::parse(
            r#"
            [line]
            scrap_rate = 0.02
            speed = [{ at = 1.0, factor = 3.0 }, { at = 0.0, factor = 1.0 }, { at = 0.5, factor = 1.0 }]
            [work_centers.A]
            scrap_rate = 0.5
            mtbf_s = 60
            "#,
            "custom",
        )
        .expect("valid");
        assert_eq!(s.name, "custom");
        assert_eq!(s.duration_ms(), 600_000);
        assert_eq!(s.tick_ms, 100);
        assert_eq!(s.speed_at(0.25), 1.0);
        assert!((s.speed_at(0.75) - 2.0).abs() < 1e-9);
        assert_eq!(s.station("A").scrap_rate, 0.5);
        assert_eq!(s.station("A").mtbf_s, 60.0);
        assert_eq!(s.station("B").scrap_rate, 0.02);
        assert_eq!(s.station("B").mtbf_s, 0.0);
    }
}
