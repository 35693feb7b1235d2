//! The `brook` command, kept in the library so that its parts are testable:
//! [`main`] runs it; the dashboard's queries are public for tests and benches
//! that run them in process.

pub(crate) mod cluster;
mod command;
pub(crate) mod compact;
pub mod demo;
pub(crate) mod send;

pub use command::main;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::Trigger;
use crate::engine::{Engine, Overrides};
use crate::error::{BrookError, Result};
use crate::ui::{UiOptions, UiServer};

/// Output rows `brook run --ui` keeps of each query that has no memory sink.
const UI_MIRROR_ROWS: usize = 1000;

/// How `brook run` reports progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProgressFormat {
    None,
    /// One JSON object per batch on standard error.
    Json,
}

/// What `brook run` takes besides the file.
#[derive(Debug, Clone)]
pub(crate) struct RunOptions {
    pub trigger: Option<Trigger>,
    pub progress: ProgressFormat,
    /// A directory holding each query's checkpoint under the query's name.
    pub checkpoint: Option<String>,
    /// Where to serve the web UI while the queries run; `None` serves none.
    pub ui: Option<UiOptions>,
    /// Bytes the queries may hold together (default: half the machine's memory).
    pub memory_limit: Option<usize>,
    /// The Ballista scheduler the batches run on (`df://HOST:PORT`).
    pub cluster: Option<String>,
    /// The partitions of a new checkpoint's state on the cluster.
    pub state_partitions: Option<usize>,
}

/// Ctrl-C (SIGINT) and SIGTERM, listened for from the start of a command: the
/// first stops its queries after their running batch, as Spark's `stop()`
/// does; a second ends the command at once.
pub(crate) struct StopSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub fn listen() -> Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let listen =
                |kind| signal(kind).map_err(|e| BrookError::io("the process's signal handlers", e));
            Ok(Self {
                interrupt: listen(SignalKind::interrupt())?,
                terminate: listen(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Waits for the next signal.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }

    /// Stops every query of `engine` after its running batch, unless a second
    /// signal comes first: then the command ends at once, leaving the running
    /// batches to be run again from their checkpoints.
    pub async fn stop(&mut self, engine: &Engine) -> Result<()> {
        tokio::select! {
            stopped = engine.stop_all() => stopped,
            _ = self.recv() => Err(BrookError::Cancelled(
                "stopped at once by a second signal: the running batches were abandoned \
                 (a checkpointed query runs them again on the next run)"
                    .into(),
            )),
        }
    }
}

/// Writes a line on standard error, as long as someone reads it: a reader that
/// went away (`brook run ... 2>&1 | head`) does not stop the queries.
pub(crate) fn note(line: &str) -> bool {
    static GONE: AtomicBool = AtomicBool::new(false);
    if GONE.load(Ordering::Relaxed) {
        return false;
    }
    let written = writeln!(std::io::stderr().lock(), "{line}").is_ok();
    if !written {
        GONE.store(true, Ordering::Relaxed);
    }
    written
}

/// Runs a SQL file until its queries stop (once / available-now) or Ctrl-C.
/// For a process that ends after it: once the queries end by themselves, the
/// engine is left for the exit to free.
pub(crate) async fn run_file(path: &Path, options: RunOptions) -> Result<()> {
    let script = std::fs::read_to_string(path).map_err(|e| BrookError::io(path, e))?;
    let mut signals = StopSignals::listen()?;
    let mut overrides = Overrides {
        trigger: options.trigger,
        checkpoint_root: options.checkpoint,
        // The web UI shows every query's output, whatever its sink.
        mirror_rows: options.ui.as_ref().map(|_| UI_MIRROR_ROWS),
        memory_limit: options.memory_limit,
        cluster: options.cluster,
        state_partitions: options.state_partitions,
        ..Overrides::default()
    };
    if options.progress == ProgressFormat::Json {
        overrides.listeners.push(Arc::new(|p| {
            note(&p.to_json());
        }));
    }
    let engine = Arc::new(Engine::with_overrides(overrides));
    // The UI first: a port it cannot take stops the run before any query starts.
    let ui = UiServer::start_if(&engine, options.ui).await?;
    if let Some(ui) = &ui {
        note(&format!("brook: web UI at {}", ui.url()));
    }
    // Starting can wait (on a Kafka broker, say): a signal then stops what started.
    let queries = tokio::select! {
        started = engine.execute(&script) => started.map_err(|e| prefix_file(path, e))?,
        _ = signals.recv() => {
            note("stopping before every query has started");
            return signals.stop(&engine).await;
        }
    };
    if queries.is_empty() {
        return Err(BrookError::sql(format!(
            "{} starts no query: add INSERT INTO <sink> SELECT ... or a SELECT",
            path.display()
        )));
    }
    // The first query to fail ends the run (Spark's awaitAnyTermination); the
    // others finish their running batch and stop.
    let all_done = futures::future::try_join_all(queries.iter().map(|q| q.await_termination()));
    let result = tokio::select! {
        r = all_done => r.map(|_| ()),
        _ = signals.recv() => {
            note(
                "stopping: finishing the running batches (a checkpointed query resumes on \
                 the next run); a second Ctrl-C or SIGTERM stops at once",
            );
            return signals.stop(&engine).await;
        }
    };
    if result.is_err() {
        // Their own errors, if any, come after the first; the first is reported.
        let _ = engine.stop_all().await;
    }
    // A failed run ends at once, whatever the UI shows, so that whoever
    // started it (a supervisor, a script) learns of the failure.
    if let (Some(ui), true) = (ui, result.is_ok()) {
        // The queries' last results and progress stay browsable until the user leaves.
        note(&format!(
            "brook: the queries have ended; the web UI at {} stays up until Ctrl-C",
            ui.url()
        ));
        signals.recv().await;
    }
    // The process ends next, and the kernel takes the engine's memory back at
    // once; dropping it would free it a piece at a time.
    std::mem::forget(queries);
    std::mem::forget(engine);
    result
}

fn prefix_file(path: &Path, e: BrookError) -> BrookError {
    match e {
        BrookError::Sql(m) => BrookError::Sql(format!("{}: {m}", path.display())),
        other => BrookError::Context {
            context: path.display().to_string(),
            source: Box::new(other),
        },
    }
}
