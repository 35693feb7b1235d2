//! Streaming sources: where each micro-batch's rows come from.
//!
//! A source plans a batch (decides its input, as an offset that can be written
//! ahead to a checkpoint) before it reads it, and reading an offset again yields
//! the same rows: that is what lets a restarted query re-run a batch exactly.

pub mod file;
pub mod format;
pub mod kafka;
pub(crate) mod location;
pub mod lookup;
pub mod malformed;
pub(crate) mod manifest;
pub(crate) mod shared;
pub(crate) mod socket;
mod timestamps;

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use futures::StreamExt;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

pub(crate) use file::FileSource;
pub use file::{CleanSource, FileSourceOptions};
pub use format::{CsvOptions, DecodeOptions, FileFormat};
pub(crate) use kafka::SharedReads;
pub use location::write_atomically;
pub use malformed::{MalformedRecord, MalformedStats, ParseMode};

use crate::error::Result;

/// What the sources of one engine share: decoded files and Kafka reads.
#[derive(Debug, Default)]
pub(crate) struct SharedInput {
    pub files: Arc<shared::SharedDecodes>,
    pub kafka: Arc<SharedReads>,
}

/// The input of one batch as a source describes it: for files, the files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceOffset(pub serde_json::Value);

/// The rows a batch read, and what was rejected while reading them.
#[derive(Debug, Clone, Default)]
pub struct SourceBatch {
    pub batches: Vec<RecordBatch>,
    pub malformed: MalformedStats,
}

impl SourceBatch {
    /// All the parts of a read, in order.
    pub async fn collect(mut parts: BoxStream<'_, Result<SourceBatch>>) -> Result<Self> {
        let mut read = SourceBatch::default();
        while let Some(part) = parts.next().await {
            read.extend(part?);
        }
        Ok(read)
    }

    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }

    /// Adds `part`, read after this, to it.
    pub fn extend(&mut self, part: SourceBatch) {
        self.batches.extend(part.batches);
        self.malformed.merge(part.malformed);
    }
}

/// What a source noticed about its input besides rows, since the query started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceCounts {
    /// Files that changed after they were read (not read again).
    pub files_changed_after_read: u64,
    /// Files left unread because they cannot be named (a name not in UTF-8).
    pub files_skipped: u64,
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

    /// Reads the input that `offset` names a part at a time (a file, say), so
    /// that a query can work on the first parts while the others are read.
    fn read_parts<'a>(&'a self, offset: &'a SourceOffset) -> BoxStream<'a, Result<SourceBatch>> {
        futures::stream::once(self.read(offset)).boxed()
    }

    /// Records that `offset`'s input has been processed, so it is not planned again.
    fn commit(&mut self, offset: &SourceOffset) -> Result<()>;

    /// Restricts later batches to the input available now (the available-now trigger).
    async fn snapshot_available(&mut self) -> Result<()>;

    fn counts(&self) -> SourceCounts {
        SourceCounts::default()
    }

    /// Waits for work the source does after commits (cleaning up files) as its query ends.
    async fn stop(&mut self) -> Result<()> {
        Ok(())
    }
}
