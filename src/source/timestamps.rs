//! CSV timestamps read fast in their usual form, the rest by arrow's parser.
//!
//! Arrow's CSV reader parses every timestamp with its general parser (several
//! layouts, fractions, offsets), which was a tenth of the dashboard's CPU.
//! Nearly every timestamp of an order stream reads `YYYY-MM-DD HH:MM:SS` and
//! has the date of the row before. So arrow's reader reads such a column as
//! text; a value of exactly that form is converted here, with its date's day
//! number kept for the next row, and any other value goes to arrow's parser,
//! which alone decides what else is a valid timestamp.

use std::sync::Arc;

use chrono::{NaiveDate, Utc};
use datafusion::arrow::array::{
    Array, ArrayRef, RecordBatch, StringArray, TimestampMicrosecondArray,
    TimestampMillisecondArray, TimestampNanosecondArray, TimestampSecondArray,
};
use datafusion::arrow::compute::kernels::cast_utils::string_to_datetime;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

/// A CSV file schema, as arrow's reader reads it (timestamps without a time
/// zone as text) and as the rows are kept.
#[derive(Debug)]
pub struct CsvColumns {
    /// What arrow's reader produces.
    pub read: SchemaRef,
    file: SchemaRef,
    timestamps: Vec<(usize, TimeUnit)>,
}

impl CsvColumns {
    pub fn new(file: SchemaRef) -> Self {
        let mut timestamps = vec![];
        let fields: Vec<Field> = file
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| match f.data_type() {
                DataType::Timestamp(unit, None) => {
                    timestamps.push((i, *unit));
                    f.as_ref().clone().with_data_type(DataType::Utf8)
                }
                _ => f.as_ref().clone(),
            })
            .collect();
        let read = match timestamps.is_empty() {
            true => file.clone(),
            false => Arc::new(Schema::new_with_metadata(fields, file.metadata().clone())),
        };
        Self {
            read,
            file,
            timestamps,
        }
    }

    /// The schema of the rows kept.
    pub fn file(&self) -> &SchemaRef {
        &self.file
    }

    /// A batch arrow's reader read, with its timestamp columns parsed; `None`
    /// if one of them holds a value that is not a timestamp.
    pub fn typed(&self, batch: RecordBatch) -> Option<RecordBatch> {
        if self.timestamps.is_empty() {
            return Some(batch);
        }
        let mut columns = batch.columns().to_vec();
        for &(i, unit) in &self.timestamps {
            let text = columns[i].as_any().downcast_ref::<StringArray>()?;
            columns[i] = parse(text, unit)?;
        }
        RecordBatch::try_new(self.file.clone(), columns).ok()
    }
}

/// `text` as timestamps of `unit` without a time zone, nulls kept; `None` if
/// a value is not a timestamp (or out of the unit's range).
fn parse(text: &StringArray, unit: TimeUnit) -> Option<ArrayRef> {
    let per_second: i64 = match unit {
        TimeUnit::Second => 1,
        TimeUnit::Millisecond => 1_000,
        TimeUnit::Microsecond => 1_000_000,
        TimeUnit::Nanosecond => 1_000_000_000,
    };
    let mut last_date = None;
    let mut values = Vec::with_capacity(text.len());
    for i in 0..text.len() {
        if text.is_null(i) {
            values.push(0);
            continue;
        }
        let s = text.value(i);
        let value = match usual_form(s.as_bytes(), &mut last_date) {
            Some(seconds) => seconds.checked_mul(per_second)?,
            None => by_arrow(s, unit)?,
        };
        values.push(value);
    }
    let nulls = text.nulls().cloned();
    Some(match unit {
        TimeUnit::Second => Arc::new(TimestampSecondArray::new(values.into(), nulls)),
        TimeUnit::Millisecond => Arc::new(TimestampMillisecondArray::new(values.into(), nulls)),
        TimeUnit::Microsecond => Arc::new(TimestampMicrosecondArray::new(values.into(), nulls)),
        TimeUnit::Nanosecond => Arc::new(TimestampNanosecondArray::new(values.into(), nulls)),
    })
}

/// Seconds since the epoch of `YYYY-MM-DD HH:MM:SS` (or with a `T`), a valid
/// date and time; `last_date` keeps the day number of the last date read.
fn usual_form(s: &[u8], last_date: &mut Option<([u8; 10], i64)>) -> Option<i64> {
    let s: &[u8; 19] = s.try_into().ok()?;
    let separators = [(4, b'-'), (7, b'-'), (13, b':'), (16, b':')];
    if separators.iter().any(|&(i, c)| s[i] != c) || !matches!(s[10], b' ' | b'T') {
        return None;
    }
    let date: [u8; 10] = s[..10].try_into().ok()?;
    let days = match *last_date {
        Some((d, days)) if d == date => days,
        _ => {
            let day = NaiveDate::from_ymd_opt(
                digits(&s[0..4])? as i32,
                digits(&s[5..7])? as u32,
                digits(&s[8..10])? as u32,
            )?;
            let days = day.signed_duration_since(NaiveDate::default()).num_days();
            *last_date = Some((date, days));
            days
        }
    };
    let (h, m, sec) = (
        digits(&s[11..13])?,
        digits(&s[14..16])?,
        digits(&s[17..19])?,
    );
    if h > 23 || m > 59 || sec > 59 {
        return None;
    }
    Some(days * 86_400 + h * 3_600 + m * 60 + sec)
}

fn digits(s: &[u8]) -> Option<i64> {
    s.iter().try_fold(0i64, |n, &c| {
        c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0'))
    })
}

/// What arrow's CSV reader makes of `s` as a timestamp of `unit` without a time zone.
fn by_arrow(s: &str, unit: TimeUnit) -> Option<i64> {
    let t = string_to_datetime(&Utc, s).ok()?;
    match unit {
        TimeUnit::Second => Some(t.timestamp()),
        TimeUnit::Millisecond => Some(t.timestamp_millis()),
        TimeUnit::Microsecond => Some(t.timestamp_micros()),
        TimeUnit::Nanosecond => t.timestamp_nanos_opt(),
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::compute::{CastOptions, cast_with_options};
    use datafusion::arrow::datatypes::{
        TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
        TimestampSecondType,
    };

    use super::*;

    /// Arrow's cast of text to timestamps, failing on a value it cannot read.
    fn cast(text: &StringArray, unit: TimeUnit) -> datafusion::arrow::error::Result<ArrayRef> {
        let strict = CastOptions {
            safe: false,
            ..Default::default()
        };
        cast_with_options(text, &DataType::Timestamp(unit, None), &strict)
    }

    /// Every value, of the usual form or not, reads as arrow's cast reads it,
    /// and a value arrow rejects fails the column.
    #[test]
    fn values_read_as_arrow_reads_them() {
        let values = [
            Some("2016-03-22 20:25:28"),
            Some("2016-03-22 20:25:29"),
            Some("2016-03-22T23:59:59"),
            None,
            Some("2016-03-23 00:00:00"),
            Some("1969-12-31 23:59:59"),
            Some("2000-02-29 12:00:00"),
            Some("2016-03-22 20:25:28.5"),
            Some("2016-03-22T20:25:28Z"),
            Some("2016-03-22 20:25:28+02:00"),
            Some("2016-03-22"),
            Some("2016-03-22 20:25:60"),
            Some("0001-01-01 00:00:00"),
            Some("2016-03-22 20:25:28"),
        ];
        let text = StringArray::from(values.to_vec());
        for unit in [
            TimeUnit::Second,
            TimeUnit::Millisecond,
            TimeUnit::Microsecond,
            TimeUnit::Nanosecond,
        ] {
            let ours = parse(&text, unit);
            let want = cast(&text, unit);
            if unit == TimeUnit::Nanosecond {
                // Year 1 is out of the nanosecond range: both refuse.
                assert!(ours.is_none() && want.is_err(), "{unit:?}");
                continue;
            }
            let (ours, want) = (ours.unwrap(), want.unwrap());
            assert_eq!(ours.data_type(), want.data_type());
            let as_i64 = |a: &ArrayRef| -> Vec<Option<i64>> {
                match unit {
                    TimeUnit::Second => a.as_primitive::<TimestampSecondType>().iter().collect(),
                    TimeUnit::Millisecond => a
                        .as_primitive::<TimestampMillisecondType>()
                        .iter()
                        .collect(),
                    TimeUnit::Microsecond => a
                        .as_primitive::<TimestampMicrosecondType>()
                        .iter()
                        .collect(),
                    TimeUnit::Nanosecond => {
                        a.as_primitive::<TimestampNanosecondType>().iter().collect()
                    }
                }
            };
            assert_eq!(as_i64(&ours), as_i64(&want), "{unit:?}");
        }
    }

    /// Near misses of the usual form are left to arrow, which refuses them.
    #[test]
    fn invalid_dates_and_times_are_refused() {
        for bad in [
            "2016-02-30 10:00:00",
            "2015-02-29 10:00:00",
            "2016-13-01 10:00:00",
            "2016-03-22 24:00:00",
            "2016-03-22 20:60:00",
            "2016-03-22 2O:25:28",
            "2016/03/22 20:25:28",
            "2016-03-22_20:25:28",
            "２016-03-22 20:25:2",
            "",
        ] {
            let text = StringArray::from(vec![Some("2016-03-22 20:25:28"), Some(bad)]);
            assert!(parse(&text, TimeUnit::Nanosecond).is_none(), "{bad}");
            assert!(
                cast(&text, TimeUnit::Nanosecond).is_err(),
                "arrow accepts {bad}"
            );
        }
    }
}
