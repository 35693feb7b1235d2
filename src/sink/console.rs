//! Prints each batch as a table, headed by its batch id, as Spark's console sink does.

use std::fmt;
use std::io::Write;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::util::pretty::pretty_format_batches_with_schema;

use super::Sink;
use crate::config::OutputMode;
use crate::error::{BrookError, Result};
use crate::options::Options;

/// A console sink table's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleOptions {
    /// Spark's `numRows`: the rows printed per batch at most.
    pub num_rows: usize,
}

impl Default for ConsoleOptions {
    fn default() -> Self {
        Self { num_rows: 20 }
    }
}

impl ConsoleOptions {
    pub fn from_options(options: &Options) -> Result<Self> {
        let num_rows = options.parse("numRows", "a row count")?;
        Ok(num_rows.map_or_else(Self::default, |num_rows| Self { num_rows }))
    }
}

pub struct ConsoleSink {
    out: Mutex<Box<dyn Write + Send>>,
    num_rows: usize,
    schema: Mutex<Option<SchemaRef>>,
}

impl fmt::Debug for ConsoleSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConsoleSink(numRows={})", self.num_rows)
    }
}

impl ConsoleSink {
    /// Prints to standard output, at most `num_rows` rows per batch (Spark shows 20).
    pub fn stdout(num_rows: usize) -> Self {
        Self::to_writer(Box::new(std::io::stdout()), num_rows)
    }

    pub fn to_writer(out: Box<dyn Write + Send>, num_rows: usize) -> Self {
        Self {
            out: Mutex::new(out),
            num_rows,
            schema: Mutex::new(None),
        }
    }

    /// A sink writing into a shared buffer, for programs that capture the text.
    pub fn to_buffer(num_rows: usize) -> (Self, Arc<Mutex<Vec<u8>>>) {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = Self::to_writer(Box::new(SharedBuffer(buffer.clone())), num_rows);
        (sink, buffer)
    }
}

struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("buffer lock poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn lock_err<T>(_: std::sync::PoisonError<T>) -> BrookError {
    BrookError::Sink {
        sink: "console".into(),
        message: "lock poisoned".into(),
    }
}

#[async_trait]
impl Sink for ConsoleSink {
    fn describe(&self) -> String {
        "ConsoleSink".into()
    }

    async fn open(&self, schema: &SchemaRef, _mode: OutputMode, _query_id: &str) -> Result<()> {
        *self.schema.lock().map_err(lock_err)? = Some(schema.clone());
        Ok(())
    }

    async fn add_batch(&self, batch_id: u64, batches: Vec<RecordBatch>) -> Result<()> {
        let schema = self.schema.lock().map_err(lock_err)?.clone();
        let schema = schema.unwrap_or_else(|| {
            batches.first().map_or_else(
                || Arc::new(datafusion::arrow::datatypes::Schema::empty()),
                |b| b.schema(),
            )
        });
        let total: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let mut shown = Vec::new();
        let mut left = self.num_rows;
        for b in &batches {
            if left == 0 {
                break;
            }
            let n = b.num_rows().min(left);
            shown.push(b.slice(0, n));
            left -= n;
        }
        let table = pretty_format_batches_with_schema(schema, &shown)?;
        let line = "-------------------------------------------";
        let mut text = format!("{line}\nBatch: {batch_id}\n{line}\n{table}\n");
        if total > self.num_rows {
            text.push_str(&format!("only showing top {} rows\n", self.num_rows));
        }
        text.push('\n');
        let mut out = self.out.lock().map_err(lock_err)?;
        out.write_all(text.as_bytes())
            .and_then(|_| out.flush())
            .map_err(|e| BrookError::Sink {
                sink: "console".into(),
                message: match e.kind() {
                    std::io::ErrorKind::BrokenPipe => format!(
                        "batch {batch_id} could not be printed: the output was closed by its \
                         reader (such as `head`)"
                    ),
                    _ => e.to_string(),
                },
            })
    }
}
