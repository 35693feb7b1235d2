//! `StreamingContext`: the inputs, the output operations, and the batch loop.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use datafusion::arrow::array::{AsArray, RecordBatch, StringArray, UInt32Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::prelude::SessionContext;
use futures::future::BoxFuture;
use serde_json::json;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use super::stateful::Checkpointed;
use super::{BatchEnv, DStream, Data};
use crate::config::Trigger;
use crate::engine::Engine;
use crate::error::{BrookError, Result};
use crate::progress::{
    Monitored, ProgressLog, QueryInfo, QueryProgress, SinkProgress, SourceProgress,
};
use crate::source::format::Decoder;
use crate::source::kafka::{KafkaOptions, KafkaSource, StartingOffsets, Topics, default_readers};
use crate::source::location::Location;
use crate::source::malformed::DEFAULT_CORRUPT_COLUMN;
use crate::source::socket::SocketSource;
use crate::source::{
    FileFormat, FileSource, FileSourceOptions, MalformedStats, ParseMode, SourceOffset,
    StreamSource,
};
use crate::state::checkpoint::{
    DEFAULT_MIN_BATCHES_TO_RETAIN, QueryFingerprint, StateFile, new_id,
};
use crate::state::driver::{Driver, Program};
use crate::state::{Checkpoint, CommitEntry, Recovery};
use crate::testing::faults;

/// The checkpoint's name for the DStream operators' state.
const STATE_OPERATOR: &str = "dstream";

/// An output operation: runs on a batch, giving the number of rows it was handed.
pub(crate) type Output = Arc<dyn Fn(&BatchEnv) -> Result<u64> + Send + Sync>;

/// Arrow rows read from a source into a typed batch (`Vec<T>`).
type Convert = fn(&[RecordBatch]) -> Result<Arc<dyn Any + Send + Sync>>;

/// Where a stream's rows come from.
enum Input {
    /// Rows from a source shared with SQL queries (files, socket, Kafka),
    /// turned into the stream's typed rows.
    Source(Box<dyn StreamSource>, Convert),
    /// Batches handed in by the program (`queue_stream`), typed, with their length.
    Queue(Box<dyn FnMut() -> (Arc<dyn Any + Send + Sync>, u64) + Send + Sync>),
}

struct Inner {
    session: SessionContext,
    interval: Duration,
    /// A new id until the checkpoint (whose id is kept across restarts) is opened.
    id: Mutex<String>,
    name: Mutex<String>,
    /// Committed batches whose checkpoint files are kept.
    min_batches_to_retain: AtomicU64,
    /// Each input stream, described.
    sources: Mutex<Vec<String>>,
    progress: ProgressLog,
    next_id: AtomicUsize,
    inputs: Mutex<Vec<Input>>,
    outputs: Mutex<Vec<Output>>,
    states: Mutex<Vec<Arc<dyn Checkpointed>>>,
    checkpoint: Mutex<Option<String>>,
    /// Mistakes in the program found while it was built, reported by `start`.
    invalid: Mutex<Vec<String>>,
    started: AtomicBool,
    stop: AtomicBool,
    wake: Notify,
    /// Batches completed: tests and `await_batches` wait on it.
    completed: watch::Sender<u64>,
    finished: watch::Sender<bool>,
    error: Mutex<Option<Arc<BrookError>>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// Spark Streaming's entry point: a batch every `batch_interval`.
#[derive(Clone)]
pub struct StreamingContext {
    inner: Arc<Inner>,
}

fn poisoned<T>(_: T) -> BrookError {
    BrookError::poisoned("streaming context")
}

impl StreamingContext {
    pub fn new(session: &SessionContext, batch_interval: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                session: session.clone(),
                interval: batch_interval.max(Duration::from_millis(1)),
                id: Mutex::new(new_id()),
                name: Mutex::new("dstream".into()),
                min_batches_to_retain: AtomicU64::new(DEFAULT_MIN_BATCHES_TO_RETAIN),
                sources: Mutex::default(),
                progress: ProgressLog::default(),
                next_id: AtomicUsize::new(0),
                inputs: Mutex::default(),
                outputs: Mutex::default(),
                states: Mutex::default(),
                checkpoint: Mutex::default(),
                invalid: Mutex::default(),
                started: AtomicBool::new(false),
                stop: AtomicBool::new(false),
                wake: Notify::new(),
                completed: watch::channel(0).0,
                finished: watch::channel(false).0,
                error: Mutex::default(),
                task: Mutex::default(),
            }),
        }
    }

    /// Builds the program with `factory` and points it at `dir`: when the
    /// checkpoint holds batches, the program resumes from them (its state,
    /// windows and input positions). Unlike Spark, the factory always runs:
    /// Rust closures cannot be saved, so the program is rebuilt and the
    /// checkpoint supplies the data (the program must be the same one).
    pub fn get_or_create(dir: &str, factory: impl FnOnce() -> StreamingContext) -> Self {
        let ctx = factory();
        ctx.checkpoint(dir);
        ctx
    }

    /// Where offsets, commits and operator state go (local path or object-store URL).
    pub fn checkpoint(&self, dir: &str) {
        if let Ok(mut c) = self.inner.checkpoint.lock() {
            *c = Some(dir.to_string());
        }
    }

    /// Committed batches whose checkpoint files are kept (default 100), as
    /// for SQL queries.
    pub fn min_batches_to_retain(&self, batches: u64) {
        self.inner
            .min_batches_to_retain
            .store(batches, Ordering::SeqCst);
    }

    /// Names the program in its progress records and the web UI, and for
    /// `BROOK_PAUSE_AT` (default `dstream`).
    pub fn set_name(&self, name: &str) {
        if let Ok(mut n) = self.inner.name.lock() {
            *n = name.to_string();
        }
    }

    pub fn name(&self) -> String {
        self.inner
            .name
            .lock()
            .map(|n| n.clone())
            .unwrap_or_default()
    }

    /// The checkpoint's id once the program has started on one (the same
    /// across restarts), else an id of this context.
    pub fn id(&self) -> String {
        self.inner.id.lock().map(|i| i.clone()).unwrap_or_default()
    }

    /// The progress of the most recent batches, oldest first.
    pub fn recent_progress(&self) -> Vec<QueryProgress> {
        self.inner.progress.recent()
    }

    pub fn last_progress(&self) -> Option<QueryProgress> {
        self.inner.progress.last()
    }

    /// Calls `f` with each batch's progress as the batch completes.
    pub fn on_progress(&self, f: impl Fn(&QueryProgress) + Send + Sync + 'static) {
        self.inner.progress.listen(Arc::new(f));
    }

    /// Lists the program among `engine`'s queries: the web UI serving `engine`
    /// shows its batches in its monitor, and can stop it.
    pub fn monitor_in(&self, engine: &Engine) -> Result<()> {
        self.inner.progress.listen(engine.progress_listener());
        engine.monitor(Arc::new(self.clone()))
    }

    pub fn session(&self) -> &SessionContext {
        &self.inner.session
    }

    pub(crate) fn next_id(&self) -> usize {
        self.inner.next_id.fetch_add(1, Ordering::SeqCst)
    }

    pub(crate) fn register_state(&self, state: Arc<dyn Checkpointed>) {
        if let Ok(mut s) = self.inner.states.lock() {
            s.push(state);
        }
    }

    /// Records a mistake in the program; `start` refuses to run it.
    pub(crate) fn invalid(&self, message: String) {
        if let Ok(mut i) = self.inner.invalid.lock() {
            i.push(message);
        }
    }

    /// Checks a window's length and slide against the batch interval, as Spark does.
    pub(crate) fn check_window(&self, length: Duration, slide: Duration) {
        let interval = self.inner.interval.as_millis();
        for (what, d) in [("length", length), ("slide", slide)] {
            let ms = d.as_millis();
            if ms == 0 || ms % interval != 0 {
                self.invalid(format!(
                    "window {what} {d:?} is not a positive multiple of the batch interval {:?}",
                    self.inner.interval
                ));
            }
        }
    }

    pub(crate) fn register_output(&self, output: Output) {
        if let Ok(mut o) = self.inner.outputs.lock() {
            o.push(output);
        }
    }

    fn add_input<T: Data>(&self, input: Input) -> DStream<T> {
        if self.inner.started.load(Ordering::SeqCst) {
            self.invalid("an input stream was created after start".into());
        }
        if let Ok(mut sources) = self.inner.sources.lock() {
            sources.push(match &input {
                Input::Source(source, _) => source.describe(),
                Input::Queue(_) => "queue".into(),
            });
        }
        let index = match self.inner.inputs.lock() {
            Ok(mut inputs) => {
                inputs.push(input);
                inputs.len() - 1
            }
            Err(_) => usize::MAX,
        };
        DStream::new(self, move |env| {
            let rows = env
                .inputs
                .get(index)
                .cloned()
                .ok_or_else(|| BrookError::internal(format!("no input {index}")))?;
            rows.downcast::<Vec<T>>()
                .map(Some)
                .map_err(|_| BrookError::internal(format!("input {index} has another type")))
        })
    }

    fn lines(&self, source: Box<dyn StreamSource>) -> DStream<String> {
        self.add_input(Input::Source(source, lines))
    }

    /// Spark's `KafkaUtils.createDirectStream`: each record's key and value
    /// (as text), read with brook's Kafka source, its offset ranges in the
    /// checkpoint as for SQL queries.
    pub fn kafka_direct_stream(
        &self,
        bootstrap_servers: &str,
        topics: &[&str],
        starting_offsets: StartingOffsets,
    ) -> Result<DStream<(Option<String>, String)>> {
        let options = KafkaOptions {
            bootstrap_servers: bootstrap_servers.to_string(),
            topics: Topics::List(topics.iter().map(|t| t.to_string()).collect()),
            starting_offsets,
            max_offsets_per_trigger: None,
            fail_on_data_loss: true,
            client: Default::default(),
            poll_timeout: Duration::from_secs(120),
            include_headers: false,
            readers: default_readers(),
        };
        let source = KafkaSource::new(options, None, &Arc::default())?;
        Ok(self.add_input(Input::Source(Box::new(source), keys_and_values)))
    }

    /// Spark's `textFileStream`: each new file's lines. Files already in the
    /// directory at start are not read, as in Spark; files must be moved in whole.
    pub fn text_file_stream(&self, dir: &str) -> Result<DStream<String>> {
        let location = Location::resolve(dir, &self.inner.session.runtime_env())?;
        let schema = Arc::new(Schema::new(vec![Field::new(
            "value",
            DataType::Utf8,
            false,
        )]));
        let decoder = Decoder::new(
            FileFormat::Text,
            schema,
            ParseMode::Permissive,
            DEFAULT_CORRUPT_COLUMN,
        );
        let options = FileSourceOptions {
            include_existing_files: false,
            ..Default::default()
        };
        let source = FileSource::new(location, decoder, options, &Arc::default())?;
        Ok(self.lines(Box::new(source)))
    }

    /// Spark's `socketTextStream`: lines read over TCP from `host:port`
    /// (reconnecting when the connection drops). Lines received are held in
    /// memory until their batch commits: a process that dies loses them, as a
    /// Spark receiver without a write-ahead log does.
    pub fn socket_text_stream(&self, host: &str, port: u16) -> DStream<String> {
        self.lines(Box::new(SocketSource::new(format!("{host}:{port}"))))
    }

    /// Spark's `queueStream`: each batch takes the next of `batches` (or all of
    /// them at once when `one_at_a_time` is false); empty once they run out.
    pub fn queue_stream<T: Data>(&self, batches: Vec<Vec<T>>, one_at_a_time: bool) -> DStream<T> {
        let mut queue: VecDeque<Vec<T>> = batches.into();
        self.add_input::<T>(Input::Queue(Box::new(move || {
            let rows: Vec<T> = if one_at_a_time {
                queue.pop_front().unwrap_or_default()
            } else {
                queue.drain(..).flatten().collect()
            };
            let count = rows.len() as u64;
            (Arc::new(rows), count)
        })))
    }

    /// Spark's `union` of many streams.
    pub fn union<T: Data>(&self, streams: &[DStream<T>]) -> Result<DStream<T>> {
        let (first, rest) = streams
            .split_first()
            .ok_or_else(|| BrookError::usage("union of no streams"))?;
        Ok(rest.iter().fold(first.clone(), |acc, s| acc.union(s)))
    }

    /// Starts the batch loop. The program's streams and outputs are fixed from here on.
    pub fn start(&self) -> Result<()> {
        let mut task = self.inner.task.lock().map_err(poisoned)?;
        if task.is_some() {
            return Err(BrookError::usage(
                "the streaming context was already started",
            ));
        }
        let invalid = self.inner.invalid.lock().map_err(poisoned)?.clone();
        if !invalid.is_empty() {
            return Err(BrookError::usage(format!(
                "the DStream program cannot run: {}",
                invalid.join("; ")
            )));
        }
        let checkpointed = self.inner.checkpoint.lock().map_err(poisoned)?.is_some();
        let inputs = std::mem::take(&mut *self.inner.inputs.lock().map_err(poisoned)?);
        if checkpointed && inputs.iter().any(|i| matches!(i, Input::Queue(_))) {
            return Err(BrookError::usage(
                "queue_stream cannot be checkpointed: its batches live in the program and would \
                 be replayed on restart (Spark refuses this too); drop the checkpoint or read \
                 from files, a socket or Kafka",
            ));
        }
        self.inner.started.store(true, Ordering::SeqCst);
        let inner = self.inner.clone();
        let name = self.name();
        *task = Some(tokio::spawn(async move {
            let result = faults::in_query(name, run(&inner, inputs)).await;
            if let Err(e) = result {
                tracing::error!("streaming context failed: {e}");
                if let Ok(mut slot) = inner.error.lock() {
                    *slot = Some(Arc::new(e));
                }
            }
            inner.finished.send_replace(true);
        }));
        Ok(())
    }

    /// Waits until the context stops; the error it failed with, if any.
    pub async fn await_termination(&self) -> Result<()> {
        if !self.inner.started.load(Ordering::SeqCst) && !*self.inner.finished.borrow() {
            return Err(BrookError::usage(
                "await_termination before start: start the streaming context first",
            ));
        }
        let mut finished = self.inner.finished.subscribe();
        let _ = finished.wait_for(|f| *f).await;
        match self.inner.error.lock().ok().and_then(|e| e.clone()) {
            Some(source) => Err(BrookError::ContextFailed { source }),
            None => Ok(()),
        }
    }

    /// As `await_termination`, for at most `timeout`: whether it stopped.
    pub async fn await_termination_or_timeout(&self, timeout: Duration) -> Result<bool> {
        match tokio::time::timeout(timeout, self.await_termination()).await {
            Ok(result) => result.map(|()| true),
            Err(_) => Ok(false),
        }
    }

    /// Waits until `n` batches have completed since start (for tests and demos).
    pub async fn await_batches(&self, n: u64) -> Result<()> {
        let mut completed = self.inner.completed.subscribe();
        let mut finished = self.inner.finished.subscribe();
        tokio::select! {
            _ = completed.wait_for(|c| *c >= n) => Ok(()),
            _ = finished.wait_for(|f| *f) => self.await_termination().await,
        }
    }

    /// Stops after the running batch (which commits). The session is shared
    /// with the caller, so `stop_session` only matters to Spark ports: there is
    /// nothing else to stop.
    pub async fn stop(&self, _stop_session: bool) -> Result<()> {
        self.inner.stop.store(true, Ordering::SeqCst);
        if !self.inner.started.load(Ordering::SeqCst) {
            self.inner.finished.send_replace(true);
            return Ok(());
        }
        self.inner.wake.notify_one();
        self.await_termination().await?;
        let task = self.inner.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            task.await
                .map_err(|e| BrookError::task("the DStream batch loop", e))?;
        }
        Ok(())
    }
}

impl Monitored for StreamingContext {
    fn info(&self) -> QueryInfo {
        let inner = &self.inner;
        let count = |what: usize, one: &str| match what {
            1 => format!("1 {one}"),
            n => format!("{n} {one}s"),
        };
        let sources = inner.sources.lock().map(|s| s.clone()).unwrap_or_default();
        let outputs = inner.outputs.lock().map(|o| o.len()).unwrap_or_default();
        let states = inner.states.lock().map(|s| s.len()).unwrap_or_default();
        QueryInfo {
            id: self.id(),
            name: self.name(),
            sql: format!(
                "a DStream program: {}, {}, {}",
                count(sources.len(), "input stream"),
                count(outputs, "output operation"),
                count(states, "stateful operator")
            ),
            output_mode: "none (DStream outputs)".into(),
            trigger: Trigger::ProcessingTime(inner.interval).to_string(),
            checkpoint: inner.checkpoint.lock().ok().and_then(|c| c.clone()),
            source: sources.join(" + "),
            sink: count(outputs, "output operation"),
            memory_table: None,
            active: inner.started.load(Ordering::SeqCst) && !*inner.finished.borrow(),
            exception: inner
                .error
                .lock()
                .ok()
                .and_then(|e| e.as_ref().map(|e| e.to_string())),
        }
    }

    fn recent_progress(&self) -> Vec<QueryProgress> {
        StreamingContext::recent_progress(self)
    }

    fn stop(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(StreamingContext::stop(self, false))
    }
}

fn state_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("operator", DataType::UInt32, false),
        Field::new("state", DataType::Utf8, false),
    ]))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Opens the checkpoint and runs the batches through the [`Driver`], which
/// logs each batch's time and input offsets ahead, and commits it with the
/// state of the stateful operators.
async fn run(inner: &Arc<Inner>, inputs: Vec<Input>) -> Result<()> {
    let states = inner.states.lock().map_err(poisoned)?.clone();
    let outputs = inner.outputs.lock().map_err(poisoned)?.clone();
    let location = inner.checkpoint.lock().map_err(poisoned)?.clone();
    let runtime = inner.session.runtime_env();
    let checkpoint = match &location {
        Some(dir) => {
            let retain = inner.min_batches_to_retain.load(Ordering::SeqCst);
            let cp = open_checkpoint(dir, &runtime, &inputs, states.len(), retain).await?;
            *inner.id.lock().map_err(poisoned)? = cp.query_id().to_string();
            Some(Arc::new(cp))
        }
        None => None,
    };
    let id = inner.id.lock().map_err(poisoned)?.clone();
    let name = inner.name.lock().map_err(poisoned)?.clone();
    let mut batches = Batches {
        inputs,
        outputs: Arc::new(outputs),
        states,
        checkpoint: checkpoint.clone(),
        next_time: 0,
        last_time: i64::MIN,
    };
    let mut driver = Driver::new(checkpoint, id, name);
    let ran = run_batches(inner, &mut driver, &mut batches).await;
    let finished = driver.finish(&mut batches).await;
    ran.and(finished)
}

/// The timer: a batch at every multiple of the interval.
async fn run_batches(inner: &Inner, driver: &mut Driver, batches: &mut Batches) -> Result<()> {
    driver.recover(batches).await?;
    let interval = i64::try_from(inner.interval.as_millis()).unwrap_or(i64::MAX);
    // Batch times are multiples of the interval (as Spark's timer), never repeated.
    let mut first = true;
    while !inner.stop.load(Ordering::SeqCst) {
        // A batch logged before a restart runs at once, at its logged time.
        if !driver.has_rerun() {
            let aligned = (now_ms() / interval + 1) * interval;
            // A restart goes on at the current time (downtime is not replayed);
            // while running, batches that overran run back to back, none skipped.
            let time = if first {
                aligned.max(batches.last_time.saturating_add(interval))
            } else {
                batches.last_time + interval
            };
            let wait = time - now_ms();
            if wait > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
                    _ = inner.wake.notified() => continue,
                }
            }
            first = false;
            batches.next_time = time;
        }
        if let Some(progress) = driver.run_batch(batches).await? {
            inner.progress.publish(progress);
        }
        inner.completed.send_modify(|n| *n += 1);
    }
    Ok(())
}

/// The program's inputs, outputs and state, as the [`Driver`] runs them.
struct Batches {
    inputs: Vec<Input>,
    outputs: Arc<Vec<Output>>,
    states: Vec<Arc<dyn Checkpointed>>,
    checkpoint: Option<Arc<Checkpoint>>,
    /// The time of the next batch to plan, in ms.
    next_time: i64,
    /// The time of the last batch read.
    last_time: i64,
}

/// A batch's input, read; its outputs run when it is written.
struct Batch {
    time: i64,
    offsets: Vec<Option<SourceOffset>>,
    rows: Vec<Arc<dyn Any + Send + Sync>>,
    /// Each input's rows.
    counts: Vec<u64>,
    malformed: MalformedStats,
    output_rows: u64,
    state: Option<StateFile>,
}

impl Program for Batches {
    type Batch = Batch;

    async fn start(&mut self) -> Result<()> {
        for input in &mut self.inputs {
            if let Input::Source(source, _) = input {
                source.start().await?;
            }
        }
        Ok(())
    }

    async fn restore(&mut self, recovery: Recovery) -> Result<()> {
        restore_sources(
            &mut self.inputs,
            recovery.source_snapshot,
            &recovery.committed_offsets,
        )?;
        if let (Some(cp), Some(commit)) = (&self.checkpoint, &recovery.last_commit)
            && let Some(info) = commit.state.get(STATE_OPERATOR)
        {
            let rows = cp.load_state(info, &state_schema()).await?;
            load_states(&self.states, &rows, cp.display())?;
        }
        Ok(())
    }

    /// Each line source's progress, as one JSON array.
    fn source_progress(&self) -> Result<serde_json::Value> {
        let mut out = vec![];
        for input in &self.inputs {
            out.push(match input {
                Input::Source(source, _) => source.progress()?,
                Input::Queue(_) => serde_json::Value::Null,
            });
        }
        Ok(serde_json::Value::Array(out))
    }

    /// Every interval has a batch, with or without input: its time and each
    /// input's offset.
    async fn plan(&mut self) -> Result<Option<Option<SourceOffset>>> {
        let mut offsets = vec![];
        for input in &mut self.inputs {
            offsets.push(match input {
                Input::Source(source, _) => source.plan_batch().await?.map(|o| o.0),
                Input::Queue(_) => None,
            });
        }
        let logged = json!({"time": self.next_time, "inputs": offsets});
        Ok(Some(Some(SourceOffset(logged))))
    }

    async fn compute(&mut self, _batch_id: u64, offset: Option<&SourceOffset>) -> Result<Batch> {
        let (time, offsets) = logged_batch(offset.cloned())?;
        let mut batch = Batch {
            time,
            offsets: vec![],
            rows: vec![],
            counts: vec![],
            malformed: MalformedStats::default(),
            output_rows: 0,
            state: None,
        };
        for (input, offset) in self.inputs.iter_mut().zip(&offsets) {
            let (rows, count) = match input {
                Input::Source(source, convert) => match offset {
                    Some(o) => {
                        let read = source.read(o).await?;
                        let count = read.num_rows() as u64;
                        batch.malformed.merge(read.malformed);
                        (convert(&read.batches)?, count)
                    }
                    None => (convert(&[])?, 0),
                },
                Input::Queue(next) => next(),
            };
            batch.rows.push(rows);
            batch.counts.push(count);
        }
        batch.offsets = offsets;
        self.last_time = time;
        Ok(batch)
    }

    /// Runs the output operations, then saves the stateful operators' state.
    async fn write(&mut self, batch_id: u64, batch: &mut Batch) -> Result<()> {
        let env = BatchEnv::new(batch.time, std::mem::take(&mut batch.rows));
        let outputs = self.outputs.clone();
        batch.output_rows = tokio::task::spawn_blocking(move || {
            outputs
                .iter()
                .try_fold(0, |rows, out| Ok::<_, BrookError>(rows + out(&env)?))
        })
        .await
        .map_err(|e| BrookError::task("a DStream batch", e))??;
        if let Some(cp) = &self.checkpoint {
            let state = save_states(&self.states)?;
            let file = cp
                .write_state(STATE_OPERATOR, batch_id, &state_schema(), &[state])
                .await?;
            batch.state = Some(file);
        }
        Ok(())
    }

    fn record_state(&mut self, _batch_id: u64, batch: &mut Batch) -> bool {
        batch.state.is_some()
    }

    fn commit_entry(&mut self, batch_id: u64, batch: &Batch) -> Result<CommitEntry> {
        Ok(CommitEntry {
            batch_id,
            event_time: Default::default(),
            state: batch
                .state
                .iter()
                .map(|file| (STATE_OPERATOR.to_string(), file.clone()))
                .collect(),
            state_deltas: Default::default(),
            offsets_crc32: None,
        })
    }

    fn committed(&mut self, offset: Option<&SourceOffset>) -> Result<()> {
        let (_, offsets) = logged_batch(offset.cloned())?;
        for (input, offset) in self.inputs.iter_mut().zip(&offsets) {
            if let (Input::Source(source, _), Some(o)) = (input, offset) {
                source.commit(o)?;
            }
        }
        Ok(())
    }

    fn describe(&self, batch: Batch, _offset: Option<SourceOffset>, progress: &mut QueryProgress) {
        // A DStream's rows are computed as its outputs ask for them: the
        // batch's "execute" phase only reads, and "sink" runs the outputs.
        if let Some(read) = progress.duration_ms.remove("execute") {
            progress.duration_ms.insert("read".into(), read);
        }
        progress.timestamp = DateTime::<Utc>::from_timestamp_millis(batch.time)
            .unwrap_or_default()
            .to_rfc3339_opts(SecondsFormat::Millis, true);
        progress.num_input_rows = batch.counts.iter().sum();
        progress.num_malformed_rows = batch.malformed.count;
        progress.malformed_by_reason = batch.malformed.by_reason;
        progress.malformed_samples = batch.malformed.samples;
        progress.sources = self
            .inputs
            .iter()
            .zip(batch.offsets)
            .zip(batch.counts)
            .map(|((input, offset), rows)| {
                let (description, counts) = match input {
                    Input::Source(source, _) => (source.describe(), source.counts()),
                    Input::Queue(_) => ("queue".into(), Default::default()),
                };
                SourceProgress {
                    description,
                    offset: offset.map(|o| o.0).unwrap_or_default(),
                    num_input_rows: rows,
                    files_changed_after_read: counts.files_changed_after_read,
                    files_skipped: counts.files_skipped,
                    watermark: None,
                }
            })
            .collect();
        progress.sink = SinkProgress {
            description: format!("{} DStream output operations", self.outputs.len()),
            num_output_rows: batch.output_rows,
        };
    }

    async fn stop(&mut self) -> Result<()> {
        let mut stopped = Ok(());
        for input in &mut self.inputs {
            if let Input::Source(source, _) = input {
                stopped = stopped.and(source.stop().await);
            }
        }
        stopped
    }
}

async fn open_checkpoint(
    dir: &str,
    runtime: &Arc<RuntimeEnv>,
    inputs: &[Input],
    operators: usize,
    min_batches_to_retain: u64,
) -> Result<Checkpoint> {
    let described: Vec<String> = inputs
        .iter()
        .map(|i| match i {
            Input::Source(s, _) => s.describe(),
            Input::Queue(_) => "queue".into(),
        })
        .collect();
    let fingerprint = QueryFingerprint {
        source: described.join(" + "),
        group_by: vec![],
        aggregates: vec![format!("{operators} stateful DStream operators")],
        functions: vec![],
        state_partitions: None,
    };
    Checkpoint::open(
        dir,
        runtime,
        "a DStream program",
        fingerprint,
        min_batches_to_retain,
    )
    .await
}

/// A logged batch: its time and each input's offset.
fn logged_batch(offset: Option<SourceOffset>) -> Result<(i64, Vec<Option<SourceOffset>>)> {
    let bad = || BrookError::CheckpointData {
        message: "a DStream checkpoint offset without time and inputs".into(),
        source: None,
    };
    let value = offset.ok_or_else(bad)?.0;
    let time = value["time"].as_i64().ok_or_else(bad)?;
    let inputs = value["inputs"]
        .as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|o| (!o.is_null()).then(|| SourceOffset(o.clone())))
        .collect();
    Ok((time, inputs))
}

fn restore_sources(
    inputs: &mut [Input],
    snapshot: Option<serde_json::Value>,
    committed: &[SourceOffset],
) -> Result<()> {
    let logged: Vec<Vec<Option<SourceOffset>>> = committed
        .iter()
        .map(|o| logged_batch(Some(o.clone())).map(|(_, inputs)| inputs))
        .collect::<Result<_>>()?;
    for (i, input) in inputs.iter_mut().enumerate() {
        if let Input::Source(source, _) = input {
            let progress = snapshot.as_ref().and_then(|s| s.get(i)).cloned();
            let offsets: Vec<SourceOffset> = logged
                .iter()
                .filter_map(|batch| batch.get(i).cloned().flatten())
                .collect();
            source.restore(progress.filter(|p| !p.is_null()), &offsets)?;
        }
    }
    Ok(())
}

/// A text source's `value` column as lines.
fn lines(batches: &[RecordBatch]) -> Result<Arc<dyn Any + Send + Sync>> {
    let mut out: Vec<String> = Vec::new();
    for batch in batches {
        let column = batch.column(0).as_string::<i32>();
        out.extend(column.iter().map(|v| v.unwrap_or_default().to_string()));
    }
    Ok(Arc::new(out))
}

/// Kafka records' keys and values, as text.
fn keys_and_values(batches: &[RecordBatch]) -> Result<Arc<dyn Any + Send + Sync>> {
    let mut out: Vec<(Option<String>, String)> = Vec::new();
    for batch in batches {
        let column = |name: &str| -> Result<&datafusion::arrow::array::BinaryArray> {
            batch
                .column_by_name(name)
                .and_then(|c| c.as_binary_opt::<i32>())
                .ok_or_else(|| {
                    BrookError::internal(format!("a Kafka batch without binary '{name}'"))
                })
        };
        let (keys, values) = (column("key")?, column("value")?);
        for (k, v) in keys.iter().zip(values.iter()) {
            out.push((
                k.map(|k| String::from_utf8_lossy(k).into_owned()),
                String::from_utf8_lossy(v.unwrap_or_default()).into_owned(),
            ));
        }
    }
    Ok(Arc::new(out))
}

fn save_states(states: &[Arc<dyn Checkpointed>]) -> Result<RecordBatch> {
    let mut values = vec![];
    for s in states {
        values.push(s.save()?.to_string());
    }
    Ok(RecordBatch::try_new(
        state_schema(),
        vec![
            Arc::new(UInt32Array::from_iter_values(0..values.len() as u32)),
            Arc::new(StringArray::from(values)),
        ],
    )?)
}

fn load_states(states: &[Arc<dyn Checkpointed>], rows: &[RecordBatch], at: &str) -> Result<()> {
    let mut loaded = 0;
    for batch in rows {
        let ops = batch
            .column(0)
            .as_primitive::<datafusion::arrow::datatypes::UInt32Type>();
        let values = batch.column(1).as_string::<i32>();
        for (op, value) in ops.iter().zip(values.iter()) {
            let (Some(op), Some(value)) = (op, value) else {
                continue;
            };
            let state = states.get(op as usize).ok_or_else(|| {
                BrookError::checkpoint(at, format!(
                    "holds state of stateful operator {op}, but this program has {}: it is another program",
                    states.len()
                ))
            })?;
            let value = serde_json::from_str(value).map_err(|e| {
                BrookError::checkpoint(at, format!("unreadable DStream state: {e}"))
            })?;
            state
                .load(value)
                .map_err(|e| BrookError::checkpoint(at, e.to_string()))?;
            loaded += 1;
        }
    }
    if loaded != states.len() {
        return Err(BrookError::checkpoint(
            at,
            format!(
                "holds state of {loaded} stateful operators, this program has {}",
                states.len()
            ),
        ));
    }
    Ok(())
}
