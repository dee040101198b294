//! A work center: the device cursor, the machine state and the order being worked on.

use crate::counter::{advance, Advance, Cursor};
use crate::reading::{MachineState, Reading};
use serde::{Deserialize, Serialize};

/// What the store must commit for one counted reading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    pub work_center: String,
    pub device: String,
    pub boot: u64,
    pub seq: u64,
    pub ts_ms: Option<i64>,
    pub good: u64,
    pub scrap: u64,
    /// The order the output is attributed to, if any.
    pub order: Option<String>,
    pub state: MachineState,
    /// The state changed with this reading.
    pub state_changed: bool,
    pub reason: Option<String>,
    pub restarted: bool,
    /// Device time spent running since the previous counted reading (from `ts`; 0 without
    /// timestamps), capped at [`MAX_RUN_GAP_MS`] so an outage is not booked as running.
    pub running_ms: i64,
    /// The device cursor after this reading; committed with it.
    pub cursor: Cursor,
    /// Where counting of the device's previous boot stood after this reading
    /// ([`WorkCenterState::prev_boot`]); committed with the cursor.
    #[serde(default)]
    pub prev_boot: Option<Cursor>,
}

/// Longest gap between two readings that still counts as running time.
pub const MAX_RUN_GAP_MS: i64 = 60_000;

/// The outcome of applying a reading.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Already counted (duplicate, replay, out of order): commit nothing, acknowledge.
    Duplicate,
    Counted(Box<Delta>),
    /// Implausible (more units in one step than the work center's limit): not counted and
    /// the cursor not moved, so nothing is booked silently. The reason says why; the caller
    /// keeps it for review (a dead letter). A glitch that returns to normal counts right on
    /// the next reading; a real jump is booked once the limit is raised (counters are
    /// cumulative, so nothing is lost while held).
    Held(Held),
}

/// A reading held for review.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub device: String,
    pub reason: String,
    /// The reading's identity and counters, as JSON text.
    pub payload: String,
}

/// The in-memory state of one work center, rebuilt from the database on start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkCenterState {
    pub id: String,
    pub device: String,
    pub state: MachineState,
    pub reason: Option<String>,
    pub current_order: Option<String>,
    pub cursor: Option<Cursor>,
    pub good_total: u64,
    pub scrap_total: u64,
    /// Device time of the last counted reading.
    pub last_ts_ms: Option<i64>,
    /// Most units (good + scrap) one reading may add; more is held for review.
    #[serde(default)]
    pub max_step: Option<u64>,
    /// Where counting of the previous boot stopped, kept when the device restarts: a
    /// reading of that boot delivered after the new boot's first one (a broker that
    /// reorders across a reconnect) still counts what it adds. Committed with the device
    /// cursor (each [`Delta`] carries it), so an MES restart keeps it.
    #[serde(default)]
    pub prev_boot: Option<Cursor>,
}

impl WorkCenterState {
    pub fn new(id: impl Into<String>, device: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            device: device.into(),
            state: MachineState::Stopped,
            reason: None,
            current_order: None,
            cursor: None,
            good_total: 0,
            scrap_total: 0,
            last_ts_ms: None,
            max_step: None,
            prev_boot: None,
        }
    }

    /// Applies one reading from this work center's device.
    ///
    /// Output is attributed to the order the reading names, else to the current order; a
    /// reading that names an order makes it the current one.
    pub fn apply(&mut self, r: &Reading) -> Outcome {
        debug_assert_eq!(r.device, self.device, "reading routed to the wrong work center");
        let (good, scrap, next, restarted) = match advance(self.cursor.as_ref(), r.boot, r.seq, r.good, r.scrap) {
            Advance::Stale => return self.late_previous_boot(r),
            Advance::Counted { good, scrap, next, restarted } => (good, scrap, next, restarted),
        };
        if let Some(held) = self.implausible(r, good, scrap) {
            return held;
        }
        if restarted {
            // Keep where the old boot stopped for its late readings (a fall within a boot
            // leaves nothing to continue from).
            self.prev_boot = self.cursor.filter(|c| c.boot < r.boot);
        }
        if let Some(o) = &r.order {
            if self.current_order.as_deref() != Some(o) {
                self.current_order = Some(o.clone());
            }
        }
        let running_ms = match (self.state, self.last_ts_ms, r.ts_ms) {
            (MachineState::Running, Some(prev), Some(now)) if !restarted => {
                now.saturating_sub(prev).clamp(0, MAX_RUN_GAP_MS)
            }
            _ => 0,
        };
        let state = r.state.unwrap_or(self.state);
        let state_changed = state != self.state;
        self.state = state;
        self.reason = r.reason.clone();
        self.cursor = Some(next);
        // Saturating: no input may panic the actor (a limit belongs in `max_step`).
        self.good_total = self.good_total.saturating_add(good);
        self.scrap_total = self.scrap_total.saturating_add(scrap);
        if r.ts_ms.is_some() {
            self.last_ts_ms = r.ts_ms;
        }
        Outcome::Counted(Box::new(Delta {
            work_center: self.id.clone(),
            device: self.device.clone(),
            boot: r.boot,
            seq: r.seq,
            ts_ms: r.ts_ms,
            good,
            scrap,
            order: self.current_order.clone(),
            state,
            state_changed,
            reason: r.reason.clone(),
            restarted,
            running_ms,
            cursor: next,
            prev_boot: self.prev_boot,
        }))
    }

    /// More units in one step than the work center's limit: held for review.
    fn implausible(&self, r: &Reading, good: u64, scrap: u64) -> Option<Outcome> {
        let limit = self.max_step?;
        let step = good.saturating_add(scrap);
        (step > limit).then(|| {
            Outcome::Held(Held {
                device: self.device.clone(),
                reason: format!(
                    "implausible step: {step} units in one reading (boot {}, seq {}) exceeds the limit of {limit} for {}; held for review, nothing booked",
                    r.boot, r.seq, self.id
                ),
                payload: format!(r#"{{"boot":{},"seq":{},"good":{},"scrap":{}}}"#, r.boot, r.seq, r.good, r.scrap),
            })
        })
    }

    /// A reading behind the cursor: a duplicate, unless it belongs to the previous boot and
    /// goes beyond where counting of that boot stopped. Then it counts what it adds (its
    /// delta keeps the current cursor and changes no state: it is old news of output).
    fn late_previous_boot(&mut self, r: &Reading) -> Outcome {
        let Some(p) = self.prev_boot else { return Outcome::Duplicate };
        if r.boot != p.boot || r.seq <= p.seq || r.good < p.good || r.scrap < p.scrap {
            return Outcome::Duplicate;
        }
        let (good, scrap) = (r.good - p.good, r.scrap - p.scrap);
        if let Some(held) = self.implausible(r, good, scrap) {
            return held;
        }
        let Some(cursor) = self.cursor else { return Outcome::Duplicate };
        self.prev_boot = Some(Cursor { boot: r.boot, seq: r.seq, good: r.good, scrap: r.scrap });
        self.good_total = self.good_total.saturating_add(good);
        self.scrap_total = self.scrap_total.saturating_add(scrap);
        Outcome::Counted(Box::new(Delta {
            work_center: self.id.clone(),
            device: self.device.clone(),
            boot: r.boot,
            seq: r.seq,
            ts_ms: r.ts_ms,
            good,
            scrap,
            order: r.order.clone().or_else(|| self.current_order.clone()),
            state: self.state,
            state_changed: false,
            reason: self.reason.clone(),
            restarted: false,
            running_ms: 0,
            cursor,
            prev_boot: self.prev_boot,
        }))
    }

    /// A planner or the device dispatch set the current order.
    pub fn set_order(&mut self, order: Option<String>) {
        self.current_order = order;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A broker that delivers the old boot's last readings after the new boot's first one:
    /// what they add still counts, once.
    #[test]
    fn late_readings_of_the_previous_boot_still_count_once() {
        let mut wc = WorkCenterState::new("PRESS-1", "press-01");
        let counted = |o: Outcome| match o {
            Outcome::Counted(d) => (d.good, d.scrap, d.cursor.boot, d.cursor.seq),
            other => panic!("expected a count, got {other:?}"),
        };
        assert_eq!(counted(wc.apply(&r(1, 1, 10, 1, None))), (10, 1, 1, 1));
        assert_eq!(counted(wc.apply(&r(1, 2, 15, 1, None))), (5, 0, 1, 2));
        // The device restarted; boot 2 arrives before boot 1's seq 3 and 4.
        assert_eq!(counted(wc.apply(&r(2, 1, 4, 0, None))), (4, 0, 2, 1));
        assert_eq!(counted(wc.apply(&r(1, 3, 18, 2, None))), (3, 1, 2, 1), "late: counted, cursor unchanged");
        assert_eq!(wc.apply(&r(1, 3, 18, 2, None)), Outcome::Duplicate);
        assert_eq!(wc.apply(&r(1, 2, 15, 1, None)), Outcome::Duplicate);
        assert_eq!(counted(wc.apply(&r(1, 4, 20, 2, None))), (2, 0, 2, 1));
        // Two boots back is not followed.
        assert_eq!(counted(wc.apply(&r(3, 1, 1, 0, None))), (1, 0, 3, 1));
        assert_eq!(counted(wc.apply(&r(2, 2, 6, 0, None))), (2, 0, 3, 1));
        assert_eq!(wc.apply(&r(1, 5, 25, 2, None)), Outcome::Duplicate);
        assert_eq!((wc.good_total, wc.scrap_total), (10 + 5 + 4 + 3 + 2 + 1 + 2, 1 + 1));
        assert_eq!(wc.cursor.map(|c| (c.boot, c.seq)), Some((3, 1)));
    }

    /// Each delta carries where the previous boot stood after it (committed with the cursor):
    /// a state rebuilt from the last delta counts a late reading as the live one does.
    #[test]
    fn a_delta_carries_the_previous_boot_and_a_rebuilt_state_continues_from_it() {
        let mut wc = WorkCenterState::new("PRESS-1", "press-01");
        let delta = |o: Outcome| match o {
            Outcome::Counted(d) => *d,
            other => panic!("expected a count, got {other:?}"),
        };
        assert_eq!(delta(wc.apply(&r(1, 1, 10, 1, None))).prev_boot, None);
        let first_of_boot_2 = delta(wc.apply(&r(2, 1, 4, 0, None)));
        assert_eq!(first_of_boot_2.prev_boot, Some(Cursor { boot: 1, seq: 1, good: 10, scrap: 1 }));
        let late = delta(wc.apply(&r(1, 2, 13, 1, None)));
        assert_eq!((late.good, late.cursor.boot, late.cursor.seq), (3, 2, 1));
        assert_eq!(late.prev_boot, Some(Cursor { boot: 1, seq: 2, good: 13, scrap: 1 }));
        // A restart rebuilds from what the last delta committed.
        let mut rebuilt = WorkCenterState::new("PRESS-1", "press-01");
        rebuilt.cursor = Some(late.cursor);
        rebuilt.prev_boot = late.prev_boot;
        assert_eq!(rebuilt.apply(&r(1, 2, 13, 1, None)), Outcome::Duplicate);
        assert_eq!(delta(rebuilt.apply(&r(1, 3, 20, 1, None))).good, 7);
        assert_eq!(delta(wc.apply(&r(1, 3, 20, 1, None))).good, 7, "the same as without the restart");
    }

    fn r(boot: u64, seq: u64, good: u64, scrap: u64, order: Option<&str>) -> Reading {
        Reading {
            device: "press-01".into(),
            boot,
            seq,
            ts_ms: None,
            good,
            scrap,
            state: Some(MachineState::Running),
            reason: None,
            order: order.map(str::to_string),
            metrics: BTreeMap::new(),
        }
    }

    #[test]
    fn attributes_to_named_then_current_order() {
        let mut wc = WorkCenterState::new("PRESS-1", "press-01");
        wc.set_order(Some("PO-1".into()));
        let Outcome::Counted(d) = wc.apply(&r(1, 1, 5, 0, None)) else { panic!("expected a count") };
        assert_eq!((d.good, d.order.as_deref(), d.state_changed), (5, Some("PO-1"), true));
        let Outcome::Counted(d) = wc.apply(&r(1, 2, 8, 1, Some("PO-2"))) else { panic!("expected a count") };
        assert_eq!((d.good, d.scrap, d.order.as_deref()), (3, 1, Some("PO-2")));
        assert_eq!(wc.current_order.as_deref(), Some("PO-2"));
        assert_eq!(wc.apply(&r(1, 2, 8, 1, None)), Outcome::Duplicate);
        assert_eq!((wc.good_total, wc.scrap_total), (8, 1));
    }

    #[test]
    fn running_time_comes_from_device_timestamps() {
        let mut wc = WorkCenterState::new("PRESS-1", "press-01");
        let mut at = |seq, ts: i64, state| {
            let mut x = r(1, seq, seq, 0, None);
            x.ts_ms = Some(ts);
            x.state = Some(state);
            match wc.apply(&x) {
                Outcome::Counted(d) => d.running_ms,
                Outcome::Duplicate | Outcome::Held(_) => -1,
            }
        };
        assert_eq!(at(1, 1_000, MachineState::Running), 0);
        assert_eq!(at(2, 3_500, MachineState::Down), 2_500);
        assert_eq!(at(3, 9_000, MachineState::Running), 0, "down time is not running time");
        assert_eq!(at(4, 500_000, MachineState::Running), MAX_RUN_GAP_MS);
    }

    #[test]
    fn an_implausible_step_is_held_and_a_glitch_counts_right_after() {
        let mut wc = WorkCenterState::new("PRESS-1", "press-01");
        wc.max_step = Some(100);
        assert!(matches!(wc.apply(&r(1, 1, 10, 0, None)), Outcome::Counted(_)));
        // A counter glitch of 10^9: held, cursor and totals untouched.
        assert!(matches!(wc.apply(&r(1, 2, 1_000_000_010, 0, None)), Outcome::Held(_)));
        assert_eq!((wc.good_total, wc.cursor.map(|c| c.seq)), (10, Some(1)));
        // Back to normal: the next reading counts its true step.
        let Outcome::Counted(d) = wc.apply(&r(1, 3, 25, 1, None)) else { panic!("expected a count") };
        assert_eq!((d.good, d.scrap), (15, 1));
        // A real jump stays held until the limit is raised, then is booked once.
        assert!(matches!(wc.apply(&r(1, 4, 525, 1, None)), Outcome::Held(_)));
        assert!(matches!(wc.apply(&r(1, 5, 530, 1, None)), Outcome::Held(_)));
        wc.max_step = Some(1_000);
        let Outcome::Counted(d) = wc.apply(&r(1, 6, 531, 1, None)) else { panic!("expected a count") };
        assert_eq!(d.good, 506);
        assert_eq!((wc.good_total, wc.scrap_total), (531, 1));
    }

    /// Seeded random readings, extreme values included, never panic the state machine,
    /// and totals never run backwards.
    #[test]
    fn random_and_extreme_readings_never_panic() {
        let mut seed = 0x5eed_u64;
        let mut next = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            seed >> 11
        };
        let extremes = [0, 1, u64::MAX, u64::MAX - 1, 1 << 63, 1 << 32];
        let times = [i64::MIN, i64::MAX, 0, -1, 1_795_600_800_000];
        let mut wc = WorkCenterState::new("PRESS-1", "press-01");
        let (mut g, mut s) = (0u64, 0u64);
        for i in 0..20_000u64 {
            let pick =
                |n: u64, r: u64| if r.is_multiple_of(7) { extremes[(r as usize / 7) % extremes.len()] } else { n };
            let mut x =
                r(next() % 4, pick(i, next()), pick(next() % 1_000_000, next()), pick(next() % 1000, next()), None);
            x.ts_ms = if next().is_multiple_of(3) {
                Some(times[(next() % 5) as usize])
            } else {
                Some((next() % 1_000_000) as i64)
            };
            x.state = Some([MachineState::Running, MachineState::Idle, MachineState::Down][(next() % 3) as usize]);
            if next() % 5 == 0 {
                wc.max_step = Some(next() % 10_000 + 1);
            }
            let _ = wc.apply(&x);
            assert!(wc.good_total >= g && wc.scrap_total >= s, "totals ran backwards at {i}");
            (g, s) = (wc.good_total, wc.scrap_total);
        }
    }

    #[test]
    fn restart_loses_and_doubles_nothing() {
        let mut wc = WorkCenterState::new("PRESS-1", "press-01");
        wc.apply(&r(1, 1, 10, 1, None));
        wc.apply(&r(1, 2, 20, 2, None));
        wc.apply(&r(2, 1, 4, 0, None));
        wc.apply(&r(1, 3, 99, 9, None)); // late message of the old boot: what it adds counts
        wc.apply(&r(1, 3, 99, 9, None)); // once
        wc.apply(&r(2, 2, 9, 1, None));
        assert_eq!((wc.good_total, wc.scrap_total), (20 + 79 + 9, 2 + 7 + 1));
    }
}
