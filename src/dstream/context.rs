//! `StreamingContext`: the inputs, the output operations, and the batch loop.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use datafusion::arrow::array::{AsArray, RecordBatch, StringArray, UInt32Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::prelude::SessionContext;
use serde_json::json;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use super::stateful::Checkpointed;
use super::{BatchEnv, DStream, Data};
use crate::catalog::DEFAULT_CORRUPT_COLUMN;
use crate::error::{BrookError, Result};
use crate::exec::faults::crash_point;
use crate::source::format::Decoder;
use crate::source::kafka::{KafkaOptions, KafkaSource, StartingOffsets, Topics, default_readers};
use crate::source::location::Location;
use crate::source::socket::SocketSource;
use crate::source::{
    FileFormat, FileSource, FileSourceOptions, ParseMode, SourceOffset, StreamSource,
};
use crate::state::checkpoint::{DEFAULT_MIN_BATCHES_TO_RETAIN, QueryFingerprint};
use crate::state::{Checkpoint, CommitEntry};

/// The checkpoint's name for the DStream operators' state.
const STATE_OPERATOR: &str = "dstream";

pub(crate) type Output = Arc<dyn Fn(&BatchEnv) -> Result<()> + Send + Sync>;

/// Arrow rows read from a source into a typed batch (`Vec<T>`).
type Convert = fn(&[RecordBatch]) -> Result<Arc<dyn Any + Send + Sync>>;

/// Where a stream's rows come from.
enum Input {
    /// Rows from a source shared with SQL queries (files, socket, Kafka),
    /// turned into the stream's typed rows.
    Source(Box<dyn StreamSource>, Convert),
    /// Batches handed in by the program (`queue_stream`), typed.
    Queue(Box<dyn FnMut() -> Arc<dyn Any + Send + Sync> + Send + Sync>),
}

struct Inner {
    session: SessionContext,
    interval: Duration,
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
            Arc::new(rows)
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
        *task = Some(tokio::spawn(async move {
            let result = run(&inner, inputs).await;
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

fn state_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("operator", DataType::UInt32, false),
        Field::new("state", DataType::Utf8, false),
    ]))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The batch loop: plan and log each input's offsets, read, run the outputs,
/// save state, commit.
async fn run(inner: &Arc<Inner>, mut inputs: Vec<Input>) -> Result<()> {
    let interval = i64::try_from(inner.interval.as_millis()).unwrap_or(i64::MAX);
    let states = inner.states.lock().map_err(poisoned)?.clone();
    let outputs = inner.outputs.lock().map_err(poisoned)?.clone();
    let location = inner.checkpoint.lock().map_err(poisoned)?.clone();
    let runtime = inner.session.runtime_env();
    let checkpoint = match &location {
        Some(dir) => Some(open_checkpoint(dir, &runtime, &inputs, states.len()).await?),
        None => None,
    };
    let mut batch_id = 0;
    let mut rerun = None;
    match &checkpoint {
        None => start_sources(&mut inputs).await?,
        Some(cp) => {
            let recovery = cp.recover().await?;
            if recovery.is_fresh() {
                start_sources(&mut inputs).await?;
                cp.write_source(0, &progress(&inputs)?).await?;
            } else {
                batch_id = recovery.next_batch();
                restore(
                    &mut inputs,
                    recovery.source_snapshot,
                    &recovery.committed_offsets,
                )?;
                if let Some(commit) = &recovery.last_commit
                    && let Some(info) = commit.state.get(STATE_OPERATOR)
                {
                    let rows = cp.load_state(info, &state_schema()).await?;
                    load_states(&states, &rows, cp.display())?;
                }
                rerun = recovery.rerun;
                tracing::info!(
                    checkpoint = cp.display(),
                    "DStream program resumes at batch {batch_id}"
                );
            }
        }
    }
    // Batch times are multiples of the interval (as Spark's timer), never repeated.
    let mut last_time = i64::MIN;
    let mut resumed = rerun.is_some();
    while !inner.stop.load(Ordering::SeqCst) {
        let (time, offsets) = match rerun.take() {
            Some(logged) => logged_batch(logged.source)?,
            None => {
                let aligned = (now_ms() / interval + 1) * interval;
                // A restart goes on at the current time (downtime is not replayed);
                // while running, batches that overran run back to back, none skipped.
                let time = if last_time == i64::MIN || resumed {
                    aligned.max(last_time.saturating_add(interval))
                } else {
                    last_time + interval
                };
                resumed = false;
                let wait = time - now_ms();
                if wait > 0 {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
                        _ = inner.wake.notified() => continue,
                    }
                }
                let mut offsets = vec![];
                for input in inputs.iter_mut() {
                    offsets.push(match input {
                        Input::Source(source, _) => source.plan_batch().await?,
                        Input::Queue(_) => None,
                    });
                }
                if let Some(cp) = &checkpoint {
                    let logged = json!({"time": time, "inputs": offsets.iter().map(|o| o.as_ref().map(|o| o.0.clone())).collect::<Vec<_>>()});
                    cp.write_offsets(batch_id, Some(SourceOffset(logged)))
                        .await?;
                    crash_point("offsets", batch_id);
                }
                (time, offsets)
            }
        };
        let mut rows: Vec<Arc<dyn Any + Send + Sync>> = vec![];
        for (input, offset) in inputs.iter_mut().zip(&offsets) {
            rows.push(match input {
                Input::Source(source, convert) => match offset {
                    Some(o) => convert(&source.read(o).await?.batches)?,
                    None => convert(&[])?,
                },
                Input::Queue(next) => next(),
            });
        }
        let env = BatchEnv::new(time, rows);
        let outputs = outputs.clone();
        tokio::task::spawn_blocking(move || outputs.iter().try_for_each(|out| out(&env)))
            .await
            .map_err(|e| BrookError::task("a DStream batch", e))??;
        crash_point("sink", batch_id);
        if let Some(cp) = &checkpoint {
            let state = save_states(&states)?;
            let file = cp
                .write_state(STATE_OPERATOR, batch_id, &state_schema(), &[state])
                .await?;
            let entry = CommitEntry {
                batch_id,
                event_time: Default::default(),
                state: [(STATE_OPERATOR.to_string(), file)].into(),
                state_deltas: Default::default(),
                offsets_crc32: None,
            };
            cp.write_commit(&entry).await?;
            crash_point("commits", batch_id);
        }
        for (input, offset) in inputs.iter_mut().zip(&offsets) {
            if let (Input::Source(source, _), Some(o)) = (input, offset) {
                source.commit(o)?;
            }
        }
        if let Some(cp) = &checkpoint
            && Checkpoint::source_due(batch_id)
        {
            cp.write_source(batch_id + 1, &progress(&inputs)?).await?;
        }
        last_time = time;
        batch_id += 1;
        inner.completed.send_modify(|n| *n += 1);
    }
    Ok(())
}

async fn open_checkpoint(
    dir: &str,
    runtime: &Arc<RuntimeEnv>,
    inputs: &[Input],
    operators: usize,
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
    };
    Checkpoint::open(
        dir,
        runtime,
        "a DStream program",
        fingerprint,
        DEFAULT_MIN_BATCHES_TO_RETAIN,
    )
    .await
}

async fn start_sources(inputs: &mut [Input]) -> Result<()> {
    for input in inputs {
        if let Input::Source(source, _) = input {
            source.start().await?;
        }
    }
    Ok(())
}

/// Each line source's progress, as one JSON array.
fn progress(inputs: &[Input]) -> Result<serde_json::Value> {
    let mut out = vec![];
    for input in inputs {
        out.push(match input {
            Input::Source(source, _) => source.progress()?,
            Input::Queue(_) => serde_json::Value::Null,
        });
    }
    Ok(serde_json::Value::Array(out))
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

fn restore(
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
