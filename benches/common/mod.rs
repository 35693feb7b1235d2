//! Order data for the benchmarks: generated orders, the book's orders, and
//! splitting them into files as `brook send` would drop them.

use std::io::Read;
use std::path::Path;

use brook::cli::send::write_atomically;
use brook::orders::{GeneratorConfig, OrderGenerator, TIME_FORMAT};
use chrono::{NaiveDateTime, TimeDelta};

/// `count` generated orders, `step` apart in event time, a `malformed` share damaged.
pub fn generated(count: usize, malformed: f64, step: TimeDelta) -> Vec<String> {
    let mut g = OrderGenerator::new(GeneratorConfig {
        malformed,
        ..Default::default()
    });
    let start = NaiveDateTime::parse_from_str("2016-03-22 20:25:28", TIME_FORMAT).unwrap();
    (0..count as i32)
        .map(|i| g.line(start + step * i))
        .collect()
}

/// The book's 500,000 orders, or `None` without `../shared`.
pub fn book_lines() -> Option<Vec<String>> {
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

/// Writes `lines` as `files` CSV files `orders-000.csv`, ... under `dir`.
pub fn write_files(dir: &Path, files: usize, lines: &[String]) {
    std::fs::create_dir_all(dir).unwrap();
    for (n, chunk) in lines.chunks(lines.len().div_ceil(files)).enumerate() {
        write_atomically(
            dir,
            &format!("orders-{n:03}.csv"),
            (chunk.join("\n") + "\n").as_bytes(),
        )
        .unwrap();
    }
}
