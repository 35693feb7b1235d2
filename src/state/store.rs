//! One operator's state in the checkpoint: a snapshot and the changes since.
//!
//! A batch that changes a small part of a large state writes only its changes,
//! so the commit stays short. Every [`SNAPSHOT_AFTER`] changes, the whole state
//! is written in the background, off the batch's path; a commit names the
//! latest snapshot that has landed and the changes written since it.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use futures::FutureExt;
use tokio::task::JoinHandle;

use super::checkpoint::{Checkpoint, CommitEntry, StateFile};
use super::delta;
use crate::error::{BrookError, Result};
use crate::testing::faults;

/// Change files written before the whole state is written again.
const SNAPSHOT_AFTER: usize = 10;

/// What a batch wrote of its state.
#[derive(Debug)]
pub enum Saved {
    Snapshot(StateFile),
    Changes(StateFile),
    /// The batch changed nothing.
    Nothing,
}

#[derive(Debug)]
pub struct StateStore {
    checkpoint: Arc<Checkpoint>,
    operator: String,
    schema: SchemaRef,
    /// The columns of a change file: the state's and a deleted flag.
    change_schema: SchemaRef,
    /// The leading state columns that identify a group.
    keys: usize,
    snapshot: Option<StateFile>,
    changes: Vec<StateFile>,
    writing: Option<JoinHandle<Result<StateFile>>>,
}

impl StateStore {
    pub fn new(
        checkpoint: Arc<Checkpoint>,
        operator: &str,
        schema: SchemaRef,
        keys: usize,
    ) -> Self {
        Self {
            checkpoint,
            operator: operator.to_string(),
            change_schema: delta::schema(&schema),
            schema,
            keys,
            snapshot: None,
            changes: vec![],
            writing: None,
        }
    }

    /// The state as `commit` left it: its snapshot with its changes replayed.
    pub async fn restore(&mut self, commit: &CommitEntry) -> Result<Vec<RecordBatch>> {
        let snapshot = commit.state.get(&self.operator).ok_or_else(|| {
            BrookError::checkpoint(
                self.checkpoint.display(),
                format!(
                    "batch {} committed no {} state",
                    commit.batch_id, self.operator
                ),
            )
        })?;
        let changes = commit
            .state_deltas
            .get(&self.operator)
            .cloned()
            .unwrap_or_default();
        let rows = self.checkpoint.load_state(snapshot, &self.schema).await?;
        let mut replayed = Vec::with_capacity(changes.len());
        for file in &changes {
            replayed.push(
                self.checkpoint
                    .load_state(file, &self.change_schema)
                    .await?,
            );
        }
        self.snapshot = Some(snapshot.clone());
        self.changes = changes;
        delta::apply(rows, &replayed, self.keys, &self.schema)
    }

    /// Writes batch `batch_id`'s state: its changes, or the whole `state` when
    /// there is no snapshot yet, the changes are as large as half of it, or
    /// twice [`SNAPSHOT_AFTER`] changes are waiting.
    pub async fn save(
        &self,
        batch_id: u64,
        state: &[RecordBatch],
        upserts: &[RecordBatch],
        deletes: &[RecordBatch],
    ) -> Result<Saved> {
        let rows =
            |batches: &[RecordBatch]| batches.iter().map(RecordBatch::num_rows).sum::<usize>();
        let changed = rows(upserts) + rows(deletes);
        if self.snapshot.is_some() && changed == 0 {
            return Ok(Saved::Nothing);
        }
        // A snapshot not written in the background (a short run ends first, or
        // the writes fail) is written here, so the changes to replay stay few.
        if self.snapshot.is_none()
            || changed * 2 >= rows(state)
            || self.changes.len() >= 2 * SNAPSHOT_AFTER
        {
            let file = self
                .checkpoint
                .write_state(&self.operator, batch_id, &self.schema, state)
                .await?;
            return Ok(Saved::Snapshot(file));
        }
        let changes = delta::changes(&self.change_schema, upserts, deletes)?;
        let file = self
            .checkpoint
            .write_state_changes(&self.operator, batch_id, &self.change_schema, &changes)
            .await?;
        Ok(Saved::Changes(file))
    }

    /// Records what [`save`](Self::save) wrote, takes up a snapshot that has
    /// landed, and starts the next one when enough changes have piled up.
    pub fn saved(&mut self, batch_id: u64, saved: Saved, state: &[RecordBatch]) {
        match saved {
            Saved::Snapshot(file) => self.adopt(file),
            Saved::Changes(file) => self.changes.push(file),
            Saved::Nothing => {}
        }
        // Polled in place: a finished task can still be pending to a task
        // that has used up its cooperative budget.
        if self.writing.as_ref().is_some_and(JoinHandle::is_finished)
            && let Some(done) = self
                .writing
                .as_mut()
                .and_then(|task| faults::settle(task).now_or_never())
        {
            self.writing = None;
            self.landed(done);
        }
        if self.writing.is_none() && self.changes.len() >= SNAPSHOT_AFTER {
            let checkpoint = self.checkpoint.clone();
            let operator = self.operator.clone();
            let schema = self.schema.clone();
            let state = state.to_vec();
            self.writing = Some(faults::spawn(async move {
                checkpoint
                    .write_state(&operator, batch_id, &schema, &state)
                    .await
            }));
        }
    }

    /// Waits for a snapshot being written, so that nothing writes to the
    /// checkpoint (or holds it) once the query has ended.
    pub async fn finish(&mut self) {
        if let Some(mut writing) = self.writing.take() {
            self.landed(faults::settle(&mut writing).await);
        }
    }

    /// Builds on the snapshot `file` unless a later one is in use: the changes
    /// up to its batch are in it.
    fn adopt(&mut self, file: StateFile) {
        if self
            .snapshot
            .as_ref()
            .is_none_or(|s| s.batch_id < file.batch_id)
        {
            self.changes.retain(|c| c.batch_id > file.batch_id);
            self.snapshot = Some(file);
        }
    }

    fn landed(&mut self, done: Result<StateFile>) {
        match done {
            Ok(file) => self.adopt(file),
            // The changes still cover the state; the next snapshot tries again.
            Err(e) => tracing::warn!(
                checkpoint = self.checkpoint.display(),
                "writing a state snapshot failed: {e}"
            ),
        }
    }

    /// The files a commit names: the snapshot and the changes since, per operator.
    pub fn commit_files(
        &self,
    ) -> (
        BTreeMap<String, StateFile>,
        BTreeMap<String, Vec<StateFile>>,
    ) {
        let mut snapshot = BTreeMap::new();
        let mut changes = BTreeMap::new();
        if let Some(file) = &self.snapshot {
            snapshot.insert(self.operator.clone(), file.clone());
        }
        if !self.changes.is_empty() {
            changes.insert(self.operator.clone(), self.changes.clone());
        }
        (snapshot, changes)
    }
}
