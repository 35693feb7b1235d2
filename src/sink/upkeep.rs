//! Work a sink keeps off the batch path: compacting files, and a Delta
//! table's log checkpoints and VACUUM. One task per sink at a time, started
//! after a batch, waited for before a batch that must not overlap it, and
//! when the query stops.

use std::future::Future;

use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

use crate::error::{BrookError, Result};
use crate::testing::faults;

/// The runtime upkeep runs on, shared by every sink: one worker thread at the
/// lowest CPU priority, so that on a busy machine the batches of every query
/// go first. Beside them on the same threads a compaction's few hundred
/// milliseconds of work made batches wait. (The Delta kernel blocks a worker
/// while tasks it spawned run: the runtime's blocking pool, left at its
/// default size, stands in for blocked workers.)
fn runtime() -> std::result::Result<&'static Runtime, &'static std::io::Error> {
    static RUNTIME: std::sync::OnceLock<std::io::Result<Runtime>> = std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("brook-sink-upkeep")
                .on_thread_start(lowest_priority)
                .enable_all()
                .build()
        })
        .as_ref()
}

/// Gives the calling thread the lowest CPU priority (nice 19).
#[cfg(target_os = "linux")]
fn lowest_priority() {
    // SAFETY: setpriority takes no pointers; on Linux, PRIO_PROCESS with id 0
    // names the calling thread alone. Failing leaves the default priority.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
    }
}

#[cfg(not(target_os = "linux"))]
fn lowest_priority() {}

/// A sink's background task, if one runs, and whether more work came due
/// while it ran.
#[derive(Debug)]
pub(crate) struct Upkeep<T> {
    running: Option<JoinHandle<Result<T>>>,
    /// Work came due; it starts when no task runs.
    pub due: bool,
}

impl<T> Default for Upkeep<T> {
    fn default() -> Self {
        Self {
            running: None,
            due: false,
        }
    }
}

impl<T: Send + 'static> Upkeep<T> {
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Waits for the running task, if any: its result, or its failure.
    pub async fn settle(&mut self) -> Result<Option<T>> {
        match self.running.take() {
            Some(task) => Ok(Some(task.await.map_err(|e| {
                BrookError::task("a sink's background compaction or upkeep", e)
            })??)),
            None => Ok(None),
        }
    }

    /// [`settle`](Self::settle), only if the task has finished.
    pub async fn settle_finished(&mut self) -> Result<Option<T>> {
        if self.running.as_ref().is_some_and(JoinHandle::is_finished) {
            self.settle().await
        } else {
            Ok(None)
        }
    }

    /// Starts `work`; a crash test's pause points in it know the query.
    pub fn start(&mut self, work: impl Future<Output = Result<T>> + Send + 'static) -> Result<()> {
        let runtime = runtime().map_err(|e| BrookError::Sink {
            sink: "upkeep".into(),
            message: format!("cannot start the thread sinks compact and vacuum on: {e}"),
        })?;
        self.running = Some(runtime.spawn(faults::with_query(work)));
        self.due = false;
        Ok(())
    }
}
