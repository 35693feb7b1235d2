//! End to end: 500,000 orders in 50 files through the three dashboard queries
//! with the available-now trigger. Also on the book's real orders when
//! `../shared/data/orders.tar.gz` is present, and with five files per batch
//! with and without a checkpoint (what durability costs). Peak memory (VmHWM)
//! is printed after each benchmark.

mod common;

use std::path::Path;
use std::time::Duration;

use brook::cli::demo::{QUERIES, demo_sql};
use brook::{Engine, Overrides};
use chrono::TimeDelta;
use common::{BOOK_ORDERS, generated, peak_memory_mb, with_book_lines, write_files};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

const ORDERS: usize = 500_000;
const FILES: usize = 50;

/// Runs the dashboard over `dir` until every file is processed, all files in
/// one batch or `files_per_batch` at a time, checkpointing under `checkpoint`.
async fn run_dashboard(dir: &Path, files_per_batch: Option<usize>, checkpoint: Option<&Path>) {
    let engine = Engine::with_overrides(Overrides {
        checkpoint_root: checkpoint.map(|c| c.display().to_string()),
        ..Overrides::default()
    });
    let mut queries = vec![];
    // The dashboard's three: the demo's fourth, volume per sector, has a bench of its own (e2e's sector).
    for (name, sql) in QUERIES
        .iter()
        .filter(|(name, _)| *name != "volume_per_sector")
    {
        let symbols = concat!(env!("CARGO_MANIFEST_DIR"), "/queries/symbols.csv");
        let mut sql = demo_sql(sql, &dir.display().to_string(), symbols, name).replace(
            "OPTIONS ('outputMode'",
            "OPTIONS ('trigger' 'available-now', 'outputMode'",
        );
        if let Some(n) = files_per_batch {
            let source = "OPTIONS ('mode' 'DROPMALFORMED')";
            assert!(sql.contains(source));
            sql = sql.replace(
                source,
                &format!("OPTIONS ('mode' 'DROPMALFORMED', 'maxFilesPerTrigger' '{n}')"),
            );
        }
        queries.extend(engine.execute(&sql).await.unwrap());
    }
    for q in queries {
        q.await_termination().await.unwrap();
    }
}

/// Starts measuring peak memory afresh (Linux: writing 5 to clear_refs resets VmHWM).
fn reset_peak_memory() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // Written before measuring, and not kept: the peak is the engine's.
    let lines = generated(ORDERS, 0.01, TimeDelta::milliseconds(2));
    write_files(&tmp.path().join("generated"), FILES, ORDERS, lines);
    let mut inputs = vec![("generated", ORDERS)];
    let book = tmp.path().join("book");
    if with_book_lines(|lines| write_files(&book, FILES, BOOK_ORDERS, lines)).is_some() {
        inputs.push(("book", BOOK_ORDERS));
    }
    let mut group = c.benchmark_group("dashboard");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(30));
    for (name, count) in inputs {
        let dir = tmp.path().join(name);
        group.throughput(Throughput::Elements(count as u64));
        reset_peak_memory();
        group.bench_function(name, |b| {
            b.iter(|| runtime.block_on(run_dashboard(&dir, None, None)))
        });
        println!(
            "dashboard/{name}: peak memory (VmHWM) {:.0} MB",
            peak_memory_mb()
        );
    }
    group.finish();

    let mut group = c.benchmark_group("five_files_per_batch");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(30));
    let dir = tmp.path().join("generated");
    group.throughput(Throughput::Elements(ORDERS as u64));
    for checkpointed in [false, true] {
        let name = if checkpointed {
            "checkpoint"
        } else {
            "no_checkpoint"
        };
        reset_peak_memory();
        group.bench_function(name, |b| {
            b.iter_batched(
                || tempfile::tempdir().unwrap(),
                |checkpoint| {
                    let at = checkpointed.then_some(checkpoint.path());
                    runtime.block_on(run_dashboard(&dir, Some(5), at))
                },
                BatchSize::PerIteration,
            )
        });
        println!(
            "five_files_per_batch/{name}: peak memory (VmHWM) {:.0} MB",
            peak_memory_mb()
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
