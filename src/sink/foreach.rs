//! Hands each batch to user code, as Spark's `foreachBatch`.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;

use super::Sink;
use crate::config::OutputMode;
use crate::error::Result;

type BatchFn = dyn Fn(u64, &[RecordBatch]) -> Result<()> + Send + Sync;

/// Calls a function with each batch id and its rows. The batch id lets the
/// function write idempotently: a batch re-run after a crash has the same id.
#[derive(Clone)]
pub struct ForeachBatchSink {
    f: Arc<BatchFn>,
}

impl ForeachBatchSink {
    pub fn new(f: impl Fn(u64, &[RecordBatch]) -> Result<()> + Send + Sync + 'static) -> Self {
        Self { f: Arc::new(f) }
    }
}

impl fmt::Debug for ForeachBatchSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ForeachBatchSink")
    }
}

#[async_trait]
impl Sink for ForeachBatchSink {
    fn describe(&self) -> String {
        "ForeachBatchSink".into()
    }

    async fn open(&self, _schema: &SchemaRef, _mode: OutputMode, _query_id: &str) -> Result<()> {
        Ok(())
    }

    async fn add_batch(&self, batch_id: u64, batches: Vec<RecordBatch>) -> Result<()> {
        (self.f)(batch_id, &batches)
    }
}
