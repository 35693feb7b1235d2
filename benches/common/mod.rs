//! Order data for the benchmarks: generated orders, the book's orders, and
//! splitting them into files as `brook send` would drop them.

use std::io::{BufRead, BufReader};
use std::path::Path;

use brook::cli::send::write_atomically;
use brook::orders::{GeneratorConfig, OrderGenerator, TIME_FORMAT};
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

/// The book's 500,000 orders, or `None` without `../shared`.
pub fn book_lines() -> Option<Vec<String>> {
    with_book_lines(|lines| lines.collect())
}

/// `f` over the book's orders, read from the archive as they are taken, or
/// `None` without `../shared`.
pub fn with_book_lines<T>(f: impl FnOnce(&mut dyn Iterator<Item = String>) -> T) -> Option<T> {
    let file = std::fs::File::open(BOOK_ARCHIVE).ok()?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let entry = archive.entries().ok()?.next()?.ok()?;
    let mut lines = BufReader::new(entry).lines().map_while(Result::ok);
    Some(f(&mut lines))
}

/// Writes `count` lines as `files` CSV files `orders-000.csv`, ... under
/// `dir`, a file at a time: lines made as they are taken are never all in memory.
pub fn write_files<S: AsRef<str>>(
    dir: &Path,
    files: usize,
    count: usize,
    lines: impl IntoIterator<Item = S>,
) {
    std::fs::create_dir_all(dir).unwrap();
    let mut lines = lines.into_iter().peekable();
    let mut n = 0;
    while lines.peek().is_some() {
        let mut text = String::new();
        for line in lines.by_ref().take(count.div_ceil(files)) {
            text.push_str(line.as_ref());
            text.push('\n');
        }
        write_atomically(dir, &format!("orders-{n:03}.csv"), text.as_bytes()).unwrap();
        n += 1;
    }
}
