//! Named points where crash tests stop the engine, to kill it at a known instant.
//!
//! `BROOK_PAUSE_AT=top_stocks/sink-part:7,state-tmp:12` makes the process
//! announce `brook: paused at top_stocks/sink-part:7` on standard error when
//! query `top_stocks` reaches that point in its batch 7 (or any query reaches
//! `state-tmp` in batch 12), then wait forever for the test to kill it. Unset,
//! each point costs one look at a setting parsed once.

use std::future::Future;
use std::sync::OnceLock;

pub const ENV: &str = "BROOK_PAUSE_AT";

/// The points, in the order a batch reaches them. `metadata-tmp` is reached as
/// a query starts, outside its task, so it is matched by batch only.
pub const POINTS: &[&str] = &[
    "metadata-tmp",      // a new checkpoint's metadata is on disk under a temporary name
    "read",              // the input is read and computed, nothing written
    "offsets-tmp",       // the batch's offsets are on disk under a temporary name
    "offsets",           // the offsets are written, nothing in the sink yet
    "sink-part-tmp",     // the file sink's part is on disk under a temporary name
    "sink-part",         // the file sink wrote the batch's part (or snapshot), not its manifest
    "sink-manifest-tmp", // the sink's manifest entry (or `_latest`) is on disk under a temporary name
    "delta-commit",      // the Delta sink committed the batch to its table
    "state-tmp",         // a state file is on disk under a temporary name
    "sink",              // the sink has the batch and the state file is written
    "state",             // the state file is recorded, the commit is not written
    "commits-tmp",       // the commit is on disk under a temporary name
    "commits",           // the batch is committed; clean-up has not run
    "sources-tmp",       // the source's progress is on disk under a temporary name
];
// Compaction's points are matched by its sequence number in place of a batch:
// `compact-merged-tmp` (a merged file under a temporary name), `compact-merged`
// (the merged files are written, not the entry), `compact-entry` (the entry is
// written, the replaced files not yet deleted). They are not in `POINTS`: a
// batch reaches them only when its sink compacts.

struct Pause {
    query: Option<String>,
    point: String,
    batch: u64,
}

tokio::task_local! {
    static QUERY: String;
}

/// Runs a query's batch loop, so that its points know the query's name.
pub(crate) async fn in_query<F: Future>(name: String, f: F) -> F::Output {
    QUERY.scope(name, f).await
}

/// `f`, run anywhere, as part of the current query: its points know the query's name.
pub(crate) fn with_query<F: Future>(f: F) -> impl Future<Output = F::Output> {
    let name = QUERY.try_with(String::clone).unwrap_or_default();
    QUERY.scope(name, f)
}

/// Spawns `f` as part of the current query, so that its points know the query's name.
pub(crate) fn spawn<F>(f: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(with_query(f))
}

/// What a task started by [`spawn`] returned; a task that panicked or was
/// cancelled is an error. The task stays where it is: a caller that is itself
/// dropped while waiting leaves it to its owner.
pub(crate) async fn settle<T>(
    task: &mut tokio::task::JoinHandle<crate::error::Result<T>>,
) -> crate::error::Result<T> {
    task.await
        .map_err(|e| crate::error::BrookError::task("a checkpoint write task", e))?
}

fn pauses() -> &'static [Pause] {
    static PAUSES: OnceLock<Vec<Pause>> = OnceLock::new();
    PAUSES.get_or_init(|| {
        std::env::var(ENV)
            .unwrap_or_default()
            .split(',')
            .filter_map(|p| {
                let (at, batch) = p.trim().rsplit_once(':')?;
                let (query, point) = match at.split_once('/') {
                    Some((q, p)) => (Some(q.to_string()), p),
                    None => (None, at),
                };
                Some(Pause {
                    query,
                    point: point.to_string(),
                    batch: batch.parse().ok()?,
                })
            })
            .collect()
    })
}

/// Stops here for good if a crash test asked for `point` in `batch`.
pub(crate) fn crash_point(point: &str, batch: u64) {
    let pauses = pauses();
    if pauses.is_empty() {
        return;
    }
    let query = QUERY.try_with(String::clone).unwrap_or_default();
    let hit = pauses.iter().any(|p| {
        p.point == point && p.batch == batch && p.query.as_ref().is_none_or(|q| *q == query)
    });
    if hit {
        eprintln!("brook: paused at {query}/{point}:{batch}");
        let forever = || loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        };
        // A paused query must not hold a runtime worker: with two cores, two
        // paused queries would stop the others from reaching their own points.
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(forever)
            }
            _ => forever(),
        }
    }
}
