//! A running query: the micro-batch loop, its trigger, and the handle users hold.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::compute::{cast, max};
use datafusion::arrow::datatypes::{DataType, Int64Type};
use datafusion::execution::TaskContext;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use futures::StreamExt;
use futures::future::BoxFuture;

use super::compile::{CompiledPlan, CompiledQuery, InputWindow};
use super::stateful::{StatefulOp, execute};
use crate::config::{OutputMode, Trigger};
use crate::error::{BrookError, Result};
use crate::progress::{
    EventTimeProgress, Monitored, ProgressLog, QueryProgress, SinkProgress, SourceProgress,
    StateProgress,
};
use crate::sink::Sink;
use crate::source::{MalformedStats, SourceOffset, StreamSource};
use crate::sql::script::WatermarkSpec;
use crate::sql::slot::Feed;
use crate::sql::window::{WindowTicks, unit_nanos};
use crate::state::checkpoint::DEFAULT_MIN_BATCHES_TO_RETAIN;
use crate::state::driver::{Driver, Program};
use crate::state::store::{Saved, StateStore};
use crate::state::{Checkpoint, CommitEntry, EventTime, Recovery};
use crate::testing::faults;

pub use crate::progress::{ProgressListener, QueryInfo};

/// The checkpoint's name for a query's aggregation state: the state of its
/// last stateful stage. A stage before it is named by its place and kind
/// ([`stage_operator`]).
const STATE_OPERATOR: &str = "aggregate";

/// The operator name progress reports for `op`.
fn progress_operator(op: &StatefulOp) -> &'static str {
    if op.dedup { "dedupe" } else { STATE_OPERATOR }
}

/// The checkpoint's name for the state of stage `stage` of `stages`.
fn stage_operator(stage: usize, stages: usize, op: &StatefulOp) -> String {
    if stage + 1 == stages {
        STATE_OPERATOR.to_string()
    } else {
        format!("stage{stage}-{}", progress_operator(op))
    }
}

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
    progress: ProgressLog,
    /// Counts polls that found nothing to do: `process_all_available` waits on it.
    idle: watch::Sender<u64>,
    finished: watch::Sender<bool>,
    error: Mutex<Option<Arc<BrookError>>>,
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
            progress: ProgressLog::new(options.listeners.clone()),
            idle: watch::channel(0).0,
            finished: watch::channel(false).0,
            error: Mutex::new(None),
        });
        let output_mode = compiled.mode;
        let sql = compiled.sql.clone();
        let described_source = source.describe();
        let described_sink = sink.describe();
        let checkpoint = checkpoint.map(Arc::new);
        let plans = compiled.plans();
        let state_stores = plans
            .iter()
            .enumerate()
            .map(|(i, plan)| match (&checkpoint, plan) {
                (Some(cp), CompiledPlan::Stateful(op)) => Some(StateStore::new(
                    cp.clone(),
                    &stage_operator(i, plans.len(), op),
                    op.state_slot.schema().clone(),
                    op.keys,
                )),
                _ => None,
            })
            .collect();
        let runner = Runner {
            shared: shared.clone(),
            driver: Driver::new(checkpoint, shared.id.clone(), shared.name.clone()),
            batches: QueryBatches {
                compiled,
                source,
                sink,
                state_stores,
                watermark_ns: None,
                max_event_ns: None,
                pending_no_data: false,
            },
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
        self.shared.progress.recent()
    }

    pub fn last_progress(&self) -> Option<QueryProgress> {
        self.shared.progress.last()
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

impl Monitored for StreamingQuery {
    fn info(&self) -> QueryInfo {
        StreamingQuery::info(self)
    }

    fn recent_progress(&self) -> Vec<QueryProgress> {
        StreamingQuery::recent_progress(self)
    }

    fn stop(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(StreamingQuery::stop(self))
    }
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

/// The trigger loop around the [`Driver`], which runs the query's batches.
struct Runner {
    shared: Arc<Shared>,
    driver: Driver,
    batches: QueryBatches,
}

impl Runner {
    async fn run_loop(&mut self, options: &QueryOptions, gate: Gate) -> Result<()> {
        let ran = self.run_batches(options, gate).await;
        let finished = self.driver.finish(&mut self.batches).await;
        ran.and(finished)
    }

    async fn run_batches(&mut self, options: &QueryOptions, mut gate: Gate) -> Result<()> {
        self.driver.recover(&mut self.batches).await?;
        if options.trigger == Trigger::AvailableNow {
            self.batches.source.snapshot_available().await?;
        }
        // Recovery and listing are done while the script's other queries are
        // planned; reading waits for them.
        let _ = gate.wait_for(|go| *go).await;
        while !self.shared.stop.load(Ordering::SeqCst) {
            let started = Instant::now();
            let ran = match self.driver.run_batch(&mut self.batches).await? {
                Some(progress) => {
                    self.shared.progress.publish(progress);
                    true
                }
                None => {
                    self.shared.idle.send_modify(|n| *n += 1);
                    false
                }
            };
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
}

/// A query's sources, plans, state and sink, as the [`Driver`] runs them.
struct QueryBatches {
    compiled: CompiledQuery,
    source: Box<dyn StreamSource>,
    sink: Arc<dyn Sink>,
    /// Each stage's state in the checkpoint, in the order of [`CompiledQuery::plans`].
    state_stores: Vec<Option<StateStore>>,
    watermark_ns: Option<i64>,
    max_event_ns: Option<i64>,
    /// The watermark moved and closes state: run a batch without input to emit or drop it.
    pending_no_data: bool,
}

/// A batch read and computed.
struct Computed {
    read: ReadInput,
    read_time: Duration,
    output: Vec<RecordBatch>,
    output_rows: u64,
    late_rows: u64,
    state_progress: Vec<StateProgress>,
    /// Per stage, the state rows the batch upserted and deleted.
    changes: Vec<Option<(Vec<RecordBatch>, Vec<RecordBatch>)>>,
    saved: Vec<Option<Saved>>,
}

impl Program for QueryBatches {
    type Batch = Computed;

    async fn start(&mut self) -> Result<()> {
        self.source.start().await
    }

    async fn restore(&mut self, recovery: Recovery) -> Result<()> {
        self.source
            .restore(recovery.source_snapshot, &recovery.committed_offsets)?;
        let Some(commit) = &recovery.last_commit else {
            return Ok(());
        };
        let EventTime {
            watermark_ns,
            max_event_ns,
            pending_no_data,
            emitted_through_ns,
        } = commit.event_time.clone();
        self.watermark_ns = watermark_ns;
        self.max_event_ns = max_event_ns;
        self.pending_no_data = pending_no_data;
        let mode = self.compiled.mode;
        let ctx = self.compiled.task_ctx.clone();
        let mut plans = self.compiled.plans_mut();
        let last = plans.len() - 1;
        for (i, (plan, store)) in plans.iter_mut().zip(&mut self.state_stores).enumerate() {
            let (CompiledPlan::Stateful(op), Some(store)) = (&mut **plan, store) else {
                continue;
            };
            op.restore(store.restore(commit).await?)?;
            // Only the last stage can keep panes, and so emit windows late.
            if i == last {
                op.emitted_through_ns = emitted_through_ns;
                if mode == OutputMode::Complete {
                    let output = op.emit_all(&ctx).await?;
                    self.sink.restore(commit.batch_id, output).await?;
                }
            }
        }
        Ok(())
    }

    fn source_progress(&self) -> Result<serde_json::Value> {
        self.source.progress()
    }

    /// The source's next offset, or a batch without input when the watermark
    /// has state to close.
    async fn plan(&mut self) -> Result<Option<Option<SourceOffset>>> {
        let offset = self.source.plan_batch().await?;
        if offset.is_none() && !self.pending_no_data {
            return Ok(None);
        }
        Ok(Some(offset))
    }

    async fn compute(&mut self, _batch_id: u64, offset: Option<&SourceOffset>) -> Result<Computed> {
        self.pending_no_data = false;
        // The plan runs over the input as the source reads it, a file at a time:
        // a file's rows are worked on, and can be let go, while the next is read.
        let CompiledQuery {
            source: source_def,
            input_slot,
            window,
            plan,
            mode,
            task_ctx: ctx,
            then,
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
                offset,
                window.as_ref(),
                source_def.watermark.as_ref(),
                feed,
            )
            .await;
            (read, started_reading.elapsed())
        };
        let (mode, watermark_ns) = (*mode, self.watermark_ns);
        // Rows a stage passes on are final: every stage but the last appends.
        let first_mode = if then.is_empty() {
            mode
        } else {
            OutputMode::Append
        };
        let ticks = window.as_ref().map(|w| &w.ticks);
        let running = run_stage(plan, ctx, first_mode, watermark_ns, ticks);
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
        let mut ran = ran?;
        let mut changes = vec![ran.changes];
        let mut state_progress: Vec<StateProgress> = ran.progress.into_iter().collect();
        let mut late_rows = ran.late_rows;
        let stages = then.len();
        for (i, stage) in then.iter_mut().enumerate() {
            let input = match &stage.window {
                Some(w) => ran
                    .output
                    .into_iter()
                    .map(|b| w.with_panes(stage.input_slot.schema(), b))
                    .collect::<Result<Vec<_>>>()?,
                None => ran.output,
            };
            stage.input_slot.set(&input)?;
            let stage_mode = if i + 1 == stages {
                mode
            } else {
                OutputMode::Append
            };
            let ticks = stage.window.as_ref().map(|w| &w.ticks);
            let result = run_stage(&mut stage.plan, ctx, stage_mode, watermark_ns, ticks).await;
            stage.input_slot.set(&[])?;
            ran = result?;
            changes.push(ran.changes);
            state_progress.extend(ran.progress);
            late_rows += ran.late_rows;
        }
        let output = ran.output;
        Ok(Computed {
            read,
            read_time,
            output_rows: output.iter().map(|b| b.num_rows() as u64).sum(),
            output,
            late_rows,
            state_progress,
            saved: changes.iter().map(|_| None).collect(),
            changes,
        })
    }

    async fn write(&mut self, batch_id: u64, batch: &mut Computed) -> Result<()> {
        let output = std::mem::take(&mut batch.output);
        // The state files are named by the commit only, so they are written beside the sink's.
        let plans = self.compiled.plans();
        let saves = plans
            .iter()
            .zip(&self.state_stores)
            .zip(&batch.changes)
            .map(|((plan, store), changes)| async move {
                match (store, plan, changes) {
                    (Some(store), CompiledPlan::Stateful(op), Some((upserts, deletes))) => store
                        .save(batch_id, &op.state, upserts, deletes)
                        .await
                        .map(Some),
                    _ => Ok(None),
                }
            });
        let (_, saved) = tokio::try_join!(
            self.sink.add_batch(batch_id, output),
            futures::future::try_join_all(saves)
        )?;
        batch.saved = saved;
        Ok(())
    }

    fn record_state(&mut self, batch_id: u64, batch: &mut Computed) -> bool {
        let mut recorded = false;
        let plans = self.compiled.plans();
        for ((store, saved), plan) in self
            .state_stores
            .iter_mut()
            .zip(std::mem::take(&mut batch.saved))
            .zip(plans)
        {
            if let (Some(store), Some(saved), CompiledPlan::Stateful(op)) = (store, saved, plan) {
                store.saved(batch_id, saved, &op.state);
                recorded = true;
            }
        }
        recorded
    }

    /// Advances the watermark past the batch; the commit records it and the state.
    fn commit_entry(&mut self, batch_id: u64, batch: &Computed) -> Result<CommitEntry> {
        self.advance_watermark(batch.read.max_event_ns)?;
        let emitted_through_ns = match self.compiled.plans().last() {
            Some(CompiledPlan::Stateful(op)) => op.emitted_through_ns,
            _ => None,
        };
        let (mut state, mut state_deltas) = (BTreeMap::new(), BTreeMap::new());
        for store in self.state_stores.iter().flatten() {
            let (snapshot, changes) = store.commit_files();
            state.extend(snapshot);
            state_deltas.extend(changes);
        }
        Ok(CommitEntry {
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
        })
    }

    fn committed(&mut self, offset: Option<&SourceOffset>) -> Result<()> {
        match offset {
            Some(o) => self.source.commit(o),
            None => Ok(()),
        }
    }

    fn describe(
        &self,
        batch: Computed,
        offset: Option<SourceOffset>,
        progress: &mut QueryProgress,
    ) {
        // Reading and executing overlap: "read" is until the input was all
        // read, "execute" the rest.
        let read_ms = batch.read_time.as_secs_f64() * 1000.0;
        if let Some(execute) = progress.duration_ms.get_mut("execute") {
            *execute = (*execute - read_ms).max(0.0);
        }
        progress.duration_ms.insert("read".into(), read_ms);
        let input_rows = batch.read.rows;
        progress.num_input_rows = input_rows;
        progress.event_time = EventTimeProgress {
            watermark: self.watermark_ns.map(format_ns),
            max: self.max_event_ns.map(format_ns),
        };
        progress.state_operators = batch.state_progress;
        progress.num_malformed_rows = batch.read.malformed.count;
        progress.malformed_by_reason = batch.read.malformed.by_reason;
        progress.malformed_samples = batch.read.malformed.samples;
        progress.num_late_rows = batch.late_rows;
        let counts = self.source.counts();
        progress.sources = vec![SourceProgress {
            description: self.source.describe(),
            offset: offset.map(|o| o.0).unwrap_or_default(),
            num_input_rows: input_rows,
            files_changed_after_read: counts.files_changed_after_read,
            files_skipped: counts.files_skipped,
        }];
        progress.sink = SinkProgress {
            description: self.sink.describe(),
            num_output_rows: batch.output_rows,
        };
    }

    async fn stop(&mut self) -> Result<()> {
        for store in self.state_stores.iter_mut().flatten() {
            store.finish().await;
        }
        self.source.stop().await
    }
}

/// What one stage made of a batch.
struct StageRun {
    output: Vec<RecordBatch>,
    late_rows: u64,
    progress: Option<StateProgress>,
    changes: Option<(Vec<RecordBatch>, Vec<RecordBatch>)>,
}

/// Runs one stage over the rows in its input slot.
async fn run_stage(
    plan: &mut CompiledPlan,
    ctx: &Arc<TaskContext>,
    mode: OutputMode,
    watermark_ns: Option<i64>,
    ticks: Option<&WindowTicks>,
) -> Result<StageRun> {
    match plan {
        CompiledPlan::Stateless(plan) => Ok(StageRun {
            output: execute(plan, ctx).await?,
            late_rows: 0,
            progress: None,
            changes: None,
        }),
        CompiledPlan::Stateful(op) => {
            let outcome = op.run(ctx, mode, watermark_ns, ticks).await?;
            let progress = StateProgress {
                operator: progress_operator(op).into(),
                num_rows_total: op.state_rows() as u64,
                num_rows_updated: outcome.updated_rows,
                num_rows_removed: outcome.removed_rows,
                memory_used_bytes: op.state_bytes() as u64,
                num_dropped_duplicate_rows: op.dedup.then_some(outcome.dropped_duplicates),
            };
            Ok(StageRun {
                output: outcome.output,
                late_rows: outcome.late_rows,
                progress: Some(progress),
                changes: Some((outcome.upserts, outcome.deletes)),
            })
        }
    }
}

impl QueryBatches {
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
            // Complete mode keeps every group of the last stage, so a watermark
            // closes nothing there; the stages before it append.
            let plans = self.compiled.plans();
            let windows = self.compiled.windows();
            let mut closes = false;
            for (i, (plan, window)) in plans.iter().zip(windows).enumerate() {
                let appends = i + 1 < plans.len() || self.compiled.mode != OutputMode::Complete;
                if let (CompiledPlan::Stateful(op), true) = (plan, appends) {
                    closes |= op.closes_state(candidate, window.map(|w| &w.ticks))?;
                }
            }
            self.pending_no_data = closes;
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

fn format_ns(ns: i64) -> String {
    DateTime::<Utc>::from_timestamp_nanos(ns).to_rfc3339_opts(SecondsFormat::Millis, true)
}
