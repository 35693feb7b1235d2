//! Durations as users write them: `'10 seconds'`, `'1 hour'`, `'500ms'`, `3s`.

use std::time::Duration;

use datafusion::arrow::compute::kernels::cast_utils::parse_interval_month_day_nano;

use crate::error::{BrookError, Result};

/// Parses a duration written as an SQL interval (`1 hour`, `10 seconds`,
/// `1 minute 30 seconds`) or in short form (`500ms`, `3s`, `2m`, `1h`).
/// Month-based intervals have no fixed length and are rejected.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let t = text.trim();
    if let Some(d) = parse_short(t) {
        return Ok(d);
    }
    let invalid = |why: &str| BrookError::sql(format!("invalid duration '{text}': {why}"));
    let interval = parse_interval_month_day_nano(t).map_err(|e| invalid(&e.to_string()))?;
    if interval.months != 0 {
        return Err(invalid("months have no fixed length; use days or hours"));
    }
    let nanos = i128::from(interval.days) * 86_400_000_000_000 + i128::from(interval.nanoseconds);
    if nanos < 0 {
        return Err(invalid("must not be negative"));
    }
    u64::try_from(nanos)
        .map(Duration::from_nanos)
        .map_err(|_| invalid("too long"))
}

fn parse_short(t: &str) -> Option<Duration> {
    let split = t.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n * 60)),
        "h" => Some(Duration::from_secs(n * 3600)),
        _ => None,
    }
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
        assert!(parse_duration("soon").is_err());
    }
}
