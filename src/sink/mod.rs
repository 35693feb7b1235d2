//! Where each batch's result goes.

pub mod compact;
pub mod console;
pub mod delta;
pub mod file;
pub mod foreach;
pub mod kafka;
pub mod memory;
pub(crate) mod mirror;
pub mod parquet;
pub mod snapshot;
mod upkeep;

use std::fmt::Debug;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;

pub use console::ConsoleSink;
pub use delta::DeltaSink;
pub use file::{FileSink, OutputFormat};
pub use foreach::ForeachBatchSink;
pub use memory::MemorySink;
pub(crate) use mirror::MirrorSink;

use crate::config::OutputMode;
use crate::error::Result;

/// Which output columns of a query are its aggregation's group keys: what a
/// sink that updates rows in place (update mode) matches rows on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum GroupKeys {
    /// The query does not aggregate.
    #[default]
    None,
    /// The output columns holding the group keys, one per key.
    Columns(Vec<String>),
    /// The group keys (as written) that are not output columns.
    Missing(Vec<String>),
}

#[async_trait]
pub trait Sink: Send + Sync + Debug {
    /// One line naming the sink for progress reports and errors.
    fn describe(&self) -> String;

    /// Called once before the first batch with the query's output schema, mode
    /// and id (the same across restarts from a checkpoint); a sink that cannot
    /// take that mode says so here.
    async fn open(&self, schema: &SchemaRef, mode: OutputMode, query_id: &str) -> Result<()>;

    /// `open`, also told which output columns are the group keys; the query
    /// calls this one. Sinks that do not match rows on keys need only `open`.
    async fn open_keyed(
        &self,
        schema: &SchemaRef,
        mode: OutputMode,
        query_id: &str,
        _keys: &GroupKeys,
    ) -> Result<()> {
        self.open(schema, mode, query_id).await
    }

    /// Receives a complete-mode query's last committed result when the query
    /// restarts from a checkpoint. A sink whose output outlives the process
    /// holds it already; one that does not (the memory sink) takes it again.
    async fn restore(&self, _batch_id: u64, _batches: Vec<RecordBatch>) -> Result<()> {
        Ok(())
    }

    /// Receives batch `batch_id`'s result. A batch may be delivered again
    /// after a restart; sinks make that idempotent by batch id.
    async fn add_batch(&self, batch_id: u64, batches: Vec<RecordBatch>) -> Result<()>;

    /// Called when the query stops: a sink that keeps work off the batch path
    /// (the Delta sink's compaction, log checkpoints and VACUUM) finishes it,
    /// so a stopped query leaves its output as its last batch did.
    async fn finish(&self) -> Result<()> {
        Ok(())
    }
}
