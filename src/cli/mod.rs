//! The `brook` command's subcommands, kept in the library so they are testable.

pub mod demo;
pub mod send;

use std::path::Path;
use std::sync::Arc;

use crate::engine::{Engine, Overrides};
use crate::error::{BrookError, Result};
use crate::exec::Trigger;
use crate::ui::{UiOptions, UiServer};

/// Output rows `brook run --ui` keeps of each query that has no memory sink.
const UI_MIRROR_ROWS: usize = 1000;

/// How `brook run` reports progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressFormat {
    None,
    /// One JSON object per batch on standard error.
    Json,
}

/// What `brook run` takes besides the file.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub trigger: Option<Trigger>,
    pub progress: ProgressFormat,
    /// A directory holding each query's checkpoint under the query's name.
    pub checkpoint: Option<String>,
    /// Where to serve the web UI while the queries run; `None` serves none.
    pub ui: Option<UiOptions>,
}

/// Runs a SQL file until its queries stop (once / available-now) or Ctrl-C.
/// For a process that ends after it: once the queries end by themselves, the
/// engine is left for the exit to free.
pub async fn run_file(path: &Path, options: RunOptions) -> Result<()> {
    let script = std::fs::read_to_string(path).map_err(|e| BrookError::io(path, e))?;
    let mut overrides = Overrides {
        trigger: options.trigger,
        checkpoint_root: options.checkpoint,
        // The web UI shows every query's output, whatever its sink.
        mirror_rows: options.ui.as_ref().map(|_| UI_MIRROR_ROWS),
        ..Overrides::default()
    };
    if options.progress == ProgressFormat::Json {
        overrides
            .listeners
            .push(Arc::new(|p| eprintln!("{}", p.to_json())));
    }
    let engine = Arc::new(Engine::with_overrides(overrides));
    // The UI first: a port it cannot take stops the run before any query starts.
    let ui = UiServer::start_if(&engine, options.ui).await?;
    if let Some(ui) = &ui {
        eprintln!("brook: web UI at {}", ui.url());
    }
    let queries = engine
        .execute(&script)
        .await
        .map_err(|e| prefix_file(path, e))?;
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
        _ = tokio::signal::ctrl_c() => {
            eprintln!("stopping: finishing the running batches (a checkpointed query resumes on the next run)");
            return engine.stop_all().await;
        }
    };
    if result.is_err() {
        // Their own errors, if any, come after the first; the first is reported.
        let _ = engine.stop_all().await;
    }
    if let Some(ui) = ui {
        // The queries' last results and progress stay browsable until the user leaves.
        eprintln!(
            "brook: the queries have ended; the web UI at {} stays up until Ctrl-C",
            ui.url()
        );
        let _ = tokio::signal::ctrl_c().await;
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
        other => other,
    }
}
