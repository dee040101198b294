//! A small deterministic pseudo-random number generator (PCG-XSH-RR 64/32), so that the
//! same seed replays the same run on every machine.

/// PCG-XSH-RR with 64-bit state and 32-bit output.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
    inc: u64,
}

const MULTIPLIER: u64 = 6_364_136_223_846_793_005;

/// SplitMix64 step: turns related seeds (0, 1, 2, ...) into unrelated 64-bit values.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// A generator for `seed` on stream `stream` (independent sequences per stream).
    /// State and increment both come from a fully mixed `(seed, stream)` key, because
    /// PCG streams whose increments are related start out correlated.
    pub fn new(seed: u64, stream: u64) -> Rng {
        let key = splitmix64(seed.wrapping_add(splitmix64(stream ^ 0xDA94_2042_E4DD_58B5)));
        let mut rng = Rng { state: splitmix64(key), inc: (splitmix64(key ^ 0x5851_F42D_4C95_7F2D) << 1) | 1 };
        for _ in 0..4 {
            rng.next_u32();
        }
        rng
    }

    /// The next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        let old = self.state;
        self.state = old.wrapping_mul(MULTIPLIER).wrapping_add(self.inc);
        let xorshifted = (((old >> 18) ^ old) >> 27) as u32;
        let rot = (old >> 59) as u32;
        xorshifted.rotate_right(rot)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        (u64::from(self.next_u32()) << 32) | u64::from(self.next_u32())
    }

    /// Uniform in `[0, 1)` with 53 bits of precision.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p` (clamped to `[0, 1]`).
    pub fn chance(&mut self, p: f64) -> bool {
        if p <= 0.0 {
            // Still draw, so a probability of 0 does not shift later draws.
            self.next_u64();
            return false;
        }
        self.next_f64() < p
    }

    /// Uniform in `[lo, hi)`; `lo` when the range is empty.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        let u = self.next_f64();
        if hi > lo {
            lo + (hi - lo) * u
        } else {
            lo
        }
    }

    /// Exponentially distributed with the given mean (`f64::INFINITY` for a mean that is
    /// not positive and finite, meaning "never").
    pub fn exponential(&mut self, mean: f64) -> f64 {
        let u = self.next_f64();
        if !(mean.is_finite() && mean > 0.0) {
            return f64::INFINITY;
        }
        -mean * (1.0 - u).ln()
    }

    /// Approximately normal with mean 0 and standard deviation 1 (Irwin–Hall of 12
    /// uniforms; bounded to ±6, which suits cycle-time jitter).
    pub fn std_normal(&mut self) -> f64 {
        (0..12).map(|_| self.next_f64()).sum::<f64>() - 6.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence() {
        let mut a = Rng::new(42, 1);
        let mut b = Rng::new(42, 1);
        for _ in 0..1000 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
    }

    #[test]
    fn seeds_and_streams_differ() {
        let first = |seed, stream| {
            let mut r = Rng::new(seed, stream);
            (0..8).map(|_| r.next_u32()).collect::<Vec<_>>()
        };
        assert_ne!(first(42, 0), first(43, 0));
        assert_ne!(first(42, 0), first(42, 1));
    }

    #[test]
    fn streams_are_not_correlated() {
        // The first draws of many streams of one seed (and of many seeds on one stream)
        // spread evenly over [0, 1).
        for pick in [|i| Rng::new(42, i), |i| Rng::new(i, 3)] {
            let first: Vec<f64> = (0..2000u64).map(|i| pick(i).next_f64()).collect();
            let mean = first.iter().sum::<f64>() / first.len() as f64;
            let low = first.iter().filter(|x| **x < 0.1).count() as f64 / first.len() as f64;
            assert!((mean - 0.5).abs() < 0.03, "mean {mean}");
            assert!((low - 0.1).abs() < 0.03, "low {low}");
        }
        let odd: Vec<f64> = (0..8u64).map(|i| Rng::new(42, 2 * i + 1).next_f64()).collect();
        assert!(odd.iter().any(|x| *x > 0.2), "{odd:?}");
    }

    #[test]
    fn ranges_and_moments() {
        let mut r = Rng::new(7, 0);
        let n = 100_000;
        let mut sum = 0.0;
        let mut hits = 0;
        let mut exp_sum = 0.0;
        for _ in 0..n {
            let x = r.next_f64();
            assert!((0.0..1.0).contains(&x));
            sum += x;
            if r.chance(0.1) {
                hits += 1;
            }
            exp_sum += r.exponential(5.0);
        }
        let mean = sum / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
        let p = hits as f64 / n as f64;
        assert!((p - 0.1).abs() < 0.01, "p {p}");
        let em = exp_sum / n as f64;
        assert!((em - 5.0).abs() < 0.15, "exp mean {em}");
        assert_eq!(r.exponential(0.0), f64::INFINITY);
        assert!(!r.chance(0.0));
        assert!(r.chance(1.0));
    }
}
