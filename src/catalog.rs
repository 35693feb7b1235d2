//! Source and sink definitions, from `CREATE [UNBOUNDED] EXTERNAL TABLE` or the Rust API.

use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::logical_expr::CreateExternalTable;
use datafusion::sql::sqlparser::ast::Value;

use crate::config::{OutputMode, Trigger, WatermarkPolicy};
use crate::error::{BrookError, Result};
use crate::options::{Options, duration_or_why, same_key};
use crate::sink::compact::AutoCompact;
use crate::sink::console::ConsoleOptions;
use crate::sink::delta::{DeltaOptions, DeltaSink};
use crate::sink::kafka::{KafkaSink, KafkaSinkOptions};
use crate::sink::snapshot::SnapshotOptions;
use crate::sink::{ConsoleSink, FileSink, MemorySink, OutputFormat, Sink};
use crate::source::kafka::{KafkaOptions, KafkaSource, KafkaValue};
use crate::source::location::Location;
use crate::source::lookup::StaticTable;
use crate::source::{
    DecodeOptions, FileFormat, FileSource, FileSourceOptions, SharedInput, StreamSource,
};
use crate::sql::script::WatermarkSpec;

/// Options every sink table accepts: how its query runs, and the console's
/// `numRows`, which the other sinks ignore.
const SINK_OPTIONS: &[&str] = &[
    "outputMode",
    "trigger",
    "queryName",
    "numRows",
    "checkpointLocation",
    "minBatchesToRetain",
    "multipleWatermarkPolicy",
];

/// The source option saying when an input stops holding back the watermark.
const IDLE_TIMEOUT: &str = "idleTimeout";

/// A streaming source: a directory or Kafka topics read as an unbounded table.
#[derive(Debug, Clone)]
pub struct SourceDef {
    pub name: String,
    /// The table's columns (for a raw Kafka source, Kafka's).
    pub schema: SchemaRef,
    pub watermark: Option<WatermarkSpec>,
    /// After this long without new rows (processing time) the source no
    /// longer holds back the watermark of a query reading several sources.
    pub idle_timeout: Option<Duration>,
    pub kind: SourceKind,
}

/// The kinds of source a table can name with `STORED AS`.
#[derive(Debug, Clone)]
pub enum SourceKind {
    /// The files of a directory (a path or object-store URL), each record a row.
    Files {
        location: String,
        decode: DecodeOptions,
        options: FileSourceOptions,
    },
    /// Kafka topics (`STORED AS KAFKA`).
    Kafka {
        options: KafkaOptions,
        value: KafkaValue,
    },
}

/// A connector's options and the query's `idleTimeout`, which every source takes.
fn with_idle_timeout(options: &[&'static str]) -> Vec<&'static str> {
    options.iter().copied().chain([IDLE_TIMEOUT]).collect()
}

impl SourceDef {
    /// Reads a `CREATE UNBOUNDED EXTERNAL TABLE` statement.
    pub fn from_ddl(cmd: &CreateExternalTable, watermark: Option<WatermarkSpec>) -> Result<Self> {
        let name = cmd.name.table().to_string();
        // The idle timeout is the query's, whatever the connector: the connectors
        // do not see it.
        let idle_timeout = cmd
            .options
            .iter()
            .find(|(k, _)| same_key(k, IDLE_TIMEOUT))
            .map(|(_, v)| {
                duration_or_why(v).map_err(|why| {
                    BrookError::option(IDLE_TIMEOUT, format!("source table '{name}': {why}"))
                })
            })
            .transpose()?;
        let options: Options = cmd
            .options
            .iter()
            .filter(|(k, _)| !same_key(k, IDLE_TIMEOUT))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let declared = Arc::new(cmd.schema.as_arrow().clone());
        let location = cmd.locations.first().map(String::as_str);
        let (schema, kind) = if cmd.file_type.eq_ignore_ascii_case("KAFKA") {
            let what = format!("Kafka source table '{name}'");
            options.reject_unknown_but(
                &with_idle_timeout(KafkaOptions::OPTIONS),
                "kafka.",
                &what,
            )?;
            let kafka = KafkaOptions::from_options(location, &options, &what)?;
            let (value, schema) =
                KafkaValue::from_options(&options, declared, kafka.include_headers, &what)?;
            let kind = SourceKind::Kafka {
                options: kafka,
                value,
            };
            (schema, kind)
        } else {
            options.reject_unknown(
                &with_idle_timeout(FileSourceOptions::OPTIONS),
                &format!("source table '{name}'"),
            )?;
            let Some(format) = FileFormat::from_options(&cmd.file_type, &options, &name)? else {
                return Err(BrookError::sql(format!(
                    "table '{name}': STORED AS {} is not a streaming source format; \
                     use CSV, JSON, PARQUET, TEXT or KAFKA",
                    cmd.file_type.to_ascii_uppercase()
                )));
            };
            let kind = SourceKind::Files {
                decode: DecodeOptions::from_options(format, &options)?,
                options: FileSourceOptions::from_options(&options)?,
                location: location.unwrap_or_default().to_string(),
            };
            (declared, kind)
        };
        let def = Self {
            name,
            schema,
            watermark,
            idle_timeout,
            kind,
        };
        def.validate()?;
        Ok(def)
    }

    /// How records become rows; `None` for a raw Kafka source, which parses nothing.
    fn decode(&self) -> Option<&DecodeOptions> {
        match &self.kind {
            SourceKind::Files { decode, .. } => Some(decode),
            SourceKind::Kafka {
                value: KafkaValue::Parsed(decode),
                ..
            } => Some(decode),
            SourceKind::Kafka {
                value: KafkaValue::Raw,
                ..
            } => None,
        }
    }

    /// What the source reads, as a checkpoint records it: a relative directory is
    /// resolved, since offsets name files by absolute path.
    pub fn identity(&self) -> String {
        match &self.kind {
            SourceKind::Kafka { options, value } => format!(
                "KAFKA {} [{}] value {}",
                options.bootstrap_servers,
                options.topics,
                match value {
                    KafkaValue::Raw => "raw",
                    KafkaValue::Parsed(decode) => decode.format.name(),
                }
            ),
            SourceKind::Files {
                location, decode, ..
            } if location.contains("://") => {
                format!("{} '{}'", decode.format.name(), location)
            }
            SourceKind::Files {
                location, decode, ..
            } => format!(
                "{} '{}'",
                decode.format.name(),
                std::path::absolute(location)
                    .map_or_else(|_| location.clone(), |p| p.display().to_string())
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
        let format = self.decode().map(|d| &d.format);
        if self.schema.fields().is_empty() {
            match format {
                None | Some(FileFormat::Text) => return Ok(()),
                Some(format) => {
                    return fail(format!(
                        "declare its columns: {} files are read with the declared schema",
                        format.name()
                    ));
                }
            }
        }
        if matches!(&self.kind, SourceKind::Files { decode, .. } if decode.format == FileFormat::Text)
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
                Err(_) => {
                    let columns: Vec<&str> = self
                        .schema
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .collect();
                    return fail(format!(
                        "watermark column '{}' is not a column of the table; its columns: {}",
                        wm.column,
                        columns.join(", ")
                    ));
                }
            }
        }
        Ok(())
    }

    /// The schema rows are read with: a TEXT source without columns reads `value`.
    pub fn read_schema(&self) -> SchemaRef {
        let text = matches!(self.decode(), Some(d) if d.format == FileFormat::Text);
        if text && self.schema.fields().is_empty() {
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
        match &self.kind {
            SourceKind::Kafka { options, value } => {
                let decoder = match value {
                    KafkaValue::Raw => None,
                    KafkaValue::Parsed(decode) => Some(decode.decoder(self.read_schema())),
                };
                Ok(Box::new(KafkaSource::new(
                    options.clone(),
                    decoder,
                    &shared.kafka,
                )?))
            }
            SourceKind::Files {
                location,
                decode,
                options,
            } => Ok(Box::new(FileSource::new(
                Location::resolve(location, runtime)?,
                decode.decoder(self.read_schema()),
                options.clone(),
                &shared.files,
            )?)),
        }
    }
}

/// A bounded table read by streaming queries (a lookup table), from a
/// `CREATE EXTERNAL TABLE` without UNBOUNDED that no statement inserts into.
#[derive(Debug, Clone)]
pub struct StaticDef {
    /// The declaration as DataFusion reads it, without brook's own options.
    cmd: CreateExternalTable,
    /// How long the table's files are trusted unchanged; checked every batch without it.
    refresh: Option<Duration>,
}

impl StaticDef {
    /// The options brook reads; DataFusion reads the others (`format.*`).
    const OPTIONS: &[&str] = &["refreshInterval"];

    pub fn from_ddl(cmd: &CreateExternalTable) -> Result<Self> {
        let name = cmd.name.table();
        let file_type = cmd.file_type.to_ascii_uppercase();
        if !["PARQUET", "CSV", "JSON"].contains(&file_type.as_str()) {
            return Err(BrookError::sql(format!(
                "table '{name}' is read as a static table, but STORED AS {file_type} is a sink \
                 only; a static table is STORED AS PARQUET, CSV or JSON"
            )));
        }
        let options: Options = cmd
            .options
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(key) = SINK_OPTIONS.iter().find(|o| options.get(o).is_some()) {
            return Err(BrookError::option(
                *key,
                format!(
                    "table '{name}' is read as a static table, but option '{key}' is a sink's \
                     (it says how a query writing into the table runs); drop it, or declare \
                     the static table and the sink as two tables"
                ),
            ));
        }
        let refresh = options
            .get("refreshInterval")
            .map(|v| {
                duration_or_why(v).map_err(|why| {
                    BrookError::option("refreshInterval", format!("static table '{name}': {why}"))
                })
            })
            .transpose()?;
        let mut cmd = cmd.clone();
        cmd.options
            .retain(|k, _| !Self::OPTIONS.iter().any(|o| same_key(k, o)));
        Ok(Self { cmd, refresh })
    }

    /// Whether `cmd` gives options that only a static table takes.
    pub fn has_own_options(cmd: &CreateExternalTable) -> bool {
        cmd.options
            .keys()
            .any(|k| Self::OPTIONS.iter().any(|o| same_key(k, o)))
    }

    /// The table, its schema read from the declaration or inferred from its files.
    pub async fn open(&self, runtime: Arc<RuntimeEnv>) -> Result<StaticTable> {
        StaticTable::new(&self.cmd, self.refresh, runtime).await
    }
}

/// The kinds of sink a table can name with `STORED AS`.
#[derive(Debug, Clone)]
pub enum SinkKind {
    Console(ConsoleOptions),
    Memory,
    File {
        format: OutputFormat,
        location: String,
        compact: Option<AutoCompact>,
        snapshots: SnapshotOptions,
        /// `PARTITIONED BY` columns: Hive-style directories by their values.
        partition_by: Vec<String>,
        /// The format's writer options ([`OutputFormat::options`]).
        options: Options,
    },
    Kafka(KafkaSinkOptions),
    /// A Delta Lake table (`STORED AS DELTA [PARTITIONED BY (...)]`).
    Delta {
        location: String,
        partition_by: Vec<String>,
        options: DeltaOptions,
    },
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
    pub watermark_policy: Option<WatermarkPolicy>,
}

impl SinkDef {
    /// The sink `INSERT INTO console` uses when no table of that name was declared.
    pub fn console() -> Self {
        Self {
            name: "console".into(),
            kind: SinkKind::Console(ConsoleOptions::default()),
            output_mode: None,
            trigger: None,
            query_name: None,
            checkpoint_location: None,
            min_batches_to_retain: None,
            watermark_policy: None,
        }
    }

    /// Reads a `CREATE EXTERNAL TABLE ... STORED AS PARQUET|CSV|JSON|CONSOLE|MEMORY|KAFKA` statement.
    pub fn from_ddl(cmd: &CreateExternalTable) -> Result<Self> {
        let name = cmd.name.table().to_string();
        let options: Options = cmd
            .options
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let what = format!("sink table '{name}'");
        let location = cmd.locations.first().map(String::as_str);
        let file_type = cmd.file_type.to_ascii_uppercase();
        let files_or_delta = OutputFormat::parse(&file_type).is_some() || file_type == "DELTA";
        if !files_or_delta
            && let Some(key) = AutoCompact::OPTIONS
                .iter()
                .find(|o| options.get(o).is_some())
        {
            return Err(BrookError::option(
                *key,
                format!(
                    "{what} is STORED AS {file_type}: only file sinks (PARQUET, CSV, JSON) \
                     and Delta tables compact their output"
                ),
            ));
        }
        if file_type == "KAFKA" {
            let known = [SINK_OPTIONS, KafkaSinkOptions::OPTIONS].concat();
            options.reject_unknown_but(&known, "kafka.", &what)?;
        } else if let Some(format) = OutputFormat::parse(&file_type) {
            let parquet = OutputFormat::Parquet.options();
            if format != OutputFormat::Parquet
                && let Some(key) = parquet.iter().find(|k| options.get(k).is_some())
            {
                return Err(BrookError::option(
                    *key,
                    format!("a Parquet writer option, but {what} is STORED AS {file_type}"),
                ));
            }
            options.reject_unknown(
                &[
                    SINK_OPTIONS,
                    AutoCompact::OPTIONS,
                    SnapshotOptions::OPTIONS,
                    &format.options(),
                ]
                .concat(),
                &what,
            )?;
        } else if file_type == "DELTA" {
            options.reject_unknown(&[SINK_OPTIONS, &DeltaOptions::options()].concat(), &what)?;
        } else {
            options.reject_unknown(SINK_OPTIONS, &what)?;
        }
        if !cmd.table_partition_cols.is_empty() && !files_or_delta {
            return Err(BrookError::sql(format!(
                "{what}: PARTITIONED BY is for PARQUET, CSV, JSON and DELTA sinks, not {file_type}"
            )));
        }
        let kind = match file_type.as_str() {
            "KAFKA" => SinkKind::Kafka(KafkaSinkOptions::from_options(location, &options, &what)?),
            "CONSOLE" => SinkKind::Console(ConsoleOptions::from_options(&options)?),
            "MEMORY" => SinkKind::Memory,
            "DELTA" => SinkKind::Delta {
                location: location.unwrap_or_default().to_string(),
                partition_by: cmd.table_partition_cols.clone(),
                options: DeltaOptions::from_options(&options)?,
            },
            other => match OutputFormat::parse(other) {
                Some(format) => SinkKind::File {
                    format,
                    location: location.unwrap_or_default().to_string(),
                    compact: AutoCompact::from_options(&options)?,
                    snapshots: SnapshotOptions::from_options(&options)?,
                    partition_by: cmd.table_partition_cols.clone(),
                    options: format
                        .options()
                        .iter()
                        .filter_map(|k| options.get(k).map(|v| (*k, v)))
                        .collect(),
                },
                None => {
                    return Err(BrookError::sql(format!(
                        "sink table '{name}': STORED AS {other} is not a sink; \
                         use PARQUET, CSV, JSON, DELTA, CONSOLE, MEMORY or KAFKA"
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
            watermark_policy: options
                .get("multipleWatermarkPolicy")
                .map(str::parse)
                .transpose()?,
        })
    }

    /// Creates the sink; a memory sink is also returned as such, to be registered as a table.
    pub fn open(&self, runtime: &RuntimeEnv) -> Result<(Arc<dyn Sink>, Option<MemorySink>)> {
        Ok(match &self.kind {
            SinkKind::Console(options) => (Arc::new(ConsoleSink::stdout(options.num_rows)), None),
            SinkKind::Memory => {
                let sink = MemorySink::new(&self.name);
                (Arc::new(sink.clone()), Some(sink))
            }
            SinkKind::File {
                format,
                location,
                compact,
                snapshots,
                partition_by,
                options,
            } => (
                Arc::new(
                    FileSink::new(Location::resolve(location, runtime)?, *format)?
                        .with_compaction(*compact)
                        .with_snapshots(*snapshots)
                        .partitioned_by(partition_by.clone())
                        .with_writer_options(options.clone()),
                ),
                None,
            ),
            SinkKind::Kafka(options) => (Arc::new(KafkaSink::new(options.clone())?), None),
            SinkKind::Delta {
                location,
                partition_by,
                options,
            } => (
                Arc::new(DeltaSink::new(
                    Location::resolve(location, runtime)?,
                    partition_by.clone(),
                    options.clone(),
                )),
                None,
            ),
        })
    }
}

/// Takes a PARQUET or DELTA table's `compression` option out of its declaration, to be
/// put back after planning: DataFusion's planner reads that key as a whole-file
/// codec (gzip, bzip2, ...), which it refuses for Parquet, while a Parquet sink
/// reads it as the column chunks' codec, as Spark does.
pub(crate) fn hold_parquet_compression(
    create: &mut datafusion::sql::parser::CreateExternalTable,
) -> Option<(String, String)> {
    if !["PARQUET", "DELTA"]
        .iter()
        .any(|t| create.file_type.eq_ignore_ascii_case(t))
    {
        return None;
    }
    let at = create
        .options
        .iter()
        .position(|(k, _)| same_key(k, "compression"))?;
    let (_, value) = create.options.remove(at);
    let text = match value {
        Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => s,
        other => other.to_string(),
    };
    Some(("format.compression".to_string(), text))
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
