//! Per-batch progress records, as Spark's `StreamingQueryProgress`, and what
//! monitors such as the web UI see of a running query.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use serde::Serialize;

use crate::error::Result;
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
    /// With `session_window(...)`: rows dropped because their gap was not
    /// positive, or null (as Spark drops them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_rows_without_session: Option<u64>,
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
    /// SELECT DISTINCT only: input rows dropped as duplicates (Spark's
    /// `numDroppedDuplicateRows`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_dropped_duplicate_rows: Option<u64>,
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
    /// In a query reading several sources with watermarks, this source's own
    /// (the query's is `event_time.watermark`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watermark: Option<String>,
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

/// Told of each batch's progress as it completes.
pub type ProgressListener = Arc<dyn Fn(&QueryProgress) + Send + Sync>;

/// How many progress records a query keeps (Spark keeps 100).
const RECENT_PROGRESS: usize = 100;

/// A query's most recent progress records, and who is told of each new one.
#[derive(Default)]
pub struct ProgressLog {
    recent: Mutex<VecDeque<QueryProgress>>,
    listeners: Mutex<Vec<ProgressListener>>,
}

impl ProgressLog {
    pub fn new(listeners: Vec<ProgressListener>) -> Self {
        Self {
            recent: Mutex::default(),
            listeners: Mutex::new(listeners),
        }
    }

    /// Tells `listener` of every batch completed from now on.
    pub fn listen(&self, listener: ProgressListener) {
        if let Ok(mut listeners) = self.listeners.lock() {
            listeners.push(listener);
        }
    }

    /// Records the progress before telling listeners, so that a listener reading
    /// [`recent`](Self::recent) (the web UI) finds the batch it was told about.
    pub fn publish(&self, progress: QueryProgress) {
        if let Ok(mut recent) = self.recent.lock() {
            if recent.len() == RECENT_PROGRESS {
                recent.pop_front();
            }
            recent.push_back(progress.clone());
        }
        let listeners = self.listeners.lock().map(|l| l.clone()).unwrap_or_default();
        for listener in &listeners {
            listener(&progress);
        }
    }

    /// The progress of the most recent batches, oldest first.
    pub fn recent(&self) -> Vec<QueryProgress> {
        self.recent
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn last(&self) -> Option<QueryProgress> {
        self.recent.lock().ok().and_then(|r| r.back().cloned())
    }
}

/// What a query reads and writes and how it runs, for monitors such as the web UI.
#[derive(Debug, Clone, Serialize)]
pub struct QueryInfo {
    pub id: String,
    pub name: String,
    pub sql: String,
    pub output_mode: String,
    pub trigger: String,
    pub checkpoint: Option<String>,
    pub source: String,
    pub sink: String,
    /// The memory table holding the query's output, when its sink is one.
    pub memory_table: Option<String>,
    pub active: bool,
    pub exception: Option<String>,
}

/// A streaming program as monitors (the web UI) see it: an SQL query or a
/// DStream program.
pub trait Monitored: Send + Sync {
    fn info(&self) -> QueryInfo;

    /// The progress of the most recent batches, oldest first.
    fn recent_progress(&self) -> Vec<QueryProgress>;

    /// Asks it to stop after the batch it is running, and waits for it.
    fn stop(&self) -> BoxFuture<'_, Result<()>>;
}
