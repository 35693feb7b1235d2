//! Durations as users write them: `'10 seconds'`, `'1 hour'`, `'500ms'`, `3s`.

use std::time::Duration;

use datafusion::arrow::compute::kernels::cast_utils::parse_interval_month_day_nano;
use datafusion::arrow::error::ArrowError;

use crate::error::{BrookError, Result};

/// The longest duration brook takes: windows, watermarks and triggers are
/// worked out in nanoseconds of an `i64`, as Arrow's timestamps are.
pub const MAX_DURATION: Duration = Duration::from_nanos(i64::MAX as u64);

/// Parses a duration written as an SQL interval (`1 hour`, `10 seconds`,
/// `1 minute 30 seconds`) or in short form (`500ms`, `3s`, `2m`, `1h`).
/// Month-based intervals have no fixed length and are rejected, and so is
/// anything longer than [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration> {
    let invalid = |why: &str| BrookError::sql(format!("invalid duration '{text}': {why}"));
    let too_long = || {
        invalid(&format!(
            "too long (at most {} days)",
            MAX_DURATION.as_secs() / 86_400
        ))
    };
    let t = text.trim();
    // Arrow would read a bare number as months.
    if t.parse::<f64>().is_ok() {
        return Err(invalid(
            "a number needs a unit, e.g. '30 seconds' or '500ms'",
        ));
    }
    let nanos = match parse_short(t) {
        Some(nanos) => nanos.ok_or_else(too_long)?,
        None => {
            let interval = parse_interval_month_day_nano(t).map_err(|e| match e {
                ArrowError::ArithmeticOverflow(_) => too_long(),
                e => invalid(&e.to_string()),
            })?;
            if interval.months != 0 {
                return Err(invalid("months have no fixed length; use days or hours"));
            }
            i128::from(interval.days) * 86_400_000_000_000 + i128::from(interval.nanoseconds)
        }
    };
    if nanos < 0 {
        return Err(invalid("must not be negative"));
    }
    i64::try_from(nanos)
        .map(|n| Duration::from_nanos(n.unsigned_abs()))
        .map_err(|_| too_long())
}

/// Nanoseconds of a short-form duration (`500ms`, `3s`); `Some(None)` when it
/// is one but its number has more digits than a `u64` holds.
fn parse_short(t: &str) -> Option<Option<i128>> {
    let split = t.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = t.split_at(split);
    let unit_nanos: i128 = match unit {
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return None,
    };
    if num.is_empty() {
        return None;
    }
    Some(num.parse::<u64>().ok().map(|n| i128::from(n) * unit_nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sql_and_short_forms() {
        assert_eq!(parse_duration("1 hour").unwrap(), Duration::from_secs(3600));
        assert_eq!(
            parse_duration("10 seconds").unwrap(),
            Duration::from_secs(10)
        );
        assert_eq!(
            parse_duration("1 minute 30 seconds").unwrap(),
            Duration::from_secs(90)
        );
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("3s").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("1 month").is_err());
        for bare in ["30", "1.5", " 10 "] {
            let e = parse_duration(bare).unwrap_err().to_string();
            assert!(e.contains("a number needs a unit"), "{e}");
        }
        assert!(parse_duration("soon").is_err());
    }

    /// `5124095576030432h` is 2^64 ns and 3,584 s more: it once wrapped to 3,584 s.
    #[test]
    fn overlong_durations_are_refused_by_value() {
        for text in [
            "5124095576030432h",
            "9999999999999999h",
            "99999999999999999999999s",
            "106752 days",
            "9999999999999999 hours",
        ] {
            let e = parse_duration(text).unwrap_err().to_string();
            assert!(e.contains(&format!("'{text}'")), "{e}");
        }
        assert_eq!(
            parse_duration("106751 days").unwrap(),
            Duration::from_secs(106_751 * 86_400)
        );
        for text in ["5124095576030432h", "9999999999999999 hours"] {
            let e = parse_duration(text).unwrap_err().to_string();
            assert!(e.contains("too long (at most 106751 days)"), "{e}");
        }
    }
}
