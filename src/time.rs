//! Times as the MES reads and writes them, in one place: RFC 3339 text, calendar dates
//! (UTC), and milliseconds since the Unix epoch, the unit of every stored time.

use chrono::{DateTime, NaiveDate, SecondsFormat};

/// RFC 3339 text of a millisecond timestamp (UTC, millisecond precision); empty for a
/// time chrono cannot represent.
pub fn rfc3339(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms).map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true)).unwrap_or_default()
}

/// The instant of an RFC 3339 time (`2026-11-25T10:00:00.123Z`, any offset).
pub fn rfc3339_ms(s: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp_millis())
}

/// Which instant of a calendar day a date stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Day {
    /// 00:00:00.000 UTC: where a window or a plan's horizon begins.
    Start,
    /// 23:59:59.999 UTC: a due date is met by anything done on that day.
    End,
}

/// The instant a date (`YYYY-MM-DD`, UTC) stands for.
pub fn date_ms(s: &str, day: Day) -> Option<i64> {
    let d = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
    let t = match day {
        Day::Start => d.and_hms_milli_opt(0, 0, 0, 0)?,
        Day::End => d.and_hms_milli_opt(23, 59, 59, 999)?,
    };
    Some(t.and_utc().timestamp_millis())
}

/// An instant given as milliseconds since the epoch, an RFC 3339 time, or a date (the
/// instant `day` says): what query parameters and the CLI's times accept.
pub fn instant_ms(s: &str, day: Day) -> Option<i64> {
    s.parse::<i64>().ok().or_else(|| rfc3339_ms(s)).or_else(|| date_ms(s, day))
}

/// A due date: an RFC 3339 time, or a date meaning the end of that day.
pub fn due_ms(s: &str) -> Option<i64> {
    rfc3339_ms(s).or_else(|| date_ms(s, Day::End))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_form_reads_as_the_same_instant_and_formats_back() {
        let t = 1_795_600_800_123; // 2026-11-25T10:00:00.123Z
        assert_eq!(rfc3339(t), "2026-11-25T10:00:00.123Z");
        assert_eq!(rfc3339_ms("2026-11-25T10:00:00.123Z"), Some(t));
        assert_eq!(rfc3339_ms("2026-11-25T11:00:00.123+01:00"), Some(t));
        assert_eq!(instant_ms("1795600800123", Day::Start), Some(t));
        assert_eq!(instant_ms("2026-11-25T10:00:00.123Z", Day::End), Some(t));
        let midnight = 1_795_564_800_000; // 2026-11-25T00:00:00Z
        assert_eq!(instant_ms("2026-11-25", Day::Start), Some(midnight));
        assert_eq!(date_ms("2026-11-25", Day::End), Some(midnight + 86_400_000 - 1));
        assert_eq!(due_ms("2026-11-25"), Some(midnight + 86_400_000 - 1));
        assert_eq!(due_ms("2026-11-25T10:00:00.123Z"), Some(t));
    }

    #[test]
    fn anything_else_is_not_a_time() {
        for s in ["", "yesterday", "2026-13-01", "2026-11-25T25:00:00Z", "2026/11/25", "1e12"] {
            assert_eq!(instant_ms(s, Day::Start), None, "{s}");
            assert_eq!(due_ms(s), None, "{s}");
        }
        // A due date is a date or a time, not a bare number.
        assert_eq!(due_ms("1795600800123"), None);
    }
}
