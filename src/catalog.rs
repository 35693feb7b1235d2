//! Source and sink definitions, from `CREATE [UNBOUNDED] EXTERNAL TABLE` or the Rust API.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::logical_expr::CreateExternalTable;

use crate::config::{OutputMode, Trigger};
use crate::error::{BrookError, Result};
use crate::options::Options;
use crate::sink::kafka::{KafkaSink, KafkaSinkOptions, ValueFormat};
use crate::sink::{ConsoleSink, FileSink, MemorySink, OutputFormat, Sink};
use crate::source::format::Decoder;
use crate::source::kafka::{
    KafkaOptions, KafkaSource, StartingOffsets, Topics, default_readers, kafka_schema,
};
use crate::source::location::Location;
use crate::source::{
    CleanSource, CsvOptions, FileFormat, FileSource, FileSourceOptions, ParseMode, SharedInput,
    StreamSource,
};
use crate::sql::script::WatermarkSpec;

/// Spark's default name for the column that receives unparseable records.
pub const DEFAULT_CORRUPT_COLUMN: &str = "_corrupt_record";

const SOURCE_OPTIONS: &[&str] = &[
    "has_header",
    "header",
    "delimiter",
    "sep",
    "quote",
    "multiLine",
    "mode",
    "columnNameOfCorruptRecord",
    "maxFilesPerTrigger",
    "latestFirst",
    "includeExistingFiles",
    "recursiveFileLookup",
    "maxBytesPerTrigger",
    "maxFileAge",
    "cleanSource",
    "sourceArchiveDir",
];

const SINK_OPTIONS: &[&str] = &[
    "outputMode",
    "trigger",
    "queryName",
    "numRows",
    "checkpointLocation",
    "minBatchesToRetain",
];

/// Options of a Kafka sink table, besides the general ones and `kafka.*`.
const KAFKA_SINK_OPTIONS: &[&str] = &[
    "topic",
    "format",
    "key",
    "deliveryGuarantee",
    "transactionalIdPrefix",
];

/// Options of a Kafka source table (besides `kafka.*`, passed to the client).
const KAFKA_SOURCE_OPTIONS: &[&str] = &[
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

/// A streaming source: a directory or Kafka topics read as an unbounded table.
#[derive(Debug, Clone)]
pub struct SourceDef {
    pub name: String,
    pub location: String,
    /// How records become rows (for Kafka: how `value` is parsed).
    pub format: FileFormat,
    pub schema: SchemaRef,
    pub mode: ParseMode,
    pub corrupt_column: String,
    pub file_options: FileSourceOptions,
    pub watermark: Option<WatermarkSpec>,
    /// Set for a Kafka source (`STORED AS KAFKA`); `format` then parses `value`,
    /// unless `raw`, when the table has Spark's Kafka columns.
    pub kafka: Option<(KafkaOptions, bool)>,
}

impl SourceDef {
    /// Reads a `CREATE UNBOUNDED EXTERNAL TABLE` statement.
    pub fn from_ddl(cmd: &CreateExternalTable, watermark: Option<WatermarkSpec>) -> Result<Self> {
        let name = cmd.name.table().to_string();
        let options: Options = cmd
            .options
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let schema = Arc::new(cmd.schema.as_arrow().clone());
        if cmd.file_type.eq_ignore_ascii_case("KAFKA") {
            return Self::kafka_from_ddl(cmd, name, schema, &options, watermark);
        }
        options.reject_unknown(SOURCE_OPTIONS, &format!("source table '{name}'"))?;
        let format = match cmd.file_type.to_ascii_uppercase().as_str() {
            "CSV" => FileFormat::Csv(csv_options(&options)?),
            "JSON" | "NDJSON" => FileFormat::Json,
            "PARQUET" => FileFormat::Parquet,
            "TEXT" | "TXT" => FileFormat::Text,
            other => {
                return Err(BrookError::sql(format!(
                    "table '{name}': STORED AS {other} is not a streaming source format; \
                     use CSV, JSON, PARQUET, TEXT or KAFKA"
                )));
            }
        };
        // 'false', which scripts ported from Spark often set, is every format's way.
        if options.bool("multiLine", false)? && !matches!(format, FileFormat::Csv(_)) {
            return Err(BrookError::option(
                "multiLine",
                format!("table '{name}': only CSV sources read records across lines"),
            ));
        }
        let file_options = FileSourceOptions {
            max_files_per_trigger: options.count("maxFilesPerTrigger")?,
            latest_first: options.bool("latestFirst", false)?,
            include_existing_files: options.bool("includeExistingFiles", true)?,
            recursive: options.bool("recursiveFileLookup", false)?,
            max_bytes_per_trigger: options.size("maxBytesPerTrigger")?,
            max_file_age: options
                .get("maxFileAge")
                .map(|t| {
                    crate::duration::parse_duration(t)
                        .map_err(|e| BrookError::option("maxFileAge", e.to_string()))
                })
                .transpose()?,
            clean_source: clean_source(&options)?,
            ..FileSourceOptions::default()
        };
        let location = cmd.locations.first().cloned().unwrap_or_default();
        let def = Self {
            name,
            location,
            format,
            schema,
            mode: options.get_or("mode", "PERMISSIVE").parse()?,
            corrupt_column: options
                .get_or("columnNameOfCorruptRecord", DEFAULT_CORRUPT_COLUMN)
                .to_string(),
            file_options,
            watermark,
            kafka: None,
        };
        def.validate()?;
        Ok(def)
    }

    /// Reads `CREATE UNBOUNDED EXTERNAL TABLE ... STORED AS KAFKA LOCATION 'host:port'`.
    fn kafka_from_ddl(
        cmd: &CreateExternalTable,
        name: String,
        declared: SchemaRef,
        options: &Options,
        watermark: Option<WatermarkSpec>,
    ) -> Result<Self> {
        let what = format!("Kafka source table '{name}'");
        options.reject_unknown_but(KAFKA_SOURCE_OPTIONS, "kafka.", &what)?;
        let (servers, client) = kafka_client(cmd, options, &what)?;
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
        let max_offsets_per_trigger = options.count("maxOffsetsPerTrigger")?;
        let poll_timeout = match options.get("pollTimeout") {
            Some(t) => crate::duration::parse_duration(t)
                .map_err(|e| BrookError::option("pollTimeout", e.to_string()))?,
            None => std::time::Duration::from_secs(120),
        };
        let include_headers = options.bool("includeHeaders", false)?;
        let readers = options.count("readers")?.unwrap_or_else(default_readers);
        let (format, raw, schema) = match options
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
                (FileFormat::Text, true, schema)
            }
            "csv" => (FileFormat::Csv(csv_options(options)?), false, declared),
            "json" => (FileFormat::Json, false, declared),
            other => {
                return Err(BrookError::option(
                    "format",
                    format!("expected raw, csv or json, found '{other}'"),
                ));
            }
        };
        let kafka = KafkaOptions {
            bootstrap_servers: servers.clone(),
            topics,
            starting_offsets,
            max_offsets_per_trigger,
            fail_on_data_loss: options.bool("failOnDataLoss", true)?,
            client,
            poll_timeout,
            include_headers,
            readers,
        };
        let def = Self {
            name,
            location: servers,
            format,
            schema,
            mode: options.get_or("mode", "PERMISSIVE").parse()?,
            corrupt_column: options
                .get_or("columnNameOfCorruptRecord", DEFAULT_CORRUPT_COLUMN)
                .to_string(),
            file_options: FileSourceOptions::default(),
            watermark,
            kafka: Some((kafka, raw)),
        };
        def.validate()?;
        Ok(def)
    }

    /// What the source reads, as a checkpoint records it: a relative directory is
    /// resolved, since offsets name files by absolute path.
    pub fn identity(&self) -> String {
        match &self.kafka {
            Some((k, raw)) => format!(
                "KAFKA {} [{}] value {}",
                k.bootstrap_servers,
                k.topics,
                if *raw { "raw" } else { self.format.name() }
            ),
            None if self.location.contains("://") => {
                format!("{} '{}'", self.format.name(), self.location)
            }
            None => format!(
                "{} '{}'",
                self.format.name(),
                std::path::absolute(&self.location)
                    .map_or_else(|_| self.location.clone(), |p| p.display().to_string())
            ),
        }
    }

    /// Checks the schema fits the format and the watermark names a timestamp column.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| {
            Err(BrookError::sql(format!(
                "source table '{}': {m}",
                self.name
            )))
        };
        if self.schema.fields().is_empty() {
            if matches!(self.format, FileFormat::Text) {
                return Ok(());
            }
            return fail(format!(
                "declare its columns: {} files are read with the declared schema",
                self.format.name()
            ));
        }
        if matches!(self.format, FileFormat::Text)
            && self.kafka.is_none()
            && (self.schema.fields().len() != 1
                || self.schema.field(0).data_type() != &DataType::Utf8)
        {
            return fail("TEXT sources have one VARCHAR column (e.g. `value VARCHAR`)".into());
        }
        if let Some(wm) = &self.watermark {
            match self.schema.field_with_name(&wm.column) {
                Ok(f) if matches!(f.data_type(), DataType::Timestamp(_, _)) => {}
                Ok(f) => {
                    return fail(format!(
                        "watermark column '{}' is {}, not a TIMESTAMP",
                        wm.column,
                        f.data_type()
                    ));
                }
                Err(_) => return fail(format!("watermark column '{}' is not a column", wm.column)),
            }
        }
        Ok(())
    }

    /// The schema rows are read with: a TEXT source without columns reads `value`.
    pub fn read_schema(&self) -> SchemaRef {
        if matches!(self.format, FileFormat::Text) && self.schema.fields().is_empty() {
            return Arc::new(Schema::new(vec![Field::new("value", DataType::Utf8, true)]));
        }
        self.schema.clone()
    }

    /// A new source reading this table, sharing decoded files and Kafka reads through `shared`.
    pub(crate) fn open(
        &self,
        runtime: &RuntimeEnv,
        shared: &SharedInput,
    ) -> Result<Box<dyn StreamSource>> {
        let decoder = Decoder::new(
            self.format.clone(),
            self.read_schema(),
            self.mode,
            &self.corrupt_column,
        );
        if let Some((kafka, raw)) = &self.kafka {
            let decoder = (!raw).then_some(decoder);
            return Ok(Box::new(KafkaSource::new(
                kafka.clone(),
                decoder,
                &shared.kafka,
            )?));
        }
        let location = Location::resolve(&self.location, runtime)?;
        Ok(Box::new(FileSource::new(
            location,
            decoder,
            self.file_options.clone(),
            &shared.files,
        )?))
    }
}

/// The brokers (LOCATION, or `kafka.bootstrap.servers`) and the other `kafka.*` options.
fn kafka_client(
    cmd: &CreateExternalTable,
    options: &Options,
    what: &str,
) -> Result<(String, BTreeMap<String, String>)> {
    let mut client = options.prefixed("kafka.");
    let servers = client
        .remove("bootstrap.servers")
        .or_else(|| cmd.locations.first().cloned())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            BrookError::option(
                "kafka.bootstrap.servers",
                format!("{what} needs brokers: LOCATION 'host:port' or this option"),
            )
        })?;
    Ok((servers, client))
}

/// Spark's `cleanSource` and its `sourceArchiveDir`.
fn clean_source(options: &Options) -> Result<CleanSource> {
    let archive_dir = options.get("sourceArchiveDir").map(str::to_string);
    let mode = options
        .get_or("cleanSource", "off")
        .trim()
        .to_ascii_lowercase();
    let clean = match mode.as_str() {
        "off" => CleanSource::Off,
        "delete" => CleanSource::Delete,
        "archive" => match &archive_dir {
            Some(dir) => CleanSource::Archive(dir.clone()),
            None => {
                return Err(BrookError::option(
                    "sourceArchiveDir",
                    "cleanSource 'archive' needs it: the directory processed files are moved to",
                ));
            }
        },
        other => {
            return Err(BrookError::option(
                "cleanSource",
                format!("expected off, delete or archive, found '{other}'"),
            ));
        }
    };
    if archive_dir.is_some() && !matches!(clean, CleanSource::Archive(_)) {
        return Err(BrookError::option(
            "sourceArchiveDir",
            "only used with cleanSource 'archive'",
        ));
    }
    Ok(clean)
}

fn csv_options(options: &Options) -> Result<CsvOptions> {
    let byte = |key: &str, default: u8| -> Result<u8> {
        match options.get(key) {
            None => Ok(default),
            Some(v) if v.len() == 1 => Ok(v.as_bytes()[0]),
            Some("\\t") => Ok(b'\t'),
            Some(v) => Err(BrookError::option(
                key,
                format!("expected one character, found '{v}'"),
            )),
        }
    };
    let has_header = match options.get("has_header") {
        Some(_) => options.bool("has_header", false)?,
        None => options.bool("header", false)?,
    };
    let delimiter = match options.get("sep") {
        Some(_) => byte("sep", b',')?,
        None => byte("delimiter", b',')?,
    };
    Ok(CsvOptions {
        has_header,
        delimiter,
        quote: byte("quote", b'"')?,
        multi_line: options.bool("multiLine", false)?,
    })
}

/// The kinds of sink a table can name with `STORED AS`.
#[derive(Debug, Clone)]
pub enum SinkKind {
    Console {
        num_rows: usize,
    },
    Memory,
    File {
        format: OutputFormat,
        location: String,
    },
    Kafka(KafkaSinkOptions),
}

/// A sink table: where an `INSERT INTO` query writes, and how it runs.
#[derive(Debug, Clone)]
pub struct SinkDef {
    pub name: String,
    pub kind: SinkKind,
    pub output_mode: Option<OutputMode>,
    pub trigger: Option<Trigger>,
    pub query_name: Option<String>,
    /// Where the query writing here keeps its checkpoint.
    pub checkpoint_location: Option<String>,
    pub min_batches_to_retain: Option<u64>,
}

impl SinkDef {
    /// The sink `INSERT INTO console` uses when no table of that name was declared.
    pub fn console() -> Self {
        Self {
            name: "console".into(),
            kind: SinkKind::Console { num_rows: 20 },
            output_mode: None,
            trigger: None,
            query_name: None,
            checkpoint_location: None,
            min_batches_to_retain: None,
        }
    }

    /// Reads a `CREATE EXTERNAL TABLE ... STORED AS PARQUET|CSV|JSON|CONSOLE|MEMORY` statement.
    pub fn from_ddl(cmd: &CreateExternalTable) -> Result<Self> {
        let name = cmd.name.table().to_string();
        let options: Options = cmd
            .options
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let what = format!("sink table '{name}'");
        let location = cmd.locations.first().cloned().unwrap_or_default();
        let file_type = cmd.file_type.to_ascii_uppercase();
        if file_type == "KAFKA" {
            let known = [SINK_OPTIONS, KAFKA_SINK_OPTIONS].concat();
            options.reject_unknown_but(&known, "kafka.", &what)?;
        } else {
            options.reject_unknown(SINK_OPTIONS, &what)?;
        }
        let kind = match file_type.as_str() {
            "KAFKA" => {
                let (bootstrap_servers, client) = kafka_client(cmd, &options, &what)?;
                let format = match options
                    .get_or("format", "json")
                    .to_ascii_lowercase()
                    .as_str()
                {
                    "json" => ValueFormat::Json,
                    "csv" => ValueFormat::Csv,
                    other => {
                        return Err(BrookError::option(
                            "format",
                            format!("expected json or csv, found '{other}'"),
                        ));
                    }
                };
                let topic = options.get("topic").map(str::to_string);
                let exactly_once = match options
                    .get_or("deliveryGuarantee", "at-least-once")
                    .to_ascii_lowercase()
                    .as_str()
                {
                    "at-least-once" => None,
                    "exactly-once" if topic.is_none() => {
                        return Err(BrookError::option(
                            "deliveryGuarantee",
                            format!(
                                "{what}: exactly-once needs the 'topic' option (a transaction \
                                 records its batch id in that topic's consumer group)"
                            ),
                        ));
                    }
                    "exactly-once" => {
                        Some(options.get_or("transactionalIdPrefix", "brook").to_string())
                    }
                    other => {
                        return Err(BrookError::option(
                            "deliveryGuarantee",
                            format!("expected at-least-once or exactly-once, found '{other}'"),
                        ));
                    }
                };
                SinkKind::Kafka(KafkaSinkOptions {
                    bootstrap_servers,
                    topic,
                    format,
                    key: options.get("key").map(str::to_string),
                    client,
                    exactly_once,
                })
            }
            "CONSOLE" => SinkKind::Console {
                num_rows: options.parse("numRows", "a row count")?.unwrap_or(20),
            },
            "MEMORY" => SinkKind::Memory,
            other => match OutputFormat::parse(other) {
                Some(format) => SinkKind::File { format, location },
                None => {
                    return Err(BrookError::sql(format!(
                        "sink table '{name}': STORED AS {other} is not a sink; \
                         use PARQUET, CSV, JSON, CONSOLE, MEMORY or KAFKA"
                    )));
                }
            },
        };
        Ok(Self {
            name,
            kind,
            output_mode: options.get("outputMode").map(str::parse).transpose()?,
            trigger: options.get("trigger").map(str::parse).transpose()?,
            query_name: options.get("queryName").map(query_name).transpose()?,
            checkpoint_location: options.get("checkpointLocation").map(str::to_string),
            min_batches_to_retain: options.parse("minBatchesToRetain", "a batch count")?,
        })
    }

    /// Creates the sink; a memory sink is also returned as such, to be registered as a table.
    pub fn open(&self, runtime: &RuntimeEnv) -> Result<(Arc<dyn Sink>, Option<MemorySink>)> {
        Ok(match &self.kind {
            SinkKind::Console { num_rows } => (Arc::new(ConsoleSink::stdout(*num_rows)), None),
            SinkKind::Memory => {
                let sink = MemorySink::new(&self.name);
                (Arc::new(sink.clone()), Some(sink))
            }
            SinkKind::File { format, location } => (
                Arc::new(FileSink::new(
                    Location::resolve(location, runtime)?,
                    *format,
                )?),
                None,
            ),
            SinkKind::Kafka(options) => (Arc::new(KafkaSink::new(options.clone())?), None),
        })
    }
}

/// The value of option `queryName`, which also names the query's checkpoint
/// directory below a checkpoint root (`--checkpoint DIR`): one plain name.
fn query_name(name: &str) -> Result<String> {
    match not_a_directory_name(name) {
        None => Ok(name.to_string()),
        Some(why) => Err(BrookError::option(
            "queryName",
            format!(
                "'{}' cannot name a query ({why}): a query's name is also its checkpoint \
                 directory's below --checkpoint DIR, so it is one plain name such as 'top_clients'",
                name.escape_debug()
            ),
        )),
    }
}

/// Why `name` cannot be one directory below another, if it cannot: a query's
/// name (its `queryName`, else its sink table's) becomes one below `--checkpoint DIR`.
pub(crate) fn not_a_directory_name(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name == "." || name == ".." {
        Some("it names a directory, not one below")
    } else if name.contains(['/', '\\']) {
        Some("it contains a path separator")
    } else if name.contains('\0') {
        Some("it contains a NUL character")
    } else {
        None
    }
}
