//! Order data for the benchmarks: generated orders, the book's orders, and
//! splitting them into files as `brook send` would drop them.

use std::io::{BufRead, BufReader};
use std::path::Path;

use brook::orders::{GeneratorConfig, OrderGenerator, TIME_FORMAT};
use brook::source::write_atomically;
use chrono::{NaiveDateTime, TimeDelta};

/// `count` generated orders, `step` apart in event time, a `malformed` share
/// damaged, made as they are taken.
pub fn generated(count: usize, malformed: f64, step: TimeDelta) -> impl Iterator<Item = String> {
    let mut g = OrderGenerator::new(GeneratorConfig {
        malformed,
        ..Default::default()
    });
    let start = NaiveDateTime::parse_from_str("2016-03-22 20:25:28", TIME_FORMAT).unwrap();
    (0..count as i32).map(move |i| g.line(start + step * i))
}

/// Where the book's orders are, when `../shared` is there.
pub const BOOK_ARCHIVE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/orders.tar.gz");

/// The book's orders, 500,000 of them.
pub const BOOK_ORDERS: usize = 500_000;

/// `f` over the book's orders, read from the archive as they are taken, or
/// `None` when there is no archive (no `../shared`) or it holds no file.
pub fn with_book_lines<T>(f: impl FnOnce(&mut dyn Iterator<Item = String>) -> T) -> Option<T> {
    let file = std::fs::File::open(BOOK_ARCHIVE).ok()?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let entry = archive.entries().ok()?.next()?.ok()?;
    let mut lines = BufReader::new(entry)
        .lines()
        .map(|line| line.expect("reading ../shared/data/orders.tar.gz"));
    Some(f(&mut lines))
}

/// This process's peak resident memory (VmHWM), in MB.
pub fn peak_memory_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Writes `count` lines as `files` CSV files `orders-000.csv`, ... under
/// `dir`, a file at a time: lines made as they are taken are never all in memory.
pub fn write_files<S: AsRef<str>>(
    dir: &Path,
    files: usize,
    count: usize,
    lines: impl IntoIterator<Item = S>,
) {
    let per_file = count.div_ceil(files);
    assert!(per_file > 0, "no lines to write into {}", dir.display());
    std::fs::create_dir_all(dir).unwrap();
    let mut lines = lines.into_iter().peekable();
    let (mut n, mut written) = (0, 0);
    while lines.peek().is_some() {
        let mut text = String::new();
        for line in lines.by_ref().take(per_file) {
            text.push_str(line.as_ref());
            text.push('\n');
            written += 1;
        }
        write_atomically(dir, &format!("orders-{n:03}.csv"), text.as_bytes()).unwrap();
        n += 1;
    }
    assert_eq!(written, count, "lines written into {}", dir.display());
}
