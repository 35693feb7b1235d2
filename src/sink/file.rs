//! Writes each batch as one part file in a directory, with a manifest.
//!
//! A part file is written whole (under a hidden temporary name, then renamed;
//! object stores make `put` atomic), and only then is the batch's manifest
//! entry `_brook_manifest/<batch id>-<query>.json` written, listing its
//! files. Readers that follow the manifest never see a half-written batch;
//! readers that glob `part-*` never see an unfinished file. Part names are
//! derived from the batch id and the query id (`part-<batch>-<query>.<ext>`),
//! so a batch re-run after a restart from a checkpoint replaces its own
//! output, while a new query writing into the same directory adds beside it.
//!
//! In complete mode each batch's whole result is a snapshot instead ([`super::snapshot`]).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::csv::WriterBuilder as CsvWriterBuilder;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::json::LineDelimitedWriter;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;
use serde::Serialize;

use super::Sink;
use super::compact::{self, AutoCompact};
use super::snapshot::{self, Snapshot, SnapshotOptions};
use crate::config::OutputMode;
use crate::error::{BrookError, Result};
use crate::source::location::Location;
use crate::testing::faults;

pub use super::compact::MANIFEST_DIR;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Parquet,
    Csv,
    Json,
}

impl OutputFormat {
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_uppercase().as_str() {
            "PARQUET" => Some(Self::Parquet),
            "CSV" => Some(Self::Csv),
            "JSON" | "NDJSON" => Some(Self::Json),
            _ => None,
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Self::Parquet => "parquet",
            Self::Csv => "csv",
            Self::Json => "json",
        }
    }
}

#[derive(Debug)]
pub struct FileSink {
    location: Location,
    format: OutputFormat,
    /// The schema and the query id's first characters, set by `open`.
    opened: Mutex<Option<(SchemaRef, String)>>,
    compact: Option<AutoCompact>,
    /// Whether the query runs in complete mode, set by `open`: batches are snapshots.
    complete: AtomicBool,
    snapshots: SnapshotOptions,
}

#[derive(Serialize)]
struct ManifestEntry<'a> {
    batch_id: u64,
    files: Vec<ManifestFile<'a>>,
}

#[derive(Serialize)]
struct ManifestFile<'a> {
    path: &'a str,
    rows: usize,
    bytes: usize,
}

impl FileSink {
    pub fn new(location: Location, format: OutputFormat) -> Result<Self> {
        location.ensure_dir()?;
        Ok(Self {
            location,
            format,
            opened: Mutex::new(None),
            compact: None,
            complete: AtomicBool::new(false),
            snapshots: SnapshotOptions::default(),
        })
    }

    /// Compacts the output after every `compactEvery`-th batch, in the batch's task.
    pub fn with_compaction(mut self, compact: Option<AutoCompact>) -> Self {
        self.compact = compact;
        self
    }

    /// How complete-mode results are kept.
    pub fn with_snapshots(self, snapshots: SnapshotOptions) -> Self {
        Self { snapshots, ..self }
    }

    fn error(&self, message: impl Into<String>) -> BrookError {
        BrookError::Sink {
            sink: self.location.display.clone(),
            message: message.into(),
        }
    }

    /// A store's error, naming the sink: the store names only the object's key.
    fn located(&self, e: BrookError) -> BrookError {
        match e {
            BrookError::ObjectStore(e) => self.error(self.location.store_failure(&e)),
            other => other,
        }
    }

    fn encode(&self, schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        match self.format {
            OutputFormat::Parquet => {
                let props = WriterProperties::builder()
                    .set_compression(Compression::ZSTD(ZstdLevel::default()))
                    .build();
                let mut writer = ArrowWriter::try_new(&mut buf, schema.clone(), Some(props))?;
                for b in batches {
                    writer.write(b)?;
                }
                writer.close()?;
            }
            OutputFormat::Csv => {
                let mut writer = CsvWriterBuilder::new().with_header(true).build(&mut buf);
                for b in batches {
                    writer.write(b)?;
                }
            }
            OutputFormat::Json => {
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
        if mode == OutputMode::Complete && self.compact.is_some() {
            return Err(self.error(
                "option 'compactEvery' compacts an append-mode sink's part files; in complete \
                 mode each batch writes one whole snapshot and only 'snapshotsToRetain' of \
                 them are kept, so there is nothing to compact: drop the option",
            ));
        }
        self.complete
            .store(mode == OutputMode::Complete, Ordering::Relaxed);
        let tag: String = query_id.chars().take(8).collect();
        *self
            .opened
            .lock()
            .map_err(|_| self.error("lock poisoned"))? = Some((schema.clone(), tag));
        Ok(())
    }

    async fn add_batch(&self, batch_id: u64, batches: Vec<RecordBatch>) -> Result<()> {
        let (schema, tag) = self
            .opened
            .lock()
            .map_err(|_| self.error("lock poisoned"))?
            .clone()
            .ok_or_else(|| self.error("add_batch before open"))?;
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        if self.complete.load(Ordering::Relaxed) {
            let snapshot = Snapshot {
                batch_id,
                tag: &tag,
                extension: self.format.extension(),
                encoded: self.encode(&schema, &batches)?,
                rows,
            };
            return snapshot::write(&self.location, snapshot, self.snapshots)
                .await
                .map_err(|e| self.located(e));
        }
        let name = format!("part-{batch_id:05}-{tag}.{}", self.format.extension());
        let mut files = vec![];
        if rows > 0 {
            let bytes = self.encode(&schema, &batches)?;
            let len = bytes.len();
            self.location
                .write_file(&name, bytes, ("sink-part-tmp", batch_id))
                .await
                .map_err(|e| self.located(e))?;
            faults::crash_point("sink-part", batch_id);
            files.push(ManifestFile {
                path: &name,
                rows,
                bytes: len,
            });
        }
        let entry = serde_json::to_vec_pretty(&ManifestEntry { batch_id, files })
            .map_err(|e| self.error(e.to_string()))?;
        let manifest = format!("{MANIFEST_DIR}/{batch_id:020}-{tag}.json");
        self.location
            .write_file(&manifest, entry, ("sink-manifest-tmp", batch_id))
            .await
            .map_err(|e| self.located(e))?;
        if let Some(auto) = self.compact
            && (batch_id + 1) % auto.every == 0
        {
            compact::compact(&self.location, auto.target_file_size)
                .await
                .map_err(|e| self.located(e))?;
        }
        Ok(())
    }
}
