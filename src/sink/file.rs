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

use std::sync::Mutex;

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
use crate::config::OutputMode;
use crate::error::{BrookError, Result};
use crate::source::location::Location;
use crate::testing::faults;

pub const MANIFEST_DIR: &str = "_brook_manifest";

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
        })
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
        if mode != OutputMode::Append {
            return Err(self.error(format!(
                "file sinks take output mode 'append' only (as Spark's), not '{mode}': \
                 each batch adds files and never rewrites old ones; use a memory or console \
                 sink for '{mode}', or append with a watermark"
            )));
        }
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
        Ok(())
    }
}
