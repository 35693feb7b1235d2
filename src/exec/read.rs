//! What a batch's read of an input gave besides its rows, counted the same
//! way where the driver reads the input and where a cluster's tasks do.

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use serde::{Deserialize, Serialize};

use super::compile::InputWindow;
use crate::error::Result;
use crate::source::MalformedStats;
use crate::sql::window::max_event_time;

/// Rows read, records rejected, and the largest event time, for the batch's
/// progress and watermark.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReadStats {
    pub rows: u64,
    pub malformed: MalformedStats,
    pub max_event_ns: Option<i64>,
}

impl ReadStats {
    pub fn merge(&mut self, other: ReadStats) {
        self.rows += other.rows;
        self.malformed.merge(other.malformed);
        self.note_event_time(other.max_event_ns);
    }

    fn note_event_time(&mut self, m: Option<i64>) {
        self.max_event_ns = match (self.max_event_ns, m) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }

    /// Counts `batch`, a source's rows, and gives it as the plan reads it:
    /// with its window pane column (as `schema`, the input slot's, has it) if
    /// the query has a window. `watermark_column` is the source's, if any.
    pub fn take(
        &mut self,
        batch: RecordBatch,
        watermark_column: Option<&str>,
        window: Option<&InputWindow>,
        schema: &SchemaRef,
    ) -> Result<RecordBatch> {
        self.rows += batch.num_rows() as u64;
        if let Some(column) = watermark_column {
            self.note_event_time(max_event_time(column, &batch)?);
        }
        match window {
            Some(w) => w.with_panes(schema, batch),
            None => Ok(batch),
        }
    }
}
