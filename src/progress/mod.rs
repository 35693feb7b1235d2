//! Per-batch progress records, as Spark's `StreamingQueryProgress`.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::source::MalformedRecord;

#[derive(Debug, Clone, Serialize, Default)]
pub struct QueryProgress {
    pub id: String,
    pub name: String,
    pub batch_id: u64,
    /// When the batch was triggered (RFC 3339, UTC).
    pub timestamp: String,
    pub num_input_rows: u64,
    /// Input rows over the time since the previous batch started.
    pub input_rows_per_second: f64,
    /// Input rows over this batch's duration.
    pub processed_rows_per_second: f64,
    /// Milliseconds per phase: plan, read, execute, state, sink, commit, total.
    pub duration_ms: BTreeMap<String, f64>,
    pub event_time: EventTimeProgress,
    pub state_operators: Vec<StateProgress>,
    pub num_malformed_rows: u64,
    pub malformed_by_reason: BTreeMap<String, u64>,
    pub malformed_samples: Vec<MalformedRecord>,
    /// Rows dropped because their event time was behind the watermark
    /// (for sliding windows: row-window pairs, as Spark counts them).
    pub num_late_rows: u64,
    pub sources: Vec<SourceProgress>,
    pub sink: SinkProgress,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct EventTimeProgress {
    pub watermark: Option<String>,
    pub max: Option<String>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct StateProgress {
    pub operator: String,
    pub num_rows_total: u64,
    pub num_rows_updated: u64,
    pub num_rows_removed: u64,
    pub memory_used_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct SourceProgress {
    pub description: String,
    /// What the batch read, as written to the offset log.
    pub offset: serde_json::Value,
    pub num_input_rows: u64,
    /// Since the query started: files that changed after they were read
    /// (not read again), and files skipped because their names are not UTF-8.
    pub files_changed_after_read: u64,
    pub files_skipped: u64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct SinkProgress {
    pub description: String,
    pub num_output_rows: u64,
}

impl QueryProgress {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}
