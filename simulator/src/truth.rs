//! The truth file (CONTRACT §7) and the [`Ledger`], which counts published telemetry the
//! way the MES does, so the truth can be checked against what was actually sent.

use crate::model::Telemetry;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What really happened during a run. Maps are ordered, so the same run always gives
/// the same bytes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Truth {
    pub seed: u64,
    pub work_centers: BTreeMap<String, WorkCenterTruth>,
    pub orders: BTreeMap<String, OrderTruth>,
    /// Material consumed (BOM × (good + scrap)), per sku.
    pub consumed: BTreeMap<String, u64>,
    /// Final level of each buffer (initial + good in − consumed out).
    pub buffers: BTreeMap<String, u64>,
    /// The device and network faults the scenario scheduled (an addition to CONTRACT §7).
    #[serde(default)]
    pub faults: FaultTruth,
    /// The promo demand, when the scenario has one (an addition to CONTRACT §7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demand: Option<DemandTruth>,
}

/// How many faults of each kind happened (scheduled in simulated time, so deterministic).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultTruth {
    /// Device reboots, over all devices.
    pub reboots: u64,
    /// Times the simulator's MQTT connection was cut.
    pub mqtt_drops: u64,
    /// Times a Modbus server stopped answering, over all Modbus devices.
    pub modbus_timeouts: u64,
}

/// Sales orders for finished goods during the run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DemandTruth {
    pub sku: String,
    /// Sales orders placed.
    pub requests: u64,
    /// Units asked for, over all sales orders.
    pub requested: u64,
    /// Units the line's own finished stock could cover when each order came (stock not yet
    /// promised to an earlier order); what a planner who saw the line in real time could
    /// promise.
    pub promised: u64,
    /// Sales orders the line's stock could not cover.
    pub short_requests: u64,
    /// The MES's answers to the reservations (`line-sim --mes-http` only; these depend on
    /// how far the MES is behind the line, so they are not part of the deterministic truth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mes: Option<MesDemandTruth>,
}

/// What the MES answered to the promo reservations (`POST /api/v1/reservations`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MesDemandTruth {
    /// Reservations created (201), and their units.
    pub granted_requests: u64,
    pub granted: u64,
    /// Reservations refused because `available` was short (409).
    pub refused_requests: u64,
    /// Requests that got no answer or another status.
    pub failed_requests: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkCenterTruth {
    pub good: u64,
    pub scrap: u64,
    /// Simulated seconds in which the device reported `running`.
    pub running_s: f64,
    /// Simulated seconds in which the device reported `down` (breakdowns, reboots).
    pub down_s: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderTruth {
    pub good: u64,
    pub scrap: u64,
}

impl Truth {
    /// Pretty JSON with a final newline.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

#[derive(Debug, Clone)]
struct Cursor {
    boot: u64,
    seq: u64,
    good: u64,
    scrap: u64,
}

/// Counts telemetry as the MES does (CONTRACT §4): per device, a reading at or below the
/// last `(boot, seq)` counts nothing; a new boot counts its totals from 0; otherwise the
/// increase counts. Output goes to the reading's order, or the last order named.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    cursors: BTreeMap<String, Cursor>,
    current_order: BTreeMap<String, String>,
    /// (good, scrap) per work center.
    pub work_centers: BTreeMap<String, (u64, u64)>,
    /// (good, scrap) per order.
    pub orders: BTreeMap<String, (u64, u64)>,
    pub counted: u64,
    pub stale: u64,
}

impl Ledger {
    /// Counts one message, in the order the broker delivers it.
    pub fn record(&mut self, t: &Telemetry) {
        let (good, scrap) = match self.cursors.get(&t.device) {
            Some(c) if (t.boot, t.seq) <= (c.boot, c.seq) => {
                self.stale += 1;
                return;
            }
            Some(c) if t.boot == c.boot && t.good >= c.good && t.scrap >= c.scrap => {
                (t.good - c.good, t.scrap - c.scrap)
            }
            _ => (t.good, t.scrap),
        };
        self.counted += 1;
        self.cursors.insert(t.device.clone(), Cursor { boot: t.boot, seq: t.seq, good: t.good, scrap: t.scrap });
        let wc = self.work_centers.entry(t.work_center.clone()).or_default();
        wc.0 += good;
        wc.1 += scrap;
        if let Some(o) = &t.order {
            self.current_order.insert(t.device.clone(), o.clone());
        }
        if let Some(o) = self.current_order.get(&t.device) {
            let e = self.orders.entry(o.clone()).or_default();
            e.0 += good;
            e.1 += scrap;
        }
    }

    /// Where the counted telemetry disagrees with `truth` (work centers in `devices`,
    /// the ones that publish, and all orders); empty when it agrees exactly.
    pub fn differences<'a>(&self, truth: &Truth, publishing: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let mut out = Vec::new();
        for wc in publishing {
            let want = truth.work_centers.get(wc).map(|t| (t.good, t.scrap)).unwrap_or_default();
            let got = self.work_centers.get(wc).copied().unwrap_or_default();
            if want != got {
                out.push(format!("{wc}: truth good/scrap {want:?}, telemetry says {got:?}"));
            }
        }
        let mut orders: Vec<&String> = truth.orders.keys().chain(self.orders.keys()).collect();
        orders.sort();
        orders.dedup();
        for o in orders {
            let want = truth.orders.get(o).map(|t| (t.good, t.scrap)).unwrap_or_default();
            let got = self.orders.get(o).copied().unwrap_or_default();
            if want != got {
                out.push(format!("order {o}: truth good/scrap {want:?}, telemetry says {got:?}"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::State;

    fn t(boot: u64, seq: u64, good: u64, scrap: u64, order: Option<&str>) -> Telemetry {
        Telemetry {
            device: "d".into(),
            work_center: "WC".into(),
            boot,
            seq,
            sim_ms: 0,
            state: State::Running,
            good,
            scrap,
            order: order.map(str::to_string),
            reason: None,
            metrics: BTreeMap::new(),
        }
    }

    #[test]
    fn counts_like_the_mes() {
        let mut l = Ledger::default();
        for m in [
            t(1, 1, 5, 0, Some("A")),
            t(1, 3, 9, 1, None),
            t(1, 2, 7, 0, None), // out of order: stale
            t(1, 3, 9, 1, None), // duplicate: stale
            t(2, 1, 2, 0, Some("B")),
            t(2, 2, 4, 1, None),
        ] {
            l.record(&m);
        }
        assert_eq!(l.work_centers["WC"], (13, 2));
        assert_eq!(l.orders["A"], (9, 1));
        assert_eq!(l.orders["B"], (4, 1));
        assert_eq!((l.counted, l.stale), (4, 2));
    }

    #[test]
    fn truth_json_is_stable() {
        let mut truth = Truth { seed: 7, ..Truth::default() };
        truth.consumed.insert("Z".into(), 1);
        truth.consumed.insert("A".into(), 2);
        truth.work_centers.insert("WC".into(), WorkCenterTruth { good: 1, scrap: 0, running_s: 3600.1, down_s: 0.0 });
        let json = truth.to_json();
        assert!(json.find("\"A\"") < json.find("\"Z\""));
        assert!(json.contains("3600.1"));
        let back: Truth = serde_json::from_str(&json).expect("round trip");
        assert_eq!(back, truth);
        let keys: Vec<usize> = ["\"seed\"", "\"work_centers\"", "\"orders\"", "\"consumed\""]
            .iter()
            .filter_map(|k| json.find(k))
            .collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{json}");
    }
}
