//! A named in-memory table holding a query's output, queryable with SQL while
//! the query runs (Spark's memory sink). Complete mode replaces its rows each
//! batch; append and update modes add the batch's rows.

use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;

use super::Sink;
use crate::config::OutputMode;
use crate::error::{BrookError, Result};

#[derive(Debug, Default)]
struct Contents {
    schema: Option<SchemaRef>,
    mode: Option<OutputMode>,
    rows: Vec<RecordBatch>,
    /// The last batch applied, so a batch delivered twice is applied once.
    last_batch: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct MemorySink {
    name: String,
    contents: Arc<RwLock<Contents>>,
    /// Keep only the newest rows, for a table that watches an endless stream.
    max_rows: Option<usize>,
}

impl MemorySink {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            contents: Arc::default(),
            max_rows: None,
        }
    }

    /// A table that keeps only the last `max_rows` rows it was given.
    pub fn with_max_rows(name: impl Into<String>, max_rows: usize) -> Self {
        Self {
            max_rows: Some(max_rows),
            ..Self::new(name)
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The table to register in a session under the sink's name.
    pub fn table(&self) -> Arc<dyn TableProvider> {
        Arc::new(self.clone())
    }

    /// The rows the table holds now.
    pub fn rows(&self) -> Result<Vec<RecordBatch>> {
        Ok(self.read()?.rows.clone())
    }

    fn read(&self) -> Result<std::sync::RwLockReadGuard<'_, Contents>> {
        self.contents.read().map_err(|_| self.poisoned())
    }

    fn poisoned(&self) -> BrookError {
        BrookError::Sink {
            sink: self.name.clone(),
            message: "lock poisoned".into(),
        }
    }
}

#[async_trait]
impl Sink for MemorySink {
    fn describe(&self) -> String {
        format!("MemorySink[{}]", self.name)
    }

    async fn open(&self, schema: &SchemaRef, mode: OutputMode, _query_id: &str) -> Result<()> {
        let mut c = self.contents.write().map_err(|_| self.poisoned())?;
        c.schema = Some(schema.clone());
        c.mode = Some(mode);
        Ok(())
    }

    async fn restore(&self, batch_id: u64, batches: Vec<RecordBatch>) -> Result<()> {
        self.add_batch(batch_id, batches).await
    }

    async fn add_batch(&self, batch_id: u64, batches: Vec<RecordBatch>) -> Result<()> {
        let mut c = self.contents.write().map_err(|_| self.poisoned())?;
        if c.last_batch.is_some_and(|last| batch_id <= last) {
            return Ok(());
        }
        if c.mode == Some(OutputMode::Complete) {
            c.rows.clear();
        }
        c.rows
            .extend(batches.into_iter().filter(|b| b.num_rows() > 0));
        if let Some(max) = self.max_rows {
            c.rows = last_rows(&c.rows, max);
        }
        c.last_batch = Some(batch_id);
        Ok(())
    }
}

/// The last `limit` rows of `batches`, as slices of them.
pub(crate) fn last_rows(batches: &[RecordBatch], limit: usize) -> Vec<RecordBatch> {
    let mut left = limit;
    let mut kept = vec![];
    for batch in batches.iter().rev() {
        if left == 0 {
            break;
        }
        let take = batch.num_rows().min(left);
        kept.push(batch.slice(batch.num_rows() - take, take));
        left -= take;
    }
    kept.reverse();
    kept
}

#[async_trait]
impl TableProvider for MemorySink {
    fn schema(&self) -> SchemaRef {
        self.contents
            .read()
            .ok()
            .and_then(|c| c.schema.clone())
            .unwrap_or_else(|| Arc::new(Schema::empty()))
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        let rows = self
            .contents
            .read()
            .map_err(|_| DataFusionError::Internal("memory sink lock poisoned".into()))?
            .rows
            .clone();
        Ok(MemorySourceConfig::try_new_exec(
            &[rows],
            self.schema(),
            projection.cloned(),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{AsArray, Int64Array};
    use datafusion::arrow::datatypes::Int64Type;

    use super::*;

    fn batch(values: std::ops::Range<i64>) -> RecordBatch {
        RecordBatch::try_from_iter([("n", Arc::new(Int64Array::from_iter_values(values)) as _)])
            .unwrap()
    }

    fn values(sink: &MemorySink) -> Vec<i64> {
        sink.rows()
            .unwrap()
            .iter()
            .flat_map(|b| b.column(0).as_primitive::<Int64Type>().values().to_vec())
            .collect()
    }

    #[tokio::test]
    async fn a_capped_table_keeps_the_newest_rows() {
        let sink = MemorySink::with_max_rows("t", 5);
        let schema = batch(0..1).schema();
        sink.open(&schema, OutputMode::Append, "q").await.unwrap();
        sink.add_batch(0, vec![batch(0..3)]).await.unwrap();
        assert_eq!(values(&sink), [0, 1, 2]);
        sink.add_batch(1, vec![batch(3..5), batch(5..7)])
            .await
            .unwrap();
        assert_eq!(values(&sink), [2, 3, 4, 5, 6]);
        sink.add_batch(2, vec![batch(7..20)]).await.unwrap();
        assert_eq!(values(&sink), [15, 16, 17, 18, 19]);
    }
}
