//! Money as integer minor units (1/10_000 of the currency unit), never floats.
//!
//! Four decimal places keep per-unit conversion costs exact enough (60.00 per hour over
//! a 1 s cycle is 0.0167 per unit); the edges print and parse decimal strings.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Number of minor units in one currency unit.
pub const SCALE: i64 = 10_000;
const DECIMALS: usize = 4;

/// An amount of money in 1/10_000 units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Money(pub i64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("`{0}` is not a decimal amount (expected e.g. \"1.20\")")]
    Syntax(String),
    #[error("`{0}` has more than {DECIMALS} decimal places")]
    TooPrecise(String),
    #[error("`{0}` is out of range")]
    Range(String),
}

impl Money {
    pub const ZERO: Money = Money(0);

    pub fn minor(self) -> i64 {
        self.0
    }

    /// Multiply by an integer quantity, failing on overflow.
    pub fn times(self, qty: i64) -> Option<Money> {
        self.0.checked_mul(qty).map(Money)
    }
}

impl FromStr for Money {
    type Err = MoneyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let (neg, body) = match t.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, t),
        };
        let (int, frac) = match body.split_once('.') {
            Some((i, f)) => (i, f),
            None => (body, ""),
        };
        let digits = |x: &str| x.bytes().all(|b| b.is_ascii_digit());
        if int.is_empty() || !digits(int) || !digits(frac) || (body.contains('.') && frac.is_empty()) {
            return Err(MoneyError::Syntax(s.to_string()));
        }
        if frac.len() > DECIMALS {
            return Err(MoneyError::TooPrecise(s.to_string()));
        }
        let int_v: i64 = int.parse().map_err(|_| MoneyError::Range(s.to_string()))?;
        let mut frac_v: i64 = 0;
        for i in 0..DECIMALS {
            let d = frac.as_bytes().get(i).map(|b| i64::from(b - b'0')).unwrap_or(0);
            frac_v = frac_v * 10 + d;
        }
        let v = int_v
            .checked_mul(SCALE)
            .and_then(|v| v.checked_add(frac_v))
            .ok_or_else(|| MoneyError::Range(s.to_string()))?;
        Ok(Money(if neg { -v } else { v }))
    }
}

impl TryFrom<String> for Money {
    type Error = MoneyError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Money> for String {
    fn from(m: Money) -> String {
        m.to_string()
    }
}

impl fmt::Display for Money {
    /// Prints at least two decimals, more only when they are not zero: `1.20`, `0.0167`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let int = abs / SCALE as u64;
        let frac = abs % SCALE as u64;
        let mut frac_s = format!("{frac:04}");
        while frac_s.len() > 2 && frac_s.ends_with('0') {
            frac_s.pop();
        }
        write!(f, "{sign}{int}.{frac_s}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_exactly() {
        assert_eq!("1.20".parse::<Money>(), Ok(Money(12_000)));
        assert_eq!("5".parse::<Money>(), Ok(Money(50_000)));
        assert_eq!("0.0167".parse::<Money>(), Ok(Money(167)));
        assert_eq!("-3.5".parse::<Money>(), Ok(Money(-35_000)));
        assert_eq!(Money(12_000).to_string(), "1.20");
        assert_eq!(Money(167).to_string(), "0.0167");
        assert_eq!(Money(-35_000).to_string(), "-3.50");
        assert_eq!(Money(0).to_string(), "0.00");
    }

    #[test]
    fn rejects_floats_in_disguise() {
        assert!(matches!("1.2e3".parse::<Money>(), Err(MoneyError::Syntax(_))));
        assert!(matches!("1.".parse::<Money>(), Err(MoneyError::Syntax(_))));
        assert!(matches!("".parse::<Money>(), Err(MoneyError::Syntax(_))));
        assert!(matches!("0.00001".parse::<Money>(), Err(MoneyError::TooPrecise(_))));
        assert!(matches!("99999999999999999".parse::<Money>(), Err(MoneyError::Range(_))));
    }
}
