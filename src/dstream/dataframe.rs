//! `transform_df`: a batch of typed rows as a DataFusion DataFrame, and back.
//!
//! Rows go to Arrow through serde (each row must serialise as a JSON object,
//! e.g. a struct with named fields), with the columns inferred from the batch;
//! the DataFrame's result comes back through arrow's JSON writer into `U`.

use std::future::Future;
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::json::reader::{ReaderBuilder, infer_json_schema_from_iterator};
use datafusion::arrow::json::writer::LineDelimitedWriter;
use datafusion::dataframe::DataFrame;
use datafusion::prelude::SessionContext;

use super::{DStream, Data};
use crate::error::{BrookError, Result};

fn to_batch<T: Data>(rows: &[T]) -> Result<RecordBatch> {
    let values = rows
        .iter()
        .map(serde_json::to_value)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| BrookError::serde("transform_df: a row does not serialise", e))?;
    let schema = Arc::new(infer_json_schema_from_iterator(values.iter().map(Ok))?);
    let mut decoder = ReaderBuilder::new(schema.clone()).build_decoder()?;
    decoder.serialize(&values)?;
    Ok(decoder
        .flush()?
        .unwrap_or_else(|| RecordBatch::new_empty(schema)))
}

fn from_batches<U: Data>(batches: &[RecordBatch]) -> Result<Vec<U>> {
    let mut buf = Vec::new();
    let mut writer = LineDelimitedWriter::new(&mut buf);
    for b in batches {
        writer.write(b)?;
    }
    writer.finish()?;
    buf.split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| {
            serde_json::from_slice(line).map_err(|e| {
                BrookError::serde("transform_df: a result row does not fit the output type", e)
            })
        })
        .collect()
}

impl<T: Data> DStream<T> {
    /// Spark's `transform` with a DataFrame: `f` gets each non-empty batch as
    /// a DataFusion DataFrame in this context's session, and its result is the
    /// new stream's batch.
    pub fn transform_df<U: Data, F, Fut>(&self, f: F) -> DStream<U>
    where
        F: Fn(DataFrame) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = datafusion::error::Result<DataFrame>> + Send,
    {
        let session: SessionContext = self.ctx.session().clone();
        self.derive(move |rows, _| {
            if rows.is_empty() {
                return Ok(vec![]);
            }
            let batch = to_batch(rows)?;
            let runtime = tokio::runtime::Handle::current();
            let result = runtime.block_on(async {
                let df = session.read_batch(batch)?;
                f(df).await?.collect().await
            })?;
            from_batches(&result)
        })
    }
}
