//! A sink that also keeps the newest rows of a query's output in a memory table,
//! so that the web UI can show a query whose sink is the console, files or Kafka.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;

use super::{GroupKeys, MemorySink, Sink};
use crate::config::OutputMode;
use crate::error::Result;

#[derive(Debug)]
pub struct MirrorSink {
    inner: Arc<dyn Sink>,
    copy: MemorySink,
}

impl MirrorSink {
    pub fn new(inner: Arc<dyn Sink>, copy: MemorySink) -> Self {
        Self { inner, copy }
    }
}

#[async_trait]
impl Sink for MirrorSink {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn open(&self, schema: &SchemaRef, mode: OutputMode, query_id: &str) -> Result<()> {
        self.inner.open(schema, mode, query_id).await?;
        self.copy.open(schema, mode, query_id).await
    }

    async fn open_keyed(
        &self,
        schema: &SchemaRef,
        mode: OutputMode,
        query_id: &str,
        keys: &GroupKeys,
    ) -> Result<()> {
        self.inner.open_keyed(schema, mode, query_id, keys).await?;
        self.copy.open(schema, mode, query_id).await
    }

    async fn restore(&self, batch_id: u64, batches: Vec<RecordBatch>) -> Result<()> {
        self.inner.restore(batch_id, batches.clone()).await?;
        self.copy.restore(batch_id, batches).await
    }

    /// The copy follows only what the real sink took.
    async fn add_batch(&self, batch_id: u64, batches: Vec<RecordBatch>) -> Result<()> {
        self.inner.add_batch(batch_id, batches.clone()).await?;
        self.copy.add_batch(batch_id, batches).await
    }

    async fn finish(&self) -> Result<()> {
        self.inner.finish().await
    }
}
