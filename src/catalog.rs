//! Source and sink definitions, from `CREATE [UNBOUNDED] EXTERNAL TABLE` or the Rust API.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::logical_expr::CreateExternalTable;

use crate::error::{BrookError, Result};
use crate::exec::{OutputMode, Trigger};
use crate::options::Options;
use crate::sink::{ConsoleSink, FileSink, MemorySink, OutputFormat, Sink};
use crate::source::format::Decoder;
use crate::source::location::Location;
use crate::source::{
    CsvOptions, FileFormat, FileSource, FileSourceOptions, ParseMode, StreamSource,
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
    "mode",
    "columnNameOfCorruptRecord",
    "maxFilesPerTrigger",
    "latestFirst",
    "includeExistingFiles",
    "recursiveFileLookup",
];

const SINK_OPTIONS: &[&str] = &[
    "outputMode",
    "trigger",
    "queryName",
    "numRows",
    "checkpointLocation",
    "minBatchesToRetain",
];

/// A streaming file source: a directory read as an unbounded table.
#[derive(Debug, Clone)]
pub struct SourceDef {
    pub name: String,
    pub location: String,
    pub format: FileFormat,
    pub schema: SchemaRef,
    pub mode: ParseMode,
    pub corrupt_column: String,
    pub file_options: FileSourceOptions,
    pub watermark: Option<WatermarkSpec>,
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
        options.reject_unknown(SOURCE_OPTIONS, &format!("source table '{name}'"))?;
        let schema = Arc::new(cmd.schema.as_arrow().clone());
        let format = match cmd.file_type.to_ascii_uppercase().as_str() {
            "CSV" => FileFormat::Csv(csv_options(&options)?),
            "JSON" | "NDJSON" => FileFormat::Json,
            "PARQUET" => FileFormat::Parquet,
            "TEXT" | "TXT" => FileFormat::Text,
            other => {
                return Err(BrookError::sql(format!(
                    "table '{name}': STORED AS {other} is not a streaming source format; \
                     use CSV, JSON, PARQUET or TEXT"
                )));
            }
        };
        let file_options = FileSourceOptions {
            max_files_per_trigger: options.parse("maxFilesPerTrigger", "a positive count")?,
            latest_first: options.bool("latestFirst", false)?,
            include_existing_files: options.bool("includeExistingFiles", true)?,
            recursive: options.bool("recursiveFileLookup", false)?,
            ..FileSourceOptions::default()
        };
        if file_options.max_files_per_trigger == Some(0) {
            return Err(BrookError::option(
                "maxFilesPerTrigger",
                "must be at least 1",
            ));
        }
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
        };
        def.validate()?;
        Ok(def)
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

    pub fn open(&self, runtime: &RuntimeEnv) -> Result<Box<dyn StreamSource>> {
        let location = Location::resolve(&self.location, runtime)?;
        let decoder = Decoder::new(
            self.format.clone(),
            self.read_schema(),
            self.mode,
            &self.corrupt_column,
        );
        Ok(Box::new(FileSource::new(
            location,
            decoder,
            self.file_options.clone(),
        )?))
    }
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
        options.reject_unknown(SINK_OPTIONS, &format!("sink table '{name}'"))?;
        let location = cmd.locations.first().cloned().unwrap_or_default();
        let kind = match cmd.file_type.to_ascii_uppercase().as_str() {
            "CONSOLE" => SinkKind::Console {
                num_rows: options.parse("numRows", "a row count")?.unwrap_or(20),
            },
            "MEMORY" => SinkKind::Memory,
            other => match OutputFormat::parse(other) {
                Some(format) => SinkKind::File { format, location },
                None => {
                    return Err(BrookError::sql(format!(
                        "sink table '{name}': STORED AS {other} is not a sink; \
                         use PARQUET, CSV, JSON, CONSOLE or MEMORY"
                    )));
                }
            },
        };
        Ok(Self {
            name,
            kind,
            output_mode: options.get("outputMode").map(str::parse).transpose()?,
            trigger: options.get("trigger").map(str::parse).transpose()?,
            query_name: options.get("queryName").map(str::to_string),
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
        })
    }
}
