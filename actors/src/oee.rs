//! Overall equipment effectiveness (ISO 22400) over a time window, with the six big losses.
//!
//! Pure: a state timeline and production counts in, an [`Oee`] report out. All times are
//! milliseconds since the epoch (`i64`); the window is half-open, `[from_ms, to_ms)`.
//!
//! # The timeline
//!
//! [`timeline`] turns "the state in force at `from_ms`" plus a list of state changes into
//! contiguous [`Interval`]s that exactly cover the window:
//!
//! - changes are sorted by time (stably: of several changes at the same instant the last
//!   one given wins, the others last zero time);
//! - changes at or after `to_ms` are ignored;
//! - changes before `from_ms` are ignored, except that when the state at `from_ms` is not
//!   given the latest of them is taken as that state; with neither, the machine is taken to
//!   be `stopped` (no reason);
//! - a change to the same state and reason as the one in force is no change; adjacent
//!   intervals with the same state and reason are merged.
//!
//! # Definitions
//!
//! - **Planned downtime**: time in `stopped`. It is not planned production time, so it is
//!   no loss: `planned_busy_ms = window − stopped`.
//! - **Availability losses**
//!   - *breakdowns*: time in `down`, plus every `idle` stop at least
//!     [`OeeParams::micro_stop_ms`] long (an unplanned stop). An idle stop is a maximal run
//!     of adjacent `idle` intervals, whatever their reasons; a stop cut by a window edge is
//!     classified by its length inside the window (its full length may be unknown).
//!   - *setup_changeover*: time in `setup`.
//! - `run_ms = planned_busy − breakdowns − setup`: running time plus micro stops.
//! - **Performance losses**
//!   - *micro_stops*: idle stops shorter than `micro_stop_ms`.
//!   - *reduced_speed*: `run_ms − micro_stops − ideal_cycle × (good + scrap)`, floored at 0.
//! - **Quality losses** (in units, and as time `units × ideal_cycle_ms`)
//!   - *startup_rejects*: scrap counted within [`OeeParams::startup_window_ms`] after a
//!     transition into `running` from `setup`, `down` or `stopped` (not from `idle`). A
//!     change into `running` exactly at `from_ms` is such a transition when the state before
//!     it (given, inferred or the default `stopped`) is one of those.
//!   - *production_rejects*: all other scrap.
//! - **Ratios**
//!   - availability = `run_ms / planned_busy_ms`;
//!   - performance = `ideal_cycle_ms × (good + scrap) / run_ms`. Not capped: above 1 means
//!     the ideal cycle is set slower than the machine really runs and should be corrected;
//!   - quality = `good / (good + scrap)`;
//!   - oee = `ideal_cycle_ms × good / planned_busy_ms`, which equals
//!     availability × performance × quality whenever those three are defined; when only
//!     quality is undefined (nothing counted) it is 0, as nothing was made in planned time.
//!
//!   A ratio whose denominator is 0 is `None` (JSON `null`), never NaN. Nothing is rounded
//!   inside; [`round_ratio`] and [`Oee::rounded`] round to 4 decimals for display.
//!
//! Counts are increments `(ts_ms, good, scrap)`; those outside the window are ignored.
//! Counts are taken as they come, whatever the state at their time.
//!
//! With no reduced-speed flooring, the losses add up to the planned busy time:
//! `planned_busy = ideal × good + breakdowns + setup + micro_stops + reduced_speed +
//! ideal × scrap`.

use crate::reading::MachineState;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Default shortest idle stop that counts as a breakdown rather than a micro stop: 5 min.
pub const DEFAULT_MICRO_STOP_MS: i64 = 300_000;
/// Default time after a start-up during which scrap is a start-up reject: 10 min.
pub const DEFAULT_STARTUP_WINDOW_MS: i64 = 600_000;

/// Tunable thresholds of the loss classification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OeeParams {
    /// Idle stops at least this long are breakdowns, shorter ones micro stops.
    pub micro_stop_ms: i64,
    /// Scrap within this long after a start-up is a start-up reject.
    pub startup_window_ms: i64,
}

impl Default for OeeParams {
    fn default() -> Self {
        Self { micro_stop_ms: DEFAULT_MICRO_STOP_MS, startup_window_ms: DEFAULT_STARTUP_WINDOW_MS }
    }
}

/// A state and its reason code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateAt {
    pub state: MachineState,
    pub reason: Option<String>,
}

/// The machine entered `state` (for `reason`) at `ts_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChange {
    pub ts_ms: i64,
    pub state: MachineState,
    pub reason: Option<String>,
}

/// Units counted at `ts_ms` (increments, not cumulative counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Count {
    pub ts_ms: i64,
    pub good: u64,
    pub scrap: u64,
}

/// A stretch `[start_ms, end_ms)` of one state and reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interval {
    pub start_ms: i64,
    pub end_ms: i64,
    pub state: MachineState,
    pub reason: Option<String>,
    /// The state in force just before `start_ms` (for the first interval: before the
    /// window, or at it when no change happens at `from_ms`). Equal to `state` when only
    /// the reason changed or when nothing changed at the window start.
    pub previous: MachineState,
}

impl Interval {
    pub fn duration_ms(&self) -> i64 {
        self.end_ms - self.start_ms
    }
}

/// Everything [`oee`] needs about one work center and window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OeeInput<'a> {
    pub from_ms: i64,
    pub to_ms: i64,
    /// The state in force at `from_ms`, if known.
    pub initial: Option<&'a StateAt>,
    /// State changes, in any order; those outside the window are handled as documented.
    pub changes: &'a [StateChange],
    /// Production increments; those outside the window are ignored.
    pub counts: &'a [Count],
    /// Ideal (fastest sustainable) cycle time per unit, > 0.
    pub ideal_cycle_ms: i64,
}

/// The six big losses. Times in ms, rejects in units and as ideal time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SixBigLosses {
    pub breakdowns_ms: i64,
    pub setup_changeover_ms: i64,
    pub micro_stops_ms: i64,
    pub reduced_speed_ms: i64,
    pub startup_rejects: u64,
    pub production_rejects: u64,
    pub startup_rejects_ms: i64,
    pub production_rejects_ms: i64,
}

/// Total time spent in one non-running state for one reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonTime {
    pub state: MachineState,
    pub reason: Option<String>,
    pub ms: i64,
}

/// The OEE report of one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Oee {
    pub from_ms: i64,
    pub to_ms: i64,
    pub planned_busy_ms: i64,
    /// Planned busy time minus breakdowns and setup: running plus micro stops.
    pub run_ms: i64,
    /// Time in `running` only.
    pub running_ms: i64,
    pub good: u64,
    pub scrap: u64,
    pub availability: Option<f64>,
    pub performance: Option<f64>,
    pub quality: Option<f64>,
    pub oee: Option<f64>,
    pub losses: SixBigLosses,
    /// Time in `stopped`: outside planned production time.
    pub planned_downtime_ms: i64,
    /// Non-running time per state and reason, longest first (ties in the order idle, setup,
    /// down, stopped, then by reason, no reason first).
    pub downtime_by_reason: Vec<ReasonTime>,
}

impl Oee {
    /// The same report with every ratio rounded to 4 decimals, for display.
    pub fn rounded(mut self) -> Self {
        for r in [&mut self.availability, &mut self.performance, &mut self.quality, &mut self.oee] {
            *r = round_ratio(*r);
        }
        self
    }
}

/// Rounds a ratio to 4 decimals (half away from zero); `None` stays `None`.
pub fn round_ratio(x: Option<f64>) -> Option<f64> {
    x.map(|v| (v * 10_000.0).round() / 10_000.0)
}

/// Why an OEE could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OeeError {
    #[error("window ends ({to_ms}) before it starts ({from_ms})")]
    InvalidWindow { from_ms: i64, to_ms: i64 },
    #[error("ideal cycle must be positive, got {0} ms")]
    InvalidIdealCycle(i64),
    #[error("OEE parameters must not be negative")]
    InvalidParams,
}

/// Builds the contiguous intervals covering `[from_ms, to_ms)` (see the module docs for
/// the rules). Empty when the window is empty or inverted.
pub fn timeline(from_ms: i64, to_ms: i64, initial: Option<&StateAt>, changes: &[StateChange]) -> Vec<Interval> {
    if to_ms <= from_ms {
        return Vec::new();
    }
    let mut sorted: Vec<&StateChange> = changes.iter().collect();
    sorted.sort_by_key(|c| c.ts_ms);
    let before: StateAt = match initial {
        Some(s) => s.clone(),
        None => sorted
            .iter()
            .rev()
            .find(|c| c.ts_ms < from_ms)
            .map(|c| StateAt { state: c.state, reason: c.reason.clone() })
            .unwrap_or(StateAt { state: MachineState::Stopped, reason: None }),
    };
    let mut out: Vec<Interval> = Vec::new();
    let mut push = |start_ms: i64, end_ms: i64, cur: &StateAt| {
        if end_ms <= start_ms {
            return;
        }
        match out.last_mut() {
            Some(last) if last.state == cur.state && last.reason == cur.reason && last.end_ms == start_ms => {
                last.end_ms = end_ms;
            }
            last => {
                let previous = last.map(|l| l.state).unwrap_or(before.state);
                out.push(Interval { start_ms, end_ms, state: cur.state, reason: cur.reason.clone(), previous });
            }
        }
    };
    let mut cur = before.clone();
    let mut start = from_ms;
    for c in sorted.into_iter().filter(|c| c.ts_ms >= from_ms && c.ts_ms < to_ms) {
        if c.state == cur.state && c.reason == cur.reason {
            continue;
        }
        push(start, c.ts_ms, &cur);
        start = c.ts_ms;
        cur = StateAt { state: c.state, reason: c.reason.clone() };
    }
    push(start, to_ms, &cur);
    debug_assert_eq!(out.iter().map(Interval::duration_ms).sum::<i64>(), to_ms - from_ms);
    debug_assert!(out.windows(2).all(|w| w[0].end_ms == w[1].start_ms));
    out
}

/// `units × ideal_cycle_ms`, saturating at `i64::MAX`.
fn units_ms(units: u64, ideal_cycle_ms: i64) -> i64 {
    let v = i128::from(units) * i128::from(ideal_cycle_ms);
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn ratio(num: f64, den: i128) -> Option<f64> {
    (den != 0).then(|| num / den as f64)
}

/// Computes the OEE of one window (see the module docs for every definition).
pub fn oee(input: &OeeInput<'_>, params: &OeeParams) -> Result<Oee, OeeError> {
    let OeeInput { from_ms, to_ms, initial, changes, counts, ideal_cycle_ms } = *input;
    if to_ms < from_ms {
        return Err(OeeError::InvalidWindow { from_ms, to_ms });
    }
    if ideal_cycle_ms <= 0 {
        return Err(OeeError::InvalidIdealCycle(ideal_cycle_ms));
    }
    if params.micro_stop_ms < 0 || params.startup_window_ms < 0 {
        return Err(OeeError::InvalidParams);
    }
    let intervals = timeline(from_ms, to_ms, initial, changes);

    // Time per state, idle stops classified, downtime per reason, start-up windows.
    let (mut running, mut idle, mut setup, mut down, mut stopped) = (0i64, 0i64, 0i64, 0i64, 0i64);
    let (mut idle_long, mut micro) = (0i64, 0i64);
    let mut idle_run = 0i64;
    // Keyed by the state's declaration order (idle, setup, down, stopped), then reason.
    let mut by_reason: BTreeMap<(u8, Option<String>), (MachineState, i64)> = BTreeMap::new();
    let mut startups: Vec<i64> = Vec::new();
    let mut close_idle = |idle_run: &mut i64| {
        if *idle_run >= params.micro_stop_ms {
            idle_long += *idle_run;
        } else {
            micro += *idle_run;
        }
        *idle_run = 0;
    };
    for iv in &intervals {
        let d = iv.duration_ms();
        if iv.state != MachineState::Idle && idle_run > 0 {
            close_idle(&mut idle_run);
        }
        match iv.state {
            MachineState::Running => {
                running += d;
                if matches!(iv.previous, MachineState::Setup | MachineState::Down | MachineState::Stopped) {
                    startups.push(iv.start_ms);
                }
            }
            MachineState::Idle => {
                idle += d;
                idle_run += d;
            }
            MachineState::Setup => setup += d,
            MachineState::Down => down += d,
            MachineState::Stopped => stopped += d,
        }
        if iv.state != MachineState::Running {
            by_reason.entry((iv.state as u8, iv.reason.clone())).or_insert((iv.state, 0)).1 += d;
        }
    }
    if idle_run > 0 {
        close_idle(&mut idle_run);
    }
    let window = to_ms - from_ms;
    debug_assert_eq!(running + idle + setup + down + stopped, window);
    debug_assert_eq!(idle_long + micro, idle);

    // Counts.
    let in_startup = |ts: i64| {
        startups.iter().any(|&s| ts >= s && i128::from(ts) < i128::from(s) + i128::from(params.startup_window_ms))
    };
    let (mut good, mut scrap, mut startup_rejects) = (0u64, 0u64, 0u64);
    for c in counts.iter().filter(|c| c.ts_ms >= from_ms && c.ts_ms < to_ms) {
        good = good.saturating_add(c.good);
        scrap = scrap.saturating_add(c.scrap);
        if c.scrap > 0 && in_startup(c.ts_ms) {
            startup_rejects = startup_rejects.saturating_add(c.scrap);
        }
    }
    let production_rejects = scrap - startup_rejects;
    let total = good.saturating_add(scrap);

    let planned_busy = window - stopped;
    let breakdowns = down + idle_long;
    let run = planned_busy - breakdowns - setup;
    debug_assert_eq!(run, running + micro);
    let ideal_total = i128::from(total) * i128::from(ideal_cycle_ms);
    let ideal_good = i128::from(good) * i128::from(ideal_cycle_ms);
    let reduced = (i128::from(run) - i128::from(micro) - ideal_total).max(0);
    let reduced_speed_ms = i64::try_from(reduced).unwrap_or(i64::MAX);

    let availability = ratio(run as f64, i128::from(planned_busy));
    let performance = ratio(ideal_total as f64, i128::from(run));
    let quality = ratio(good as f64, i128::from(total));
    let oee = ratio(ideal_good as f64, i128::from(planned_busy));
    if let (Some(a), Some(p), Some(q), Some(o)) = (availability, performance, quality, oee) {
        debug_assert!((a * p * q - o).abs() <= 1e-9 * o.abs().max(1.0), "A×P×Q = {} ≠ OEE {o}", a * p * q);
    }

    let losses = SixBigLosses {
        breakdowns_ms: breakdowns,
        setup_changeover_ms: setup,
        micro_stops_ms: micro,
        reduced_speed_ms,
        startup_rejects,
        production_rejects,
        startup_rejects_ms: units_ms(startup_rejects, ideal_cycle_ms),
        production_rejects_ms: units_ms(production_rejects, ideal_cycle_ms),
    };
    if reduced > 0 {
        // Nothing floored: the losses and the fully productive time fill planned busy time.
        debug_assert_eq!(
            ideal_good
                + i128::from(breakdowns + setup + micro + reduced_speed_ms)
                + i128::from(scrap) * i128::from(ideal_cycle_ms),
            i128::from(planned_busy)
        );
    }

    let mut downtime_by_reason: Vec<ReasonTime> =
        by_reason.into_iter().map(|((_, reason), (state, ms))| ReasonTime { state, reason, ms }).collect();
    // The map iterates by (state, reason); a stable sort by time keeps that order on ties.
    downtime_by_reason.sort_by_key(|r| std::cmp::Reverse(r.ms));

    Ok(Oee {
        from_ms,
        to_ms,
        planned_busy_ms: planned_busy,
        run_ms: run,
        running_ms: running,
        good,
        scrap,
        availability,
        performance,
        quality,
        oee,
        losses,
        planned_downtime_ms: stopped,
        downtime_by_reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use MachineState::{Down, Idle, Running, Setup, Stopped};

    const MIN: i64 = 60_000;

    fn ch(ts_ms: i64, state: MachineState, reason: Option<&str>) -> StateChange {
        StateChange { ts_ms, state, reason: reason.map(str::to_string) }
    }

    fn at(state: MachineState, reason: Option<&str>) -> StateAt {
        StateAt { state, reason: reason.map(str::to_string) }
    }

    fn cnt(ts_ms: i64, good: u64, scrap: u64) -> Count {
        Count { ts_ms, good, scrap }
    }

    fn rt(state: MachineState, reason: Option<&str>, ms: i64) -> ReasonTime {
        ReasonTime { state, reason: reason.map(str::to_string), ms }
    }

    fn run(
        from_ms: i64,
        to_ms: i64,
        initial: Option<&StateAt>,
        changes: &[StateChange],
        counts: &[Count],
        ideal_cycle_ms: i64,
    ) -> Oee {
        let input = OeeInput { from_ms, to_ms, initial, changes, counts, ideal_cycle_ms };
        match oee(&input, &OeeParams::default()) {
            Ok(o) => o,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    fn close(x: Option<f64>, want: f64) -> bool {
        x.is_some_and(|v| (v - want).abs() < 1e-12)
    }

    /// One hour, 10 s ideal cycle, every loss present:
    ///
    /// ```text
    ///   0– 5 min stopped "no-shift"      300 000  planned downtime
    ///   5–15 min setup   "changeover"    600 000  setup/changeover
    ///  15–30 min running                 900 000  start-up (from setup) until 25 min
    ///  30–32 min idle    "jam"           120 000  < 5 min: micro stop
    ///  32–40 min running                 480 000  (from idle: no start-up)
    ///  40–47 min idle    "no-material"   420 000  ≥ 5 min: breakdown
    ///  47–50 min down    "motor"         180 000  breakdown
    ///  50–60 min running                 600 000  start-up (from down) until 60 min
    /// ```
    ///
    /// planned_busy = 3 600 000 − 300 000 = 3 300 000
    /// breakdowns = 420 000 + 180 000 = 600 000; setup = 600 000; micro = 120 000
    /// run = 3 300 000 − 600 000 − 600 000 = 2 100 000 = running 1 980 000 + micro 120 000
    /// counts: 16 min 40+5s (start-up), 26 min 50+2s (after start-up window),
    ///         33 min 40+1s, 51:40 30+4s (start-up) → good 160, scrap 12 (9 start-up, 3 other)
    /// ideal = 10 000 × 172 = 1 720 000
    /// A = 2 100 000 / 3 300 000 = 7/11; P = 1 720 000 / 2 100 000 = 86/105; Q = 160/172 = 40/43
    /// OEE = 10 000 × 160 / 3 300 000 = 16/33 (= 7/11 × 86/105 × 40/43)
    /// reduced speed = 2 100 000 − 120 000 − 1 720 000 = 260 000
    /// check: 1 600 000 + 600 000 + 600 000 + 120 000 + 260 000 + 120 000 = 3 300 000
    #[test]
    fn scripted_hour_with_all_six_losses() {
        let initial = at(Stopped, Some("no-shift"));
        let changes = [
            ch(5 * MIN, Setup, Some("changeover")),
            ch(15 * MIN, Running, None),
            ch(30 * MIN, Idle, Some("jam")),
            ch(32 * MIN, Running, None),
            ch(40 * MIN, Idle, Some("no-material")),
            ch(47 * MIN, Down, Some("motor")),
            ch(50 * MIN, Running, None),
        ];
        let counts = [
            cnt(-1, 5, 5),                 // before the window: ignored
            cnt(16 * MIN, 40, 5),          // start-up reject
            cnt(26 * MIN, 50, 2),          // 25 min + : production reject
            cnt(33 * MIN, 40, 1),          // after a micro stop: production reject
            cnt(51 * MIN + 40_000, 30, 4), // start-up reject
            cnt(60 * MIN, 99, 99),         // at the window end: ignored
        ];
        let o = run(0, 60 * MIN, Some(&initial), &changes, &counts, 10_000);
        assert_eq!((o.from_ms, o.to_ms), (0, 3_600_000));
        assert_eq!(o.planned_downtime_ms, 300_000);
        assert_eq!(o.planned_busy_ms, 3_300_000);
        assert_eq!(o.run_ms, 2_100_000);
        assert_eq!(o.running_ms, 1_980_000);
        assert_eq!((o.good, o.scrap), (160, 12));
        assert_eq!(
            o.losses,
            SixBigLosses {
                breakdowns_ms: 600_000,
                setup_changeover_ms: 600_000,
                micro_stops_ms: 120_000,
                reduced_speed_ms: 260_000,
                startup_rejects: 9,
                production_rejects: 3,
                startup_rejects_ms: 90_000,
                production_rejects_ms: 30_000,
            }
        );
        assert!(close(o.availability, 7.0 / 11.0));
        assert!(close(o.performance, 86.0 / 105.0));
        assert!(close(o.quality, 40.0 / 43.0));
        assert!(close(o.oee, 16.0 / 33.0));
        assert_eq!(
            o.downtime_by_reason,
            vec![
                rt(Setup, Some("changeover"), 600_000),
                rt(Idle, Some("no-material"), 420_000),
                rt(Stopped, Some("no-shift"), 300_000),
                rt(Down, Some("motor"), 180_000),
                rt(Idle, Some("jam"), 120_000),
            ]
        );
        // 7/11 = 0.63636.. → 0.6364; 86/105 = 0.819047.. → 0.819; 40/43 = 0.930232.. → 0.9302;
        // 16/33 = 0.484848.. → 0.4848
        let r = o.rounded();
        assert_eq!(
            (r.availability, r.performance, r.quality, r.oee),
            (Some(0.6364), Some(0.819), Some(0.9302), Some(0.4848))
        );
    }

    #[test]
    fn timeline_covers_the_window_and_remembers_previous_states() {
        let changes = [ch(10, Running, None), ch(20, Running, None), ch(30, Down, Some("x"))];
        let t = timeline(0, 40, Some(&at(Setup, None)), &changes);
        let got: Vec<_> = t.iter().map(|i| (i.start_ms, i.end_ms, i.state, i.previous)).collect();
        // The repeated "running" at 20 is no change.
        assert_eq!(got, vec![(0, 10, Setup, Setup), (10, 30, Running, Setup), (30, 40, Down, Running)]);
        assert!(timeline(5, 5, None, &changes).is_empty());
        assert!(timeline(9, 5, None, &changes).is_empty());
    }

    #[test]
    fn empty_window_has_no_ratios() {
        let o = run(1_000, 1_000, None, &[ch(1_000, Running, None)], &[cnt(1_000, 3, 1)], 1_000);
        assert_eq!((o.planned_busy_ms, o.run_ms, o.good, o.scrap), (0, 0, 0, 0));
        assert_eq!((o.availability, o.performance, o.quality, o.oee), (None, None, None, None));
        assert_eq!(o.losses, SixBigLosses::default());
        assert!(o.downtime_by_reason.is_empty());
    }

    #[test]
    fn all_stopped_is_planned_downtime_only() {
        // Unknown initial state and no changes: stopped for the whole 10 000 ms.
        let o = run(0, 10_000, None, &[], &[cnt(500, 4, 0)], 100);
        assert_eq!((o.planned_downtime_ms, o.planned_busy_ms, o.run_ms), (10_000, 0, 0));
        assert_eq!((o.availability, o.performance, o.oee), (None, None, None));
        assert_eq!(o.quality, Some(1.0), "4 good of 4");
        assert_eq!(o.downtime_by_reason, vec![rt(Stopped, None, 10_000)]);
        assert_eq!(o.losses, SixBigLosses::default());
    }

    #[test]
    fn no_counts_is_zero_performance_and_zero_oee() {
        // Running all 1 000 000 ms, nothing made: A = 1, P = 0, Q undefined, OEE 0.
        // reduced speed = 1 000 000 − 0 − 0 = 1 000 000.
        let o = run(0, 1_000_000, Some(&at(Running, None)), &[], &[], 1_000);
        assert_eq!((o.availability, o.performance, o.quality, o.oee), (Some(1.0), Some(0.0), None, Some(0.0)));
        assert_eq!(o.losses.reduced_speed_ms, 1_000_000);
        assert!(o.downtime_by_reason.is_empty());
    }

    #[test]
    fn unsorted_duplicated_and_out_of_window_changes() {
        // Window [100 000, 200 000). Before it: setup at 0, down at 50 000 (the latest,
        // so the state at the window start). In it, given out of order: running at
        // 120 000, idle at 150 000 then (same instant, given later, wins) running at
        // 150 000, stopped at 190 000. After it: down at 200 000 and 300 000 (ignored).
        let changes = [
            ch(300_000, Down, None),
            ch(150_000, Idle, None),
            ch(120_000, Running, None),
            ch(50_000, Down, Some("jam")),
            ch(190_000, Stopped, None),
            ch(0, Setup, None),
            ch(150_000, Running, None),
            ch(200_000, Down, None),
        ];
        let counts = [cnt(125_000, 10, 2), cnt(199_999, 5, 0), cnt(99_999, 7, 7), cnt(200_000, 7, 7)];
        let o = run(100_000, 200_000, None, &changes, &counts, 1_000);
        // down 20 000, running 70 000, stopped 10 000; planned_busy 90 000, run 70 000
        // good 15, scrap 2 (in the start-up window after down→running at 120 000)
        // A = 70/90 = 7/9; P = 17 000 / 70 000; Q = 15/17; OEE = 15 000 / 90 000 = 1/6
        // reduced = 70 000 − 17 000 = 53 000
        assert_eq!(
            (o.planned_busy_ms, o.run_ms, o.running_ms, o.planned_downtime_ms),
            (90_000, 70_000, 70_000, 10_000)
        );
        assert_eq!((o.good, o.scrap), (15, 2));
        assert_eq!((o.losses.breakdowns_ms, o.losses.startup_rejects, o.losses.production_rejects), (20_000, 2, 0));
        assert_eq!(o.losses.reduced_speed_ms, 53_000);
        assert!(close(o.availability, 7.0 / 9.0));
        assert!(close(o.performance, 17.0 / 70.0));
        assert!(close(o.quality, 15.0 / 17.0));
        assert!(close(o.oee, 1.0 / 6.0));
        assert_eq!(o.downtime_by_reason, vec![rt(Down, Some("jam"), 20_000), rt(Stopped, None, 10_000)]);

        // A known initial state wins over changes before the window.
        let o = run(100_000, 200_000, Some(&at(Running, None)), &changes, &[], 1_000);
        assert_eq!((o.running_ms, o.losses.breakdowns_ms), (90_000, 0));
    }

    #[test]
    fn idle_stops_split_at_the_micro_stop_threshold() {
        // Idle 299 999 ms (micro), idle 300 000 ms (breakdown), then an idle stop of
        // 200 000 + 200 000 ms under two reasons: one 400 000 ms stop (breakdown).
        let changes = [
            ch(0, Idle, None),
            ch(299_999, Running, None),
            ch(400_000, Idle, Some("a")),
            ch(700_000, Running, None),
            ch(800_000, Idle, Some("b")),
            ch(1_000_000, Idle, Some("c")),
            ch(1_200_000, Running, None),
        ];
        let o = run(0, 1_300_000, Some(&at(Running, None)), &changes, &[], 1_000);
        assert_eq!(o.losses.micro_stops_ms, 299_999);
        assert_eq!(o.losses.breakdowns_ms, 300_000 + 400_000);
        // running = 100 001 + 100 000 + 100 000; run = running + micro
        assert_eq!((o.running_ms, o.run_ms), (300_001, 600_000));
    }

    #[test]
    fn idle_cut_by_the_window_is_classified_by_its_clipped_length() {
        // Idle since long before the window; only 120 000 ms of it is inside: micro stop.
        let o = run(0, 1_000_000, None, &[ch(-9_000_000, Idle, None), ch(120_000, Running, None)], &[], 1_000);
        assert_eq!((o.losses.micro_stops_ms, o.losses.breakdowns_ms), (120_000, 0));
    }

    #[test]
    fn startups_come_only_from_setup_down_or_stopped() {
        let counts = [cnt(1_000, 0, 1), cnt(700_000, 0, 1)];
        let start = |initial: MachineState, at_from: Option<MachineState>| {
            let changes: Vec<StateChange> = at_from.map(|s| ch(0, s, None)).into_iter().collect();
            let o = run(0, 1_000_000, Some(&at(initial, None)), &changes, &counts, 1_000);
            (o.losses.startup_rejects, o.losses.production_rejects)
        };
        // Starting at the window start from setup: scrap at 1 000 is a start-up reject,
        // at 700 000 (after 600 000) a production reject.
        assert_eq!(start(Setup, Some(Running)), (1, 1));
        assert_eq!(start(Running, None), (0, 2), "already running: no start-up");
        assert_eq!(start(Idle, Some(Running)), (0, 2), "idle → running is no start-up");
        assert_eq!(start(Stopped, Some(Running)), (1, 1));
        // Unknown initial state counts as stopped.
        let o = run(0, 1_000_000, None, &[ch(0, Running, None)], &counts, 1_000);
        assert_eq!((o.losses.startup_rejects, o.losses.startup_rejects_ms), (1, 1_000));
    }

    #[test]
    fn performance_is_not_capped() {
        // Running 10 000 ms, 20 units at an ideal 1 000 ms: P = 20 000 / 10 000 = 2.
        let o = run(0, 10_000, Some(&at(Running, None)), &[], &[cnt(5_000, 20, 0)], 1_000);
        assert_eq!((o.performance, o.oee, o.losses.reduced_speed_ms), (Some(2.0), Some(2.0), 0));
    }

    #[test]
    fn rejects_bad_input() {
        let input = OeeInput { from_ms: 10, to_ms: 5, initial: None, changes: &[], counts: &[], ideal_cycle_ms: 1 };
        assert_eq!(oee(&input, &OeeParams::default()), Err(OeeError::InvalidWindow { from_ms: 10, to_ms: 5 }));
        let input = OeeInput { to_ms: 20, ideal_cycle_ms: 0, ..input };
        assert_eq!(oee(&input, &OeeParams::default()), Err(OeeError::InvalidIdealCycle(0)));
        let input = OeeInput { ideal_cycle_ms: 1, ..input };
        let params = OeeParams { micro_stop_ms: -1, ..OeeParams::default() };
        assert_eq!(oee(&input, &params), Err(OeeError::InvalidParams));
    }

    #[test]
    fn round_ratio_keeps_four_decimals() {
        assert_eq!(round_ratio(Some(2.0 / 3.0)), Some(0.6667));
        assert_eq!(round_ratio(Some(0.12344)), Some(0.1234));
        assert_eq!(round_ratio(None), None);
    }
}
