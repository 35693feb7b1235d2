//! A running query: the micro-batch loop, its trigger, and the handle users hold.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::ExecutionPlan;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use futures::StreamExt;
use futures::future::BoxFuture;

use super::cluster::{ClusterQuery, rows_plan};
use super::compile::{CompiledPlan, CompiledQuery, Input, InputWindow, Stage};
use super::read::ReadStats;
use super::stateful::{RemoteState, StatefulOp, StatefulOutcome, Watermarks, execute};
use crate::catalog::SourceDef;
use crate::config::{OutputMode, Trigger, WatermarkPolicy};
use crate::error::{BrookError, Result};
use crate::progress::{
    EventTimeProgress, Monitored, ProgressLog, QueryProgress, SinkProgress, SourceProgress,
    StateProgress,
};
use crate::sink::Sink;
use crate::source::{SourceOffset, StreamSource};
use crate::sql::script::WatermarkSpec;
use crate::sql::slot::Feed;
use crate::sql::window::WindowTicks;
use crate::state::checkpoint::DEFAULT_MIN_BATCHES_TO_RETAIN;
use crate::state::checkpoint::InputEventTime;
use crate::state::driver::{Driver, Program};
use crate::state::store::{Saved, StateStore};
use crate::state::{Checkpoint, CommitEntry, EventTime, Recovery};
use crate::testing::faults;

pub use crate::progress::{ProgressListener, QueryInfo};

/// The checkpoint's name for a query's aggregation state, the last stage's
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
    /// How a query reading several sources picks its watermark.
    pub watermark_policy: WatermarkPolicy,
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
            watermark_policy: WatermarkPolicy::default(),
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
        sources: Vec<Box<dyn StreamSource>>,
        sink: Arc<dyn Sink>,
        checkpoint: Option<Checkpoint>,
        id: String,
        options: QueryOptions,
        memory_table: Option<String>,
        gate: Gate,
        cluster: Option<ClusterQuery>,
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
        let described_source = sources
            .iter()
            .map(|s| s.describe())
            .collect::<Vec<_>>()
            .join(", ");
        let described_sink = sink.describe();
        let checkpoint = checkpoint.map(Arc::new);
        let state_stores = match &checkpoint {
            Some(cp) => state_layout(&compiled)
                .into_iter()
                .map(|part| StoredState {
                    store: StateStore::new(cp.clone(), &part.operator, part.schema, part.keys),
                    stage: part.stage,
                    part: part.part,
                })
                .collect(),
            None => vec![],
        };
        let inputs = sources
            .into_iter()
            .zip(&compiled.inputs)
            .map(|(source, input)| InputState::new(source, &input.source))
            .collect();
        let runner = Runner {
            shared: shared.clone(),
            driver: Driver::new(checkpoint, shared.id.clone(), shared.name.clone()),
            batches: QueryBatches {
                compiled,
                inputs,
                sink,
                state_stores,
                watermark_ns: None,
                late_watermark_ns: None,
                policy: options.watermark_policy,
                pending_no_data: false,
                cluster,
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
            for input in &mut self.batches.inputs {
                input.source.snapshot_available().await?;
            }
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
    /// One per input of the compiled query, in its order.
    inputs: Vec<InputState>,
    sink: Arc<dyn Sink>,
    /// One per state operator, in the order of [`state_layout`]: each
    /// stage's aggregation or deduplication, or a join's two sides.
    state_stores: Vec<StoredState>,
    /// The query's watermark, from its inputs' by the policy: the next batch
    /// closes state by it.
    watermark_ns: Option<i64>,
    /// The watermark the last batch ran under: the next batch's rows are late
    /// by it (Spark's watermark for late events).
    late_watermark_ns: Option<i64>,
    policy: WatermarkPolicy,
    /// The watermark moved and closes state: run a batch without input to emit or drop it.
    pending_no_data: bool,
    /// Where the batches' first stage runs, when not here.
    cluster: Option<ClusterQuery>,
}

/// A source a query reads, and its event time.
struct InputState {
    source: Box<dyn StreamSource>,
    name: String,
    watermark: Option<WatermarkSpec>,
    idle_timeout: Option<Duration>,
    watermark_ns: Option<i64>,
    max_event_ns: Option<i64>,
    /// When the source last gave rows (or the query started), for its idle timeout.
    last_rows: Instant,
}

impl InputState {
    fn new(source: Box<dyn StreamSource>, def: &SourceDef) -> Self {
        Self {
            source,
            name: def.name.clone(),
            watermark: def.watermark.clone(),
            idle_timeout: def.idle_timeout,
            watermark_ns: None,
            max_event_ns: None,
            last_rows: Instant::now(),
        }
    }

    /// Whether the source has had no rows for its idle timeout, so that it no
    /// longer holds the query's watermark back.
    fn is_idle(&self) -> bool {
        self.idle_timeout
            .is_some_and(|t| self.last_rows.elapsed() >= t)
    }
}

/// A batch read and computed.
struct Computed {
    /// Per input.
    read: Vec<ReadStats>,
    read_time: Duration,
    output: Vec<RecordBatch>,
    output_rows: u64,
    late_rows: u64,
    state_progress: Vec<StateProgress>,
    /// Per state store, the state rows the batch upserted and deleted.
    changes: Vec<(Vec<RecordBatch>, Vec<RecordBatch>)>,
    saved: Vec<Saved>,
}

/// The checkpoint's names for a join's state, left side first.
const JOIN_OPERATORS: [&str; 2] = ["join-left", "join-right"];

/// A state operator of a query, as the checkpoint names it.
struct StatePart {
    /// The stage it belongs to, in the order of [`CompiledQuery::plans`].
    stage: usize,
    /// Its number within the stage's plan, as [`state_rows`] takes it.
    part: usize,
    operator: String,
    schema: SchemaRef,
    keys: usize,
}

/// A state operator's store, and where its rows are in the query's plans.
struct StoredState {
    store: StateStore,
    stage: usize,
    part: usize,
}

/// The state operators of every stage of `compiled`, first stage first.
fn state_layout(compiled: &CompiledQuery) -> Vec<StatePart> {
    let plans = compiled.plans();
    let mut parts = vec![];
    for (stage, plan) in plans.iter().enumerate() {
        match plan {
            CompiledPlan::Stateless(_) => {}
            // The executors keep it, in files of their own.
            CompiledPlan::Stateful(op) if op.remote.is_some() => {}
            CompiledPlan::Stateful(op) => parts.push(StatePart {
                stage,
                part: 0,
                operator: stage_operator(stage, plans.len(), op),
                schema: op.state_slot.schema().clone(),
                keys: op.keys,
            }),
            CompiledPlan::Join(op) => {
                for (part, (operator, schema)) in
                    JOIN_OPERATORS.iter().zip(op.state_schemas()).enumerate()
                {
                    parts.push(StatePart {
                        stage,
                        part,
                        operator: operator.to_string(),
                        schema,
                        keys: 1,
                    });
                }
            }
        }
    }
    parts
}

/// The rows of state operator `i` of `plan`, as [`state_layout`] numbers them.
fn state_rows(plan: &CompiledPlan, i: usize) -> &[RecordBatch] {
    match plan {
        CompiledPlan::Stateless(_) => &[],
        CompiledPlan::Stateful(op) => &op.state,
        CompiledPlan::Join(op) => op.state(i),
    }
}

impl Program for QueryBatches {
    type Batch = Computed;

    async fn start(&mut self) -> Result<()> {
        for input in &mut self.inputs {
            input.source.start().await?;
        }
        Ok(())
    }

    async fn restore(&mut self, recovery: Recovery) -> Result<()> {
        if let [input] = &mut self.inputs[..] {
            input
                .source
                .restore(recovery.source_snapshot, &recovery.committed_offsets)?;
        } else {
            for input in &mut self.inputs {
                let progress = recovery
                    .source_snapshot
                    .as_ref()
                    .and_then(|s| input_entry(s, &input.name));
                let committed: Vec<SourceOffset> = recovery
                    .committed_offsets
                    .iter()
                    .filter_map(|o| input_entry(&o.0, &input.name).map(SourceOffset))
                    .collect();
                input.source.restore(progress, &committed)?;
            }
        }
        let Some(commit) = &recovery.last_commit else {
            return Ok(());
        };
        let EventTime {
            watermark_ns,
            max_event_ns,
            pending_no_data,
            emitted_through_ns,
            late_watermark_ns,
            inputs,
        } = commit.event_time.clone();
        self.watermark_ns = watermark_ns;
        self.late_watermark_ns = match late_watermark_ns {
            Some(recorded) => recorded,
            None => self.unrecorded_late_watermark(watermark_ns, emitted_through_ns),
        };
        self.pending_no_data = pending_no_data;
        if let [input] = &mut self.inputs[..] {
            input.watermark_ns = watermark_ns;
            input.max_event_ns = max_event_ns;
        } else {
            for input in &mut self.inputs {
                let saved = inputs.get(&input.name).cloned().unwrap_or_default();
                input.watermark_ns = saved.watermark_ns;
                input.max_event_ns = saved.max_event_ns;
            }
        }
        let mut states: Vec<Vec<Vec<RecordBatch>>> = vec![];
        for stored in &mut self.state_stores {
            states.resize_with(stored.stage + 1, Vec::new);
            states[stored.stage].push(stored.store.restore(commit).await?);
        }
        let mode = self.compiled.mode;
        let ctx = self.compiled.task_ctx.clone();
        // A complete-mode result whose state the executors keep is read from it.
        if let (Some(cluster), CompiledPlan::Stateful(op)) = (&self.cluster, &self.compiled.plan)
            && op.remote.is_some()
            && self.compiled.then.is_empty()
            && mode == OutputMode::Complete
        {
            let state = cluster
                .state_rows(commit.batch_id, op.state_slot.schema())
                .await?;
            let output = op.finish(&ctx, &state).await?;
            self.sink.restore(commit.batch_id, output).await?;
        }
        let mut plans = self.compiled.plans_mut();
        let last = plans.len() - 1;
        for (stage, mut state) in states.into_iter().enumerate() {
            match (&mut *plans[stage], &mut state[..]) {
                (CompiledPlan::Stateful(op), [state]) => {
                    op.restore(std::mem::take(state))?;
                    // Only the last stage can keep panes, and so emit windows late.
                    if stage == last {
                        op.emitted_through_ns = emitted_through_ns;
                        if mode == OutputMode::Complete {
                            let output = op.emit_all(&ctx).await?;
                            self.sink.restore(commit.batch_id, output).await?;
                        }
                    }
                }
                (CompiledPlan::Join(op), [left, right]) => {
                    op.restore([std::mem::take(left), std::mem::take(right)])?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn source_progress(&self) -> Result<serde_json::Value> {
        if let [input] = &self.inputs[..] {
            return input.source.progress();
        }
        let mut all = serde_json::Map::new();
        for input in &self.inputs {
            all.insert(input.name.clone(), input.source.progress()?);
        }
        Ok(serde_json::Value::Object(all))
    }

    fn batch_watermarks(&self) -> Option<Watermarks> {
        let watermarks = self.watermarks();
        (watermarks.late_ns.is_some() || watermarks.evict_ns.is_some()).then_some(watermarks)
    }

    fn rerun_under(&mut self, watermarks: Watermarks) {
        self.late_watermark_ns = watermarks.late_ns;
        // The watermark never goes back; it may have moved since the commit.
        self.watermark_ns = self.watermark_ns.max(watermarks.evict_ns);
    }

    /// The sources' next offsets (one source's as it is, several keyed by
    /// source name), or a batch without input when the watermark has state to close.
    async fn plan(&mut self) -> Result<Option<Option<SourceOffset>>> {
        let mut offsets = vec![];
        for input in &mut self.inputs {
            offsets.push(input.source.plan_batch().await?);
        }
        if offsets.iter().all(Option::is_none) {
            // A source that went idle meanwhile may let the watermark move.
            self.advance_watermark(&[])?;
            if !self.pending_no_data {
                // Spark would run a batch without input under the moved watermark,
                // which judges the next batch's rows late; this one would close
                // nothing, so it is skipped, but its watermark counts.
                self.late_watermark_ns = self.watermark_ns;
                return Ok(None);
            }
            return Ok(Some(None));
        }
        if let [offset] = &mut offsets[..] {
            return Ok(Some(offset.take()));
        }
        let mut all = serde_json::Map::new();
        for (input, offset) in self.inputs.iter().zip(offsets) {
            all.insert(
                input.name.clone(),
                offset.map_or(serde_json::Value::Null, |o| o.0),
            );
        }
        Ok(Some(Some(SourceOffset(serde_json::Value::Object(all)))))
    }

    async fn compute(&mut self, batch_id: u64, offset: Option<&SourceOffset>) -> Result<Computed> {
        self.pending_no_data = false;
        let offsets = self.split_offset(offset)?;
        let watermarks = self.watermarks();
        let CompiledQuery {
            inputs: defs,
            plan,
            mode,
            task_ctx: ctx,
            then,
            ..
        } = &mut self.compiled;
        let mode = *mode;
        let ticks = defs
            .iter()
            .find_map(|i| i.window.as_ref())
            .map(|w| &w.ticks);
        let started_reading = Instant::now();
        if let CompiledPlan::Join(op) = plan {
            // The join runs its plan twice over each side's rows: they are read whole
            // first, on the cluster if there is one (the join's state stays here).
            let (mut rows, read) = match &self.cluster {
                Some(cluster) => cluster.read_inputs(batch_id, &offsets).await?,
                None => {
                    let mut read = vec![];
                    let mut rows = vec![];
                    for ((input, def), offset) in self.inputs.iter().zip(defs.iter()).zip(&offsets)
                    {
                        let mut batches = vec![];
                        read.push(
                            read_input(
                                input.source.as_ref(),
                                offset.as_ref(),
                                def.window.as_ref(),
                                def.slot.schema(),
                                input.watermark.as_ref(),
                                |b| {
                                    batches.push(b);
                                    Ok(())
                                },
                            )
                            .await?,
                        );
                        rows.push(batches);
                    }
                    (rows, read)
                }
            };
            let read_time = started_reading.elapsed();
            let [left, right] = op.inputs();
            let new = [
                std::mem::take(&mut rows[left]),
                std::mem::take(&mut rows[right]),
            ];
            let outcome = op.run(ctx, watermarks, new).await?;
            let progress = StateProgress {
                operator: "symmetricHashJoin".into(),
                num_rows_total: op.state_rows() as u64,
                num_rows_updated: outcome.updated_rows,
                num_rows_removed: outcome.removed_rows,
                memory_used_bytes: op.state_bytes() as u64,
                num_dropped_duplicate_rows: None,
            };
            let [up_left, up_right] = outcome.upserts;
            let [del_left, del_right] = outcome.deletes;
            let mut computed = Computed {
                read,
                read_time,
                output_rows: 0,
                output: vec![],
                late_rows: outcome.late_rows,
                state_progress: vec![progress],
                changes: vec![(up_left, del_left), (up_right, del_right)],
                saved: vec![],
            };
            run_later_stages(then, ctx, mode, watermarks, outcome.output, &mut computed).await?;
            return Ok(computed);
        }
        // Rows a stage passes on are final: every stage but the last appends.
        let first_mode = if then.is_empty() {
            mode
        } else {
            OutputMode::Append
        };
        let (read, read_time, ran) = match &self.cluster {
            // The cluster reads the input, and the plan runs here over its rows.
            Some(cluster) if !cluster.runs_plan() => {
                let (rows, read) = cluster.read_inputs(batch_id, &offsets).await?;
                let read_time = started_reading.elapsed();
                for (def, rows) in defs.iter().zip(&rows) {
                    def.slot.set(rows)?;
                }
                let ran = run_stage(plan, ctx, first_mode, watermarks, ticks).await;
                // Not kept until the next batch.
                for def in defs.iter() {
                    def.slot.set(&[])?;
                }
                (read, read_time, ran?)
            }
            Some(cluster) => {
                let run = cluster.run_batch(batch_id, &offsets, watermarks).await?;
                let read_time = started_reading.elapsed();
                let ran = match (&mut *plan, run.state) {
                    // The executors merged the batch into the state they keep;
                    // its rows are the state rows it emits.
                    (CompiledPlan::Stateful(op), Some(report)) => {
                        let output = op.finish(ctx, &run.rows).await?;
                        op.remote = Some(RemoteState {
                            rows: report.rows,
                            bytes: report.bytes,
                            earliest_close_ns: report.earliest_close_ns,
                            known: true,
                        });
                        stateful_run(op, report.outcome(output))
                    }
                    (plan, _) => {
                        // The rows the cluster made stand for the plan's scan of the
                        // input (a join's sides are read apart, above).
                        let input = scanned(plan);
                        *input = rows_plan(input.schema(), run.rows)?;
                        let ran = run_stage(plan, ctx, first_mode, watermarks, ticks).await;
                        // Not kept until the next batch.
                        let input = scanned(plan);
                        *input = rows_plan(input.schema(), vec![])?;
                        ran?
                    }
                };
                (run.read, read_time, ran)
            }
            None => {
                let local = Local {
                    inputs: &self.inputs,
                    defs,
                    offsets: &offsets,
                    started_reading,
                };
                local.run(plan, ctx, first_mode, watermarks, ticks).await?
            }
        };
        let mut computed = Computed {
            read,
            read_time,
            output_rows: 0,
            output: vec![],
            late_rows: ran.late_rows,
            state_progress: ran.progress.into_iter().collect(),
            changes: ran.changes.into_iter().collect(),
            saved: vec![],
        };
        run_later_stages(then, ctx, mode, watermarks, ran.output, &mut computed).await?;
        Ok(computed)
    }

    async fn write(&mut self, batch_id: u64, batch: &mut Computed) -> Result<()> {
        let output = std::mem::take(&mut batch.output);
        // The state files are named by the commit only, so they are written beside the sink's.
        let plans = self.compiled.plans();
        let saves =
            self.state_stores
                .iter()
                .zip(&batch.changes)
                .map(|(stored, (upserts, deletes))| {
                    let rows = state_rows(plans[stored.stage], stored.part);
                    stored.store.save(batch_id, rows, upserts, deletes)
                });
        let (_, saved) = tokio::try_join!(
            self.sink.add_batch(batch_id, output),
            futures::future::try_join_all(saves)
        )?;
        batch.saved = saved;
        Ok(())
    }

    fn record_state(&mut self, batch_id: u64, batch: &mut Computed) -> bool {
        let saved = std::mem::take(&mut batch.saved);
        let any = !saved.is_empty();
        let plans = self.compiled.plans();
        for (stored, saved) in self.state_stores.iter_mut().zip(saved) {
            let rows = state_rows(plans[stored.stage], stored.part);
            stored.store.saved(batch_id, saved, rows);
        }
        any
    }

    /// Advances the watermark past the batch; the commit records it and the state.
    fn commit_entry(&mut self, batch_id: u64, batch: &Computed) -> Result<CommitEntry> {
        let maxes: Vec<Option<i64>> = batch.read.iter().map(|r| r.max_event_ns).collect();
        for (input, read) in self.inputs.iter_mut().zip(&batch.read) {
            if read.rows > 0 {
                input.last_rows = Instant::now();
            }
        }
        let ran_under = self.watermark_ns;
        self.late_watermark_ns = ran_under;
        self.advance_watermark(&maxes)?;
        let emitted_through_ns = match self.compiled.plans().last() {
            Some(CompiledPlan::Stateful(op)) => op.emitted_through_ns,
            _ => None,
        };
        let mut state = BTreeMap::new();
        let mut state_deltas = BTreeMap::new();
        for stored in &self.state_stores {
            let (snapshot, changes) = stored.store.commit_files();
            state.extend(snapshot);
            state_deltas.extend(changes);
        }
        // One source's event time is the query's, as it always was.
        let inputs = match &self.inputs[..] {
            [_] => BTreeMap::new(),
            all => all
                .iter()
                .map(|i| {
                    let at = InputEventTime {
                        watermark_ns: i.watermark_ns,
                        max_event_ns: i.max_event_ns,
                    };
                    (i.name.clone(), at)
                })
                .collect(),
        };
        Ok(CommitEntry {
            batch_id,
            event_time: EventTime {
                watermark_ns: self.watermark_ns,
                max_event_ns: self.max_event_ns(),
                pending_no_data: self.pending_no_data,
                emitted_through_ns,
                late_watermark_ns: Some(ran_under),
                inputs,
            },
            state,
            state_deltas,
            offsets_crc32: None,
        })
    }

    fn committed(&mut self, offset: Option<&SourceOffset>) -> Result<()> {
        let offsets = self.split_offset(offset)?;
        for (input, offset) in self.inputs.iter_mut().zip(offsets) {
            if let Some(o) = offset {
                input.source.commit(&o)?;
            }
        }
        Ok(())
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
        progress.num_input_rows = batch.read.iter().map(|r| r.rows).sum();
        progress.event_time = EventTimeProgress {
            watermark: self.watermark_ns.map(format_ns),
            max: self.max_event_ns().map(format_ns),
        };
        progress.state_operators = batch.state_progress;
        progress.num_late_rows = batch.late_rows;
        progress.num_rows_without_session = (self.compiled.rows_without_session.as_ref())
            .map(|n| n.swap(0, std::sync::atomic::Ordering::Relaxed));
        let offsets = self
            .split_offset(offset.as_ref())
            .unwrap_or_else(|_| vec![None; self.inputs.len()]);
        let several = self.inputs.len() > 1;
        for ((input, read), offset) in self.inputs.iter().zip(batch.read).zip(offsets) {
            let counts = input.source.counts();
            progress.sources.push(SourceProgress {
                description: input.source.describe(),
                offset: offset.map(|o| o.0).unwrap_or_default(),
                num_input_rows: read.rows,
                files_changed_after_read: counts.files_changed_after_read,
                files_skipped: counts.files_skipped,
                watermark: several
                    .then_some(input.watermark_ns)
                    .flatten()
                    .map(format_ns),
            });
            progress.num_malformed_rows += read.malformed.count;
            for (reason, n) in read.malformed.by_reason {
                *progress.malformed_by_reason.entry(reason).or_default() += n;
            }
            progress.malformed_samples.extend(read.malformed.samples);
        }
        progress.sink = SinkProgress {
            description: self.sink.describe(),
            num_output_rows: batch.output_rows,
        };
    }

    async fn stop(&mut self) -> Result<()> {
        for stored in &mut self.state_stores {
            stored.store.finish().await;
        }
        let mut stopped = self.sink.finish().await;
        for input in &mut self.inputs {
            stopped = stopped.and(input.source.stop().await);
        }
        if let Some(cluster) = &self.cluster {
            cluster.finish();
        }
        stopped
    }
}

/// One input's entry in what a query reading several sources keeps keyed by
/// source name (offsets, source logs); null when the input had none.
fn input_entry(all: &serde_json::Value, name: &str) -> Option<serde_json::Value> {
    all.get(name).filter(|v| !v.is_null()).cloned()
}

/// The part of a first stage's plan that reads the input: the whole plan, an
/// aggregation's partial, or the plan a join runs.
fn scanned(plan: &mut CompiledPlan) -> &mut Arc<dyn ExecutionPlan> {
    match plan {
        CompiledPlan::Stateless(plan) => plan,
        CompiledPlan::Stateful(op) => &mut op.partial,
        CompiledPlan::Join(op) => &mut op.plan,
    }
}

/// A batch's first stage run here, over the input as its sources read it.
struct Local<'a> {
    inputs: &'a [InputState],
    defs: &'a [Input],
    offsets: &'a [Option<SourceOffset>],
    started_reading: Instant,
}

impl Local<'_> {
    async fn run(
        self,
        plan: &mut CompiledPlan,
        ctx: &Arc<TaskContext>,
        mode: OutputMode,
        watermarks: Watermarks,
        ticks: Option<&WindowTicks>,
    ) -> Result<(Vec<ReadStats>, Duration, StageRun)> {
        // The plan runs over the input as the sources read it, a file at a time:
        // a file's rows are worked on, and can be let go, while the next is read.
        let input = scanned(plan);
        let mut feeds = vec![];
        for def in self.defs {
            feeds.push(def.slot.feed(input)?);
        }
        let streams = feeds.iter().all(Feed::streams);
        let reading = async {
            let reads = self
                .inputs
                .iter()
                .zip(self.defs)
                .zip(feeds)
                .zip(self.offsets)
                .map(|(((input, def), feed), offset)| {
                    feed_input(
                        input.source.as_ref(),
                        offset.as_ref(),
                        def.window.as_ref(),
                        input.watermark.as_ref(),
                        feed,
                    )
                });
            let read: Result<Vec<ReadStats>> =
                futures::future::join_all(reads).await.into_iter().collect();
            (read, self.started_reading.elapsed())
        };
        let running = run_stage(plan, ctx, mode, watermarks, ticks);
        let ((read, read_time), ran): (_, Result<_>) = match streams {
            true => tokio::join!(reading, running),
            false => {
                let (read, read_time) = reading.await;
                let read = read?;
                ((Ok(read), read_time), running.await)
            }
        };
        for def in self.defs {
            def.slot.set(&[])?;
        }
        // A read that failed made the plan fail too; the read's error says why.
        Ok((read?, read_time, ran?))
    }
}

/// What one stage made of a batch.
struct StageRun {
    output: Vec<RecordBatch>,
    late_rows: u64,
    progress: Option<StateProgress>,
    changes: Option<(Vec<RecordBatch>, Vec<RecordBatch>)>,
}

/// Feeds `output`, the rows the first stage emitted, through the stages after
/// it (`then`), each over the rows of the one before; the last stage's rows
/// become `computed`'s output, and every stage's counts and changes are added.
async fn run_later_stages(
    then: &mut [Stage],
    ctx: &Arc<TaskContext>,
    mode: OutputMode,
    watermarks: Watermarks,
    mut output: Vec<RecordBatch>,
    computed: &mut Computed,
) -> Result<()> {
    let stages = then.len();
    for (i, stage) in then.iter_mut().enumerate() {
        let input = match &stage.window {
            Some(w) => output
                .into_iter()
                .map(|b| w.with_panes(stage.input_slot.schema(), b))
                .collect::<Result<Vec<_>>>()?,
            None => output,
        };
        stage.input_slot.set(&input)?;
        let stage_mode = if i + 1 == stages {
            mode
        } else {
            OutputMode::Append
        };
        let ticks = stage.window.as_ref().map(|w| &w.ticks);
        let watermarks = watermarks.lagged(stage.watermark_lag_ns);
        let result = run_stage(&mut stage.plan, ctx, stage_mode, watermarks, ticks).await;
        stage.input_slot.set(&[])?;
        let ran = result?;
        computed.changes.extend(ran.changes);
        computed.state_progress.extend(ran.progress);
        computed.late_rows += ran.late_rows;
        output = ran.output;
    }
    computed.output_rows = output.iter().map(|b| b.num_rows() as u64).sum();
    computed.output = output;
    Ok(())
}

/// Runs one stage over the rows in its input slot.
async fn run_stage(
    plan: &mut CompiledPlan,
    ctx: &Arc<TaskContext>,
    mode: OutputMode,
    watermarks: Watermarks,
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
            let outcome = op.run(ctx, mode, watermarks, ticks).await?;
            Ok(stateful_run(op, outcome))
        }
        CompiledPlan::Join(_) => Err(BrookError::internal("a join ran as a plan")),
    }
}

/// A stage's run from the outcome of its aggregation's batch.
fn stateful_run(op: &StatefulOp, outcome: StatefulOutcome) -> StageRun {
    let progress = StateProgress {
        operator: progress_operator(op).into(),
        num_rows_total: op.state_rows() as u64,
        num_rows_updated: outcome.updated_rows,
        num_rows_removed: outcome.removed_rows,
        memory_used_bytes: op.state_bytes() as u64,
        num_dropped_duplicate_rows: op.dedup.then_some(outcome.dropped_duplicates),
    };
    StageRun {
        output: outcome.output,
        late_rows: outcome.late_rows,
        progress: Some(progress),
        // State the executors keep is not in the driver's checkpoint files.
        changes: op
            .remote
            .is_none()
            .then_some((outcome.upserts, outcome.deletes)),
    }
}

impl QueryBatches {
    /// The late-events watermark of a checkpoint that did not record it, which
    /// judged late rows by the current watermark. Pane state is the exception:
    /// it still holds the windows between the watermark its last batch closed
    /// through and the current one (a batch without input was pending for
    /// them), and a batch judging late rows by the current watermark would
    /// drop them unemitted; it resumes from the watermark that batch ran under.
    fn unrecorded_late_watermark(
        &self,
        watermark_ns: Option<i64>,
        emitted_through_ns: Option<i64>,
    ) -> Option<i64> {
        match self.compiled.plans().last() {
            Some(CompiledPlan::Stateful(op)) if op.panes => {
                let lag_ns = self.compiled.then.last().map_or(0, |s| s.watermark_lag_ns);
                emitted_through_ns.map(|w| w.saturating_add(lag_ns))
            }
            _ => watermark_ns,
        }
    }

    /// Each input's offset in a batch's `offset`, in the order of the inputs.
    fn split_offset(&self, offset: Option<&SourceOffset>) -> Result<Vec<Option<SourceOffset>>> {
        let Some(offset) = offset else {
            return Ok(vec![None; self.inputs.len()]);
        };
        if self.inputs.len() == 1 {
            return Ok(vec![Some(offset.clone())]);
        }
        if !offset.0.is_object() {
            return Err(BrookError::checkpoint(
                "offsets",
                format!(
                    "a batch of a query reading several sources has the offset {}, not one \
                     per source",
                    offset.0
                ),
            ));
        }
        Ok(self
            .inputs
            .iter()
            .map(|i| input_entry(&offset.0, &i.name).map(SourceOffset))
            .collect())
    }

    fn max_event_ns(&self) -> Option<i64> {
        self.inputs.iter().filter_map(|i| i.max_event_ns).max()
    }

    /// The watermarks the next batch runs under.
    fn watermarks(&self) -> Watermarks {
        Watermarks {
            late_ns: self.late_watermark_ns,
            evict_ns: self.watermark_ns,
        }
    }

    /// Moves each input's watermark past the largest event times of a batch
    /// (`batch_max`, per input; empty when no batch ran), then the query's by
    /// its policy. An input with a watermark that has not seen a row holds the
    /// `min` back, unless it is idle.
    fn advance_watermark(&mut self, batch_max: &[Option<i64>]) -> Result<()> {
        for (input, m) in self.inputs.iter_mut().zip(batch_max) {
            let (Some(m), Some(wm)) = (m, &input.watermark) else {
                continue;
            };
            let max_seen = input.max_event_ns.map_or(*m, |x| x.max(*m));
            input.max_event_ns = Some(max_seen);
            let delay = i64::try_from(wm.delay.as_nanos()).unwrap_or(i64::MAX);
            let candidate = max_seen.saturating_sub(delay);
            if input.watermark_ns.is_none_or(|w| candidate > w) {
                input.watermark_ns = Some(candidate);
            }
        }
        let counted: Vec<&InputState> = self
            .inputs
            .iter()
            .filter(|i| i.watermark.is_some() && !i.is_idle())
            .collect();
        let candidate = match self.policy {
            WatermarkPolicy::Min if counted.iter().any(|i| i.watermark_ns.is_none()) => None,
            WatermarkPolicy::Min => counted.iter().filter_map(|i| i.watermark_ns).min(),
            WatermarkPolicy::Max => counted.iter().filter_map(|i| i.watermark_ns).max(),
        };
        let Some(candidate) = candidate else {
            return Ok(());
        };
        if self.watermark_ns.is_none_or(|w| candidate > w) {
            self.watermark_ns = Some(candidate);
            // Complete mode keeps every group of the last stage, so a watermark
            // closes nothing there; the stages before it append.
            let plans = self.compiled.plans();
            let stages = self
                .compiled
                .stage_ticks()
                .into_iter()
                .zip(self.compiled.stage_watermarks(Some(candidate)));
            let mut closes = false;
            for (i, (plan, (ticks, watermark))) in plans.iter().zip(stages).enumerate() {
                let appends = i + 1 < plans.len() || self.compiled.mode != OutputMode::Complete;
                let watermark = watermark.unwrap_or(candidate);
                closes |= match plan {
                    CompiledPlan::Stateful(op) if appends => op.closes_state(watermark, ticks)?,
                    CompiledPlan::Join(op) => op.closes_state(watermark)?,
                    _ => false,
                };
            }
            self.pending_no_data = closes;
        }
        Ok(())
    }
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
) -> Result<ReadStats> {
    let schema = feed.schema().clone();
    let fed = read_input(source, offset, window, &schema, watermark, |b| {
        feed.send(&b)
    })
    .await;
    match fed {
        Ok(read) => {
            feed.finish()?;
            Ok(read)
        }
        Err(e) => {
            feed.fail(&format!("the batch's input could not be read: {e}"));
            Err(e)
        }
    }
}

/// Reads the input that `offset` names a part at a time, giving each batch,
/// with its window pane column (`schema` is the slot's) if the query has a
/// window, to `take`.
async fn read_input(
    source: &dyn StreamSource,
    offset: Option<&SourceOffset>,
    window: Option<&InputWindow>,
    schema: &SchemaRef,
    watermark: Option<&WatermarkSpec>,
    mut take: impl FnMut(RecordBatch) -> Result<()>,
) -> Result<ReadStats> {
    let mut read = ReadStats::default();
    let Some(offset) = offset else {
        return Ok(read);
    };
    let watermark = watermark.map(|w| w.column.as_str());
    let mut parts = source.read_parts(offset);
    while let Some(part) = parts.next().await {
        let part = part?;
        read.malformed.merge(part.malformed);
        for batch in part.batches {
            take(read.take(batch, watermark, window, schema)?)?;
        }
    }
    Ok(read)
}

fn format_ns(ns: i64) -> String {
    DateTime::<Utc>::from_timestamp_nanos(ns).to_rfc3339_opts(SecondsFormat::Millis, true)
}
