//! A Kafka source table's options, as `CREATE UNBOUNDED EXTERNAL TABLE ... STORED AS KAFKA` gives them.

use std::collections::BTreeMap;
use std::time::Duration;

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Schema, SchemaRef};

use super::{KafkaOptions, StartingOffsets, Topics, default_readers, kafka_schema};
use crate::error::{BrookError, Result};
use crate::options::Options;
use crate::source::format::{CsvOptions, DecodeOptions, FileFormat};
use crate::source::malformed::ParseMode;

impl KafkaOptions {
    /// Every option of a Kafka source table besides `kafka.*` (passed to the
    /// client): the source's, then how `value` is parsed.
    pub const OPTIONS: &[&str] = &[
        "subscribe",
        "subscribePattern",
        "topic",
        "startingOffsets",
        "maxOffsetsPerTrigger",
        "failOnDataLoss",
        "pollTimeout",
        "includeHeaders",
        "readers",
        "format",
        "mode",
        "columnNameOfCorruptRecord",
        "delimiter",
        "sep",
        "quote",
    ];

    /// Spark's Kafka source options. The brokers are `location` unless
    /// `kafka.bootstrap.servers` names them; `what` names the table in errors.
    pub fn from_options(location: Option<&str>, options: &Options, what: &str) -> Result<Self> {
        let (bootstrap_servers, client) = client_options(location, options, what)?;
        let topics = match (
            options.get("subscribe").or_else(|| options.get("topic")),
            options.get("subscribePattern"),
        ) {
            (Some(list), None) => Topics::List(
                list.split(',')
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
                    .collect(),
            ),
            (None, Some(pattern)) => Topics::Pattern(
                regex::Regex::new(&format!("^(?:{pattern})$"))
                    .map_err(|e| BrookError::option("subscribePattern", e.to_string()))?,
            ),
            (Some(_), Some(_)) => {
                return Err(BrookError::option(
                    "subscribePattern",
                    format!("{what}: give 'subscribe' or 'subscribePattern', not both"),
                ));
            }
            (None, None) => Topics::List(vec![]),
        };
        if matches!(&topics, Topics::List(t) if t.is_empty()) {
            return Err(BrookError::option(
                "subscribe",
                format!(
                    "{what} needs the topics to read, e.g. 'subscribe' 'orders' or \
                     'subscribePattern' 'orders-.*'"
                ),
            ));
        }
        let starting_offsets = match options.get_or("startingOffsets", "earliest").trim() {
            s if s.eq_ignore_ascii_case("earliest") => StartingOffsets::Earliest,
            s if s.eq_ignore_ascii_case("latest") => StartingOffsets::Latest,
            json => StartingOffsets::Given(serde_json::from_str(json).map_err(|e| {
                BrookError::option(
                    "startingOffsets",
                    format!(
                        "expected earliest, latest or JSON like {{\"orders\":{{\"0\":23,\"1\":-2}}}} \
                         (-2 earliest, -1 latest): {e}"
                    ),
                )
            })?),
        };
        let poll_timeout = options
            .duration("pollTimeout")?
            .unwrap_or(Duration::from_secs(120));
        Ok(Self {
            bootstrap_servers,
            topics,
            starting_offsets,
            max_offsets_per_trigger: options.count("maxOffsetsPerTrigger")?,
            fail_on_data_loss: options.bool("failOnDataLoss", true)?,
            client,
            poll_timeout,
            include_headers: options.bool("includeHeaders", false)?,
            readers: options.count("readers")?.unwrap_or_else(default_readers),
        })
    }
}

/// The brokers (`location`, or `kafka.bootstrap.servers`) and the other
/// `kafka.*` options, keyed without the prefix; `what` names the table in errors.
pub fn client_options(
    location: Option<&str>,
    options: &Options,
    what: &str,
) -> Result<(String, BTreeMap<String, String>)> {
    let mut client = options.prefixed("kafka.");
    let servers = client
        .remove("bootstrap.servers")
        .or_else(|| location.map(str::to_string))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            BrookError::option(
                "kafka.bootstrap.servers",
                format!("{what} needs brokers: LOCATION 'host:port' or this option"),
            )
        })?;
    Ok((servers, client))
}

/// What a Kafka source table's rows hold (its `format` option).
#[derive(Debug, Clone)]
pub enum KafkaValue {
    /// Kafka's columns ([`kafka_schema`]), the value as bytes.
    Raw,
    /// Each record's value parsed into a row of the declared columns.
    Parsed(DecodeOptions),
}

impl KafkaValue {
    /// The `format` option and the table's columns: Kafka's for 'raw' (with
    /// `headers` if `include_headers`), else the `declared` ones.
    pub fn from_options(
        options: &Options,
        declared: SchemaRef,
        include_headers: bool,
        what: &str,
    ) -> Result<(Self, SchemaRef)> {
        let format = match options
            .get_or("format", "raw")
            .to_ascii_lowercase()
            .as_str()
        {
            "raw" => {
                let schema = kafka_schema(include_headers);
                if !declared.fields().is_empty() && declared != schema {
                    return Err(BrookError::sql(format!(
                        "{what}: with format 'raw' the table has Kafka's columns (key, value, \
                         topic, partition, offset, timestamp, timestampType, and headers with \
                         'includeHeaders'): declare no columns, or set 'format' to 'csv' or \
                         'json' to parse value into yours"
                    )));
                }
                // Nothing is parsed, but a mistyped mode is still an error.
                options.get_or("mode", "PERMISSIVE").parse::<ParseMode>()?;
                return Ok((KafkaValue::Raw, schema));
            }
            "csv" => FileFormat::Csv(CsvOptions::from_options(options)?),
            "json" => FileFormat::Json,
            other => {
                return Err(BrookError::option(
                    "format",
                    format!("expected raw, csv or json, found '{other}'"),
                ));
            }
        };
        let decode = DecodeOptions::from_options(format, options)?;
        split_columns(&declared, include_headers, &decode.corrupt_column, what)?;
        Ok((KafkaValue::Parsed(decode), declared))
    }
}

/// A record's own value that a column of a parsed Kafka table holds instead
/// of a field of the value (Spark's Kafka columns, as Flink's `METADATA` columns).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Metadata {
    Key,
    Topic,
    Partition,
    Offset,
    Timestamp,
    TimestampType,
    Headers,
}

/// The metadata columns' names (compared without case: SQL lower-cases
/// unquoted names), and the types they may be declared with.
const METADATA: &[(&str, Metadata, &str)] = &[
    ("_key", Metadata::Key, "BYTEA (binary) or VARCHAR"),
    ("_topic", Metadata::Topic, "VARCHAR"),
    ("_partition", Metadata::Partition, "INT"),
    ("_offset", Metadata::Offset, "BIGINT"),
    ("_timestamp", Metadata::Timestamp, "TIMESTAMP"),
    ("_timestampType", Metadata::TimestampType, "INT"),
    (
        "_headers",
        Metadata::Headers,
        "STRUCT<key VARCHAR, value BYTEA>[] (with 'includeHeaders' 'true')",
    ),
];

impl Metadata {
    /// Whether a record may have no value here: a record without a key, a
    /// timestamp (Kafka's before 0.10) or headers.
    fn can_be_null(self) -> bool {
        matches!(
            self,
            Metadata::Key | Metadata::Timestamp | Metadata::Headers
        )
    }

    fn fits(self, t: &DataType) -> bool {
        match self {
            Metadata::Key => matches!(t, DataType::Binary | DataType::Utf8),
            Metadata::Topic => t == &DataType::Utf8,
            Metadata::Partition | Metadata::TimestampType => t == &DataType::Int32,
            Metadata::Offset => t == &DataType::Int64,
            Metadata::Timestamp => matches!(t, DataType::Timestamp(_, _)),
            Metadata::Headers => match t {
                DataType::List(item) => match item.data_type() {
                    DataType::Struct(fields) => {
                        let types: Vec<(&str, &DataType)> = fields
                            .iter()
                            .map(|f| (f.name().as_str(), f.data_type()))
                            .collect();
                        types == [("key", &DataType::Utf8), ("value", &DataType::Binary)]
                    }
                    _ => false,
                },
                _ => false,
            },
        }
    }
}

/// Where a column of a parsed Kafka table comes from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Column {
    /// The value's column at this index of the value's schema.
    Value(usize),
    Metadata(Metadata),
}

/// Splits a parsed Kafka table's `declared` columns into those parsed from
/// the value (their schema) and where each column comes from. A column named
/// as a metadata column is one, of a type it can be (and nullable when a record
/// may have none); a name starting with `_` that is a metadata column's name
/// misspelt (one letter off, two for names longer than 5) is refused,
/// so that a typo is not parsed from the value as nulls; other names (a JSON
/// value's `_id`, the corrupt-record column) are parsed from the value.
pub(crate) fn split_columns(
    declared: &Schema,
    include_headers: bool,
    corrupt_column: &str,
    what: &str,
) -> Result<(SchemaRef, Vec<Column>)> {
    let known = || {
        METADATA
            .iter()
            .map(|(name, _, _)| *name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut value_fields = vec![];
    let mut columns = vec![];
    for field in declared.fields() {
        let name = field.name();
        let found = METADATA
            .iter()
            .find(|(meta, _, _)| meta.eq_ignore_ascii_case(name));
        let Some((meta_name, meta, types)) = found else {
            let misspelt = name.starts_with('_')
                && name != corrupt_column
                && METADATA.iter().any(|(meta, _, _)| {
                    // Two letters apart is too loose for short names: `_rev`,
                    // `_seq` or `_by` are a JSON value's own fields, not `_key`.
                    let near = if meta.len() <= 5 { 1 } else { 2 };
                    edit_distance(&meta.to_ascii_lowercase(), &name.to_ascii_lowercase()) <= near
                });
            if misspelt {
                return Err(BrookError::sql(format!(
                    "{what}: column '{name}' is not a Kafka metadata column; those are {}",
                    known()
                )));
            }
            columns.push(Column::Value(value_fields.len()));
            value_fields.push(field.clone());
            continue;
        };
        if !meta.fits(field.data_type()) {
            return Err(BrookError::sql(format!(
                "{what}: Kafka metadata column '{name}' is declared {}; declare it {types}",
                field.data_type()
            )));
        }
        if !field.is_nullable() && meta.can_be_null() {
            return Err(BrookError::sql(format!(
                "{what}: Kafka metadata column '{name}' is declared NOT NULL, but a record \
                 may have none; declare it without NOT NULL"
            )));
        }
        if *meta == Metadata::Headers && !include_headers {
            return Err(BrookError::option(
                "includeHeaders",
                format!("{what}: column '{meta_name}' needs 'includeHeaders' 'true'"),
            ));
        }
        columns.push(Column::Metadata(*meta));
    }
    if value_fields.is_empty() && !columns.is_empty() {
        return Err(BrookError::sql(format!(
            "{what}: declare the columns parsed from the value besides the metadata \
             columns ({}), or read the raw value with 'format' 'raw'",
            known()
        )));
    }
    Ok((Arc::new(Schema::new(value_fields)), columns))
}

/// Levenshtein's distance between two short names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    #[test]
    fn kafka_options_read_as_spark_writes_them() {
        let options = Options::new()
            .with("subscribe", " orders, trades ,")
            .with("startingOffsets", r#"{"orders":{"0":23,"1":-2}}"#)
            .with("pollTimeout", "5 seconds")
            .with("readers", "3")
            .with("kafka.bootstrap.servers", "broker:9092")
            .with("kafka.security.protocol", "SSL");
        let kafka = KafkaOptions::from_options(Some("ignored:1"), &options, "t").unwrap();
        assert_eq!(kafka.bootstrap_servers, "broker:9092");
        assert!(matches!(&kafka.topics, Topics::List(t) if t == &["orders", "trades"]));
        let given = BTreeMap::from([(0, 23), (1, -2)]);
        assert_eq!(
            kafka.starting_offsets,
            StartingOffsets::Given(BTreeMap::from([("orders".to_string(), given)]))
        );
        assert_eq!(kafka.poll_timeout, Duration::from_secs(5));
        assert_eq!(kafka.readers, 3);
        assert!(kafka.fail_on_data_loss);
        assert_eq!(
            kafka.client,
            BTreeMap::from([("security.protocol".to_string(), "SSL".to_string())])
        );

        let pattern = Options::new().with("subscribePattern", "orders-.*");
        let kafka = KafkaOptions::from_options(Some("host:1"), &pattern, "t").unwrap();
        assert_eq!(kafka.bootstrap_servers, "host:1");
        let Topics::Pattern(p) = &kafka.topics else {
            panic!("{:?}", kafka.topics)
        };
        assert!(p.is_match("orders-eu") && !p.is_match("old-orders-eu"));
    }

    #[test]
    fn the_value_format_decides_the_columns() {
        let declared: SchemaRef = Arc::new(Schema::new(vec![Field::new(
            "symbol",
            DataType::Utf8,
            true,
        )]));
        let raw = Options::new();
        let (value, schema) =
            KafkaValue::from_options(&raw, Arc::new(Schema::empty()), true, "t").unwrap();
        assert!(matches!(value, KafkaValue::Raw));
        assert_eq!(schema, kafka_schema(true));

        let csv = Options::new()
            .with("format", "CSV")
            .with("sep", ";")
            .with("mode", "failfast");
        let (value, schema) = KafkaValue::from_options(&csv, declared.clone(), false, "t").unwrap();
        let KafkaValue::Parsed(decode) = value else {
            panic!("{value:?}")
        };
        assert_eq!(schema, declared);
        assert!(matches!(&decode.format, FileFormat::Csv(c) if c.delimiter == b';'));
        assert_eq!(decode.mode, ParseMode::FailFast);
    }
}
