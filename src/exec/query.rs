//! A running query: the micro-batch loop, its trigger, and the handle users hold.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::compute::{cast, max};
use datafusion::arrow::datatypes::{DataType, Int64Type};
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use futures::StreamExt;

use super::compile::{CompiledPlan, CompiledQuery, InputWindow};
use super::faults::{self, crash_point};
use super::slot::Feed;
use super::stateful::execute;
use super::{OutputMode, Trigger};
use crate::error::{BrookError, Result};
use crate::progress::{
    EventTimeProgress, QueryProgress, SinkProgress, SourceProgress, StateProgress,
};
use crate::sink::Sink;
use crate::source::{MalformedStats, SourceOffset, StreamSource};
use crate::sql::script::WatermarkSpec;
use crate::sql::window::unit_nanos;
use crate::state::checkpoint::{DEFAULT_MIN_BATCHES_TO_RETAIN, OffsetEntry};
use crate::state::store::StateStore;
use crate::state::{Checkpoint, CommitEntry, EventTime};

/// The checkpoint's name for a query's aggregation state.
const STATE_OPERATOR: &str = "aggregate";

/// How many progress records a query keeps (Spark keeps 100).
const RECENT_PROGRESS: usize = 100;

pub type ProgressListener = Arc<dyn Fn(&QueryProgress) + Send + Sync>;

#[derive(Clone)]
pub struct QueryOptions {
    pub name: Option<String>,
    pub trigger: Trigger,
    pub output_mode: Option<OutputMode>,
    /// How often an idle query with a zero trigger interval looks for new input.
    pub poll_interval: Duration,
    pub listeners: Vec<ProgressListener>,
    /// Where the query keeps its checkpoint; without one it starts over on restart.
    pub checkpoint: Option<String>,
    /// Committed batches whose checkpoint files are kept.
    pub min_batches_to_retain: u64,
}

impl Default for QueryOptions {
    fn default() -> Self {
        Self {
            name: None,
            trigger: Trigger::default(),
            output_mode: None,
            poll_interval: Duration::from_millis(100),
            listeners: vec![],
            checkpoint: None,
            min_batches_to_retain: DEFAULT_MIN_BATCHES_TO_RETAIN,
        }
    }
}

impl fmt::Debug for QueryOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueryOptions")
            .field("name", &self.name)
            .field("trigger", &self.trigger)
            .field("output_mode", &self.output_mode)
            .field("checkpoint", &self.checkpoint)
            .finish()
    }
}

struct Shared {
    id: String,
    name: String,
    stop: AtomicBool,
    wake: Notify,
    recent: Mutex<VecDeque<QueryProgress>>,
    /// Counts polls that found nothing to do: `process_all_available` waits on it.
    idle: watch::Sender<u64>,
    finished: watch::Sender<bool>,
    error: Mutex<Option<Arc<BrookError>>>,
    listeners: Vec<ProgressListener>,
}

/// The handle of a running streaming query.
pub struct StreamingQuery {
    shared: Arc<Shared>,
    task: Mutex<Option<JoinHandle<()>>>,
    output_mode: OutputMode,
    sql: String,
    trigger: Trigger,
    checkpoint: Option<String>,
    source: String,
    sink: String,
    memory_table: Option<String>,
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

impl fmt::Debug for StreamingQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamingQuery({} {})", self.shared.name, self.shared.id)
    }
}

impl StreamingQuery {
    /// Starts the batch loop. `id` is the checkpoint's query id, if there is one.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        compiled: CompiledQuery,
        source: Box<dyn StreamSource>,
        sink: Arc<dyn Sink>,
        checkpoint: Option<Checkpoint>,
        id: String,
        options: QueryOptions,
        memory_table: Option<String>,
        gate: Gate,
    ) -> Self {
        let name = options
            .name
            .clone()
            .unwrap_or_else(|| format!("query-{}", &id[..8]));
        let shared = Arc::new(Shared {
            id,
            name,
            stop: AtomicBool::new(false),
            wake: Notify::new(),
            recent: Mutex::new(VecDeque::new()),
            idle: watch::channel(0).0,
            finished: watch::channel(false).0,
            error: Mutex::new(None),
            listeners: options.listeners.clone(),
        });
        let output_mode = compiled.mode;
        let sql = compiled.sql.clone();
        let described_source = source.describe();
        let described_sink = sink.describe();
        let checkpoint = checkpoint.map(Arc::new);
        let state_store = match (&checkpoint, &compiled.plan) {
            (Some(cp), CompiledPlan::Stateful(op)) => Some(StateStore::new(
                cp.clone(),
                STATE_OPERATOR,
                op.state_slot.schema().clone(),
                op.keys,
            )),
            _ => None,
        };
        let runner = Runner {
            shared: shared.clone(),
            compiled,
            source,
            sink,
            checkpoint,
            state_store,
            log_written: None,
            maintenance: None,
            batch_id: 0,
            watermark_ns: None,
            max_event_ns: None,
            pending_no_data: false,
            rerun: None,
            last_trigger: None,
        };
        let trigger = options.trigger;
        let checkpoint = options.checkpoint.clone();
        let task = tokio::spawn(drive(runner, options, gate));
        Self {
            shared,
            task: Mutex::new(Some(task)),
            output_mode,
            sql,
            trigger,
            checkpoint,
            source: described_source,
            sink: described_sink,
            memory_table,
        }
    }

    pub fn info(&self) -> QueryInfo {
        QueryInfo {
            id: self.id().to_string(),
            name: self.name().to_string(),
            sql: self.sql.clone(),
            output_mode: self.output_mode.to_string(),
            trigger: self.trigger.to_string(),
            checkpoint: self.checkpoint.clone(),
            source: self.source.clone(),
            sink: self.sink.clone(),
            memory_table: self.memory_table.clone(),
            active: self.is_active(),
            exception: self.exception(),
        }
    }

    pub fn id(&self) -> &str {
        &self.shared.id
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn output_mode(&self) -> OutputMode {
        self.output_mode
    }

    pub fn sql(&self) -> &str {
        &self.sql
    }

    pub fn is_active(&self) -> bool {
        !*self.shared.finished.borrow()
    }

    /// The progress of the most recent batches, oldest first.
    pub fn recent_progress(&self) -> Vec<QueryProgress> {
        self.shared
            .recent
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn last_progress(&self) -> Option<QueryProgress> {
        self.shared
            .recent
            .lock()
            .ok()
            .and_then(|r| r.back().cloned())
    }

    /// The error the query stopped with, if it failed.
    pub fn exception(&self) -> Option<String> {
        self.error().map(|e| e.to_string())
    }

    fn error(&self) -> Option<Arc<BrookError>> {
        self.shared.error.lock().ok().and_then(|e| e.clone())
    }

    /// Asks the query to stop after the batch it is running, and waits for it.
    pub async fn stop(&self) -> Result<()> {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
        self.await_termination().await
    }

    /// Waits until the query stops; returns the error it failed with, if any.
    pub async fn await_termination(&self) -> Result<()> {
        let mut finished = self.shared.finished.subscribe();
        let _ = finished.wait_for(|f| *f).await;
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            task.await.map_err(|e| BrookError::QueryFailed {
                query: self.name().to_string(),
                source: Arc::new(BrookError::task("the task running it", e)),
            })?;
        }
        self.failure()
    }

    /// The query's error, naming the query: a program running several learns which failed.
    fn failure(&self) -> Result<()> {
        match self.error() {
            Some(source) => Err(BrookError::QueryFailed {
                query: self.name().to_string(),
                source,
            }),
            None => Ok(()),
        }
    }

    /// Waits until everything available when called has been processed (Spark's
    /// `processAllAvailable`): the loop has since looked for input and found none.
    pub async fn process_all_available(&self) -> Result<()> {
        let mut idle = self.shared.idle.subscribe();
        let mut finished = self.shared.finished.subscribe();
        let start = *idle.borrow_and_update();
        self.shared.wake.notify_one();
        tokio::select! {
            _ = idle.wait_for(|n| *n >= start + 2) => {}
            _ = finished.wait_for(|f| *f) => {}
        }
        self.failure()
    }
}

pub(crate) fn new_id() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    format!("{:016x}{:016x}", rng.random::<u64>(), rng.random::<u64>())
}

/// Holds a query back until it turns true (or its sender is gone).
pub type Gate = watch::Receiver<bool>;

/// Runs the loop in a task of its own, so that even a panicking batch ends the
/// query with an error that `await_termination` reports.
async fn drive(mut runner: Runner, options: QueryOptions, gate: Gate) {
    let shared = runner.shared.clone();
    let name = shared.name.clone();
    let result = tokio::spawn(faults::in_query(name, async move {
        runner.run_loop(&options, gate).await
    }))
    .await
    .unwrap_or_else(|e| Err(BrookError::task("a batch", e)));
    if let Err(e) = result {
        tracing::error!(query = %shared.name, "query failed: {e}");
        if let Ok(mut slot) = shared.error.lock() {
            *slot = Some(Arc::new(e));
        }
    }
    shared.finished.send_replace(true);
    shared.idle.send_modify(|n| *n += 2);
}

struct Runner {
    shared: Arc<Shared>,
    compiled: CompiledQuery,
    source: Box<dyn StreamSource>,
    sink: Arc<dyn Sink>,
    checkpoint: Option<Arc<Checkpoint>>,
    state_store: Option<StateStore>,
    /// The batch's offsets (before the first batch, also the source's starting
    /// point) being written while it is read and computed.
    log_written: Option<Write>,
    /// The source's progress being written and old files removed.
    maintenance: Option<Write>,
    batch_id: u64,
    watermark_ns: Option<i64>,
    max_event_ns: Option<i64>,
    /// The watermark moved and closes state: run a batch without input to emit or drop it.
    pending_no_data: bool,
    /// A batch logged before a restart but not committed: it runs first, as logged.
    rerun: Option<OffsetEntry>,
    last_trigger: Option<Instant>,
}

/// A checkpoint write on a task of its own. One left running when its query
/// is dropped (a batch that panicked skips `finish_background`) runs to its
/// end: aborting it could not stop its blocking steps, and it holds the
/// checkpoint, and so its lock, until it really ends.
type Write = JoinHandle<Result<()>>;

impl Runner {
    async fn run_loop(&mut self, options: &QueryOptions, gate: Gate) -> Result<()> {
        let ran = self.run_batches(options, gate).await;
        let finished = self.finish_background().await;
        ran.and(finished)
    }

    /// Waits for the checkpoint writes still running in the background, so that
    /// none outlives the query (they hold its checkpoint), even a failed one.
    async fn finish_background(&mut self) -> Result<()> {
        let offsets = settled(self.log_written.take()).await;
        if let Some(store) = &mut self.state_store {
            store.finish().await;
        }
        let maintenance = settled(self.maintenance.take()).await;
        let source = self.source.stop().await;
        // A query that failed before writing anything still waits for its
        // new checkpoint's metadata.
        let metadata = match &self.checkpoint {
            Some(cp) => cp.metadata_written().await,
            None => Ok(()),
        };
        offsets.and(maintenance).and(source).and(metadata)
    }

    async fn run_batches(&mut self, options: &QueryOptions, mut gate: Gate) -> Result<()> {
        self.resume().await?;
        if options.trigger == Trigger::AvailableNow {
            self.source.snapshot_available().await?;
        }
        // Recovery and listing are done while the script's other queries are
        // planned; reading waits for them.
        let _ = gate.wait_for(|go| *go).await;
        while !self.shared.stop.load(Ordering::SeqCst) {
            let started = Instant::now();
            let ran = self.run_batch().await?;
            if !ran {
                self.shared.idle.send_modify(|n| *n += 1);
            }
            let wait = match options.trigger {
                Trigger::Once => break,
                Trigger::AvailableNow if !ran => break,
                Trigger::AvailableNow => Duration::ZERO,
                Trigger::ProcessingTime(interval) => {
                    let left = interval.saturating_sub(started.elapsed());
                    if ran {
                        left
                    } else {
                        left.max(options.poll_interval)
                    }
                }
            };
            if !wait.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.shared.wake.notified() => {}
                }
            }
        }
        Ok(())
    }

    /// Runs the next batch if there is input (or the watermark has state to close).
    async fn run_batch(&mut self) -> Result<bool> {
        let trigger_time = Utc::now();
        let started = Instant::now();
        let mut phases = BTreeMap::new();
        let mut lap = Instant::now();
        let mut phase = |name: &str, phases: &mut BTreeMap<String, f64>| {
            phases.insert(name.to_string(), lap.elapsed().as_secs_f64() * 1000.0);
            lap = Instant::now();
        };

        // A failed checkpoint write ends the query even while no input comes.
        if self
            .log_written
            .as_ref()
            .is_some_and(JoinHandle::is_finished)
        {
            settled(self.log_written.take()).await?;
        }
        let batch_id = self.batch_id;
        let offset = match self.rerun.take() {
            Some(logged) => logged.source,
            None => {
                let offset = self.source.plan_batch().await?;
                if offset.is_none() && !self.pending_no_data {
                    return Ok(false);
                }
                // The offsets must be on disk before the sink sees the batch's output,
                // not before it is read: the write overlaps reading and executing.
                if let Some(cp) = self.checkpoint.clone() {
                    let logged = offset.clone();
                    let before = self.log_written.take();
                    self.log_written = Some(faults::spawn(async move {
                        settled(before).await?;
                        cp.write_offsets(batch_id, logged).await
                    }));
                }
                offset
            }
        };
        self.pending_no_data = false;
        phase("plan", &mut phases);

        // The plan runs over the input as the source reads it, a file at a time:
        // a file's rows are worked on, and can be let go, while the next is read.
        let CompiledQuery {
            source: source_def,
            input_slot,
            window,
            plan,
            mode,
            task_ctx: ctx,
            ..
        } = &mut self.compiled;
        let scanned = match plan {
            CompiledPlan::Stateless(plan) => plan,
            CompiledPlan::Stateful(op) => &op.partial,
        };
        let feed = input_slot.feed(scanned)?;
        let streams = feed.streams();
        let started_reading = Instant::now();
        let reading = async {
            let read = feed_input(
                self.source.as_ref(),
                offset.as_ref(),
                window.as_ref(),
                source_def.watermark.as_ref(),
                feed,
            )
            .await;
            (read, started_reading.elapsed())
        };
        let (mode, watermark_ns) = (*mode, self.watermark_ns);
        let ticks = window.as_ref().map(|w| &w.ticks);
        let running = async {
            match plan {
                CompiledPlan::Stateless(plan) => Ok((execute(plan, ctx).await?, 0, vec![], None)),
                CompiledPlan::Stateful(op) => {
                    let outcome = op.run(ctx, mode, watermark_ns, ticks).await?;
                    let progress = StateProgress {
                        operator: STATE_OPERATOR.into(),
                        num_rows_total: op.state_rows() as u64,
                        num_rows_updated: outcome.updated_rows,
                        num_rows_removed: outcome.removed_rows,
                        memory_used_bytes: op.state_bytes() as u64,
                    };
                    let changes = (outcome.upserts, outcome.deletes);
                    Ok((
                        outcome.output,
                        outcome.late_rows,
                        vec![progress],
                        Some(changes),
                    ))
                }
            }
        };
        let ((read, read_time), ran): (_, Result<_>) = match streams {
            true => tokio::join!(reading, running),
            false => {
                let (read, read_time) = reading.await;
                let read = read?;
                ((Ok(read), read_time), running.await)
            }
        };
        input_slot.set(&[])?;
        // A read that failed made the plan fail too; the read's error says why.
        let read = read?;
        let (output, late_rows, state_progress, changes) = ran?;
        crash_point("read", batch_id);
        let input_rows = read.rows;
        let batch_max = read.max_event_ns;
        // Reading and executing overlap: "read" is until the input was all
        // read, "execute" the rest.
        phase("execute", &mut phases);
        let read_ms = read_time.as_secs_f64() * 1000.0;
        if let Some(execute) = phases.get_mut("execute") {
            *execute = (*execute - read_ms).max(0.0);
        }
        phases.insert("read".into(), read_ms);

        if self.log_written.is_some() {
            settled(self.log_written.take()).await?;
            crash_point("offsets", batch_id);
        }
        let output_rows: usize = output.iter().map(RecordBatch::num_rows).sum();
        // The state file is named by the commit only, so it is written beside the sink's.
        let saved = match (&self.state_store, &self.compiled.plan, &changes) {
            (Some(store), CompiledPlan::Stateful(op), Some((upserts, deletes))) => {
                let (_, saved) = tokio::try_join!(
                    self.sink.add_batch(batch_id, output),
                    store.save(batch_id, &op.state, upserts, deletes)
                )?;
                Some(saved)
            }
            _ => {
                self.sink.add_batch(batch_id, output).await?;
                None
            }
        };
        crash_point("sink", batch_id);
        phase("sink", &mut phases);

        if let (Some(store), Some(saved), CompiledPlan::Stateful(op)) =
            (&mut self.state_store, saved, &self.compiled.plan)
        {
            store.saved(batch_id, saved, &op.state);
            crash_point("state", batch_id);
        }
        self.advance_watermark(batch_max)?;
        self.commit(batch_id).await?;
        if let Some(o) = &offset {
            self.source.commit(o)?;
        }
        self.write_source_progress(batch_id).await?;
        phase("commit", &mut phases);

        let total = started.elapsed();
        phases.insert("total".into(), total.as_secs_f64() * 1000.0);
        let since_last = self.last_trigger.map(|t| t.elapsed()).unwrap_or(total);
        self.last_trigger = Some(started);
        let per_second = |d: Duration| {
            if d.is_zero() {
                0.0
            } else {
                input_rows as f64 / d.as_secs_f64()
            }
        };
        let progress = QueryProgress {
            id: self.shared.id.clone(),
            name: self.shared.name.clone(),
            batch_id,
            timestamp: trigger_time.to_rfc3339_opts(SecondsFormat::Millis, true),
            num_input_rows: input_rows,
            input_rows_per_second: per_second(since_last),
            processed_rows_per_second: per_second(total),
            duration_ms: phases,
            event_time: EventTimeProgress {
                watermark: self.watermark_ns.map(format_ns),
                max: self.max_event_ns.map(format_ns),
            },
            state_operators: state_progress,
            num_malformed_rows: read.malformed.count,
            malformed_by_reason: read.malformed.by_reason.clone(),
            malformed_samples: read.malformed.samples.clone(),
            num_late_rows: late_rows,
            sources: vec![SourceProgress {
                description: self.source.describe(),
                offset: offset.map(|o| o.0).unwrap_or_default(),
                num_input_rows: input_rows,
                files_changed_after_read: self.source.counts().files_changed_after_read,
                files_skipped: self.source.counts().files_skipped,
            }],
            sink: SinkProgress {
                description: self.sink.describe(),
                num_output_rows: output_rows as u64,
            },
        };
        self.batch_id += 1;
        self.publish(progress);
        Ok(true)
    }

    /// Picks up where the checkpoint left off, or starts the source afresh.
    async fn resume(&mut self) -> Result<()> {
        let Some(cp) = &self.checkpoint else {
            return self.source.start().await;
        };
        let recovery = cp.recover().await?;
        if recovery.is_fresh() {
            self.source.start().await?;
            // Written while the first batch is read, and before its offsets.
            let (cp, progress) = (cp.clone(), self.source.progress()?);
            self.log_written = Some(faults::spawn(
                async move { cp.write_source(0, &progress).await },
            ));
            return Ok(());
        }
        self.batch_id = recovery.next_batch();
        self.source
            .restore(recovery.source_snapshot, &recovery.committed_offsets)?;
        if let Some(commit) = &recovery.last_commit {
            let EventTime {
                watermark_ns,
                max_event_ns,
                pending_no_data,
                emitted_through_ns,
            } = commit.event_time.clone();
            self.watermark_ns = watermark_ns;
            self.max_event_ns = max_event_ns;
            self.pending_no_data = pending_no_data;
            if let (CompiledPlan::Stateful(op), Some(store)) =
                (&mut self.compiled.plan, &mut self.state_store)
            {
                op.restore(store.restore(commit).await?)?;
                op.emitted_through_ns = emitted_through_ns;
                if self.compiled.mode == OutputMode::Complete {
                    let output = op.emit_all(&self.compiled.task_ctx).await?;
                    self.sink.restore(commit.batch_id, output).await?;
                }
            }
        }
        tracing::info!(
            query = %self.shared.name,
            checkpoint = cp.display(),
            "resuming at batch {}{}",
            self.batch_id,
            if recovery.rerun.is_some() { " (re-running it: it was not committed)" } else { "" }
        );
        self.rerun = recovery.rerun;
        Ok(())
    }

    /// Saves the state after `batch_id` and marks the batch done in the checkpoint.
    async fn commit(&self, batch_id: u64) -> Result<()> {
        let Some(cp) = &self.checkpoint else {
            return Ok(());
        };
        let emitted_through_ns = match &self.compiled.plan {
            CompiledPlan::Stateful(op) => op.emitted_through_ns,
            CompiledPlan::Stateless(_) => None,
        };
        let (state, state_deltas) = self
            .state_store
            .as_ref()
            .map(StateStore::commit_files)
            .unwrap_or_default();
        let entry = CommitEntry {
            batch_id,
            event_time: EventTime {
                watermark_ns: self.watermark_ns,
                max_event_ns: self.max_event_ns,
                pending_no_data: self.pending_no_data,
                emitted_through_ns,
            },
            state,
            state_deltas,
            offsets_crc32: None,
        };
        cp.write_commit(&entry).await?;
        crash_point("commits", batch_id);
        Ok(())
    }

    /// Every few batches, writes the source's progress and removes the files no
    /// longer needed, in the background: listing and deleting took tens of
    /// milliseconds, and would make every tenth batch the slowest. One such task
    /// runs at a time, and its error ends the query at the next one.
    async fn write_source_progress(&mut self, batch_id: u64) -> Result<()> {
        let Some(cp) = self.checkpoint.clone() else {
            return Ok(());
        };
        if !Checkpoint::source_due(batch_id) {
            return Ok(());
        }
        settled(self.maintenance.take()).await?;
        let progress = self.source.progress()?;
        self.maintenance = Some(faults::spawn(async move {
            cp.write_source(batch_id + 1, &progress).await
        }));
        Ok(())
    }

    /// Records the progress before telling listeners, so that a listener reading
    /// `recent_progress` (the web UI) finds the batch it was told about.
    fn publish(&self, progress: QueryProgress) {
        if let Ok(mut recent) = self.shared.recent.lock() {
            if recent.len() == RECENT_PROGRESS {
                recent.pop_front();
            }
            recent.push_back(progress.clone());
        }
        for listener in &self.shared.listeners {
            listener(&progress);
        }
    }

    fn advance_watermark(&mut self, batch_max: Option<i64>) -> Result<()> {
        let (Some(m), Some(wm)) = (batch_max, &self.compiled.source.watermark) else {
            return Ok(());
        };
        let max_seen = self.max_event_ns.map_or(m, |x| x.max(m));
        self.max_event_ns = Some(max_seen);
        let delay = i64::try_from(wm.delay.as_nanos()).unwrap_or(i64::MAX);
        let candidate = max_seen.saturating_sub(delay);
        if self.watermark_ns.is_none_or(|w| candidate > w) {
            self.watermark_ns = Some(candidate);
            // Complete mode keeps every group, so a watermark closes nothing there.
            self.pending_no_data = match &self.compiled.plan {
                CompiledPlan::Stateful(op) if self.compiled.mode != OutputMode::Complete => {
                    let ticks = self.compiled.window.as_ref().map(|w| &w.ticks);
                    op.closes_state(candidate, ticks)?
                }
                _ => false,
            };
        }
        Ok(())
    }
}

/// What a batch's read gave, besides the rows fed to the plan.
#[derive(Default)]
struct ReadInput {
    rows: u64,
    malformed: MalformedStats,
    max_event_ns: Option<i64>,
}

/// Reads the input that `offset` names into `feed` a part at a time, each
/// batch with its window pane column if the query has a window. If the read
/// fails, so does every scan of the slot that is reading the feed.
async fn feed_input(
    source: &dyn StreamSource,
    offset: Option<&SourceOffset>,
    window: Option<&InputWindow>,
    watermark: Option<&WatermarkSpec>,
    mut feed: Feed,
) -> Result<ReadInput> {
    let mut read = ReadInput::default();
    let Some(offset) = offset else {
        feed.finish()?;
        return Ok(read);
    };
    let mut parts = source.read_parts(offset);
    let fed: Result<()> = async {
        while let Some(part) = parts.next().await {
            let part = part?;
            read.malformed.merge(part.malformed);
            for batch in part.batches {
                read.rows += batch.num_rows() as u64;
                if let Some(m) = max_event_time(watermark, &batch)? {
                    read.max_event_ns = Some(read.max_event_ns.map_or(m, |x| x.max(m)));
                }
                let batch = match window {
                    Some(w) => w.with_panes(feed.schema(), batch)?,
                    None => batch,
                };
                feed.send(&batch)?;
            }
        }
        Ok(())
    }
    .await;
    match fed {
        Ok(()) => {
            feed.finish()?;
            Ok(read)
        }
        Err(e) => {
            feed.fail(&format!("the batch's input could not be read: {e}"));
            Err(e)
        }
    }
}

/// The largest event time of `batch`, in nanoseconds, if the source has a watermark.
fn max_event_time(watermark: Option<&WatermarkSpec>, batch: &RecordBatch) -> Result<Option<i64>> {
    let Some(wm) = watermark else {
        return Ok(None);
    };
    let column = batch.column(batch.schema().index_of(&wm.column)?);
    let unit = unit_nanos(column.data_type())?;
    let ticks = cast(column, &DataType::Int64)?;
    Ok(max(ticks.as_primitive::<Int64Type>()).map(|m| m.saturating_mul(unit)))
}

/// The outcome of a checkpoint write run as its own task, if one was started.
async fn settled(task: Option<Write>) -> Result<()> {
    match task {
        Some(mut task) => faults::settle(&mut task).await,
        None => Ok(()),
    }
}

fn format_ns(ns: i64) -> String {
    DateTime::<Utc>::from_timestamp_nanos(ns).to_rfc3339_opts(SecondsFormat::Millis, true)
}
