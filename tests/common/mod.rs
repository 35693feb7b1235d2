//! Helpers shared by the engine's integration tests: real files in real temp directories.
#![allow(dead_code)] // each test crate uses a different subset

pub mod broker;
pub mod files;
pub mod s3;
pub mod tools;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use brook::datafusion::arrow::array::{Array, RecordBatch};
use brook::datafusion::arrow::util::display::array_value_to_string;
use brook::source::write_atomically;
use brook::{Engine, StreamingQuery};

/// `brook run <script>` (a file in `dir`) in `dir`, checkpointed under
/// `dir/checkpoint`, until the input there is used up; the progress records
/// it printed, a JSON line a batch.
pub fn run_checkpointed(dir: &Path, script: &str) -> Vec<serde_json::Value> {
    run_checkpointed_printing(dir, script).1
}

/// As [`run_checkpointed`], with what the run printed on stdout.
pub fn run_checkpointed_printing(dir: &Path, script: &str) -> (String, Vec<serde_json::Value>) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_brook"))
        .args(["run", script, "--checkpoint", "checkpoint"])
        .args(["--trigger", "available-now", "--progress", "json"])
        .current_dir(dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let progress = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (String::from_utf8_lossy(&out.stdout).into_owned(), progress)
}

/// Writes `lines` into `dir` atomically, as a watched directory expects.
pub fn put(dir: &Path, name: &str, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    write_atomically(dir, name, text.as_bytes()).unwrap();
}

/// One orders CSV line: time, order_id, client_id, symbol, amount, price, buy_sell.
pub fn order(time: &str, id: i64, symbol: &str, amount: i32, price: f64, side: &str) -> String {
    format!(
        "2016-03-22 {time},{id},{},{symbol},{amount},{price},{side}",
        100 + id
    )
}

/// The orders source, one file per batch, with or without a 10 s watermark.
pub fn source_ddl(dir: &Path, watermark: bool) -> String {
    let wm = if watermark {
        ", WATERMARK FOR time AS time - INTERVAL '10' SECOND"
    } else {
        ""
    };
    format!(
        "CREATE UNBOUNDED EXTERNAL TABLE orders (time TIMESTAMP NOT NULL, order_id BIGINT, \
         client_id BIGINT, symbol VARCHAR, amount INT, price DOUBLE, buy_sell VARCHAR{wm}) \
         STORED AS CSV LOCATION '{}' OPTIONS ('mode' 'DROPMALFORMED', 'maxFilesPerTrigger' '1');",
        dir.display()
    )
}

/// Every row of `batches` as display strings ("NULL" for nulls).
pub fn table(batches: &[RecordBatch]) -> Vec<Vec<String>> {
    let mut out = vec![];
    for b in batches {
        for r in 0..b.num_rows() {
            out.push(
                b.columns()
                    .iter()
                    .map(|c| {
                        if c.is_null(r) {
                            "NULL".to_string()
                        } else {
                            array_value_to_string(c, r).unwrap()
                        }
                    })
                    .collect(),
            );
        }
    }
    out
}

pub fn rows(expected: &[&[&str]]) -> Vec<Vec<String>> {
    expected
        .iter()
        .map(|r| r.iter().map(|c| c.to_string()).collect())
        .collect()
}

pub fn sorted(mut t: Vec<Vec<String>>) -> Vec<Vec<String>> {
    t.sort();
    t
}

/// A temp directory with an empty `orders` input directory in it.
pub fn tmp_source() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("orders");
    std::fs::create_dir(&input).unwrap();
    (dir, input)
}

/// Runs a script that starts exactly one query and returns it.
pub async fn start_one(engine: &Engine, script: &str) -> Arc<StreamingQuery> {
    let mut queries = engine.execute(script).await.unwrap();
    assert_eq!(queries.len(), 1);
    queries.remove(0)
}
