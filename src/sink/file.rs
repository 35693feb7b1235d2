//! Writes each batch as one part file in a directory (one per partition,
//! Hive-style, under `PARTITIONED BY`), with a manifest.
//!
//! A part file is written whole (under a hidden temporary name, then renamed;
//! object stores make `put` atomic), and only then is the batch's manifest
//! entry `_brook_manifest/<batch id>-<query>.json` written, listing its
//! files. Readers that follow the manifest never see a half-written batch;
//! readers that glob `part-*` never see an unfinished file. Part names are
//! derived from the batch id and the query id (`part-<batch>-<query>.<ext>`),
//! so a batch re-run after a restart from a checkpoint replaces its own
//! output, while a new query writing into the same directory adds beside it.
//! A partitioned sink writes the same names below `col=value/` directories,
//! named as Spark names them, and leaves the partition columns out of the files.
//!
//! In complete mode each batch's whole result is a snapshot instead ([`super::snapshot`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datafusion::arrow::array::{Array, ArrayRef, RecordBatch};
use datafusion::arrow::compute::{
    SortColumn, concat_batches, lexsort_to_indices, take_record_batch,
};
use datafusion::arrow::csv::WriterBuilder as CsvWriterBuilder;
use datafusion::arrow::datatypes::{DataType, Schema, SchemaRef};
use datafusion::arrow::json::LineDelimitedWriter;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::file::properties::WriterProperties;
use serde::Serialize;

use super::compact::{self, AutoCompact, CompactReport};
use super::snapshot::{self, Snapshot, SnapshotOptions};
use super::upkeep::Upkeep;
use super::{Sink, parquet};
use crate::config::OutputMode;
use crate::error::{BrookError, Result};
use crate::options::Options;
use crate::source::location::Location;
use crate::testing::faults;

pub use super::compact::{MANIFEST_DIR, OutputFormat};

/// The directory name Spark and Hive give a null or empty partition value.
pub const DEFAULT_PARTITION: &str = "__HIVE_DEFAULT_PARTITION__";

#[derive(Debug)]
pub struct FileSink {
    location: Location,
    format: OutputFormat,
    partition_by: Vec<String>,
    /// The writer options ([`OutputFormat::options`]).
    options: Options,
    opened: Mutex<Option<Arc<Opened>>>,
    compact: Option<AutoCompact>,
    /// The compaction running beside the batches.
    compacting: tokio::sync::Mutex<Upkeep<CompactReport>>,
    /// Whether the query runs in complete mode, set by `open`: batches are snapshots.
    complete: AtomicBool,
    snapshots: SnapshotOptions,
}

/// What `open` learned from the query's output schema.
#[derive(Debug)]
struct Opened {
    /// The output's schema, partition columns included.
    schema: SchemaRef,
    /// The query id's first characters, in part names.
    tag: String,
    /// Where the partition columns are in the output, in `PARTITIONED BY` order.
    partition: Vec<usize>,
    /// The output columns the files hold: all but the partition columns.
    data: Vec<usize>,
    encoder: Encoder,
}

/// How batches become a file's bytes, settled once by `open`.
#[derive(Debug)]
enum Encoder {
    Parquet {
        /// From the writer options, for the files' columns.
        props: Box<WriterProperties>,
        /// The files' columns, with timestamps in the unit the options name.
        schema: SchemaRef,
    },
    Csv,
    Json,
}

impl Encoder {
    /// The encoder of `format` with writer `options` for files of `schema`
    /// (the columns the files hold); fails on a bad option.
    fn new(format: OutputFormat, options: &Options, schema: &Schema) -> Result<Self> {
        Ok(match format {
            OutputFormat::Parquet => {
                let props = parquet::writer_properties(options, schema)?;
                let unit = parquet::timestamp_unit(options)?;
                Self::Parquet {
                    props: Box::new(props),
                    schema: parquet::with_timestamp_unit(schema, unit),
                }
            }
            OutputFormat::Csv => Self::Csv,
            OutputFormat::Json => Self::Json,
        })
    }

    /// `batches` (of the columns the files hold) as one file's bytes.
    fn encode(&self, batches: &[RecordBatch]) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        match self {
            Self::Parquet { props, schema } => {
                let props = Some(props.as_ref().clone());
                let mut writer = ArrowWriter::try_new(&mut buf, schema.clone(), props)?;
                for b in batches {
                    writer.write(&parquet::cast_timestamps(b, schema)?)?;
                }
                writer.close()?;
            }
            Self::Csv => {
                let mut writer = CsvWriterBuilder::new().with_header(true).build(&mut buf);
                for b in batches {
                    writer.write(b)?;
                }
            }
            Self::Json => {
                let mut writer = LineDelimitedWriter::new(&mut buf);
                for b in batches {
                    writer.write(b)?;
                }
                writer.finish()?;
            }
        }
        Ok(buf)
    }
}

#[derive(Serialize)]
struct ManifestEntry {
    batch_id: u64,
    files: Vec<ManifestFile>,
}

#[derive(Serialize)]
struct ManifestFile {
    /// Relative to the sink's directory.
    path: String,
    rows: usize,
    bytes: usize,
}

impl FileSink {
    pub fn new(location: Location, format: OutputFormat) -> Result<Self> {
        location.ensure_dir()?;
        Ok(Self {
            location,
            format,
            partition_by: vec![],
            options: Options::new(),
            opened: Mutex::new(None),
            compact: None,
            compacting: tokio::sync::Mutex::new(Upkeep::default()),
            complete: AtomicBool::new(false),
            snapshots: SnapshotOptions::default(),
        })
    }

    /// Compacts the output after every `compactEvery`-th batch, beside the
    /// batches that follow (a compaction is safe while batches are written).
    pub fn with_compaction(mut self, compact: Option<AutoCompact>) -> Self {
        self.compact = compact;
        self
    }

    /// How complete-mode results are kept.
    pub fn with_snapshots(self, snapshots: SnapshotOptions) -> Self {
        Self { snapshots, ..self }
    }

    /// Splits each batch into Hive-style directories by the values of `columns`.
    pub fn partitioned_by(mut self, columns: Vec<String>) -> Self {
        self.partition_by = columns;
        self
    }

    /// The writer options ([`OutputFormat::options`]), checked by `open`.
    pub fn with_writer_options(mut self, options: Options) -> Self {
        self.options = options;
        self
    }

    fn error(&self, message: impl Into<String>) -> BrookError {
        BrookError::Sink {
            sink: self.location.display.clone(),
            message: message.into(),
        }
    }

    /// A store's error, naming the sink: the store names only the object's key.
    fn located(&self, e: BrookError) -> BrookError {
        located(&self.location, e)
    }

    fn opened(&self) -> Result<Option<Arc<Opened>>> {
        Ok(self
            .opened
            .lock()
            .map_err(|_| self.error("lock poisoned"))?
            .clone())
    }

    /// Where the partition columns are in `schema`, and the other columns;
    /// fails on a column that is not there, or on partitioning by all of them.
    fn partition_columns(&self, schema: &Schema) -> Result<(Vec<usize>, Vec<usize>)> {
        let names = || {
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            names.join(", ")
        };
        let mut partition = vec![];
        for column in &self.partition_by {
            let Ok(i) = schema.index_of(column) else {
                return Err(self.error(format!(
                    "PARTITIONED BY column '{column}' is not an output column of the query; \
                     its columns: {}",
                    names()
                )));
            };
            let t = schema.field(i).data_type();
            if !partition_type(t) {
                return Err(self.error(format!(
                    "PARTITIONED BY column '{column}' is {t}; partition columns are dates, \
                     timestamps, integers, strings or booleans"
                )));
            }
            partition.push(i);
        }
        let data: Vec<usize> = (0..schema.fields().len())
            .filter(|i| !partition.contains(i))
            .collect();
        if data.is_empty() {
            return Err(self.error(format!(
                "PARTITIONED BY names every output column ({}): the files would hold no \
                 column; leave at least one out",
                names()
            )));
        }
        Ok((partition, data))
    }

    /// The rows of `batches` grouped by partition directory (`a=1/b=x`), each
    /// without the partition columns.
    fn split(
        &self,
        opened: &Opened,
        batches: Vec<RecordBatch>,
    ) -> Result<BTreeMap<String, Vec<RecordBatch>>> {
        let mut groups: BTreeMap<String, Vec<RecordBatch>> = BTreeMap::new();
        if opened.partition.is_empty() {
            // Written as they came: no copy into one batch.
            groups.insert(String::new(), batches);
            return Ok(groups);
        }
        let batch = &concat_batches(&opened.schema, &batches)?;
        let keys: Vec<SortColumn> = opened
            .partition
            .iter()
            .map(|&i| SortColumn {
                values: batch.column(i).clone(),
                options: None,
            })
            .collect();
        let sorted = take_record_batch(batch, &lexsort_to_indices(&keys, None)?)?;
        let keys: Vec<ArrayRef> = opened
            .partition
            .iter()
            .map(|&i| sorted.column(i).clone())
            .collect();
        let formats = FormatOptions::new()
            .with_timestamp_format(Some("%Y-%m-%d %H:%M:%S%.f"))
            .with_timestamp_tz_format(Some("%Y-%m-%d %H:%M:%S%.f"));
        let formatters = keys
            .iter()
            .map(|k| ArrayFormatter::try_new(k.as_ref(), &formats))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        for range in datafusion::arrow::compute::partition(&keys)?.ranges() {
            let dir: Vec<String> = opened
                .partition
                .iter()
                .zip(keys.iter().zip(&formatters))
                .map(|(&i, (key, format))| {
                    let value = if key.is_null(range.start) {
                        String::new()
                    } else {
                        spark_value(key.data_type(), format.value(range.start).to_string())
                    };
                    format!(
                        "{}={}",
                        escape_path_name(opened.schema.field(i).name()),
                        if value.is_empty() {
                            DEFAULT_PARTITION.to_string()
                        } else {
                            escape_path_name(&value)
                        }
                    )
                })
                .collect();
            // Nulls and empty strings share a directory: its rows are gathered.
            let rows = sorted.slice(range.start, range.end - range.start);
            groups
                .entry(dir.join("/"))
                .or_default()
                .push(rows.project(&opened.data)?);
        }
        Ok(groups)
    }
}

/// Whether a column of type `t` can name partition directories.
fn partition_type(t: &DataType) -> bool {
    t.is_integer()
        || matches!(
            t,
            DataType::Utf8
                | DataType::LargeUtf8
                | DataType::Utf8View
                | DataType::Boolean
                | DataType::Date32
                | DataType::Date64
                | DataType::Timestamp(_, _)
        )
}

/// A partition value as Spark writes it: timestamps without trailing zeros in
/// their fraction (`2016-03-22 20:00:01.5`).
fn spark_value(t: &DataType, text: String) -> String {
    if matches!(t, DataType::Timestamp(_, _)) && text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

/// `name` escaped as Spark's `ExternalCatalogUtils.escapePathName` escapes
/// partition names and values (Hive's set), plus NUL, which no file name holds.
pub fn escape_path_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        let escape = c.is_ascii_control()
            || matches!(
                c,
                '"' | '#' | '%' | '\'' | '*' | '/' | ':' | '=' | '?' | '\\' | '{' | '[' | ']' | '^'
            );
        if escape {
            out.push_str(&format!("%{:02X}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

#[async_trait]
impl Sink for FileSink {
    fn describe(&self) -> String {
        format!("FileSink[{:?} {}]", self.format, self.location.display)
    }

    async fn open(&self, schema: &SchemaRef, mode: OutputMode, query_id: &str) -> Result<()> {
        if mode == OutputMode::Update {
            return Err(self.error(format!(
                "file sinks take output mode 'append' or 'complete', not '{mode}': \
                 append adds each batch's files and never rewrites old ones, complete writes \
                 each batch's whole result as a new snapshot (see _latest); use a memory or \
                 console sink for '{mode}', complete, or append with a watermark"
            )));
        }
        let complete = mode == OutputMode::Complete;
        if complete && self.compact.is_some() {
            return Err(self.error(
                "option 'compactEvery' compacts an append-mode sink's part files; in complete \
                 mode each batch writes one whole snapshot and only 'snapshotsToRetain' of \
                 them are kept, so there is nothing to compact: drop the option",
            ));
        }
        if complete && !self.partition_by.is_empty() {
            return Err(self.error(
                "PARTITIONED BY splits an append-mode sink's batches into directories; in \
                 complete mode each batch's whole result is one snapshot file (see _latest): \
                 drop PARTITIONED BY, or write the result to a Delta table (STORED AS DELTA)",
            ));
        }
        self.complete.store(complete, Ordering::Relaxed);
        let (partition, data) = self.partition_columns(schema)?;
        // Bad writer options fail here, at start, not at the first batch with rows.
        let encoder = Encoder::new(self.format, &self.options, &schema.project(&data)?)?;
        let tag: String = query_id.chars().take(8).collect();
        *self
            .opened
            .lock()
            .map_err(|_| self.error("lock poisoned"))? = Some(Arc::new(Opened {
            schema: schema.clone(),
            tag,
            partition,
            data,
            encoder,
        }));
        Ok(())
    }

    async fn add_batch(&self, batch_id: u64, batches: Vec<RecordBatch>) -> Result<()> {
        let opened = self
            .opened()?
            .ok_or_else(|| self.error("add_batch before open"))?;
        if self.complete.load(Ordering::Relaxed) {
            let snapshot = Snapshot {
                batch_id,
                tag: &opened.tag,
                extension: self.format.extension(),
                encoded: opened.encoder.encode(&batches)?,
                rows: batches.iter().map(RecordBatch::num_rows).sum(),
            };
            return snapshot::write(&self.location, snapshot, self.snapshots)
                .await
                .map_err(|e| self.located(e));
        }
        let name = format!(
            "part-{batch_id:05}-{}.{}",
            opened.tag,
            self.format.extension()
        );
        let mut files = vec![];
        if batches.iter().any(|b| b.num_rows() > 0) {
            for (dir, parts) in self.split(&opened, batches)? {
                let path = if dir.is_empty() {
                    name.clone()
                } else {
                    format!("{dir}/{name}")
                };
                let bytes = opened.encoder.encode(&parts)?;
                let len = bytes.len();
                self.location
                    .write_file(&path, bytes, ("sink-part-tmp", batch_id))
                    .await
                    .map_err(|e| self.located(e))?;
                faults::crash_point("sink-part", batch_id);
                files.push(ManifestFile {
                    path,
                    rows: parts.iter().map(RecordBatch::num_rows).sum(),
                    bytes: len,
                });
            }
        }
        let entry = serde_json::to_vec_pretty(&ManifestEntry { batch_id, files })
            .map_err(|e| self.error(e.to_string()))?;
        let manifest = format!("{MANIFEST_DIR}/{batch_id:020}-{}.json", opened.tag);
        self.location
            .write_file(&manifest, entry, ("sink-manifest-tmp", batch_id))
            .await
            .map_err(|e| self.located(e))?;
        if let Some(auto) = self.compact {
            let mut compacting = self.compacting.lock().await;
            compacting.settle_finished().await?;
            if (batch_id + 1).is_multiple_of(auto.every) {
                compacting.due = true;
            }
            self.start_compaction(&mut compacting, auto)?;
        }
        Ok(())
    }

    async fn finish(&self) -> Result<()> {
        let Some(auto) = self.compact else {
            return Ok(());
        };
        let mut compacting = self.compacting.lock().await;
        compacting.settle().await?;
        // One that came due while the last ran.
        self.start_compaction(&mut compacting, auto)?;
        compacting.settle().await.map(|_| ())
    }
}

impl FileSink {
    fn start_compaction(
        &self,
        compacting: &mut Upkeep<CompactReport>,
        auto: AutoCompact,
    ) -> Result<()> {
        if !compacting.due || compacting.is_running() {
            return Ok(());
        }
        let location = self.location.clone();
        compacting.start(async move {
            compact::compact(&location, auto.target_file_size)
                .await
                .map_err(|e| located(&location, e))
        })
    }
}

/// `e`, a store's failure named by the sink's location and what to check.
fn located(location: &Location, e: BrookError) -> BrookError {
    match e {
        BrookError::ObjectStore(e) => BrookError::Sink {
            sink: location.display.clone(),
            message: location.store_failure(&e),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_names_are_escaped_as_spark_escapes_them() {
        assert_eq!(escape_path_name("A/B"), "A%2FB");
        assert_eq!(escape_path_name("x=y%"), "x%3Dy%25");
        assert_eq!(escape_path_name("20:00:01"), "20%3A00%3A01");
        assert_eq!(escape_path_name("tab\there"), "tab%09here");
        assert_eq!(escape_path_name("café ok"), "café ok");
    }
}
