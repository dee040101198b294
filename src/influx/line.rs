//! InfluxDB line protocol for the MES's measurements, written straight into a request body.
//!
//! | measurement | tags | fields | time |
//! |---|---|---|---|
//! | `mes_telemetry` | `work_center`, `device`, `order`? | each device metric (float) | reading |
//! | `mes_counts` | `work_center`, `device`, `order`? | `good`, `scrap` (this reading's deltas), `state` (code) | reading |
//! | `mes_state` | `work_center`, `state`, `reason`? | `code` | state change |
//! | `mes_oee` | `work_center` | `good`, `scrap`, `running_s`, `availability`, `performance`?, `quality`?, `oee`, `state` | minute start |
//!
//! A reading's time is the device's `ts` (else the time the MES received it) in
//! nanoseconds; its sub-millisecond digits carry `seq mod 10^6`, so readings of one device
//! within the same millisecond stay distinct points instead of overwriting each other.
//! State codes follow the shipped press map: stopped 0, running 1, idle 2, down 3, setup 4.
//! Floats are written in Rust's shortest round-trip form, integers with the `i` suffix.
//! Names and tag values from devices are escaped; control characters and backslashes in
//! them become `_`, and a metric with an empty name is not exported.

use mes_actors::MachineState;
use std::collections::BTreeMap;
use std::fmt::Write;

pub const TELEMETRY: &str = "mes_telemetry";
pub const COUNTS: &str = "mes_counts";
pub const STATE: &str = "mes_state";
pub const OEE: &str = "mes_oee";

/// The numeric code of a machine state (as in `plc-maps/maps/press-v1.toml`).
pub fn state_code(s: MachineState) -> i64 {
    match s {
        MachineState::Stopped => 0,
        MachineState::Running => 1,
        MachineState::Idle => 2,
        MachineState::Down => 3,
        MachineState::Setup => 4,
    }
}

/// A reading's point time in nanoseconds: milliseconds, plus `seq mod 10^6` below them.
pub fn reading_ns(time_ms: i64, seq: u64) -> i64 {
    time_ms.saturating_mul(1_000_000).saturating_add((seq % 1_000_000) as i64)
}

/// One committed telemetry row, borrowed from the live path or a database row.
pub struct ReadingRef<'a> {
    pub work_center: &'a str,
    pub device: &'a str,
    pub order: Option<&'a str>,
    pub seq: u64,
    /// Device time, else receive time (ms since the epoch).
    pub time_ms: i64,
    pub good: u64,
    pub scrap: u64,
    pub state: MachineState,
    pub metrics: &'a BTreeMap<String, f64>,
}

/// Whether `metrics` yields a `mes_telemetry` point (at least one named, finite value).
pub fn has_metrics(metrics: &BTreeMap<String, f64>) -> bool {
    metrics.iter().any(|(k, v)| !k.is_empty() && v.is_finite())
}

/// Points a reading becomes (plus one for its state change, if any).
pub fn reading_points(metrics: &BTreeMap<String, f64>) -> usize {
    1 + usize::from(has_metrics(metrics))
}

/// Writes a reading's `mes_telemetry` (if it has metrics) and `mes_counts` lines; returns
/// how many lines were written.
pub fn reading(out: &mut String, r: &ReadingRef<'_>) -> usize {
    let ns = reading_ns(r.time_ms, r.seq);
    let mut lines = 0;
    if has_metrics(r.metrics) {
        out.push_str(TELEMETRY);
        reading_tags(out, r);
        let mut first = true;
        for (k, v) in r.metrics {
            if k.is_empty() || !v.is_finite() {
                continue;
            }
            out.push(if first { ' ' } else { ',' });
            first = false;
            escape(out, k);
            let _ = write!(out, "={v}");
        }
        let _ = writeln!(out, " {ns}");
        lines += 1;
    }
    out.push_str(COUNTS);
    reading_tags(out, r);
    let _ = writeln!(out, " good={}i,scrap={}i,state={}i {ns}", r.good, r.scrap, state_code(r.state));
    lines + 1
}

/// Tags in key order (InfluxDB stores them sorted; sorted input is cheaper for it).
fn reading_tags(out: &mut String, r: &ReadingRef<'_>) {
    tag(out, "device", r.device);
    if let Some(o) = r.order {
        tag(out, "order", o);
    }
    tag(out, "work_center", r.work_center);
}

/// Writes a `mes_state` line for a state change at `ts_ms`.
pub fn state(out: &mut String, work_center: &str, s: MachineState, reason: Option<&str>, ts_ms: i64) {
    out.push_str(STATE);
    if let Some(r) = reason {
        tag(out, "reason", r);
    }
    tag(out, "state", s.as_str());
    tag(out, "work_center", work_center);
    let _ = writeln!(out, " code={}i {}", state_code(s), ts_ms.saturating_mul(1_000_000));
}

/// `,key=value`; an empty value is left out (line protocol forbids empty tag values).
fn tag(out: &mut String, key: &str, value: &str) {
    if value.is_empty() {
        return;
    }
    out.push(',');
    out.push_str(key);
    out.push('=');
    escape(out, value);
}

/// Escapes a tag value or field key: `,`, `=` and space get a backslash; control
/// characters and backslashes (which could escape the delimiter after them) become `_`.
fn escape(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            ',' | '=' | ' ' => {
                out.push('\\');
                out.push(c);
            }
            '\\' => out.push('_'),
            c if c.is_control() => out.push('_'),
            c => out.push(c),
        }
    }
}

/// One work center's minute: the inputs of its `mes_oee` point.
#[derive(Debug, Clone, PartialEq)]
pub struct Minute {
    pub work_center: String,
    /// Start of the minute, ms since the epoch (a multiple of 60 000).
    pub start_ms: i64,
    pub good: i64,
    pub scrap: i64,
    /// Time in `running` within the minute.
    pub running_ms: i64,
    /// The state at the end of the minute.
    pub state_end: MachineState,
    pub ideal_cycle_ms: i64,
    /// Planned busy time (the minute less `stopped`) and run time (planned less breakdowns
    /// and setup), as `mes_actors::oee` defines them for the API's OEE.
    pub planned_busy_ms: i64,
    pub run_ms: i64,
}

/// Length of a rollup period.
pub const MINUTE_MS: i64 = 60_000;

impl Minute {
    /// The minute `time_ms` falls in.
    pub fn start_of(time_ms: i64) -> i64 {
        time_ms.div_euclid(MINUTE_MS) * MINUTE_MS
    }

    /// The API's OEE definitions (ISO 22400, `mes_actors::oee`) over one minute:
    /// availability (run / planned busy time), performance (ideal cycle × units / run
    /// time), quality (good / units) and OEE (ideal cycle × good / planned busy time, their
    /// product); each `None` when its denominator is 0. Each is one division of exact
    /// integers, so the value is the same wherever it is computed.
    pub fn ratios(&self) -> (Option<f64>, Option<f64>, Option<f64>, Option<f64>) {
        let units = self.good + self.scrap;
        let planned = (self.planned_busy_ms > 0).then_some(self.planned_busy_ms as f64);
        let availability = planned.map(|p| self.run_ms as f64 / p);
        let performance = (self.run_ms > 0).then(|| (self.ideal_cycle_ms * units) as f64 / self.run_ms as f64);
        let quality = (units > 0).then(|| self.good as f64 / units as f64);
        let oee = planned.map(|p| (self.ideal_cycle_ms * self.good) as f64 / p);
        (availability, performance, quality, oee)
    }

    /// Writes the `mes_oee` line.
    pub fn write(&self, out: &mut String) {
        let (availability, performance, quality, oee) = self.ratios();
        out.push_str(OEE);
        tag(out, "work_center", &self.work_center);
        let _ = write!(out, " good={}i,scrap={}i,running_s={}", self.good, self.scrap, self.running_ms as f64 / 1000.0);
        if let Some(a) = availability {
            let _ = write!(out, ",availability={a}");
        }
        if let Some(p) = performance {
            let _ = write!(out, ",performance={p}");
        }
        if let Some(q) = quality {
            let _ = write!(out, ",quality={q}");
        }
        if let Some(o) = oee {
            let _ = write!(out, ",oee={o}");
        }
        let _ = writeln!(out, ",state={}i {}", state_code(self.state_end), self.start_ms.saturating_mul(1_000_000));
    }
}

/// Time in `running` within `[start, start + MINUTE_MS)`: `before` is the state at the
/// start (the last change before it), `changes` the changes inside, in time order.
/// Returns the running time and the state at the end.
pub fn running_in_minute(start: i64, before: MachineState, changes: &[(i64, MachineState)]) -> (i64, MachineState) {
    let end = start + MINUTE_MS;
    let (mut at, mut state, mut running) = (start, before, 0);
    for &(t, s) in changes {
        let t = t.clamp(start, end);
        if state == MachineState::Running {
            running += t - at;
        }
        at = t;
        state = s;
    }
    if state == MachineState::Running {
        running += end - at;
    }
    (running, state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use MachineState::*;

    #[test]
    fn reading_lines_escape_and_order_tags() {
        let mut m = BTreeMap::new();
        m.insert("temp c".to_string(), 71.5);
        m.insert("p,x=1".to_string(), -0.25);
        m.insert(String::new(), 1.0);
        let r = ReadingRef {
            work_center: "PRESS-1",
            device: "press 01",
            order: Some("PO=1"),
            seq: 1_000_042,
            time_ms: 1_795_600_800_123,
            good: 3,
            scrap: 0,
            state: Running,
            metrics: &m,
        };
        let mut out = String::new();
        assert_eq!(reading(&mut out, &r), 2);
        assert_eq!(reading_points(&m), 2);
        assert_eq!(
            out,
            "mes_telemetry,device=press\\ 01,order=PO\\=1,work_center=PRESS-1 p\\,x\\=1=-0.25,temp\\ c=71.5 1795600800123000042\n\
             mes_counts,device=press\\ 01,order=PO\\=1,work_center=PRESS-1 good=3i,scrap=0i,state=1i 1795600800123000042\n"
        );
    }

    #[test]
    fn no_metrics_no_telemetry_line_and_hostile_names_stay_on_one_line() {
        let m = BTreeMap::new();
        let r = ReadingRef {
            work_center: "W",
            device: "d\\",
            order: None,
            seq: 7,
            time_ms: 5,
            good: 0,
            scrap: 2,
            state: Down,
            metrics: &m,
        };
        let mut out = String::new();
        assert_eq!(reading(&mut out, &r), 1);
        assert_eq!(out, "mes_counts,device=d_,work_center=W good=0i,scrap=2i,state=3i 5000007\n");
        let mut out = String::new();
        state(&mut out, "W", Down, Some("jam\nx"), 1_000);
        assert_eq!(out, "mes_state,reason=jam_x,state=down,work_center=W code=3i 1000000000\n");
    }

    #[test]
    fn minute_ratios_are_exact_and_optional_without_inputs() {
        let m = Minute {
            work_center: "W".into(),
            start_ms: 120_000,
            good: 36,
            scrap: 12,
            running_ms: 48_000,
            state_end: Down,
            ideal_cycle_ms: 1000,
            planned_busy_ms: 60_000,
            run_ms: 48_000,
        };
        assert_eq!(m.ratios(), (Some(0.8), Some(1.0), Some(0.75), Some(0.6)));
        let mut out = String::new();
        m.write(&mut out);
        assert_eq!(
            out,
            "mes_oee,work_center=W good=36i,scrap=12i,running_s=48,availability=0.8,performance=1,quality=0.75,oee=0.6,state=3i 120000000000\n"
        );
        let idle = Minute { good: 0, scrap: 0, running_ms: 0, run_ms: 0, ..m.clone() };
        assert_eq!(idle.ratios(), (Some(0.0), None, None, Some(0.0)));
        // A minute all in planned downtime (`stopped`) has no availability and no OEE.
        let planned_off = Minute { good: 0, scrap: 0, running_ms: 0, run_ms: 0, planned_busy_ms: 0, ..m };
        assert_eq!(planned_off.ratios(), (None, None, None, None));
        assert_eq!(Minute::start_of(-1), -60_000);
        assert_eq!(Minute::start_of(119_999), 60_000);
    }

    #[test]
    fn running_time_follows_the_state_timeline() {
        assert_eq!(running_in_minute(0, Stopped, &[]), (0, Stopped));
        assert_eq!(running_in_minute(0, Running, &[]), (60_000, Running));
        assert_eq!(running_in_minute(0, Running, &[(48_000, Down)]), (48_000, Down));
        assert_eq!(running_in_minute(60_000, Down, &[(60_000, Running), (108_000, Down)]), (48_000, Down));
        assert_eq!(
            running_in_minute(0, Idle, &[(10_000, Running), (20_000, Idle), (50_000, Running)]),
            (20_000, Running)
        );
    }
}
