//! Named points where crash tests stop the engine, to kill it at a known instant.
//!
//! `BROOK_PAUSE_AT=sink-part:7,state-tmp:12` makes the process announce
//! `brook: paused at sink-part:7` on standard error when it reaches that point
//! in batch 7, then wait forever for the test to kill it. Unset, each point
//! costs one load of a parsed-once setting.

use std::sync::OnceLock;

pub const ENV: &str = "BROOK_PAUSE_AT";

/// The points, in the order a batch reaches them.
pub const POINTS: &[&str] = &[
    "offsets-tmp", // the batch's offsets are on disk under a temporary name
    "offsets",     // the offsets are written, nothing read yet
    "read",        // the input is read, nothing computed
    "sink-part",   // the file sink wrote the batch's part, not its manifest
    "sink",        // the sink has the batch, no state written
    "state-tmp",   // the state file is on disk under a temporary name
    "state",       // the state is written, the commit is not
    "commits-tmp", // the commit is on disk under a temporary name
    "commits",     // the batch is committed; clean-up has not run
];

fn pauses() -> &'static [(String, u64)] {
    static PAUSES: OnceLock<Vec<(String, u64)>> = OnceLock::new();
    PAUSES.get_or_init(|| {
        std::env::var(ENV)
            .unwrap_or_default()
            .split(',')
            .filter_map(|p| {
                let (name, batch) = p.trim().rsplit_once(':')?;
                Some((name.to_string(), batch.parse().ok()?))
            })
            .collect()
    })
}

/// Stops here for good if a crash test asked for `point` in `batch`.
pub fn crash_point(point: &str, batch: u64) {
    if pauses().iter().any(|(p, b)| p == point && *b == batch) {
        eprintln!("brook: paused at {point}:{batch}");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
