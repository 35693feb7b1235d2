//! The batch protocol of every streaming program, SQL query or DStream program:
//! recovery from the checkpoint, offsets written ahead, the commit, the
//! sources' progress snapshots, and the points where crash tests stop a batch.
//!
//! A [`Driver`] runs a [`Program`]'s batches in this order:
//!
//! 1. the program plans the batch as an offset and says its watermarks (after
//!    a restart, a batch that was logged but not committed runs first, with
//!    its logged offset and watermarks);
//! 2. both are written to `offsets/N` in the background, while
//! 3. the program reads and computes the batch, writing nothing (point `read`);
//! 4. the offset is on disk (`offsets`) before
//! 5. the program writes the output and its state (`sink`) and records the
//!    state written (`state`);
//! 6. `commits/N` is written (`commits`), then the sources may let the input go;
//! 7. every few batches, the sources' progress is written to `sources/N+1` and
//!    files older than the retained batches are removed, in the background.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use tokio::task::JoinHandle;

use super::checkpoint::{Checkpoint, CommitEntry, OffsetEntry, Recovery, Watermarks};
use crate::error::Result;
use crate::progress::QueryProgress;
use crate::source::SourceOffset;
use crate::testing::faults::{self, crash_point};

/// What a batch loop runs: its sources, its computation and its output. The
/// [`Driver`] calls these in the checkpoint's order.
pub trait Program: Send {
    /// A batch read and computed, its output not yet written.
    type Batch: Send;

    /// Starts the sources from the beginning (no checkpoint, or an empty one).
    fn start(&mut self) -> impl Future<Output = Result<()>> + Send;

    /// Picks up where the checkpoint left off: the sources from their snapshot
    /// and the committed offsets after it, the state from the last commit.
    fn restore(&mut self, recovery: Recovery) -> impl Future<Output = Result<()>> + Send;

    /// The sources' own progress, as `sources/N` records it.
    fn source_progress(&self) -> Result<serde_json::Value>;

    /// The next batch's input: `None` when there is no batch to run,
    /// `Some(None)` for a batch without input.
    fn plan(&mut self) -> impl Future<Output = Result<Option<Option<SourceOffset>>>> + Send;

    /// The watermarks the batch just planned runs under, logged with its
    /// offsets; `None` for a program without event time.
    fn batch_watermarks(&self) -> Option<Watermarks> {
        None
    }

    /// A batch logged before a restart runs again under the watermarks it
    /// was logged with.
    fn rerun_under(&mut self, _watermarks: Watermarks) {}

    /// Reads and computes the batch that `offset` names, writing nothing.
    fn compute(
        &mut self,
        batch_id: u64,
        offset: Option<&SourceOffset>,
    ) -> impl Future<Output = Result<Self::Batch>> + Send;

    /// Writes the batch's output and its state files.
    fn write(
        &mut self,
        batch_id: u64,
        batch: &mut Self::Batch,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Takes up the state files the batch wrote; whether there were any.
    fn record_state(&mut self, batch_id: u64, batch: &mut Self::Batch) -> bool;

    /// Moves past the batch (its event time) and says what its commit records.
    fn commit_entry(&mut self, batch_id: u64, batch: &Self::Batch) -> Result<CommitEntry>;

    /// The batch is committed: the sources may let its input go.
    fn committed(&mut self, offset: Option<&SourceOffset>) -> Result<()>;

    /// Fills in what the program knows of the batch: its input and output
    /// rows, sources, state and event time. The driver has set the identity,
    /// the timestamp and the phases' durations (the computing phase is `execute`).
    fn describe(
        &self,
        batch: Self::Batch,
        offset: Option<SourceOffset>,
        progress: &mut QueryProgress,
    );

    /// Stops the sources and waits for the program's own background writes.
    fn stop(&mut self) -> impl Future<Output = Result<()>> + Send;
}

/// A checkpoint write on a task of its own. One left running when its loop
/// is dropped (a batch that panicked skips [`Driver::finish`]) runs to its
/// end: aborting it could not stop its blocking steps, and it holds the
/// checkpoint, and so its lock, until it really ends.
type Write = JoinHandle<Result<()>>;

/// Runs a [`Program`]'s batches against its checkpoint, if it has one.
pub struct Driver {
    checkpoint: Option<Arc<Checkpoint>>,
    id: String,
    name: String,
    batch_id: u64,
    /// A batch logged before a restart but not committed: it runs first, as logged.
    rerun: Option<OffsetEntry>,
    /// The batch's offsets (before the first batch, also the sources' starting
    /// point) being written while it is read and computed.
    log_written: Option<Write>,
    /// The sources' progress being written and old files removed.
    maintenance: Option<Write>,
    last_trigger: Option<Instant>,
}

impl Driver {
    /// A driver for the program `name` with id `id` (its checkpoint's, if it has one).
    pub fn new(checkpoint: Option<Arc<Checkpoint>>, id: String, name: String) -> Self {
        Self {
            checkpoint,
            id,
            name,
            batch_id: 0,
            rerun: None,
            log_written: None,
            maintenance: None,
            last_trigger: None,
        }
    }

    /// Whether the next batch is one logged before a restart, which runs as logged.
    pub fn has_rerun(&self) -> bool {
        self.rerun.is_some()
    }

    /// Picks up where the checkpoint left off, or starts the program afresh.
    pub async fn recover<P: Program>(&mut self, program: &mut P) -> Result<()> {
        let Some(cp) = self.checkpoint.clone() else {
            return program.start().await;
        };
        let mut recovery = cp.recover().await?;
        if recovery.is_fresh() {
            program.start().await?;
            // Written while the first batch is read, and before its offsets.
            let progress = program.source_progress()?;
            self.log_written = Some(faults::spawn(
                async move { cp.write_source(0, &progress).await },
            ));
            return Ok(());
        }
        self.batch_id = recovery.next_batch();
        self.rerun = recovery.rerun.take();
        program.restore(recovery).await?;
        tracing::info!(
            query = %self.name,
            checkpoint = cp.display(),
            "resuming at batch {}{}",
            self.batch_id,
            if self.rerun.is_some() { " (re-running it: it was not committed)" } else { "" }
        );
        Ok(())
    }

    /// Runs the next batch, if the program has one (or one is to be re-run):
    /// its progress record.
    pub async fn run_batch<P: Program>(
        &mut self,
        program: &mut P,
    ) -> Result<Option<QueryProgress>> {
        let trigger_time = Utc::now();
        let started = Instant::now();
        let mut phases = BTreeMap::new();
        let mut lap = Instant::now();
        let mut phase = |name: &str, phases: &mut BTreeMap<String, f64>| {
            phases.insert(name.to_string(), lap.elapsed().as_secs_f64() * 1000.0);
            lap = Instant::now();
        };

        // A failed checkpoint write ends the program even while no input comes.
        if self
            .log_written
            .as_ref()
            .is_some_and(JoinHandle::is_finished)
        {
            settled(self.log_written.take()).await?;
        }
        let batch_id = self.batch_id;
        let offset = match self.rerun.take() {
            Some(logged) => {
                if let Some(watermarks) = logged.watermarks {
                    program.rerun_under(watermarks);
                }
                logged.source
            }
            None => {
                let Some(offset) = program.plan().await? else {
                    return Ok(None);
                };
                // The offsets must be on disk before the sink sees the batch's output,
                // not before it is read: the write overlaps reading and executing.
                if let Some(cp) = self.checkpoint.clone() {
                    let logged = offset.clone();
                    let watermarks = program.batch_watermarks();
                    let before = self.log_written.take();
                    self.log_written = Some(faults::spawn(async move {
                        settled(before).await?;
                        cp.write_offsets(batch_id, logged, watermarks).await
                    }));
                }
                offset
            }
        };
        phase("plan", &mut phases);

        let mut batch = program.compute(batch_id, offset.as_ref()).await?;
        crash_point("read", batch_id);
        phase("execute", &mut phases);

        if self.log_written.is_some() {
            settled(self.log_written.take()).await?;
            crash_point("offsets", batch_id);
        }
        program.write(batch_id, &mut batch).await?;
        crash_point("sink", batch_id);
        phase("sink", &mut phases);

        if program.record_state(batch_id, &mut batch) {
            crash_point("state", batch_id);
        }
        let entry = program.commit_entry(batch_id, &batch)?;
        if let Some(cp) = &self.checkpoint {
            cp.write_commit(&entry).await?;
            crash_point("commits", batch_id);
        }
        program.committed(offset.as_ref())?;
        self.write_source_progress(program, batch_id).await?;
        phase("commit", &mut phases);

        let total = started.elapsed();
        phases.insert("total".into(), total.as_secs_f64() * 1000.0);
        let since_last = self.last_trigger.map(|t| t.elapsed()).unwrap_or(total);
        self.last_trigger = Some(started);
        let mut progress = QueryProgress {
            id: self.id.clone(),
            name: self.name.clone(),
            batch_id,
            timestamp: trigger_time.to_rfc3339_opts(SecondsFormat::Millis, true),
            duration_ms: phases,
            ..QueryProgress::default()
        };
        program.describe(batch, offset, &mut progress);
        let rows = progress.num_input_rows;
        let per_second = |d: Duration| {
            if d.is_zero() {
                0.0
            } else {
                rows as f64 / d.as_secs_f64()
            }
        };
        progress.input_rows_per_second = per_second(since_last);
        progress.processed_rows_per_second = per_second(total);
        self.batch_id += 1;
        Ok(Some(progress))
    }

    /// Every few batches, writes the sources' progress and removes the files no
    /// longer needed, in the background: listing and deleting took tens of
    /// milliseconds, and would make every tenth batch the slowest. One such task
    /// runs at a time, and its error ends the program at the next one.
    async fn write_source_progress<P: Program>(
        &mut self,
        program: &P,
        batch_id: u64,
    ) -> Result<()> {
        let Some(cp) = self.checkpoint.clone() else {
            return Ok(());
        };
        if !Checkpoint::source_due(batch_id) {
            return Ok(());
        }
        settled(self.maintenance.take()).await?;
        let progress = program.source_progress()?;
        self.maintenance = Some(faults::spawn(async move {
            cp.write_source(batch_id + 1, &progress).await
        }));
        Ok(())
    }

    /// Waits for the checkpoint writes still running in the background and
    /// stops the program, so that nothing outlives it (the writes hold its
    /// checkpoint), even after a failed batch.
    pub async fn finish<P: Program>(&mut self, program: &mut P) -> Result<()> {
        let offsets = settled(self.log_written.take()).await;
        let maintenance = settled(self.maintenance.take()).await;
        let stopped = program.stop().await;
        // A program that failed before writing anything still waits for its
        // new checkpoint's metadata.
        let metadata = match &self.checkpoint {
            Some(cp) => cp.metadata_written().await,
            None => Ok(()),
        };
        offsets.and(maintenance).and(stopped).and(metadata)
    }
}

/// The outcome of a checkpoint write run as its own task, if one was started.
async fn settled(task: Option<Write>) -> Result<()> {
    match task {
        Some(mut task) => faults::settle(&mut task).await,
        None => Ok(()),
    }
}
