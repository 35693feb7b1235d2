//! End to end: 500,000 orders in 50 files through the three dashboard queries
//! with the available-now trigger. Also on the book's real orders when
//! `../shared/data/orders.tar.gz` is present. Peak memory (VmHWM) is printed.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use brook::Engine;
use brook::cli::demo::{QUERIES, demo_sql};
use brook::cli::send::write_atomically;
use brook::orders::{GeneratorConfig, OrderGenerator, TIME_FORMAT};
use chrono::{NaiveDateTime, TimeDelta};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const ORDERS: usize = 500_000;
const FILES: usize = 50;

fn write_files(dir: &Path, lines: &[String]) {
    std::fs::create_dir_all(dir).unwrap();
    for (n, chunk) in lines.chunks(lines.len().div_ceil(FILES)).enumerate() {
        write_atomically(
            dir,
            &format!("orders-{n:03}.csv"),
            (chunk.join("\n") + "\n").as_bytes(),
        )
        .unwrap();
    }
}

fn generated() -> Vec<String> {
    let mut g = OrderGenerator::new(GeneratorConfig {
        malformed: 0.01,
        ..Default::default()
    });
    let start = NaiveDateTime::parse_from_str("2016-03-22 20:25:28", TIME_FORMAT).unwrap();
    (0..ORDERS as i64)
        .map(|i| g.line(start + TimeDelta::milliseconds(i * 2)))
        .collect()
}

fn book() -> Option<Vec<String>> {
    let file = std::fs::File::open(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/orders.tar.gz"
    ))
    .ok()?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut text = String::new();
    archive
        .entries()
        .ok()?
        .next()?
        .ok()?
        .read_to_string(&mut text)
        .ok()?;
    Some(text.lines().map(str::to_string).collect())
}

async fn run_dashboard(dir: &Path) {
    let engine = Engine::new();
    let mut queries = vec![];
    for (name, sql) in QUERIES {
        let sql = demo_sql(sql, &dir.display().to_string(), name).replace(
            "OPTIONS ('outputMode'",
            "OPTIONS ('trigger' 'available-now', 'outputMode'",
        );
        queries.extend(engine.execute(&sql).await.unwrap());
    }
    for q in queries {
        q.await_termination().await.unwrap();
    }
}

fn peak_memory_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut inputs = vec![("generated", generated())];
    if let Some(lines) = book() {
        inputs.push(("book", lines));
    }
    let mut group = c.benchmark_group("dashboard");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(30));
    for (name, lines) in &inputs {
        let dir = tmp.path().join(name);
        write_files(&dir, lines);
        group.throughput(Throughput::Elements(lines.len() as u64));
        group.bench_function(*name, |b| b.iter(|| runtime.block_on(run_dashboard(&dir))));
    }
    group.finish();
    println!("peak memory (VmHWM): {:.0} MB", peak_memory_mb());
}

criterion_group!(benches, bench);
criterion_main!(benches);
