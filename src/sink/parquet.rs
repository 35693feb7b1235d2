//! How Parquet files are written: the writer options a Parquet (or Delta) sink
//! takes in OPTIONS, named as Spark and DataFusion users write them.

use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::parquet::basic::{BrotliLevel, Compression, GzipLevel, ZstdLevel};
use datafusion::parquet::file::properties::{EnabledStatistics, WriterProperties};
use datafusion::parquet::schema::types::ColumnPath;

use crate::error::{BrookError, Result};
use crate::options::Options;

/// The options [`writer_properties`] reads.
pub const OPTIONS: &[&str] = &[
    "compression",
    "rowGroupSize",
    "dictionary",
    "statistics",
    "bloomFilterColumns",
    "bloomFilterFpp",
    "bloomFilterNdv",
];

/// The option saying how timestamps are stored, named after Spark's
/// `spark.sql.parquet.outputTimestampType`.
pub const TIMESTAMP_OPTION: &str = "outputTimestampType";

const COMPRESSIONS: &str = "zstd, zstd(1..22), snappy, gzip, gzip(0..10), lz4 (lz4_raw), brotli, \
                            brotli(0..11), none or uncompressed";

/// The Parquet writer's settings from `options` (the keys in [`OPTIONS`]; others
/// are ignored) for files of `schema`. Without options files are zstd-compressed
/// with dictionaries and page statistics, as before these options existed.
pub fn writer_properties(options: &Options, schema: &Schema) -> Result<WriterProperties> {
    let mut builder = WriterProperties::builder()
        .set_compression(compression(options.get("compression").unwrap_or("zstd"))?);
    if let Some(rows) = options.count::<usize>("rowGroupSize")? {
        builder = builder.set_max_row_group_row_count(Some(rows));
    }
    builder = builder.set_dictionary_enabled(options.bool("dictionary", true)?);
    if let Some(stats) = options.get("statistics") {
        let level = stats
            .trim()
            .to_ascii_lowercase()
            .parse::<EnabledStatistics>();
        builder = builder.set_statistics_enabled(level.map_err(|_| {
            BrookError::option(
                "statistics",
                format!("expected none, chunk or page, found '{stats}'"),
            )
        })?);
    }
    let fpp = options.parse::<f64>("bloomFilterFpp", "a probability between 0 and 1")?;
    if let Some(p) = fpp.filter(|p| !(*p > 0.0 && *p < 1.0)) {
        return Err(BrookError::option(
            "bloomFilterFpp",
            format!("expected a probability between 0 and 1 (exclusive), found '{p}'"),
        ));
    }
    let ndv = options.count::<u64>("bloomFilterNdv")?;
    let columns: Vec<&str> = options
        .get("bloomFilterColumns")
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect()
        })
        .unwrap_or_default();
    if columns.is_empty() && (fpp.is_some() || ndv.is_some()) {
        let key = if fpp.is_some() {
            "bloomFilterFpp"
        } else {
            "bloomFilterNdv"
        };
        return Err(BrookError::option(
            key,
            "applies to the columns of 'bloomFilterColumns', which names none",
        ));
    }
    for column in columns {
        if schema.field_with_name(column).is_err() {
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            return Err(BrookError::option(
                "bloomFilterColumns",
                format!(
                    "'{column}' is not a column of the files written; their columns: {}",
                    names.join(", ")
                ),
            ));
        }
        let path = ColumnPath::from(column);
        builder = builder.set_column_bloom_filter_enabled(path.clone(), true);
        if let Some(p) = fpp {
            builder = builder.set_column_bloom_filter_fpp(path.clone(), p);
        }
        if let Some(n) = ndv {
            builder = builder.set_column_bloom_filter_max_ndv(path, n);
        }
    }
    Ok(builder.build())
}

/// A codec as DataFusion's `format.compression` writes it: a name, with a level
/// in parentheses for those that take one (the codec's default level without).
fn compression(text: &str) -> Result<Compression> {
    let t = text.trim().to_ascii_lowercase();
    let bad = |why: String| {
        BrookError::option(
            "compression",
            format!("{why}; expected one of {COMPRESSIONS}, found '{text}'"),
        )
    };
    let plain = match t.as_str() {
        "none" | "uncompressed" => Some(Compression::UNCOMPRESSED),
        "snappy" => Some(Compression::SNAPPY),
        "lz4" | "lz4_raw" => Some(Compression::LZ4_RAW),
        "zstd" => Some(Compression::ZSTD(ZstdLevel::default())),
        "gzip" => Some(Compression::GZIP(GzipLevel::default())),
        "brotli" => Some(Compression::BROTLI(BrotliLevel::default())),
        _ => None,
    };
    if let Some(c) = plain {
        return Ok(c);
    }
    let Some((name, level)) = t.strip_suffix(')').and_then(|s| s.split_once('(')) else {
        return Err(bad("unknown codec".into()));
    };
    let level: u32 = level
        .trim()
        .parse()
        .map_err(|_| bad(format!("'{level}' is not a level")))?;
    let leveled = match name.trim() {
        "zstd" => i32::try_from(level)
            .ok()
            .and_then(|l| ZstdLevel::try_new(l).ok())
            .map(Compression::ZSTD),
        "gzip" => GzipLevel::try_new(level).ok().map(Compression::GZIP),
        "brotli" => BrotliLevel::try_new(level).ok().map(Compression::BROTLI),
        other => return Err(bad(format!("codec '{other}' takes no level"))),
    };
    leveled.ok_or_else(|| bad(format!("level {level} is out of range for {}", name.trim())))
}

/// The unit timestamps are written in: microseconds unless `outputTimestampType`
/// says otherwise. Spark 4 cannot read nanosecond timestamps, and Spark, Delta
/// and most BI readers expect microseconds.
pub fn timestamp_unit(options: &Options) -> Result<TimeUnit> {
    let Some(text) = options.get(TIMESTAMP_OPTION) else {
        return Ok(TimeUnit::Microsecond);
    };
    match text.trim().to_ascii_uppercase().as_str() {
        "TIMESTAMP_MICROS" | "MICROS" => Ok(TimeUnit::Microsecond),
        "TIMESTAMP_MILLIS" | "MILLIS" => Ok(TimeUnit::Millisecond),
        "TIMESTAMP_NANOS" | "NANOS" => Ok(TimeUnit::Nanosecond),
        _ => Err(BrookError::option(
            TIMESTAMP_OPTION,
            format!(
                "expected TIMESTAMP_MICROS, TIMESTAMP_MILLIS or TIMESTAMP_NANOS, found '{text}' \
                 (INT96 is not written)"
            ),
        )),
    }
}

/// `schema` with its timestamp columns in `unit`.
pub fn with_timestamp_unit(schema: &Schema, unit: TimeUnit) -> SchemaRef {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Timestamp(u, tz) if *u != unit => f
                .as_ref()
                .clone()
                .with_data_type(DataType::Timestamp(unit, tz.clone())),
            _ => f.as_ref().clone(),
        })
        .collect();
    Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
}

/// `batch` in `schema` (from [`with_timestamp_unit`]): finer timestamps are
/// truncated to the unit.
pub fn cast_timestamps(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    if batch.schema() == *schema {
        return Ok(batch.clone());
    }
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(c, f)| cast(c, f.data_type()))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codecs_are_read_as_datafusion_writes_them() {
        assert_eq!(
            compression("ZSTD(3)").unwrap(),
            Compression::ZSTD(ZstdLevel::try_new(3).unwrap())
        );
        assert_eq!(compression("lz4").unwrap(), Compression::LZ4_RAW);
        assert_eq!(compression("none").unwrap(), Compression::UNCOMPRESSED);
        for (bad, why) in [
            ("zip", "unknown codec"),
            ("zstd(99)", "level 99 is out of range for zstd"),
            ("snappy(2)", "codec 'snappy' takes no level"),
            ("gzip(x)", "'x' is not a level"),
        ] {
            let err = compression(bad).unwrap_err().to_string();
            assert!(
                err.contains("option 'compression'") && err.contains(why),
                "{err}"
            );
        }
    }
}
