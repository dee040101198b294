//! The counts behind the live OEE, kept from new telemetry rows only.
//!
//! The live OEE of every work center is refreshed every few seconds over the last hour.
//! Read from the `telemetry` table each time, that was every reading of the hour for every
//! work center: with 300 work centers at one reading a second (1.1 million rows), an idle
//! MES spent over half a core on it, and a surge multiplies the rows. [`LiveCounts`] keeps
//! per work center the good units per minute and the scrap per second (scrap is rare, and
//! its second decides whether it was a start-up reject) of the window, and takes only the
//! rows committed since the last refresh, by row id (`db::planner`). Pure: the caller reads
//! the rows and feeds them in.
//!
//! The live window is whole minutes: from the start of the minute an hour before its end,
//! so every minute's good units fall wholly inside or outside it (60 to 61 minutes long;
//! `window_s` says which). A single node only: its one writer assigns row ids in commit
//! order. A cluster's nodes commit concurrently, so a row with a lower id can appear after
//! a higher one; there each refresh reads the window from the table, as before.

use mes_actors::oee::Count;
use std::collections::{BTreeMap, HashMap};

const MINUTE_MS: i64 = 60_000;
/// Scrap entries (distinct seconds) kept per work center; beyond it a minute's scrap is
/// kept at the minute's start (its totals stay exact, the start-up split coarsens).
const MAX_SCRAP_SECONDS: usize = 300;

/// One work center's counts.
#[derive(Default, Debug)]
struct WcCounts {
    /// Good units per minute (ms at the minute's start).
    good: BTreeMap<i64, u64>,
    /// Scrap per second (ms at the second's start).
    scrap: BTreeMap<i64, u64>,
    /// The latest time (device time, else receive time) of its readings seen.
    latest_ms: Option<i64>,
}

/// Live counts per work center, fed with committed telemetry rows in id order.
#[derive(Default, Debug)]
pub struct LiveCounts {
    wcs: HashMap<String, WcCounts>,
    /// The highest row id taken in; `None` until the first fill.
    pub last_id: Option<i64>,
}

/// The start of the live window ending at `to_ms` (see the module's documentation).
pub fn window_start(to_ms: i64, window_ms: i64) -> i64 {
    (to_ms - window_ms).div_euclid(MINUTE_MS) * MINUTE_MS
}

impl LiveCounts {
    /// Takes in one committed reading: `ts_ms` its device time (receive time where none).
    pub fn add(&mut self, wc: &str, ts_ms: i64, good: u64, scrap: u64) {
        let c = match self.wcs.get_mut(wc) {
            Some(c) => c,
            None => self.wcs.entry(wc.to_string()).or_default(),
        };
        c.latest_ms = Some(c.latest_ms.map_or(ts_ms, |l| l.max(ts_ms)));
        if good > 0 {
            *c.good.entry(ts_ms.div_euclid(MINUTE_MS) * MINUTE_MS).or_default() += good;
        }
        if scrap > 0 {
            let second = ts_ms.div_euclid(1000) * 1000;
            let at = if c.scrap.len() < MAX_SCRAP_SECONDS || c.scrap.contains_key(&second) {
                second
            } else {
                second.div_euclid(MINUTE_MS) * MINUTE_MS
            };
            *c.scrap.entry(at).or_default() += scrap;
        }
    }

    /// Takes in good units already summed per minute (`minute_ms` a minute's start), with
    /// the latest reading time among them: the same as [`LiveCounts::add`] of each reading.
    pub fn add_good(&mut self, wc: &str, minute_ms: i64, good: u64, latest_ms: i64) {
        debug_assert_eq!(minute_ms.rem_euclid(MINUTE_MS), 0, "a minute's start");
        let c = match self.wcs.get_mut(wc) {
            Some(c) => c,
            None => self.wcs.entry(wc.to_string()).or_default(),
        };
        c.latest_ms = Some(c.latest_ms.map_or(latest_ms, |l| l.max(latest_ms)));
        if good > 0 {
            *c.good.entry(minute_ms).or_default() += good;
        }
    }

    /// The latest reading time of a work center seen.
    pub fn latest(&self, wc: &str) -> Option<i64> {
        self.wcs.get(wc).and_then(|c| c.latest_ms)
    }

    /// The counts in `[from, to)` as the OEE computation takes them (`from` a minute's
    /// start: [`window_start`]).
    pub fn counts(&self, wc: &str, from: i64, to: i64) -> Vec<Count> {
        debug_assert_eq!(from.rem_euclid(MINUTE_MS), 0, "the live window starts on a minute");
        let Some(c) = self.wcs.get(wc) else { return Vec::new() };
        let good = c.good.range(from..to).map(|(&ts_ms, &good)| Count { ts_ms, good, scrap: 0 });
        let scrap = c.scrap.range(from..to).map(|(&ts_ms, &scrap)| Count { ts_ms, good: 0, scrap });
        let mut out: Vec<Count> = good.chain(scrap).collect();
        out.sort_by_key(|c| c.ts_ms);
        out
    }

    /// Forgets a work center's counts before `before_ms` (they left its window).
    pub fn prune(&mut self, wc: &str, before_ms: i64) {
        if let Some(c) = self.wcs.get_mut(wc) {
            c.good = c.good.split_off(&before_ms);
            c.scrap = c.scrap.split_off(&before_ms);
        }
    }

    /// Minutes and scrap seconds held, over all work centers (bounded by the window).
    pub fn entries(&self) -> usize {
        self.wcs.values().map(|c| c.good.len() + c.scrap.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    #[test]
    fn the_window_starts_on_the_minute_an_hour_before() {
        assert_eq!(window_start(10 * H + 90_500, H), 9 * H + 60_000);
        assert_eq!(window_start(10 * H, H), 9 * H);
        // Before the epoch too (device clocks are not trusted).
        assert_eq!(window_start(-1, H), -H - 60_000);
    }

    #[test]
    fn counts_sum_per_minute_and_keep_scrap_to_the_second() {
        let mut l = LiveCounts::default();
        l.add("A", 9 * H + 59_000, 7, 0); // before the window below
        l.add("A", 9 * H + 60_000, 2, 0);
        l.add("A", 9 * H + 61_500, 3, 1);
        l.add("A", 9 * H + 119_999, 4, 2);
        l.add("A", 10 * H + 30_000, 5, 0);
        l.add("B", 9 * H + 60_000, 100, 0);
        let from = window_start(10 * H + 60_000, H);
        assert_eq!(from, 9 * H + 60_000);
        let c = l.counts("A", from, 10 * H + 60_000);
        let got: Vec<(i64, u64, u64)> = c.iter().map(|c| (c.ts_ms - 9 * H, c.good, c.scrap)).collect();
        assert_eq!(got, vec![(60_000, 9, 0), (61_000, 0, 1), (119_000, 0, 2), (H, 5, 0)]);
        assert_eq!(l.latest("A"), Some(10 * H + 30_000));
        assert_eq!(l.latest("C"), None);
        assert!(l.counts("C", from, 10 * H).is_empty());
        // The same totals as the readings in the window: good 2 + 3 + 4 + 5, scrap 3.
        assert_eq!(c.iter().map(|c| c.good).sum::<u64>(), 14);
        assert_eq!(c.iter().map(|c| c.scrap).sum::<u64>(), 3);
    }

    #[test]
    fn good_summed_per_minute_counts_as_its_readings() {
        let readings = [("A", 9 * H + 60_000, 2, 0), ("A", 9 * H + 61_500, 3, 1), ("A", 9 * H + 119_999, 4, 0)];
        let mut each = LiveCounts::default();
        for (wc, ts, g, s) in readings {
            each.add(wc, ts, g, s);
        }
        let mut summed = LiveCounts::default();
        summed.add_good("A", 9 * H + 60_000, 9, 9 * H + 119_999);
        summed.add("A", 9 * H + 61_500, 0, 1);
        let from = window_start(10 * H, H);
        assert_eq!(summed.counts("A", from, 10 * H), each.counts("A", from, 10 * H));
        assert_eq!(summed.latest("A"), Some(9 * H + 119_999));
        assert_eq!(summed.entries(), 2);
        // A minute with no good units still moves the latest time, and holds nothing.
        summed.add_good("A", 10 * H, 0, 10 * H + 5);
        assert_eq!((summed.latest("A"), summed.entries()), (Some(10 * H + 5), 2));
    }

    #[test]
    fn pruning_forgets_only_what_left_the_window() {
        let mut l = LiveCounts::default();
        for m in 0..120 {
            l.add("A", m * MINUTE_MS, 1, u64::from(m % 10 == 0));
        }
        assert_eq!(l.entries(), 120 + 12);
        l.prune("A", 60 * MINUTE_MS);
        assert_eq!(l.entries(), 60 + 6);
        let c = l.counts("A", 0, 200 * MINUTE_MS);
        assert_eq!(c.first().map(|c| c.ts_ms), Some(60 * MINUTE_MS));
        // The latest time outlives pruning.
        l.prune("A", 1_000 * MINUTE_MS);
        assert_eq!((l.entries(), l.latest("A")), (0, Some(119 * MINUTE_MS)));
    }

    #[test]
    fn scrap_beyond_its_bound_is_kept_per_minute_with_exact_totals() {
        let mut l = LiveCounts::default();
        let n = MAX_SCRAP_SECONDS as i64 + 100;
        for s in 0..n {
            l.add("A", s * 1000, 0, 1);
        }
        let c = l.counts("A", 0, n * 1000);
        assert_eq!(c.iter().map(|c| c.scrap).sum::<u64>(), n as u64);
        assert!(l.entries() <= MAX_SCRAP_SECONDS + 2);
    }
}
