//! Cumulative counters into exact deltas.
//!
//! A device reports `good`/`scrap` as totals since its `boot`, with `seq` growing within a
//! boot. The [`Cursor`] is the high-water mark of what has been counted for a device. A
//! reading at or below the cursor is a duplicate, a replay or out of order: it carries no
//! news, because a later reading's totals include it. A reading above the cursor counts
//! the difference, so a lost reading loses nothing that a later one carries.

use serde::{Deserialize, Serialize};

/// What has been counted for one device so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub boot: u64,
    pub seq: u64,
    pub good: u64,
    pub scrap: u64,
}

/// The result of offering a reading to a cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advance {
    /// At or behind the cursor: changes nothing.
    Stale,
    /// New: count these deltas and move the cursor.
    Counted {
        good: u64,
        scrap: u64,
        next: Cursor,
        /// The device restarted (new boot) or a counter fell within a boot.
        restarted: bool,
    },
}

/// Offers the totals `(boot, seq, good, scrap)` to the cursor.
///
/// With no cursor the device is new: its totals since boot all count, since the MES
/// saw nothing of this boot before. A counter that falls within a boot is taken as an
/// unannounced restart: its new value counts from zero.
pub fn advance(cursor: Option<&Cursor>, boot: u64, seq: u64, good: u64, scrap: u64) -> Advance {
    let next = Cursor { boot, seq, good, scrap };
    match cursor {
        None => Advance::Counted { good, scrap, next, restarted: false },
        Some(c) if (boot, seq) <= (c.boot, c.seq) => Advance::Stale,
        Some(c) if boot > c.boot => Advance::Counted { good, scrap, next, restarted: true },
        Some(c) => {
            let fell = good < c.good || scrap < c.scrap;
            if fell {
                Advance::Counted { good, scrap, next, restarted: true }
            } else {
                Advance::Counted { good: good - c.good, scrap: scrap - c.scrap, next, restarted: false }
            }
        }
    }
}

/// Delta of a register counter that wraps at `bits`, between two raw readings.
///
/// `boot_changed` says the device announced a restart (its counters start from 0). Without
/// a boot signal, a fall from the top quarter of the range is a wrap and any other fall a
/// restart.
pub fn wrapping_delta(prev: u64, now: u64, bits: u32, boot_changed: Option<bool>) -> u64 {
    let modulus: u128 = 1u128 << bits.min(64);
    let max = (modulus - 1) as u64;
    let (prev, now) = (prev & max, now & max);
    if boot_changed == Some(true) {
        return now;
    }
    if now >= prev {
        return now - prev;
    }
    let wrapped = ((modulus - u128::from(prev)) + u128::from(now)) as u64;
    match boot_changed {
        // Boot unchanged: a fall can only be a wrap.
        Some(false) => wrapped,
        _ => {
            let top_quarter = prev as u128 >= modulus - modulus / 4;
            if top_quarter {
                wrapped
            } else {
                now
            }
        }
    }
}

/// Raw counter registers as read from a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawCounters {
    pub good: u64,
    pub scrap: u64,
    /// The device's boot counter, if its map has one.
    pub boot: Option<u64>,
}

/// Counts between two raw readings of wrapping counter registers: `None` for the first
/// reading ever (the baseline counts nothing). A changed `boot` means the counters restarted
/// from 0; without a boot register, a fall is a wrap or a restart by [`wrapping_delta`]'s rule.
pub fn raw_delta(prev: Option<&RawCounters>, now: &RawCounters, good_bits: u32, scrap_bits: u32) -> Option<(u64, u64)> {
    let prev = prev?;
    let boot_changed = match (prev.boot, now.boot) {
        (Some(a), Some(b)) => Some(a != b),
        _ => None,
    };
    Some((
        wrapping_delta(prev.good, now.good, good_bits, boot_changed),
        wrapping_delta(prev.scrap, now.scrap, scrap_bits, boot_changed),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(boot: u64, seq: u64, good: u64, scrap: u64) -> Cursor {
        Cursor { boot, seq, good, scrap }
    }

    #[test]
    fn first_reading_counts_its_totals() {
        assert_eq!(
            advance(None, 1, 5, 10, 2),
            Advance::Counted { good: 10, scrap: 2, next: c(1, 5, 10, 2), restarted: false }
        );
    }

    #[test]
    fn duplicates_and_out_of_order_change_nothing() {
        let cur = c(1, 5, 10, 2);
        assert_eq!(advance(Some(&cur), 1, 5, 10, 2), Advance::Stale);
        assert_eq!(advance(Some(&cur), 1, 4, 9, 2), Advance::Stale);
        assert_eq!(advance(Some(&cur), 0, 99, 999, 9), Advance::Stale);
    }

    #[test]
    fn later_reading_counts_the_difference_even_after_a_loss() {
        let cur = c(1, 5, 10, 2);
        assert_eq!(
            advance(Some(&cur), 1, 9, 17, 3),
            Advance::Counted { good: 7, scrap: 1, next: c(1, 9, 17, 3), restarted: false }
        );
    }

    #[test]
    fn new_boot_counts_from_zero() {
        let cur = c(1, 500, 1000, 20);
        assert_eq!(
            advance(Some(&cur), 2, 1, 3, 0),
            Advance::Counted { good: 3, scrap: 0, next: c(2, 1, 3, 0), restarted: true }
        );
    }

    #[test]
    fn sum_of_deltas_equals_final_total_whatever_the_order() {
        // Deterministic shuffle of readings with duplicates: the counted sum is exact.
        let readings: Vec<(u64, u64, u64)> = (1..=200).map(|s| (s, s * 3, s / 7)).collect();
        let mut order: Vec<usize> = (0..readings.len()).chain(0..readings.len()).collect();
        let mut x: u64 = 42;
        for i in (1..order.len()).rev() {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            order.swap(i, (x >> 33) as usize % (i + 1));
        }
        let (mut cur, mut good, mut scrap) = (None, 0, 0);
        for i in order {
            let (seq, g, s) = readings[i];
            if let Advance::Counted { good: dg, scrap: ds, next, .. } = advance(cur.as_ref(), 1, seq, g, s) {
                good += dg;
                scrap += ds;
                cur = Some(next);
            }
        }
        // Out-of-order arrival may skip intermediate readings but never the final totals.
        assert_eq!((good, scrap), (600, 28));
    }

    #[test]
    fn raw_counters_baseline_wrap_and_boot() {
        let r = |good, scrap, boot| RawCounters { good, scrap, boot };
        assert_eq!(raw_delta(None, &r(500, 3, Some(1)), 32, 16), None, "first reading is the baseline");
        assert_eq!(raw_delta(Some(&r(500, 3, Some(1))), &r(510, 4, Some(1)), 32, 16), Some((10, 1)));
        assert_eq!(raw_delta(Some(&r(0xFFFF_FFFE, 65_535, Some(1))), &r(3, 2, Some(1)), 32, 16), Some((5, 3)));
        assert_eq!(
            raw_delta(Some(&r(900, 9, Some(1))), &r(7, 1, Some(2)), 32, 16),
            Some((7, 1)),
            "reboot counts from 0"
        );
        assert_eq!(
            raw_delta(Some(&r(900, 9, None)), &r(7, 1, None), 32, 16),
            Some((7, 1)),
            "fall outside the top quarter: restart"
        );
    }

    #[test]
    fn wraps_and_restarts() {
        assert_eq!(wrapping_delta(65_530, 4, 16, Some(false)), 10);
        assert_eq!(wrapping_delta(65_530, 4, 16, None), 10);
        assert_eq!(wrapping_delta(100, 4, 16, None), 4);
        assert_eq!(wrapping_delta(100, 4, 16, Some(true)), 4);
        assert_eq!(wrapping_delta(100, 4, 16, Some(false)), 65_536 - 100 + 4);
        assert_eq!(wrapping_delta(0xFFFF_FFFF, 1, 32, None), 2);
        assert_eq!(wrapping_delta(u64::MAX, 0, 64, Some(false)), 1);
        assert_eq!(wrapping_delta(7, 7, 16, None), 0);
    }
}
