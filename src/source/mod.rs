//! Streaming sources: where each micro-batch's rows come from.
//!
//! A source plans a batch (decides its input, as an offset that can be written
//! ahead to a checkpoint) before it reads it, and reading an offset again yields
//! the same rows: that is what lets a restarted query re-run a batch exactly.

pub mod file;
pub mod format;
pub mod kafka;
pub mod location;
pub mod malformed;
pub mod shared;
pub mod socket;
mod timestamps;

use std::fmt::Debug;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use serde::{Deserialize, Serialize};

pub use file::{FileSource, FileSourceOptions};
pub use format::{CsvOptions, FileFormat};
pub use malformed::{MalformedRecord, MalformedStats, ParseMode};

use crate::error::Result;

/// The input of one batch as a source describes it: for files, the files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceOffset(pub serde_json::Value);

/// The rows a batch read, and what was rejected while reading them.
#[derive(Debug, Default)]
pub struct SourceBatch {
    pub batches: Vec<RecordBatch>,
    pub malformed: MalformedStats,
}

impl SourceBatch {
    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }
}

#[async_trait]
pub trait StreamSource: Send + Sync + Debug {
    fn schema(&self) -> SchemaRef;

    /// One line naming the source for progress reports and errors.
    fn describe(&self) -> String;

    /// Fixes where a query without checkpointed progress starts reading.
    async fn start(&mut self) -> Result<()>;

    /// The source's progress, written whole into the checkpoint every few batches.
    fn progress(&self) -> Result<serde_json::Value>;

    /// Resumes after a restart from a [`progress`](Self::progress) value (if one
    /// was written) and the offsets of the batches committed after it, oldest first.
    fn restore(
        &mut self,
        progress: Option<serde_json::Value>,
        committed: &[SourceOffset],
    ) -> Result<()>;

    /// Decides the next batch's input without reading it; `None` when nothing is new.
    async fn plan_batch(&mut self) -> Result<Option<SourceOffset>>;

    /// Reads exactly the input that `offset` names.
    async fn read(&self, offset: &SourceOffset) -> Result<SourceBatch>;

    /// Records that `offset`'s input has been processed, so it is not planned again.
    fn commit(&mut self, offset: &SourceOffset) -> Result<()>;

    /// Restricts later batches to the input available now (the available-now trigger).
    async fn snapshot_available(&mut self) -> Result<()>;
}
