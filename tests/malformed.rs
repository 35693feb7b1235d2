//! Malformed input the .slt suite (tests/slt/malformed.slt) cannot state: a
//! failed query as the Rust API shows it, sources declared through the Rust
//! API, and files too large to write out there.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use brook::datafusion::arrow::datatypes::{DataType, Field, Schema};
use brook::source::FileFormat;
use brook::{BrookError, Engine, QueryProgress, StreamingQuery};

/// Writes `text` under a hidden name, then renames it into `dir`, so the
/// source never lists a half-written file.
fn put(dir: &Path, name: &str, text: impl AsRef<[u8]>) -> PathBuf {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    let path = dir.join(name);
    std::fs::rename(&tmp, &path).unwrap();
    path
}

fn lines(lines: &[&str]) -> String {
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

/// The orders source in parse mode `mode`.
fn source_ddl(dir: &Path, mode: &str) -> String {
    format!(
        "CREATE UNBOUNDED EXTERNAL TABLE orders (time TIMESTAMP NOT NULL, order_id BIGINT, \
         client_id BIGINT, symbol VARCHAR, amount INT, price DOUBLE, buy_sell VARCHAR, \
         WATERMARK FOR time AS time - INTERVAL '10' SECOND) \
         STORED AS CSV LOCATION '{}' OPTIONS ('mode' '{mode}', 'maxFilesPerTrigger' '1');",
        dir.display()
    )
}

/// Starts `INSERT INTO <table> <select>` into a memory table, over the orders
/// in `dir` read in parse mode `mode`.
async fn start_memory(
    engine: &Engine,
    dir: &Path,
    mode: &str,
    table: &str,
    select: &str,
) -> Arc<StreamingQuery> {
    let script = format!(
        "{} CREATE EXTERNAL TABLE {table} STORED AS MEMORY LOCATION '{table}';
         INSERT INTO {table} {select};",
        source_ddl(dir, mode)
    );
    start_one(engine, &script).await
}

/// The (file, line) of each malformed sample, sorted.
fn sample_places(p: &QueryProgress) -> Vec<(String, u64)> {
    let mut places: Vec<(String, u64)> = p
        .malformed_samples
        .iter()
        .map(|s| (s.file.clone(), s.line))
        .collect();
    places.sort();
    places
}

/// What the Rust API shows of a query FAILFAST stopped: the error, naming the
/// file and line, from `await_termination` and `exception`, and an inactive
/// query. (What reached the sink is pinned in tests/slt/malformed.slt.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failfast_query_reports_its_error_through_the_api() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let query = start_memory(
        &engine,
        &input,
        "FAILFAST",
        "ff",
        "SELECT order_id FROM orders",
    )
    .await;
    let file = put(
        &input,
        "b.csv",
        lines(&[
            &order("20:00:02", 2, "AAPL", 10, 1.5, "B"),
            "2016-03-22 20:00:04,4,104,MSFT,5,abc,S",
        ]),
    );
    let err = query.process_all_available().await.unwrap_err().to_string();
    let place = format!("{} line 2", file.display());
    assert!(err.contains(&place), "{err}");
    let err = query.await_termination().await.unwrap_err().to_string();
    assert!(err.contains(&place) && err.contains("price"), "{err}");
    assert!(!query.is_active());
    let exception = query.exception().unwrap();
    assert!(exception.contains(&place), "{exception}");
}

/// A program embedding brook tells a query stopped by a bad row from other
/// failures by matching the error, and finds the row's file and line under it,
/// the same each time it asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failfast_stop_is_a_query_failure_whose_source_is_the_malformed_row() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let query = start_memory(
        &engine,
        &input,
        "FAILFAST",
        "typed",
        "SELECT order_id FROM orders",
    )
    .await;
    let file = put(
        &input,
        "a.csv",
        lines(&[
            &order("20:00:01", 1, "AAPL", 10, 1.5, "B"),
            "2016-03-22 20:00:02,2,102,MSFT,5,abc,S",
        ]),
    );
    let awaited = query.await_termination().await.unwrap_err();
    let stopped = query.stop().await.unwrap_err();
    for err in [&awaited, &stopped] {
        let BrookError::QueryFailed { query, source } = err else {
            panic!("not a query failure: {err:?}");
        };
        assert_eq!(query, "typed");
        let BrookError::Malformed {
            file: f,
            line,
            reason,
        } = &**source
        else {
            panic!("not stopped by the malformed row: {source:?}");
        };
        assert_eq!((f.as_str(), *line), (file.to_str().unwrap(), 2));
        assert!(reason.contains("price"), "{reason}");
        assert!(matches!(
            err.find_root(),
            BrookError::Malformed { line: 2, .. }
        ));

        // Walking `source()`, as a generic error reporter does, reaches the
        // same row: the query's error is shared, so it is held in an `Arc`.
        let cause = std::error::Error::source(err).unwrap();
        assert_eq!(cause.to_string(), source.to_string());
        let held = cause.downcast_ref::<Arc<BrookError>>().unwrap();
        assert!(Arc::ptr_eq(held, source));
        assert!(err.to_string().starts_with(&format!(
            "query 'typed' failed: malformed record in {} line 2: ",
            file.display()
        )));
    }
    assert_eq!(awaited.to_string(), stopped.to_string());
}

/// A batch's files are fed to the aggregation as they are read: a bad file
/// after good ones fails the batch before anything of it is merged or emitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failfast_after_good_files_of_a_batch_emits_nothing_of_it() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let all_files = source_ddl(&input, "FAILFAST").replace(", 'maxFilesPerTrigger' '1'", "");
    let script = format!(
        "{all_files} CREATE EXTERNAL TABLE per_symbol STORED AS MEMORY LOCATION 'per_symbol';
         INSERT INTO per_symbol SELECT symbol, count(*) AS n FROM orders GROUP BY symbol;"
    );
    let query = start_one(&engine, &script).await;
    put(
        &input,
        "a.csv",
        lines(&[&order("20:00:01", 1, "AAPL", 10, 1.5, "B")]),
    );
    query.process_all_available().await.unwrap();
    let first = rows(&[&["AAPL", "1"]]);
    let sorted = "SELECT * FROM per_symbol ORDER BY symbol";
    assert_eq!(table(&engine.sql(sorted).await.unwrap()), first);

    for (i, name) in ["b.csv", "c.csv", "d.csv"].iter().enumerate() {
        let rows: Vec<String> = (0..1000)
            .map(|n| order("20:00:02", 10_000 * (i as i64 + 1) + n, "MSFT", 5, 2.0, "S"))
            .collect();
        put(
            &input,
            name,
            lines(&rows.iter().map(String::as_str).collect::<Vec<_>>()),
        );
    }
    let bad = put(
        &input,
        "e.csv",
        lines(&[
            &order("20:00:03", 5, "IBM", 10, 1.5, "B"),
            "2016-03-22 20:00:04,6,104,IBM,5,abc,S",
        ]),
    );
    let err = query.process_all_available().await.unwrap_err().to_string();
    assert!(err.contains(&bad.display().to_string()), "{err}");
    assert!(err.contains("line 2"), "{err}");
    assert!(!query.is_active());
    assert_eq!(table(&engine.sql(sorted).await.unwrap()), first);
    assert_eq!(query.recent_progress().len(), 1);
}

/// The same text source declared with an explicit Utf8 schema through the Rust
/// API: separates the decoding of text files from the DDL's column types.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_source_from_the_rust_api_reads_one_row_per_line() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    engine
        .read_stream("lines")
        .format(FileFormat::Text)
        .schema(Arc::new(Schema::new(vec![Field::new(
            "value",
            DataType::Utf8,
            true,
        )])))
        .load(&input.display().to_string())
        .unwrap();
    let query = engine
        .query("SELECT value, character_length(value) AS n FROM lines")
        .memory_sink("words")
        .start()
        .await
        .unwrap();
    put(&input, "a.txt", "hello\r\nworld\n\nlast");
    query.process_all_available().await.unwrap();
    let got = table(
        &engine
            .sql("SELECT value, n FROM words ORDER BY value")
            .await
            .unwrap(),
    );
    assert_eq!(
        got,
        rows(&[&["", "0"], &["hello", "5"], &["last", "4"], &["world", "5"]])
    );
    query.stop().await.unwrap();
}

/// The corrupt-record column declared as Utf8 through the Rust API: separates
/// PERMISSIVE's handling from the DDL's column types.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_utf8_corrupt_record_column_from_the_rust_api_gets_the_raw_record() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let schema = Schema::new(vec![
        Field::new("id", DataType::Int64, true),
        Field::new("price", DataType::Float64, true),
        Field::new("_corrupt_record", DataType::Utf8, true),
    ]);
    engine
        .read_stream("quotes")
        .schema(Arc::new(schema))
        .load(&input.display().to_string())
        .unwrap();
    let query = engine
        .query("SELECT id, price, _corrupt_record FROM quotes")
        .memory_sink("q")
        .start()
        .await
        .unwrap();
    put(&input, "q.csv", "1,1.5\n2,abc\n");
    query.process_all_available().await.unwrap();
    let got = table(&engine.sql("SELECT * FROM q ORDER BY id").await.unwrap());
    assert_eq!(got, rows(&[&["1", "1.5", "NULL"], &["2", "NULL", "2,abc"]]));
    let p = query.last_progress().unwrap();
    assert_eq!((p.num_input_rows, p.num_malformed_rows), (2, 1));
    query.stop().await.unwrap();
}

/// A file far larger than one parsing chunk, with bad lines near its start,
/// middle and end: every good row arrives and each bad one is named by its line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lines_deep_in_a_large_file_are_named_by_their_line() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let query = start_memory(
        &engine,
        &input,
        "DROPMALFORMED",
        "n",
        "SELECT count(*) AS orders, sum(order_id) AS ids FROM orders",
    )
    .await;
    let bad = [3u64, 7_000, 19_999];
    let text: Vec<String> = (1..=20_000u64)
        .map(|line| {
            if bad.contains(&line) {
                format!("2016-03-22 20:00:01,{line},1,AAPL,many,1.0,B")
            } else {
                order("20:00:01", line as i64, "AAPL", 1, 1.0, "B")
            }
        })
        .collect();
    assert!(text.iter().map(|l| l.len() + 1).sum::<usize>() > 4 * 64 * 1024);
    let file = put(&input, "big.csv", &(text.join("\n") + "\n"));
    query.process_all_available().await.unwrap();

    let ids: u64 = (1..=20_000u64).filter(|l| !bad.contains(l)).sum();
    assert_eq!(
        table(&engine.sql("SELECT orders, ids FROM n").await.unwrap()),
        rows(&[&["19997", &ids.to_string()]])
    );
    let p = query.last_progress().unwrap();
    assert_eq!(p.num_malformed_rows, 3);
    let path = file.display().to_string();
    assert_eq!(sample_places(&p), bad.map(|l| (path.clone(), l)).to_vec());
    let last = p
        .malformed_samples
        .iter()
        .find(|s| s.line == 19_999)
        .unwrap();
    assert_eq!(last.text, text[19_998]);
    query.stop().await.unwrap();
}
