//! End-to-end figures, measured the way a user runs brook: the
//! release `brook` binary on `queries/dashboard_parquet.sql` (Parquet sinks,
//! a checkpoint), one process per run, wall time and peak RSS from the OS.
//!
//! `cargo bench --bench e2e` runs every scenario; name some to run only those:
//! `cargo bench --bench e2e -- book ceiling scaling steady restart kafka many_files sector
//! interval_join ohlc delta steady_delta steady_compact cluster kafka_cluster`.
//! Data sets are prepared once under `target/bench-data`. The book's orders
//! come from `../shared/data/orders.tar.gz`; without it, generated orders
//! stand in. `kafka` needs `tansu` (the test suite installs it into
//! `target/tools/bin`); `kafka` and `kafka_cluster` are skipped without it.

#[path = "../tests/common/broker.rs"]
#[allow(dead_code)]
mod broker;
mod common;
#[path = "../tests/common/files.rs"]
mod files;
#[path = "../tests/common/tools.rs"]
#[allow(dead_code)]
mod tools;
use files::copy_dir;
use tools::free_port;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use brook::datafusion::arrow::csv::ReaderBuilder;
use brook::datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use brook::orders::{GeneratorConfig, OrderGenerator, TIME_FORMAT};
use brook::source::write_atomically;
use chrono::{NaiveDateTime, TimeDelta};
use serde_json::Value;

use common::{BOOK_ARCHIVE, BOOK_ORDERS, generated, peak_memory_mb, with_book_lines, write_files};

const FILES: usize = 50;
const RUNS: usize = 5;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn data_dir() -> PathBuf {
    root().join("target/bench-data")
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn percentile(mut xs: Vec<f64>, p: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    let i = ((xs.len() as f64 - 1.0) * p).round() as usize;
    xs[i]
}

/// Fills `dir` with CSV files by `write` (once: kept for later runs).
fn write_split(dir: &Path, write: impl FnOnce(&Path)) -> PathBuf {
    let done = dir.join("_complete");
    if done.exists() {
        return dir.to_path_buf();
    }
    let _ = std::fs::remove_dir_all(dir);
    write(dir);
    std::fs::write(done, b"").unwrap();
    dir.to_path_buf()
}

/// 500,000 generated orders standing in for the book's, without `../shared`.
fn book_stand_in() -> impl Iterator<Item = String> {
    generated(BOOK_ORDERS, 0.0, TimeDelta::microseconds(12))
}

/// The book's orders in 50 files of 10,000 lines, and what they are.
fn book_data() -> (PathBuf, &'static str) {
    // Lines are written as they are read: a child's peak memory is no less
    // than this process's (see `wait_with_peak`).
    if Path::new(BOOK_ARCHIVE).exists() {
        (
            write_split(&data_dir().join("book"), |dir| {
                with_book_lines(|lines| write_files(dir, FILES, BOOK_ORDERS, lines))
                    .expect("../shared/data/orders.tar.gz is unreadable")
            }),
            "the book's 500,000 orders",
        )
    } else {
        (
            write_split(&data_dir().join("book-standin"), |dir| {
                write_files(dir, FILES, BOOK_ORDERS, book_stand_in())
            }),
            "500,000 generated orders (../shared not found)",
        )
    }
}

/// `queries/dashboard_parquet.sql` reading `input`, written into `dir`.
fn dashboard_sql(dir: &Path, input: &Path, source_options: &str) -> PathBuf {
    script_sql("dashboard_parquet.sql", dir, input, source_options)
}

/// The dashboard script `queries/<file>` reading `input`, written into `dir`.
fn script_sql(file: &str, dir: &Path, input: &Path, source_options: &str) -> PathBuf {
    let sql = std::fs::read_to_string(root().join("queries").join(file)).unwrap();
    let from = "LOCATION 'data/orders' OPTIONS ('mode' 'DROPMALFORMED')";
    assert!(sql.contains(from));
    let sql = sql.replace(
        from,
        &format!(
            "LOCATION '{}' OPTIONS ('mode' 'DROPMALFORMED'{source_options})",
            input.display()
        ),
    );
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("dashboard.sql");
    std::fs::write(&path, sql).unwrap();
    path
}

/// `brook run <sql> --checkpoint ckpt --progress json` in `dir`, with `trigger`.
fn brook_run(dir: &Path, sql: &Path, trigger: &str) -> Child {
    brook_run_with(dir, sql, trigger, &[])
}

/// As [`brook_run`], with `extra` arguments.
fn brook_run_with(dir: &Path, sql: &Path, trigger: &str, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_brook"))
        .current_dir(dir)
        .args(["run", sql.to_str().unwrap(), "--trigger", trigger])
        .args(["--checkpoint", "ckpt", "--progress", "json"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// How a child process ended, from the OS.
struct Exited {
    code: i32,
    peak_mb: f64,
    /// User and system time of all its threads.
    cpu_seconds: f64,
}

/// Waits for `child`: its exit status, peak resident memory and CPU time.
///
/// Linux starts a child's peak at the peak of the memory it ran in until its
/// exec: with posix_spawn (which `Command` uses here) that is this process's
/// whole peak, with fork its size at the fork. So this process keeps its own
/// peak low (data sets are written, and Kafka's records sent, as they are read
/// or made), and warns of a run whose peak is not above its own.
fn wait_with_peak(child: Child) -> Exited {
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    // SAFETY: waits for our own child and fills a zeroed rusage.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4 failed");
    std::mem::forget(child);
    // Not getrusage's own figure: that counts cargo's peak before this
    // process's exec, which no child inherits.
    let own = peak_memory_mb();
    let peak_mb = usage.ru_maxrss as f64 / 1024.0;
    if peak_mb <= own {
        eprintln!(
            "warning: a run's peak RSS ({peak_mb:.0} MB) is not above the bench's own \
             ({own:.0} MB), so it may be the bench's rather than brook's"
        );
    }
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Exited {
        code: std::process::ExitStatus::from_raw(status)
            .code()
            .unwrap_or(-1),
        peak_mb,
        cpu_seconds: seconds(usage.ru_utime) + seconds(usage.ru_stime),
    }
}

/// The progress records a run printed, as JSON values.
fn progress_lines(stderr: impl Read) -> Vec<Value> {
    timed_progress_lines(stderr)
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}

/// The progress records a run printed, each with when it arrived.
fn timed_progress_lines(stderr: impl Read) -> Vec<(Instant, Value)> {
    timed_progress_lines_with(stderr, Instant::now)
}

/// The progress records a run printed, each with what `note` says as it arrives.
fn timed_progress_lines_with<T>(stderr: impl Read, mut note: impl FnMut() -> T) -> Vec<(T, Value)> {
    BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| {
            let progress = serde_json::from_str::<Value>(&l).ok();
            if progress.is_none() {
                // brook's own warnings and errors, for whoever reads the bench's output.
                eprintln!("brook: {l}");
            }
            progress
        })
        .filter(|v| v.get("batch_id").is_some())
        .map(|v| (note(), v))
        .collect()
}

fn input_rows(progress: &[Value], query: &str) -> u64 {
    progress
        .iter()
        .filter(|p| p["name"] == query)
        .map(|p| p["num_input_rows"].as_u64().unwrap_or(0))
        .sum()
}

struct RunFigures {
    seconds: f64,
    peak_mb: f64,
    engine_ms: f64,
}

/// One available-now run of the Parquet dashboard over `input`, in a fresh directory.
fn available_now_run(input: &Path, rows: usize, source_options: &str) -> RunFigures {
    script_run("dashboard_parquet.sql", input, rows, source_options)
}

/// One available-now run of the dashboard script `queries/<file>` over `input`,
/// in a fresh directory.
fn script_run(file: &str, input: &Path, rows: usize, source_options: &str) -> RunFigures {
    let dir = tempfile::tempdir().unwrap();
    let sql = script_sql(file, dir.path(), input, source_options);
    timed_run(
        dir.path(),
        &sql,
        rows,
        &["buy_sell_per_second", "top_clients", "top_stocks"],
    )
}

/// One available-now run of `sql` in `dir`, each of `queries` reading about
/// `rows` rows (DROPMALFORMED may drop a few).
fn timed_run(dir: &Path, sql: &Path, rows: usize, queries: &[&str]) -> RunFigures {
    timed_run_with(dir, sql, rows, queries, &[]).0
}

/// As [`timed_run`], with `extra` arguments; also the run's progress records.
fn timed_run_with(
    dir: &Path,
    sql: &Path,
    rows: usize,
    queries: &[&str],
    extra: &[&str],
) -> (RunFigures, Vec<Value>) {
    let started = Instant::now();
    let mut child = brook_run_with(dir, sql, "available-now", extra);
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || progress_lines(stderr));
    let exited = wait_with_peak(child);
    let seconds = started.elapsed().as_secs_f64();
    let progress = reader.join().unwrap();
    assert_eq!(exited.code, 0, "brook run failed");
    for q in queries {
        let seen = input_rows(&progress, q) as usize;
        assert!(
            seen <= rows && seen * 100 >= rows * 98,
            "{q} read {seen} of {rows} rows"
        );
    }
    let engine_ms = progress
        .iter()
        .map(|p| p["duration_ms"]["total"].as_f64().unwrap_or(0.0))
        .fold(0.0, f64::max);
    let figures = RunFigures {
        seconds,
        peak_mb: exited.peak_mb,
        engine_ms,
    };
    (figures, progress)
}

fn report_runs(label: &str, rows: usize, runs: &[RunFigures]) -> f64 {
    let secs = median(runs.iter().map(|r| r.seconds).collect());
    let peak = median(runs.iter().map(|r| r.peak_mb).collect());
    let longest = median(runs.iter().map(|r| r.engine_ms).collect());
    println!(
        "| {label} | {rows} | {secs:.3} s | {:.0} orders/s | {peak:.0} MB | {longest:.0} ms |",
        rows as f64 / secs
    );
    secs
}

fn table_header() {
    println!("| run | orders | median wall time | orders/s | median peak RSS | longest batch |");
    println!("|---|---|---|---|---|---|");
}

/// The three queries over the book's orders, all files in one batch.
fn book() -> f64 {
    book_into("book", "dashboard_parquet.sql", "Parquet sinks")
}

/// The three queries of `queries/<file>` over the book's orders, all files in
/// one batch, then one file per batch; the orders per second of the first.
fn book_into(scenario: &str, file: &str, sinks: &str) -> f64 {
    let (input, what) = book_data();
    println!("\n## {scenario}: {what}, 50 files, available-now, {sinks}, checkpoint\n");
    table_header();
    let runs: Vec<_> = (0..RUNS)
        .map(|_| script_run(file, &input, BOOK_ORDERS, ""))
        .collect();
    let secs = report_runs("one batch", BOOK_ORDERS, &runs);
    let runs: Vec<_> = (0..RUNS)
        .map(|_| script_run(file, &input, BOOK_ORDERS, ", 'maxFilesPerTrigger' '1'"))
        .collect();
    report_runs("one file per batch", BOOK_ORDERS, &runs);
    BOOK_ORDERS as f64 / secs
}

/// The book's files and their typed schema, as arrow's reader alone reads them.
struct Ceiling {
    files: Vec<PathBuf>,
    schema: Arc<Schema>,
    threads: usize,
}

impl Ceiling {
    fn new(input: &Path) -> Self {
        let schema = Arc::new(Schema::new(vec![
            Field::new(
                "time",
                DataType::Timestamp(TimeUnit::Nanosecond, None),
                false,
            ),
            Field::new("order_id", DataType::Int64, false),
            Field::new("client_id", DataType::Int64, false),
            Field::new("symbol", DataType::Utf8, false),
            Field::new("amount", DataType::Int32, false),
            Field::new("price", DataType::Float64, false),
            Field::new("buy_sell", DataType::Utf8, false),
        ]));
        let mut files: Vec<PathBuf> = std::fs::read_dir(input)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "csv"))
            .collect();
        files.sort();
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            files,
            schema,
            threads,
        }
    }

    /// Seconds for `read` to take every file, the files shared out over one thread per core.
    fn timed(&self, read: impl Fn(&Path) -> usize + Sync) -> f64 {
        let started = Instant::now();
        let rows: usize = std::thread::scope(|s| {
            let workers: Vec<_> = (0..self.threads)
                .map(|t| {
                    let read = &read;
                    let files = self.files.iter().skip(t).step_by(self.threads);
                    s.spawn(move || files.map(|f| read(f)).sum::<usize>())
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        assert_eq!(rows, BOOK_ORDERS);
        started.elapsed().as_secs_f64()
    }

    /// One read of all the files by `arrow::csv::Reader`.
    fn arrow_reader(&self) -> f64 {
        self.timed(|f| {
            let reader = ReaderBuilder::new(self.schema.clone())
                .build(std::fs::File::open(f).unwrap())
                .unwrap();
            reader.map(|b| b.unwrap().num_rows()).sum()
        })
    }
}

/// Arrow's CSV reader alone over the same files, one thread per core.
fn ceiling() -> f64 {
    let (input, what) = book_data();
    let ceiling = Ceiling::new(&input);
    let decoder = brook::source::format::Decoder::new(
        brook::source::FileFormat::Csv(Default::default()),
        ceiling.schema.clone(),
        brook::source::ParseMode::DropMalformed,
        "_corrupt_record",
    );
    let decode_times = (0..10)
        .map(|_| {
            ceiling.timed(|f| {
                let bytes = std::fs::read(f).unwrap();
                decoder.decode("f", bytes.into()).unwrap().batch.num_rows()
            })
        })
        .collect();
    println!(
        "brook's decoder alone: median {:.3} s",
        median(decode_times)
    );
    let secs = median((0..10).map(|_| ceiling.arrow_reader()).collect());
    println!(
        "\n## ceiling: arrow's CSV reader alone, {what}, {} threads\n",
        ceiling.threads
    );
    println!(
        "median {secs:.3} s, {:.0} orders/s",
        BOOK_ORDERS as f64 / secs
    );
    BOOK_ORDERS as f64 / secs
}

/// The dashboard's rate over arrow's reader alone, from pairs of runs taken one
/// right after the other: the machine's speed drifts by more than the
/// difference between two medians taken minutes apart.
fn paired_ratio() {
    let (input, _) = book_data();
    let ceiling = Ceiling::new(&input);
    let mut ratios: Vec<f64> = (0..2 * RUNS + 1)
        .map(|_| {
            let alone = median((0..3).map(|_| ceiling.arrow_reader()).collect());
            alone / available_now_run(&input, BOOK_ORDERS, "").seconds
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    println!(
        "dashboard end to end / arrow CSV reader alone, {} pairs of runs: median {:.2} \
         (from {:.2} to {:.2})",
        ratios.len(),
        median(ratios.clone()),
        ratios[0],
        ratios[ratios.len() - 1]
    );
}

/// 500,000 and 5,000,000 generated orders (1% malformed) in one batch each.
fn scaling() {
    println!("\n## scaling: generated orders, 1% malformed, 2 ms apart, available-now\n");
    table_header();
    let mut secs = vec![];
    for (count, files) in [(500_000, 50), (5_000_000, 500)] {
        let input = generated_data(count, files);
        let runs: Vec<_> = (0..3)
            .map(|_| available_now_run(&input, count, ""))
            .collect();
        secs.push(report_runs(&format!("{files} files"), count, &runs));
    }
    println!(
        "\n5,000,000 took {:.1}x the time of 500,000",
        secs[1] / secs[0]
    );
}

/// `count` generated orders, 1% malformed, 2 ms apart, in `files` files under
/// `target/bench-data/gen-<count>`, written once: the scenarios reading a
/// count must agree on how its orders were made.
fn generated_data(count: usize, files: usize) -> PathBuf {
    write_split(&data_dir().join(format!("gen-{count}")), |dir| {
        write_files(
            dir,
            files,
            count,
            generated(count, 0.01, TimeDelta::milliseconds(2)),
        )
    })
}

/// A 100 ms trigger with 100,000 orders/s arriving (a file of 10,000 every
/// 100 ms), event time running 100x faster than the clock so that one-hour
/// windows close within the run.
fn steady() {
    steady_into("steady", "dashboard_parquet.sql", "Parquet sinks", &[]);
}

/// `steady` with `queries/dashboard_delta.sql`: Delta sinks that compact
/// every 20 batches and VACUUM files replaced 10 s ago (the script says an
/// hour), the data files on disk and in the tables counted as the run goes.
fn steady_delta() {
    steady_into(
        "steady_delta",
        "dashboard_delta.sql",
        "Delta sinks, compactEvery 20, vacuumRetention 10 s",
        &[(
            "'vacuumRetention' '1 hour'",
            "'vacuumRetention' '10 seconds'",
        )],
    );
}

/// `steady` with the Parquet sinks of the append-mode queries compacting
/// every 20 batches in the batch's own task.
fn steady_compact() {
    steady_into(
        "steady_compact",
        "dashboard_parquet.sql",
        "Parquet sinks, compactEvery 20 on the append-mode ones",
        &[(
            "OPTIONS ('outputMode' 'append')",
            "OPTIONS ('outputMode' 'append', 'compactEvery' '20')",
        )],
    );
}

fn steady_into(scenario: &str, file: &str, sinks: &str, replace: &[(&str, &str)]) {
    const SECONDS: u64 = 75;
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("orders");
    std::fs::create_dir_all(&input).unwrap();
    let sql = script_sql(file, tmp.path(), &input, "");
    let mut text = std::fs::read_to_string(&sql).unwrap();
    for (from, to) in replace {
        assert!(text.contains(from), "{file} has no {from}");
        text = text.replace(from, to);
    }
    std::fs::write(&sql, text).unwrap();
    let mut child = brook_run(tmp.path(), &sql, "100ms");
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || timed_progress_lines(stderr));
    let mut g = OrderGenerator::new(GeneratorConfig::default());
    let start = NaiveDateTime::parse_from_str("2016-03-22 20:25:28", TIME_FORMAT).unwrap();
    let began = Instant::now();
    let mut n = 0i64;
    let mut file = 0;
    let mut counted = vec![];
    while began.elapsed() < Duration::from_secs(SECONDS) {
        let at = began.elapsed().as_secs();
        if at.is_multiple_of(15) && at > 0 && counted.last().is_none_or(|(t, _)| *t != at) {
            counted.push((at, files_now(&tmp.path().join("out"))));
        }
        let lines: Vec<String> = (0..10_000)
            .map(|_| {
                n += 1;
                g.line(start + TimeDelta::milliseconds(n))
            })
            .collect();
        write_atomically(
            &input,
            &format!("orders-{file:06}.csv"),
            (lines.join("\n") + "\n").as_bytes(),
        )
        .unwrap();
        file += 1;
        let due = began + Duration::from_millis(100 * file);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    }
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let peak_mb = wait_with_peak(child).peak_mb;
    let progress = reader.join().unwrap();
    counted.push((SECONDS, files_now(&tmp.path().join("out"))));
    println!(
        "\n## {scenario}: 100 ms trigger, 100,000 orders/s for {SECONDS} s ({n} orders), \
         event time 100x, {sinks}\n"
    );
    let warm = began + Duration::from_secs(10);
    let busy: Vec<&Value> = progress
        .iter()
        .filter(|(at, p)| *at > warm && p["num_input_rows"].as_u64().unwrap_or(0) > 0)
        .map(|(_, p)| p)
        .collect();
    let total = |p: &Value| p["duration_ms"]["total"].as_f64().unwrap_or(0.0);
    println!(
        "peak RSS {peak_mb:.0} MB; batches with input after the first 10 s:
"
    );
    println!("| query | batches | p50 | p99 | max | phases of the slowest 1% (mean ms) |");
    println!("|---|---|---|---|---|---|");
    for q in ["all", "buy_sell_per_second", "top_clients", "top_stocks"] {
        let mut mine: Vec<&Value> = busy
            .iter()
            .copied()
            .filter(|p| q == "all" || p["name"] == q)
            .collect();
        let durations: Vec<f64> = mine.iter().map(|p| total(p)).collect();
        mine.sort_by(|a, b| total(b).total_cmp(&total(a)));
        let slow = &mine[..mine.len().div_ceil(100)];
        let phases = ["plan", "read", "execute", "sink", "commit"]
            .map(|ph| {
                let mean = slow
                    .iter()
                    .map(|p| p["duration_ms"][ph].as_f64().unwrap_or(0.0))
                    .sum::<f64>()
                    / slow.len() as f64;
                format!("{ph} {mean:.0}")
            })
            .join(", ");
        println!(
            "| {q} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {phases} |",
            durations.len(),
            percentile(durations.clone(), 0.5),
            percentile(durations.clone(), 0.99),
            percentile(durations, 1.0),
        );
    }
    println!(
        "\ndata files under out/ (all sinks): on disk, and those the Delta tables' \
         latest versions reference\n"
    );
    println!("| after | data files on disk | in the tables |\n|---|---|---|");
    for (at, (disk, live)) in counted {
        let live = live.map_or("-".into(), |n| n.to_string());
        println!("| {at} s | {disk} | {live} |");
    }
    println!("\ntop_stocks state rows (one-hour windows start closing after 36 s):\n");
    println!("| after | state rows |\n|---|---|");
    for at in [15u64, 30, 45, 60, 75] {
        let rows = progress
            .iter()
            .rev()
            .find(|(t, p)| *t <= began + Duration::from_secs(at) && p["name"] == "top_stocks")
            .and_then(|(_, p)| p["state_operators"][0]["num_rows_total"].as_u64());
        println!(
            "| {at} s | {} |",
            rows.map_or("-".into(), |r| r.to_string())
        );
    }
}

/// The data files on disk below `dir`, and those the latest versions of the
/// Delta tables in its subdirectories reference (`None` if there are none).
fn files_now(dir: &Path) -> (usize, Option<usize>) {
    let tables: Vec<PathBuf> = std::fs::read_dir(dir.join("delta"))
        .map(|d| d.map_while(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    let live = (!tables.is_empty()).then(|| {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        tables
            .iter()
            .filter_map(|t| {
                let url = url::Url::from_directory_path(t).ok()?;
                let table = runtime
                    .block_on(deltalake::DeltaTableBuilder::from_url(url).ok()?.load())
                    .ok()?;
                Some(table.get_file_uris().ok()?.count())
            })
            .sum()
    });
    (data_files(dir), live)
}

/// The data files (not logs, manifests or hidden files) below `dir`.
fn data_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .map_while(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            !name.starts_with('.') && !name.starts_with('_')
        })
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => data_files(&e.path()),
            Ok(_) => 1,
            Err(_) => 0,
        })
        .sum()
}

/// Restarts from a checkpoint holding an hour of sliding-window state and
/// times how long until each query's first new batch is done.
fn restart() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("orders");
    let base = tmp.path().join("base");
    // 400,000 orders 10 ms apart: 4,000 s of event time, over an hour of open windows.
    write_split(&input, |dir| {
        write_files(
            dir,
            40,
            400_000,
            generated(400_000, 0.0, TimeDelta::milliseconds(10)),
        )
    });
    std::fs::remove_file(input.join("_complete")).unwrap();
    let sql = dashboard_sql(&base, &input, "");
    let child = brook_run(&base, &sql, "available-now");
    assert_eq!(wait_with_peak(child).code, 0);
    let state = std::fs::read_dir(base.join("ckpt/top_stocks/state/aggregate"))
        .unwrap()
        .filter_map(|e| e.ok()?.metadata().ok().map(|m| m.len()))
        .max()
        .unwrap_or(0);
    let mut g = OrderGenerator::new(GeneratorConfig {
        seed: 7,
        ..Default::default()
    });
    let start = NaiveDateTime::parse_from_str("2016-03-22 21:32:08", TIME_FORMAT).unwrap();
    let lines: Vec<String> = (0..1000)
        .map(|i| g.line(start + TimeDelta::milliseconds(10 * i)))
        .collect();
    write_atomically(
        &input,
        "orders-new.csv",
        (lines.join("\n") + "\n").as_bytes(),
    )
    .unwrap();
    let mut times = vec![];
    for run in 0..RUNS {
        // The checkpoint as the first run left it; the new file is new to each copy.
        let dir = tmp.path().join(format!("run-{run}"));
        copy_dir(&base.join("ckpt"), &dir.join("ckpt"));
        let sql = dashboard_sql(&dir, &input, "");
        let started = Instant::now();
        let mut child = brook_run(&dir, &sql, "available-now");
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let mut pending: std::collections::BTreeSet<&str> =
            ["buy_sell_per_second", "top_clients", "top_stocks"].into();
        let mut other = vec![];
        for line in stderr.lines().map_while(Result::ok) {
            let Ok(p) = serde_json::from_str::<Value>(&line) else {
                other.push(line);
                continue;
            };
            if p["num_input_rows"].as_u64().unwrap_or(0) > 0
                && let Some(name) = p["name"].as_str()
            {
                pending.remove(name);
                if pending.is_empty() {
                    times.push(started.elapsed().as_secs_f64());
                    break;
                }
            }
        }
        assert!(
            pending.is_empty(),
            "no new batch from {pending:?}: {}",
            other.join("\n")
        );
        let _ = child.kill();
        let _ = child.wait();
    }
    println!(
        "\n## restart: checkpoint with an hour of sliding windows (top_stocks state file {:.1} MB)\n",
        state as f64 / 1e6
    );
    println!(
        "process start to the first new batch of all three queries: median {:.0} ms",
        median(times) * 1000.0
    );
}

/// 100,000 one-line files a second apart (by modification time), 500 a
/// batch: without `maxFileAge` the file source remembers every file taken and
/// rewrites them all into the checkpoint's `sources/<N>` every 10 batches;
/// with it, that file and the process's memory stay flat once the query's
/// last 100 progress records (each listing its batch's files) are kept.
/// `cleanSource` also keeps the directory listed at each trigger small.
fn many_files() {
    const COUNT: usize = 100_000;
    const PER_BATCH: usize = 500;
    let input = write_split(&data_dir().join("many-files"), |dir| {
        std::fs::create_dir_all(dir).unwrap();
        let start = std::time::SystemTime::now() - Duration::from_secs(COUNT as u64 + 3600);
        for i in 0..COUNT {
            let name = format!("f{i:06}.txt");
            write_atomically(dir, &name, format!("line-{i}\n").as_bytes()).unwrap();
            std::fs::File::options()
                .write(true)
                .open(dir.join(&name))
                .unwrap()
                .set_modified(start + Duration::from_secs(i as u64))
                .unwrap();
        }
    });
    let batches = COUNT / PER_BATCH;
    let marks = [batches / 4, batches / 2, 3 * batches / 4, batches];
    println!("\n## many_files: {COUNT} one-line files, {PER_BATCH} per batch\n");
    println!(
        "| source options | largest sources/<N> | last sources/<N> | RSS after batch {} / {} / {} / {} | peak RSS | wall |",
        marks[0], marks[1], marks[2], marks[3]
    );
    println!("|---|---|---|---|---|---|");
    let age = ", 'maxFileAge' '10 minutes'";
    for (label, options, clean) in [
        ("(none)", String::new(), false),
        ("maxFileAge '10 minutes'", age.to_string(), false),
        (
            "maxFileAge + cleanSource 'delete'",
            format!("{age}, 'cleanSource' 'delete'"),
            true,
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        // cleanSource deletes what it read: it gets links to the files.
        let location = if clean {
            let links = tmp.path().join("input");
            std::fs::create_dir(&links).unwrap();
            for entry in std::fs::read_dir(&input).unwrap() {
                let entry = entry.unwrap();
                if entry.file_name() != "_complete" {
                    std::fs::hard_link(entry.path(), links.join(entry.file_name())).unwrap();
                }
            }
            links
        } else {
            input.clone()
        };
        let sql = tmp.path().join("copy.sql");
        std::fs::write(
            &sql,
            format!(
                "CREATE UNBOUNDED EXTERNAL TABLE lines (value VARCHAR) STORED AS TEXT \
                 LOCATION '{}' OPTIONS ('maxFilesPerTrigger' '{PER_BATCH}'{options});\n\
                 CREATE EXTERNAL TABLE out STORED AS JSON LOCATION 'out' \
                 OPTIONS ('queryName' 'copy');\n\
                 INSERT INTO out SELECT value FROM lines;\n",
                location.display()
            ),
        )
        .unwrap();
        let started = Instant::now();
        let mut child = brook_run(tmp.path(), &sql, "available-now");
        // Each progress record lists its batch's files: read them as they
        // come, so that the pipe never fills, noting the resident memory
        // the process has when it prints each.
        let stderr = child.stderr.take().unwrap();
        let status = format!("/proc/{}/status", child.id());
        let drain = std::thread::spawn(move || {
            timed_progress_lines_with(stderr, || resident_mb(&status))
                .into_iter()
                .map(|(rss, _)| rss)
                .collect::<Vec<f64>>()
        });
        let sources = tmp.path().join("ckpt/copy/sources");
        let sampler = {
            let sources = sources.clone();
            let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
            let flag = running.clone();
            let handle = std::thread::spawn(move || {
                let mut largest = 0u64;
                while flag.load(std::sync::atomic::Ordering::Relaxed) {
                    largest = largest.max(snapshot_bytes(&sources).1);
                    std::thread::sleep(Duration::from_millis(20));
                }
                largest
            });
            (running, handle)
        };
        let exited = wait_with_peak(child);
        let wall = started.elapsed().as_secs_f64();
        sampler.0.store(false, std::sync::atomic::Ordering::Relaxed);
        let largest = sampler.1.join().unwrap();
        assert_eq!(exited.code, 0);
        let rss = drain.join().unwrap();
        assert_eq!(rss.len(), batches);
        let (last, last_bytes) = snapshot_bytes(&sources);
        let at = marks.map(|m| format!("{:.0}", rss[m - 1]));
        println!(
            "| {label} | {:.1} KB | sources/{last}: {:.1} KB | {} MB | {:.0} MB | {wall:.1} s |",
            largest.max(last_bytes) as f64 / 1e3,
            last_bytes as f64 / 1e3,
            at.join(" / "),
            exited.peak_mb
        );
    }
}

/// A process's resident memory now, from its `/proc/<pid>/status`.
fn resident_mb(status: &str) -> f64 {
    std::fs::read_to_string(status)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The newest snapshot in a checkpoint's `sources` directory and its size.
fn snapshot_bytes(sources: &Path) -> (u64, u64) {
    let newest = std::fs::read_dir(sources)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            let n: u64 = e.file_name().to_str()?.parse().ok()?;
            Some((n, e.metadata().ok()?.len()))
        })
        .max();
    newest.unwrap_or((0, 0))
}

/// The Kafka dashboard over 500,000 orders already in a 4-partition topic.
fn kafka() {
    let tansu = root().join("target/tools/bin/tansu");
    if !tansu.exists() {
        println!("\n## kafka: skipped (no target/tools/bin/tansu; `cargo test` installs it)");
        return;
    }
    let topic = "orders";
    let sent = Instant::now();
    let (broker, produced, stored) = book_topic(topic);
    let send_secs = sent.elapsed().as_secs_f64();
    let sql = std::fs::read_to_string(root().join("queries/dashboard_kafka.sql")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let sql = sql.replace("127.0.0.1:9092", &broker.servers());
    // As shipped (a client per core, up to 4), and with one client.
    let one_client = sql.replace(
        "'subscribe' 'orders'",
        "'subscribe' 'orders', 'readers' '1'",
    );
    assert_ne!(sql, one_client);
    let scripts = [("shipped", sql), ("one client", one_client)].map(|(name, sql)| {
        let path = tmp.path().join(format!("{}.sql", name.replace(' ', "_")));
        std::fs::write(&path, sql).unwrap();
        (name, path)
    });
    let mut runs: [(Vec<f64>, Vec<f64>); 2] = Default::default();
    // A first run, not counted, then pairs in ABBA order, so that neither
    // kind always follows the other.
    let order = [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0];
    for (run, &kind) in order.iter().enumerate() {
        let (name, sql_path) = &scripts[kind];
        let dir = tmp.path().join(format!("run-{run}"));
        std::fs::create_dir_all(&dir).unwrap();
        let tansu_before = broker.cpu_seconds();
        let started = Instant::now();
        let mut child = brook_run(&dir, sql_path, "available-now");
        let stderr = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || progress_lines(stderr));
        let exited = wait_with_peak(child);
        let wall = started.elapsed().as_secs_f64();
        if run > 0 {
            runs[kind].0.push(wall);
            runs[kind].1.push(exited.peak_mb);
        }
        // The machine's cores are shared by brook and the broker serving it.
        eprintln!(
            "run {run} ({name}): {wall:.2} s, CPU: brook {:.2} s, tansu {:.2} s",
            exited.cpu_seconds,
            broker.cpu_seconds() - tansu_before
        );
        let progress = reader.join().unwrap();
        assert_eq!(exited.code, 0);
        let read = input_rows(&progress, "top_clients") as usize;
        if read != stored {
            for p in progress.iter().filter(|p| p["name"] == "top_clients") {
                eprintln!(
                    "batch {} rows {} malformed {} offsets {}",
                    p["batch_id"],
                    p["num_input_rows"],
                    p["num_malformed_rows"],
                    p["sources"][0]["offset"]
                );
            }
            panic!("read {read} of {stored} records");
        }
    }
    let [(times, peaks), (one_times, one_peaks)] = runs;
    let secs = median(times);
    let peak = median(peaks);
    let one_secs = median(one_times);
    let one_peak = median(one_peaks);
    let alone = median(
        (0..3)
            .map(|_| {
                let tansu_before = broker.cpu_seconds();
                let secs = consume_all(&broker.servers(), topic, stored);
                let tansu = broker.cpu_seconds() - tansu_before;
                eprintln!("bare consumer: {secs:.2} s, tansu CPU {tansu:.2} s");
                secs
            })
            .collect(),
    );
    println!("\n## kafka: the book's orders in a 4-partition topic on tansu, available-now\n");
    println!(
        "producing {} took {send_secs:.1} s and the broker kept {stored}; the dashboard read them \
         in a median {secs:.2} s = {:.0} orders/s, peak RSS {peak:.0} MB (with one client: \
         {one_secs:.2} s = {:.0} orders/s, {one_peak:.0} MB); a bare librdkafka consumer, same fetch settings, \
         read them in {alone:.2} s = {:.0} records/s",
        produced,
        stored as f64 / secs,
        stored as f64 / one_secs,
        stored as f64 / alone
    );
}

/// A broker on a free port whose 4-partition `topic` holds the book's orders:
/// it, the records sent, and the records it kept.
fn book_topic(topic: &str) -> (broker::Broker, usize, usize) {
    let broker = broker::Broker::start();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(broker.create_topic(topic, 4));
    let servers = broker.servers();
    let (produced, stored) = with_book_lines(|lines| produce_batched(&servers, topic, lines))
        .unwrap_or_else(|| produce_batched(&servers, topic, &mut book_stand_in()));
    (broker, produced, stored)
}

/// Seconds one librdkafka consumer, with nothing else to do and brook's
/// fetch settings, takes to read `expected` records of `topic` from the beginning.
fn consume_all(servers: &str, topic: &str, expected: usize) -> f64 {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("group.id", "brook-bench-ceiling")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .set("max.partition.fetch.bytes", "16777216")
        .set("queued.min.messages", "1000000")
        .create()
        .unwrap();
    // From explicit offsets, as brook reads: librdkafka resolves
    // `Offset::Beginning` with a lookup that costs about 500 ms on tansu.
    let mut partitions = TopicPartitionList::new();
    for p in 0..4 {
        let (low, _) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .unwrap();
        partitions
            .add_partition_offset(topic, p, Offset::Offset(low))
            .unwrap();
    }
    consumer.assign(&partitions).unwrap();
    let started = Instant::now();
    let mut read = 0;
    while read < expected {
        match consumer.poll(Duration::from_secs(10)) {
            Some(Ok(_)) => read += 1,
            Some(Err(e)) => panic!("consuming: {e}"),
            None => panic!("no record for 10 s after {read} of {expected}"),
        }
    }
    started.elapsed().as_secs_f64()
}

/// Sends `lines` round-robin over 4 partitions in producer batches (this
/// measures reading, and a reader that starts at the beginning reads whole
/// batches); returns how many were sent and how many records the topic holds,
/// as tansu drops some batches under this load.
fn produce_batched(
    servers: &str,
    topic: &str,
    lines: &mut dyn Iterator<Item = String>,
) -> (usize, usize) {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .create()
        .unwrap();
    let mut sent = 0;
    for line in lines {
        let mut record = BaseRecord::<(), str>::to(topic)
            .payload(line.as_str())
            .partition(sent as i32 % 4);
        while let Err((_, back)) = producer.send(record) {
            record = back;
            producer.poll(Duration::from_millis(10));
        }
        sent += 1;
    }
    producer.flush(Duration::from_secs(120)).unwrap();
    use rdkafka::consumer::Consumer;
    let consumer: rdkafka::consumer::BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .create()
        .unwrap();
    let stored = (0..4)
        .map(|p| {
            let (low, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap();
            (high - low) as usize
        })
        .sum();
    (sent, stored)
}

fn main() {
    let chosen: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wants = |name: &str| chosen.is_empty() || chosen.iter().any(|c| c == name);
    let mut rate = None;
    let mut limit = None;
    if wants("book") {
        rate = Some(book());
    }
    if wants("ceiling") {
        limit = Some(ceiling());
    }
    if let (Some(rate), Some(limit)) = (rate, limit) {
        println!(
            "\ndashboard end to end / arrow CSV reader alone = {:.2} (medians)",
            rate / limit
        );
        paired_ratio();
    }
    if wants("scaling") {
        scaling();
    }
    if wants("steady") {
        steady();
    }
    if wants("delta") {
        book_into("delta", "dashboard_delta.sql", "Delta sinks");
    }
    if wants("steady_delta") {
        steady_delta();
    }
    if wants("steady_compact") {
        steady_compact();
    }
    if wants("restart") {
        restart();
    }
    if wants("kafka") {
        kafka();
    }
    if wants("many_files") {
        many_files();
    }
    if wants("sector") {
        sector();
    }
    if wants("interval_join") {
        interval_join();
    }
    if wants("ohlc") {
        ohlc();
    }
    if wants("cluster") {
        cluster();
    }
    if wants("kafka_cluster") {
        kafka_on_cluster();
    }
}

/// `queries/volume_per_sector.sql` over the book's orders, all files in one
/// batch: the order stream joined with the symbols table, then aggregated
/// per sector and minute.
fn sector() {
    let symbols = root().join("queries/symbols.csv");
    let symbols = format!("LOCATION '{}'", symbols.display());
    let (input, what) = book_data();
    query_bench(
        (&input, what),
        "volume_per_sector.sql",
        &[("LOCATION 'queries/symbols.csv'", symbols.as_str())],
        "volume_per_sector",
        "joined with queries/symbols.csv, per sector and minute",
    );
}

/// `queries/ohlc.sql` over 500,000 generated orders (1,000 s of event time:
/// the book's span 5 s, in which no minute closes), all files in one batch: a
/// one-minute candle per symbol (first_value / last_value ordered by time,
/// max, min, sum), into Parquet rather than the terminal.
fn ohlc() {
    let input = generated_data(500_000, FILES);
    query_bench(
        (&input, "500,000 generated orders, 1% malformed, 2 ms apart"),
        "ohlc.sql",
        &[(
            "STORED AS CONSOLE LOCATION 'stdout'",
            "STORED AS PARQUET LOCATION 'out/candles'",
        )],
        "candles",
        "one-minute OHLC candles per symbol",
    );
}

/// One of `queries/` over 500,000 orders in `input` (described by `what`;
/// its `data/orders` pointed at them, and each `(from, to)` of `edits`
/// applied), all files in one batch, timed as `timed_run` does.
fn query_bench(
    (input, what): (&Path, &str),
    file: &str,
    edits: &[(&str, &str)],
    query: &str,
    what_it_does: &str,
) {
    let mut sql = std::fs::read_to_string(root().join("queries").join(file)).unwrap();
    let orders = format!("LOCATION '{}'", input.display());
    for (from, to) in [("LOCATION 'data/orders'", orders.as_str())]
        .into_iter()
        .chain(edits.iter().copied())
    {
        assert!(sql.contains(from), "queries/{file} has no {from}");
        sql = sql.replace(from, to);
    }
    println!("\n## {query}: {what}, {what_it_does}\n");
    table_header();
    let runs: Vec<_> = (0..RUNS)
        .map(|_| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(file);
            std::fs::write(&path, &sql).unwrap();
            timed_run(dir.path(), &path, BOOK_ORDERS, &[query])
        })
        .collect();
    report_runs("one batch", BOOK_ORDERS, &runs);
}

/// Orders of `interval_join` (about 80% of them get a fill).
const JOIN_ORDERS: usize = 500_000;

/// 500,000 generated orders and their fills (about 400,000), made by `brook
/// gen-orders --fills` and each split into 50 files by `brook send` under
/// target/bench-data/fills-bench/{orders,fills} (as benches/README.md says to
/// for Spark); also what the inner join must give, recounted here: the fills
/// at most a minute after their order.
fn fills_bench_data() -> (PathBuf, PathBuf, usize, usize) {
    let root = data_dir().join("fills-bench");
    let (orders, fills) = (root.join("orders"), root.join("fills"));
    let done = root.join("_complete");
    let brook = || Command::new(env!("CARGO_BIN_EXE_brook"));
    // Files 20 ms apart: Spark takes files in the order of their modification
    // times, and those of files written within a few ms are equal.
    let send = |input: &str, to: &Path, lines: usize| {
        let sent = brook()
            .args(["send", "--input", input, "--to"])
            .arg(to)
            .args(["--lines-per-file", &lines.to_string(), "--interval", "20ms"])
            .current_dir(&root)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(sent.success(), "brook send failed");
    };
    let lines = |name: &str| {
        BufReader::new(std::fs::File::open(root.join(name)).unwrap())
            .lines()
            .count()
    };
    if !done.exists() {
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let made = brook()
            .args(["gen-orders", "--count", &JOIN_ORDERS.to_string()])
            .args(["--fills", "fills.csv"])
            .current_dir(&root)
            .stdout(std::fs::File::create(root.join("orders.csv")).unwrap())
            .status()
            .unwrap();
        assert!(made.success(), "brook gen-orders failed");
        send("orders.csv", &orders, JOIN_ORDERS.div_ceil(FILES));
        send("fills.csv", &fills, lines("fills.csv").div_ceil(FILES));
        std::fs::write(&done, b"").unwrap();
    }
    let read = |dir: &Path| -> Vec<Vec<String>> {
        let mut lines = vec![];
        for entry in std::fs::read_dir(dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            lines.extend(
                text.lines()
                    .map(|l| l.split(',').map(str::to_string).collect::<Vec<_>>()),
            );
        }
        lines
    };
    let time = |s: &str| NaiveDateTime::parse_from_str(s, TIME_FORMAT).unwrap();
    let order_times: std::collections::HashMap<String, NaiveDateTime> = read(&orders)
        .into_iter()
        .map(|f| (f[1].clone(), time(&f[0])))
        .collect();
    let fill_lines = read(&fills);
    let in_time = fill_lines
        .iter()
        .filter(|f| {
            let ordered = order_times[&f[2]];
            let filled = time(&f[0]);
            ordered <= filled && filled <= ordered + brook::orders::FILL_BOUND
        })
        .count();
    (orders, fills, fill_lines.len(), in_time)
}

/// The interval join of orders with their fills (a fill within a minute of
/// its order), watermarks of 10 s on both streams, appended to Parquet: all
/// files in one batch, and one file of each per batch, showing the rows the
/// join keeps in state batch by batch (they stay flat as the watermark lets
/// orders go a minute after they were placed).
fn interval_join() {
    let (orders, fills, fill_count, in_time) = fills_bench_data();
    let rows = JOIN_ORDERS + fill_count;
    let sql = |per_batch: &str| {
        format!(
            "CREATE UNBOUNDED EXTERNAL TABLE orders (
                time TIMESTAMP NOT NULL, order_id BIGINT NOT NULL, client_id BIGINT NOT NULL,
                symbol VARCHAR NOT NULL, amount INT NOT NULL, price DOUBLE NOT NULL,
                buy_sell VARCHAR NOT NULL, WATERMARK FOR time AS time - INTERVAL '10' SECOND
             ) STORED AS CSV LOCATION '{}' OPTIONS ('mode' 'DROPMALFORMED'{per_batch});
             CREATE UNBOUNDED EXTERNAL TABLE fills (
                time TIMESTAMP NOT NULL, fill_id BIGINT NOT NULL, order_id BIGINT NOT NULL,
                quantity INT NOT NULL, price DOUBLE NOT NULL,
                WATERMARK FOR time AS time - INTERVAL '10' SECOND
             ) STORED AS CSV LOCATION '{}' OPTIONS ('mode' 'DROPMALFORMED'{per_batch});
             CREATE EXTERNAL TABLE filled STORED AS PARQUET LOCATION 'out/filled'
                OPTIONS ('outputMode' 'append');
             INSERT INTO filled
             SELECT o.order_id, o.symbol, o.time AS ordered, f.time AS filled, f.quantity, f.price
             FROM orders o JOIN fills f
               ON o.order_id = f.order_id
              AND f.time BETWEEN o.time AND o.time + INTERVAL '1' MINUTE;",
            orders.display(),
            fills.display()
        )
    };
    println!(
        "\n## interval_join: {JOIN_ORDERS} generated orders and {fill_count} fills, 50 files \
         each, inner join within a minute ({in_time} fills in time), Parquet, checkpoint\n"
    );
    println!(
        "| run | input rows | output rows | median wall time | input rows/s | median peak RSS | \
         state rows at the end |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (label, per_batch, runs) in [
        ("one batch", "", RUNS),
        (
            "one file of each per batch",
            ", 'maxFilesPerTrigger' '1'",
            1,
        ),
    ] {
        let mut seconds = vec![];
        let mut peaks = vec![];
        let mut states = vec![];
        for _ in 0..runs {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("join.sql");
            std::fs::write(&path, sql(per_batch)).unwrap();
            let started = Instant::now();
            let mut child = brook_run(dir.path(), &path, "available-now");
            let stderr = child.stderr.take().unwrap();
            let reader = std::thread::spawn(move || progress_lines(stderr));
            let exited = wait_with_peak(child);
            seconds.push(started.elapsed().as_secs_f64());
            peaks.push(exited.peak_mb);
            let progress = reader.join().unwrap();
            assert_eq!(exited.code, 0, "brook run failed");
            assert_eq!(input_rows(&progress, "filled") as usize, rows);
            let output: u64 = progress
                .iter()
                .map(|p| p["sink"]["num_output_rows"].as_u64().unwrap_or(0))
                .sum();
            assert_eq!(output as usize, in_time, "rows the join gave");
            states = progress
                .iter()
                .map(|p| {
                    p["state_operators"].as_array().map_or(0, |ops| {
                        ops.iter()
                            .map(|s| s["num_rows_total"].as_u64().unwrap_or(0))
                            .sum()
                    })
                })
                .collect::<Vec<u64>>();
        }
        let secs = median(seconds);
        println!(
            "| {label} | {rows} | {in_time} | {secs:.3} s | {:.0} | {:.0} MB | {} |",
            rows as f64 / secs,
            median(peaks),
            states.last().copied().unwrap_or_default()
        );
        if runs == 1 {
            println!("\nstate rows after each batch: {states:?}\n");
        }
    }
}

/// A scheduler and two executors of one task slot each on 127.0.0.1, from the
/// release binary, killed when dropped.
struct BenchCluster {
    children: Vec<Child>,
    logs: Vec<PathBuf>,
    port: u16,
    _dir: tempfile::TempDir,
}

impl BenchCluster {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let spawn = |args: &[String], log: &Path| {
            Command::new(env!("CARGO_BIN_EXE_brook"))
                .args(args)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(log).unwrap())
                .spawn()
                .unwrap()
        };
        let scheduler_log = dir.path().join("scheduler.log");
        let mut children = vec![spawn(
            &["scheduler".into(), "--port".into(), port.to_string()],
            &scheduler_log,
        )];
        let mut logs = vec![scheduler_log];
        let registered =
            |log: &Path| std::fs::read_to_string(log).is_ok_and(|t| t.contains("listening on"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !registered(&logs[0]) {
            assert!(Instant::now() < deadline, "the scheduler did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        for n in 0..2 {
            let log = dir.path().join(format!("executor-{n}.log"));
            let args: Vec<String> = [
                "executor",
                "--scheduler",
                &format!("127.0.0.1:{port}"),
                "--port",
                &free_port().to_string(),
                "--grpc-port",
                &free_port().to_string(),
                "--slots",
                "1",
            ]
            .iter()
            .map(|a| a.to_string())
            .collect();
            children.push(spawn(&args, &log));
            logs.push(log);
        }
        for log in &logs[1..] {
            while !std::fs::read_to_string(log)
                .is_ok_and(|t| t.contains("Executor registration succeed"))
            {
                assert!(Instant::now() < deadline, "an executor did not register");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Self {
            children,
            logs,
            port,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("df://127.0.0.1:{}", self.port)
    }

    /// Milliseconds of each task the executors finished since the last call,
    /// by stage (1: reading files and the partial aggregate; 2: merging the
    /// shuffled partials), and the scheduler's planning of each job.
    fn take_times(&self, seen: &mut Vec<usize>) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        seen.resize(self.logs.len(), 0);
        let (mut scan, mut merge, mut planning) = (vec![], vec![], vec![]);
        for (i, log) in self.logs.iter().enumerate() {
            let text = std::fs::read_to_string(log).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            for line in &lines[seen[i]..] {
                if let Some(rest) = line.split("Finished task : [TID ").nth(1) {
                    // `<job>/<stage>.<attempt>/<partition>.<attempt>] in <time>`
                    let stage = rest.split('/').nth(1).and_then(|s| s.split('.').next());
                    let took = rest.split("] in ").nth(1).and_then(millis);
                    match (stage, took) {
                        (Some("1"), Some(ms)) => scan.push(ms),
                        (Some(_), Some(ms)) => merge.push(ms),
                        _ => {}
                    }
                } else if let Some(rest) = line.split("planning took ").nth(1) {
                    planning.extend(millis(rest));
                }
            }
            seen[i] = lines.len();
        }
        (scan, merge, planning)
    }
}

impl Drop for BenchCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A duration as Rust's Debug prints it (`9.45ms`, `356.07µs`, `1.2s`), in ms.
fn millis(text: &str) -> Option<f64> {
    let text = text.trim();
    for (unit, factor) in [("ms", 1.0), ("µs", 1e-3), ("ns", 1e-6), ("s", 1e3)] {
        if let Some(n) = text.strip_suffix(unit) {
            return n.parse::<f64>().ok().map(|n| n * factor);
        }
    }
    None
}

/// The median over a run's batches (of every query) of a progress duration.
fn batch_median(progress: &[Value], what: &str) -> f64 {
    median(
        progress
            .iter()
            .filter(|p| p["num_input_rows"].as_u64() > Some(0))
            .map(|p| p["duration_ms"][what].as_f64().unwrap_or(0.0))
            .collect(),
    )
}

/// The book's dashboard run here and on a scheduler with two executors on
/// this machine (`brook run --cluster`): wall time, the driver's memory, and
/// where a batch's time goes.
fn cluster() {
    let (input, what) = book_data();
    println!(
        "\n## cluster: {what}, 50 files, the Parquet dashboard here and on a scheduler \
         and two 1-slot executors on 127.0.0.1\n"
    );
    let cluster = BenchCluster::start();
    let url = cluster.url();
    let queries = ["buy_sell_per_second", "top_clients", "top_stocks"];
    table_header();
    let mut seen = vec![];
    let mut breakdown = vec![];
    for (label, options) in [
        ("one batch", ""),
        ("one file per batch", ", 'maxFilesPerTrigger' '1'"),
    ] {
        for (place, extra) in [
            ("here", vec![]),
            ("cluster", vec!["--cluster", url.as_str()]),
        ] {
            let mut runs = vec![];
            let mut progress = vec![];
            cluster.take_times(&mut seen);
            for _ in 0..RUNS {
                let dir = tempfile::tempdir().unwrap();
                let sql = script_sql("dashboard_parquet.sql", dir.path(), &input, options);
                let (figures, p) = timed_run_with(dir.path(), &sql, BOOK_ORDERS, &queries, &extra);
                runs.push(figures);
                progress.extend(p);
            }
            let times = cluster.take_times(&mut seen);
            report_runs(&format!("{label}, {place}"), BOOK_ORDERS, &runs);
            breakdown.push((format!("{label}, {place}"), progress, times));
        }
    }
    println!(
        "\nWhere a batch's time goes (medians over the batches with input of all runs; \
         `read` is the cluster's job, from submitting it to holding its rows):\n"
    );
    println!(
        "| run | batches | read | execute (merge here) | sink | commit | job planning | \
         scan task | merge task |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (label, progress, (scan, merge, planning)) in breakdown {
        let batches = progress
            .iter()
            .filter(|p| p["num_input_rows"].as_u64() > Some(0))
            .count();
        let or_dash = |xs: &Vec<f64>| {
            if xs.is_empty() {
                "-".to_string()
            } else {
                format!("{:.2} ms", median(xs.clone()))
            }
        };
        println!(
            "| {label} | {batches} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {} | {} ({} tasks) | {} ({} tasks) |",
            batch_median(&progress, "read"),
            batch_median(&progress, "execute"),
            batch_median(&progress, "sink"),
            batch_median(&progress, "commit"),
            or_dash(&planning),
            or_dash(&scan),
            scan.len(),
            or_dash(&merge),
            merge.len(),
        );
    }
    state_growth(&cluster, &input);
}

/// A process's resident memory now, in MB, from /proc.
fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// An aggregation whose state grows with every batch (one group per order),
/// here and with its state on the cluster's executors: the driver's peak
/// memory, and the executors' memory after the run.
fn state_growth(cluster: &BenchCluster, input: &Path) {
    println!(
        "\n## cluster: state that grows, one group per order (GROUP BY order_id, update \
         mode, console sink), one file per batch\n"
    );
    println!(
        "| run | orders | median wall time | driver's median peak RSS | groups in state | state's size | executors' RSS after |"
    );
    println!("|---|---|---|---|---|---|---|");
    let url = cluster.url();
    for (place, extra) in [
        ("here", vec![]),
        ("cluster", vec!["--cluster", url.as_str()]),
    ] {
        let (mut seconds, mut peaks, mut last) = (vec![], vec![], Value::Null);
        for _ in 0..RUNS {
            let dir = tempfile::tempdir().unwrap();
            let sql = dir.path().join("per_order.sql");
            std::fs::write(
                &sql,
                format!(
                    "CREATE UNBOUNDED EXTERNAL TABLE orders (time TIMESTAMP NOT NULL, \
                     order_id BIGINT NOT NULL, client_id BIGINT NOT NULL, symbol VARCHAR NOT NULL, \
                     amount INT NOT NULL, price DOUBLE NOT NULL, buy_sell VARCHAR NOT NULL) \
                     STORED AS CSV LOCATION '{}' OPTIONS ('mode' 'DROPMALFORMED', \
                     'maxFilesPerTrigger' '1');
                     CREATE EXTERNAL TABLE per_order STORED AS CONSOLE LOCATION '' \
                     OPTIONS ('outputMode' 'update', 'queryName' 'per_order');
                     INSERT INTO per_order SELECT order_id, count(*) AS orders, \
                     sum(amount * price) AS traded FROM orders GROUP BY order_id;",
                    input.display()
                ),
            )
            .unwrap();
            let (figures, progress) =
                timed_run_with(dir.path(), &sql, BOOK_ORDERS, &["per_order"], &extra);
            seconds.push(figures.seconds);
            peaks.push(figures.peak_mb);
            last = progress.last().cloned().unwrap_or(Value::Null);
        }
        let state = &last["state_operators"][0];
        let executors: f64 = match place {
            "here" => 0.0,
            _ => cluster.children[1..].iter().map(|c| rss_mb(c.id())).sum(),
        };
        println!(
            "| {place} | {BOOK_ORDERS} | {:.3} s | {:.0} MB | {} | {:.1} MB | {} |",
            median(seconds),
            median(peaks),
            state["num_rows_total"],
            state["memory_used_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            if place == "here" {
                "-".to_string()
            } else {
                format!("{executors:.0} MB (two)")
            },
        );
    }
}

/// The Kafka dashboard over the book's orders in a 4-partition topic, here
/// and on the cluster, where each partition's range of a batch is a task.
fn kafka_on_cluster() {
    if !root().join("target/tools/bin/tansu").exists() {
        println!(
            "\n## cluster, Kafka: skipped (no target/tools/bin/tansu; `cargo test` installs it)"
        );
        return;
    }
    let cluster = BenchCluster::start();
    let (broker, _, stored) = book_topic("orders");
    println!(
        "\n## cluster: the Kafka dashboard over {stored} orders in a 4-partition topic on \
         tansu, one batch, here and read by the executors' tasks\n"
    );
    // One batch: tansu skips to the next producer batch when a fetch starts
    // inside one, as a batch cut by maxOffsetsPerTrigger would (the figures
    // with many batches are the files' above).
    let script = std::fs::read_to_string(root().join("queries/dashboard_kafka.sql"))
        .unwrap()
        .replace("127.0.0.1:9092", &broker.servers());
    let queries = ["buy_sell_per_second", "top_clients", "top_stocks"];
    let url = cluster.url();
    let mut seen = vec![];
    table_header();
    for (place, extra) in [
        ("here", vec![]),
        ("cluster", vec!["--cluster", url.as_str()]),
    ] {
        cluster.take_times(&mut seen);
        let runs: Vec<_> = (0..RUNS)
            .map(|_| {
                let dir = tempfile::tempdir().unwrap();
                let sql = dir.path().join("dashboard.sql");
                std::fs::write(&sql, &script).unwrap();
                timed_run_with(dir.path(), &sql, stored, &queries, &extra).0
            })
            .collect();
        report_runs(&format!("one batch, {place}"), stored, &runs);
        let (scan, _, _) = cluster.take_times(&mut seen);
        if place == "cluster" {
            println!(
                "\n{} reading tasks (a partition's range each, with the partial aggregate), \
                 median {:.1} ms",
                scan.len(),
                median(scan)
            );
        }
    }
}
