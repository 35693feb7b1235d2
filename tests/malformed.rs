//! Malformed input end to end: the three parse modes, wrong column counts,
//! JSON-lines and text sources, and a missing source directory.

mod common;
use common::*;

use std::collections::BTreeMap;
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

/// The orders source in parse mode `mode`, with `extra` columns appended to its schema.
fn source_ddl(dir: &Path, mode: &str, extra: &str) -> String {
    format!(
        "CREATE UNBOUNDED EXTERNAL TABLE orders (time TIMESTAMP NOT NULL, order_id BIGINT, \
         client_id BIGINT, symbol VARCHAR, amount INT, price DOUBLE, buy_sell VARCHAR{extra}, \
         WATERMARK FOR time AS time - INTERVAL '10' SECOND) \
         STORED AS CSV LOCATION '{}' OPTIONS ('mode' '{mode}', 'maxFilesPerTrigger' '1');",
        dir.display()
    )
}

/// Starts `INSERT INTO <table> <select>` into a memory table, over the orders
/// in `dir` read in parse mode `mode` with `extra` columns.
async fn start_memory(
    engine: &Engine,
    dir: &Path,
    mode: &str,
    extra: &str,
    table: &str,
    select: &str,
) -> Arc<StreamingQuery> {
    let script = format!(
        "{} CREATE EXTERNAL TABLE {table} STORED AS MEMORY LOCATION '{table}';
         INSERT INTO {table} {select};",
        source_ddl(dir, mode, extra)
    );
    start_one(engine, &script).await
}

fn reasons(p: &QueryProgress) -> BTreeMap<String, u64> {
    p.malformed_by_reason.clone()
}

fn reason_map(entries: &[(&str, u64)]) -> BTreeMap<String, u64> {
    entries.iter().map(|(k, v)| (k.to_string(), *v)).collect()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropmalformed_drops_and_counts_each_bad_record() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let query = start_memory(
        &engine,
        &input,
        "DROPMALFORMED",
        "",
        "ids",
        "SELECT order_id, symbol FROM orders",
    )
    .await;
    let good1 = order("20:00:01", 1, "AAPL", 10, 1.5, "B");
    let good3 = order("20:00:03", 3, "GOOG", 2, 3.0, "B");
    let file = put(
        &input,
        "bad.csv",
        lines(&[
            &good1,                                        // 1
            "2016-03-22 20:00:02,2,102,MSFT,5,abc,S",      // 2: price is not a number
            &good3,                                        // 3
            "notatime,4,104,GOOG,1,1.0,B",                 // 4: time does not parse
            "2016-03-22 20:00:05,5,105,IBM,1,1.0",         // 5: six fields
            ",6,106,IBM,1,1.0,B",                          // 6: no time (NOT NULL)
            "2016-03-22 20:00:07,7,107,IBM,1,1.0,B,extra", // 7: eight fields
        ]),
    );
    query.process_all_available().await.unwrap();

    let got = table(
        &engine
            .sql("SELECT order_id, symbol FROM ids ORDER BY order_id")
            .await
            .unwrap(),
    );
    assert_eq!(got, rows(&[&["1", "AAPL"], &["3", "GOOG"]]));
    let p = query.last_progress().unwrap();
    assert_eq!(p.num_input_rows, 2);
    assert_eq!(p.num_malformed_rows, 5);
    assert_eq!(
        reasons(&p),
        reason_map(&[
            ("unparseable value", 2),
            ("wrong number of fields", 2),
            ("null in NOT NULL column", 1)
        ])
    );
    let path = file.display().to_string();
    assert_eq!(
        sample_places(&p),
        [2, 4, 5, 6, 7].map(|l| (path.clone(), l)).to_vec()
    );
    let five = p.malformed_samples.iter().find(|s| s.line == 5).unwrap();
    assert_eq!(five.text, "2016-03-22 20:00:05,5,105,IBM,1,1.0");
    assert!(
        five.reason.contains("expected 7 fields, found 6"),
        "{}",
        five.reason
    );
    let two = p.malformed_samples.iter().find(|s| s.line == 2).unwrap();
    assert!(two.reason.contains("price"), "{}", two.reason);
    let six = p.malformed_samples.iter().find(|s| s.line == 6).unwrap();
    assert!(six.reason.contains("time"), "{}", six.reason);
    assert!(query.is_active(), "DROPMALFORMED keeps going");
    query.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_keeps_bad_rows_with_nulls_and_counts_them() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let query = start_memory(
        &engine,
        &input,
        "PERMISSIVE",
        "",
        "kept",
        "SELECT order_id, symbol, amount, price, buy_sell FROM orders",
    )
    .await;
    let file = put(
        &input,
        "p.csv",
        lines(&[
            &order("20:00:01", 1, "AAPL", 10, 1.5, "B"),
            "2016-03-22 20:00:02,2,102,MSFT,5,abc,S", // price null
            "2016-03-22 20:00:03,3,103,IBM,x7",       // five fields, amount bad too
        ]),
    );
    query.process_all_available().await.unwrap();

    let got = table(
        &engine
            .sql("SELECT * FROM kept ORDER BY order_id")
            .await
            .unwrap(),
    );
    assert_eq!(
        got,
        rows(&[
            &["1", "AAPL", "10", "1.5", "B"],
            &["2", "MSFT", "5", "NULL", "S"],
            &["3", "IBM", "NULL", "NULL", "NULL"],
        ])
    );
    let p = query.last_progress().unwrap();
    assert_eq!(p.num_input_rows, 3);
    // Row 3 is counted once, under its first reason.
    assert_eq!(p.num_malformed_rows, 2);
    assert_eq!(
        reasons(&p),
        reason_map(&[("unparseable value", 1), ("wrong number of fields", 1)])
    );
    let path = file.display().to_string();
    assert_eq!(sample_places(&p), vec![(path.clone(), 2), (path, 3)]);
    query.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_puts_the_raw_record_in_the_corrupt_record_column() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let query = start_memory(
        &engine,
        &input,
        "PERMISSIVE",
        ", _corrupt_record VARCHAR",
        "kept",
        "SELECT order_id, price, _corrupt_record FROM orders",
    )
    .await;
    put(
        &input,
        "p.csv",
        lines(&[
            &order("20:00:01", 1, "AAPL", 10, 1.5, "B"),
            "2016-03-22 20:00:02,2,102,MSFT,5,abc,S",
        ]),
    );
    query.process_all_available().await.unwrap();
    let got = table(
        &engine
            .sql("SELECT * FROM kept ORDER BY order_id")
            .await
            .unwrap(),
    );
    assert_eq!(
        got,
        rows(&[
            &["1", "1.5", "NULL"],
            &["2", "NULL", "2016-03-22 20:00:02,2,102,MSFT,5,abc,S"]
        ])
    );
    assert_eq!(query.last_progress().unwrap().num_malformed_rows, 1);
    query.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failfast_stops_the_query_naming_file_and_line() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let query = start_memory(
        &engine,
        &input,
        "FAILFAST",
        "",
        "ff",
        "SELECT order_id FROM orders",
    )
    .await;
    put(
        &input,
        "a.csv",
        lines(&[&order("20:00:01", 1, "AAPL", 10, 1.5, "B")]),
    );
    query.process_all_available().await.unwrap();
    assert_eq!(
        table(&engine.sql("SELECT * FROM ff").await.unwrap()),
        rows(&[&["1"]])
    );

    let file = put(
        &input,
        "b.csv",
        lines(&[
            &order("20:00:02", 2, "AAPL", 10, 1.5, "B"),
            &order("20:00:03", 3, "AAPL", 10, 1.5, "B"),
            "2016-03-22 20:00:04,4,104,MSFT,5,abc,S",
        ]),
    );
    let err = query.process_all_available().await.unwrap_err().to_string();
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(err.contains("line 3"), "{err}");
    let err = query.await_termination().await.unwrap_err().to_string();
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("price"), "{err}");
    assert!(!query.is_active());
    assert!(query.exception().is_some());
    // Nothing of the failed batch reached the sink.
    assert_eq!(
        table(&engine.sql("SELECT * FROM ff").await.unwrap()),
        rows(&[&["1"]])
    );
    assert_eq!(query.recent_progress().len(), 1);
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
        "",
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

/// A query that scans its source twice reads every batch's rows in each scan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_scanned_twice_reads_its_rows_twice() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let query = start_memory(
        &engine,
        &input,
        "DROPMALFORMED",
        "",
        "both",
        "SELECT order_id AS n FROM orders UNION ALL SELECT client_id AS n FROM orders",
    )
    .await;
    put(
        &input,
        "a.csv",
        lines(&[
            &order("20:00:01", 1, "AAPL", 10, 1.5, "B"),
            &order("20:00:02", 2, "AAPL", 10, 1.5, "B"),
        ]),
    );
    query.process_all_available().await.unwrap();
    assert_eq!(
        table(&engine.sql("SELECT * FROM both ORDER BY n").await.unwrap()),
        rows(&[&["1"], &["2"], &["101"], &["102"]])
    );
    query.stop().await.unwrap();
}

/// A batch's files are fed to the aggregation as they are read: a bad file
/// after good ones fails the batch before anything of it is merged or emitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failfast_after_good_files_of_a_batch_emits_nothing_of_it() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let all_files = source_ddl(&input, "FAILFAST", "").replace(", 'maxFilesPerTrigger' '1'", "");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_source_directory_fails_at_execute_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-dir");
    let engine = Engine::new();
    let err = engine
        .execute(&format!(
            "{} CREATE EXTERNAL TABLE m STORED AS MEMORY LOCATION 'm';
             INSERT INTO m SELECT order_id FROM orders;",
            source_ddl(&missing, "DROPMALFORMED", "")
        ))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert!(err.contains("does not exist"), "{err}");
    assert!(engine.queries().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csv_with_the_wrong_number_of_columns_is_dropped_and_the_query_goes_on() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let query = start_one(
        &engine,
        &format!(
            "{} CREATE EXTERNAL TABLE n STORED AS MEMORY LOCATION 'n' OPTIONS ('outputMode' 'complete');
             INSERT INTO n SELECT symbol, count(*) AS orders FROM orders GROUP BY symbol;",
            source_ddl(&input, "DROPMALFORMED", "")
        ),
    )
    .await;
    // A producer that lost the buy_sell column: every line has six fields.
    let file = put(
        &input,
        "six.csv",
        lines(&[
            "2016-03-22 20:00:01,1,101,AAPL,10,1.5",
            "2016-03-22 20:00:02,2,102,AAPL,10,1.5",
        ]),
    );
    query.process_all_available().await.unwrap();
    let p = query.last_progress().unwrap();
    assert_eq!((p.num_input_rows, p.num_malformed_rows), (0, 2));
    assert_eq!(reasons(&p), reason_map(&[("wrong number of fields", 2)]));
    let path = file.display().to_string();
    assert_eq!(sample_places(&p), vec![(path.clone(), 1), (path, 2)]);
    assert!(
        p.malformed_samples
            .iter()
            .all(|s| s.reason.contains("expected 7 fields, found 6"))
    );
    assert!(table(&engine.sql("SELECT * FROM n").await.unwrap()).is_empty());

    put(
        &input,
        "good.csv",
        lines(&[&order("20:00:03", 3, "AAPL", 1, 1.0, "B")]),
    );
    query.process_all_available().await.unwrap();
    assert_eq!(
        table(&engine.sql("SELECT * FROM n").await.unwrap()),
        rows(&[&["AAPL", "1"]])
    );
    assert_eq!(query.last_progress().unwrap().num_malformed_rows, 0);
    query.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_lines_source_skips_and_counts_a_bad_line() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let query = start_one(
        &engine,
        &format!(
            "CREATE UNBOUNDED EXTERNAL TABLE events (time TIMESTAMP NOT NULL, symbol VARCHAR, amount INT)
               STORED AS JSON LOCATION '{}' OPTIONS ('mode' 'DROPMALFORMED');
             CREATE EXTERNAL TABLE totals STORED AS MEMORY LOCATION 'totals' OPTIONS ('outputMode' 'complete');
             INSERT INTO totals SELECT symbol, sum(amount) AS shares, count(*) AS n FROM events GROUP BY symbol;",
            input.display()
        ),
    )
    .await;
    let file = put(
        &input,
        "e.json",
        lines(&[
            r#"{"time": "2016-03-22T20:00:01", "symbol": "AAPL", "amount": 10}"#,
            "",
            r#"{"time": "2016-03-22T20:00:02", "symbol": "MSFT", "amount": "#,
            r#"{"time": "2016-03-22T20:00:03", "symbol": "GOOG", "amount": 7}"#,
            r#"{"time": "2016-03-22T20:00:04", "symbol": "AAPL", "amount": 5}"#,
        ]),
    );
    query.process_all_available().await.unwrap();
    let got = table(
        &engine
            .sql("SELECT * FROM totals ORDER BY symbol")
            .await
            .unwrap(),
    );
    assert_eq!(got, rows(&[&["AAPL", "15", "2"], &["GOOG", "7", "1"]]));
    let p = query.last_progress().unwrap();
    assert_eq!(p.num_input_rows, 3);
    assert_eq!(p.num_malformed_rows, 1);
    assert_eq!(reasons(&p), reason_map(&[("invalid JSON record", 1)]));
    assert_eq!(sample_places(&p), vec![(file.display().to_string(), 3)]);
    assert!(p.malformed_samples[0].text.contains("MSFT"));
    query.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_line_without_its_not_null_column_is_malformed() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let query = start_one(
        &engine,
        &format!(
            "CREATE UNBOUNDED EXTERNAL TABLE events (time TIMESTAMP NOT NULL, symbol VARCHAR, amount INT)
               STORED AS JSON LOCATION '{}' OPTIONS ('mode' 'DROPMALFORMED');
             CREATE EXTERNAL TABLE ev STORED AS MEMORY LOCATION 'ev';
             INSERT INTO ev SELECT symbol, amount FROM events;",
            input.display()
        ),
    )
    .await;
    let file = put(
        &input,
        "e.json",
        lines(&[
            r#"{"time": "2016-03-22T20:00:01", "symbol": "AAPL", "amount": 10}"#,
            r#"{"symbol": "IBM", "amount": 1}"#,
        ]),
    );
    query.process_all_available().await.unwrap();
    assert!(query.is_active(), "query failed: {:?}", query.exception());
    assert_eq!(
        table(&engine.sql("SELECT * FROM ev").await.unwrap()),
        rows(&[&["AAPL", "10"]])
    );
    let p = query.last_progress().unwrap();
    assert_eq!((p.num_input_rows, p.num_malformed_rows), (1, 1));
    assert_eq!(sample_places(&p), vec![(file.display().to_string(), 2)]);
    query.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_source_reads_one_row_per_line() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let query = start_one(
        &engine,
        &format!(
            "CREATE UNBOUNDED EXTERNAL TABLE lines (value VARCHAR) STORED AS TEXT LOCATION '{}';
             CREATE EXTERNAL TABLE words STORED AS MEMORY LOCATION 'words';
             INSERT INTO words SELECT value, character_length(value) AS n FROM lines;",
            input.display()
        ),
    )
    .await;
    // CRLF and LF endings, an empty line, and a last line without a newline.
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
    put(&input, "b.txt", "a,b,c is not split\n");
    query.process_all_available().await.unwrap();
    let got = table(
        &engine
            .sql("SELECT value FROM words WHERE n > 5")
            .await
            .unwrap(),
    );
    assert_eq!(got, rows(&[&["a,b,c is not split"]]));
    let progress = query.recent_progress();
    assert_eq!(
        progress
            .iter()
            .map(|p| p.num_input_rows)
            .collect::<Vec<_>>(),
        vec![4, 1]
    );
    assert!(progress.iter().all(|p| p.num_malformed_rows == 0));
    query.stop().await.unwrap();
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
        "",
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

/// Two queries over one source decode each file once between them, and each
/// still gets every row and counts every bad line itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_sharing_a_source_each_see_every_row_and_bad_line() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let started = engine
        .execute(&format!(
            "{} CREATE EXTERNAL TABLE a STORED AS MEMORY LOCATION 'a' OPTIONS ('outputMode' 'complete');
             CREATE EXTERNAL TABLE b STORED AS MEMORY LOCATION 'b';
             INSERT INTO a SELECT symbol, count(*) AS n FROM orders GROUP BY symbol;
             INSERT INTO b SELECT order_id FROM orders;",
            source_ddl(&input, "DROPMALFORMED", "")
        ))
        .await
        .unwrap();
    for f in 0..3 {
        put(
            &input,
            &format!("orders-{f}.csv"),
            lines(&[
                &order("20:00:01", 2 * f, "AAPL", 1, 1.0, "B"),
                "2016-03-22 20:00:02,9,1,IBM,1,abc,S",
                &order("20:00:03", 2 * f + 1, "MSFT", 1, 1.0, "S"),
            ]),
        );
    }
    for q in &started {
        q.process_all_available().await.unwrap();
    }
    assert_eq!(
        table(
            &engine
                .sql("SELECT symbol, n FROM a ORDER BY symbol")
                .await
                .unwrap()
        ),
        rows(&[&["AAPL", "3"], &["MSFT", "3"]])
    );
    assert_eq!(
        table(
            &engine
                .sql("SELECT count(*), sum(order_id) FROM b")
                .await
                .unwrap()
        ),
        rows(&[&["6", "15"]])
    );
    for q in &started {
        let malformed: u64 = q
            .recent_progress()
            .iter()
            .map(|p| p.num_malformed_rows)
            .sum();
        assert_eq!(malformed, 3, "{}", q.name());
        q.stop().await.unwrap();
    }
}

/// Windows line ends, and no newline after the last line: bad records are
/// named by their own line and shown without the line end before them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crlf_lines_are_named_by_their_own_line() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let query = start_memory(
        &engine,
        &input,
        "DROPMALFORMED",
        "",
        "ids",
        "SELECT order_id FROM orders",
    )
    .await;
    let text = [
        order("20:00:01", 1, "AAPL", 10, 1.5, "B"),
        order("20:00:02", 2, "MSFT", 5, 1.0, "S"),
        "2016-03-22 20:00:03,3,103,IBM,1,1.0".to_string(),
        order("20:00:04", 4, "GOOG", 2, 3.0, "B"),
        "2016-03-22 20:00:05,5,105,IBM,1,abc,B".to_string(),
    ]
    .join("\r\n");
    let file = put(&input, "windows.csv", &text);
    query.process_all_available().await.unwrap();

    let got = table(
        &engine
            .sql("SELECT order_id FROM ids ORDER BY order_id")
            .await
            .unwrap(),
    );
    assert_eq!(got, rows(&[&["1"], &["2"], &["4"]]));
    let p = query.last_progress().unwrap();
    let path = file.display().to_string();
    assert_eq!(
        sample_places(&p),
        [3, 5].map(|l| (path.clone(), l)).to_vec()
    );
    let three = p.malformed_samples.iter().find(|s| s.line == 3).unwrap();
    assert_eq!(three.text.trim_end(), "2016-03-22 20:00:03,3,103,IBM,1,1.0");
    let five = p.malformed_samples.iter().find(|s| s.line == 5).unwrap();
    assert_eq!(
        five.text.trim_end(),
        "2016-03-22 20:00:05,5,105,IBM,1,abc,B"
    );
    query.stop().await.unwrap();
}

/// `..` in a LOCATION means the parent directory, as in a shell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_location_with_dot_dot_reads_the_directory_it_names() {
    let (_tmp, input) = tmp_source();
    let detour = input.join("..").join("orders");
    let engine = Engine::new();
    let query = start_memory(
        &engine,
        &detour,
        "DROPMALFORMED",
        "",
        "ids",
        "SELECT order_id FROM orders",
    )
    .await;
    put(
        &input,
        "a.csv",
        lines(&[&order("20:00:01", 1, "AAPL", 1, 1.0, "B")]),
    );
    query.process_all_available().await.unwrap();
    assert_eq!(
        table(&engine.sql("SELECT order_id FROM ids").await.unwrap()),
        rows(&[&["1"]])
    );
    query.stop().await.unwrap();
}

/// One file read by a source into the memory table `out`.
struct Run {
    _tmp: tempfile::TempDir,
    engine: Engine,
    query: Arc<StreamingQuery>,
    path: String,
    /// What processing the file returned: the error's text under FAILFAST.
    result: Result<(), String>,
}

impl Run {
    /// Declares the source `ddl(dir)`, starts `INSERT INTO out <select>`, and
    /// drops `text` into the directory as `name`.
    async fn file(ddl: &str, select: &str, name: &str, text: impl AsRef<[u8]>) -> Self {
        let (tmp, input) = tmp_source();
        let engine = Engine::new();
        let script = format!(
            "{} CREATE EXTERNAL TABLE out STORED AS MEMORY LOCATION 'out';
             INSERT INTO out {select};",
            ddl.replace("{dir}", &input.display().to_string())
        );
        let query = start_one(&engine, &script).await;
        let path = put(&input, name, text).display().to_string();
        let result = query
            .process_all_available()
            .await
            .map_err(|e| e.to_string());
        Self {
            _tmp: tmp,
            engine,
            query,
            path,
            result,
        }
    }

    /// The orders in `text`, read in parse mode `mode` with `extra` columns.
    async fn orders(mode: &str, extra: &str, select: &str, text: impl AsRef<[u8]>) -> Self {
        let ddl = source_ddl(Path::new("{dir}"), mode, extra);
        Self::file(&ddl, select, "orders.csv", text).await
    }

    /// The rows of `out`, sorted.
    async fn rows(&self) -> Vec<Vec<String>> {
        sorted(table(&self.engine.sql("SELECT * FROM out").await.unwrap()))
    }

    fn progress(&self) -> QueryProgress {
        self.query.last_progress().unwrap()
    }

    /// The error FAILFAST stopped the query with.
    fn error(&self) -> &str {
        match &self.result {
            Err(e) => e,
            Ok(()) => panic!("the query did not fail: {:?}", self.query.last_progress()),
        }
    }

    fn places(&self, lines: &[u64]) -> Vec<(String, u64)> {
        lines.iter().map(|l| (self.path.clone(), *l)).collect()
    }
}

/// A stray quote opens a field that ends with its line: that line alone is
/// malformed, and the lines after it, quoted fields and all, are read as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stray_quote_makes_only_its_line_malformed_in_every_mode() {
    let stray = "2016-03-22 20:00:02,2,102,\"A,5,1.0,B";
    let text = lines(&[
        &order("20:00:01", 1, "AAPL", 10, 1.5, "B"),
        stray,
        &order("20:00:03", 3, "GOOG", 2, 3.0, "B"),
        "2016-03-22 20:00:04,4,104,\"IBM, \"\"Inc\"\"\",1,1.0,S",
        &order("20:00:05", 5, "MSFT", 5, 1.0, "S"),
    ]);
    let select = "SELECT order_id, symbol FROM orders";
    let drop = Run::orders("DROPMALFORMED", "", select, &text).await;
    assert_eq!(drop.result, Ok(()));
    assert_eq!(
        drop.rows().await,
        rows(&[
            &["1", "AAPL"],
            &["3", "GOOG"],
            &["4", "IBM, \"Inc\""],
            &["5", "MSFT"]
        ])
    );
    let p = drop.progress();
    assert_eq!((p.num_input_rows, p.num_malformed_rows), (4, 1));
    assert_eq!(reasons(&p), reason_map(&[("unterminated quoted field", 1)]));
    assert_eq!(sample_places(&p), drop.places(&[2]));
    assert_eq!(p.malformed_samples[0].text, stray);
    let why = &p.malformed_samples[0].reason;
    assert!(why.contains("unterminated quoted field"), "{why}");
    assert!(why.contains("'multiLine'"), "{why}");

    // PERMISSIVE keeps what the line holds, as Spark does, with its text.
    let extra = ", _corrupt_record VARCHAR";
    let select = "SELECT order_id, symbol, amount, _corrupt_record FROM orders";
    let kept = Run::orders("PERMISSIVE", extra, select, &text).await;
    let got = kept.rows().await;
    assert_eq!(got.len(), 5);
    assert_eq!(got[1], ["2", "A,5,1.0,B", "NULL", stray]);
    assert_eq!(got[3], ["4", "IBM, \"Inc\"", "1", "NULL"]);
    assert_eq!(kept.progress().num_malformed_rows, 1);

    let fail = Run::orders("FAILFAST", "", "SELECT order_id FROM orders", &text).await;
    let err = fail.error();
    assert!(err.contains(&format!("{} line 2", fail.path)), "{err}");
    assert!(err.contains("unterminated quoted field"), "{err}");
}

/// With 'multiLine' 'true' a quoted field may hold a newline; by default the
/// two lines of such a record are two malformed ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiline_true_reads_quoted_newlines_and_the_default_does_not() {
    let text = lines(&[
        "2016-03-22 20:00:01,1,101,\"AA",
        "PL\",10,1.5,B",
        &order("20:00:02", 2, "MSFT", 5, 1.0, "S"),
    ]);
    let select = "SELECT order_id, symbol FROM orders";
    let by_line = Run::orders("DROPMALFORMED", "", select, &text).await;
    assert_eq!(by_line.rows().await, rows(&[&["2", "MSFT"]]));
    let p = by_line.progress();
    assert_eq!(p.num_malformed_rows, 2);
    assert_eq!(sample_places(&p), by_line.places(&[1, 2]));

    let multi = Run::orders("DROPMALFORMED', 'multiLine' 'true", "", select, &text).await;
    assert_eq!(
        multi.rows().await,
        rows(&[&["1", "AA\nPL"], &["2", "MSFT"]])
    );
    assert_eq!(multi.progress().num_malformed_rows, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiline_is_refused_for_other_formats_naming_the_option() {
    let err = Engine::new()
        .execute(
            "CREATE UNBOUNDED EXTERNAL TABLE e (symbol VARCHAR) STORED AS JSON \
             LOCATION '/tmp' OPTIONS ('multiLine' 'true');",
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("multiLine"), "{err}");
    assert!(err.contains("only CSV sources"), "{err}");
    // 'false' asks for what every format does, as scripts from Spark often say.
    Engine::new()
        .execute(
            "CREATE UNBOUNDED EXTERNAL TABLE e (symbol VARCHAR) STORED AS JSON \
             LOCATION '/tmp' OPTIONS ('multiLine' 'false');",
        )
        .await
        .unwrap();
}

/// Bytes that are not UTF-8 in a text field make the record malformed; the
/// corrupt-record column shows them as U+FFFD.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_in_a_csv_field_is_malformed_in_every_mode() {
    let mut text = lines(&[&order("20:00:01", 1, "AAPL", 10, 1.5, "B")]).into_bytes();
    text.extend_from_slice(b"2016-03-22 20:00:02,2,102,MS\xffFT,5,1.0,S\n");
    text.extend_from_slice(lines(&[&order("20:00:03", 3, "GOOG", 2, 3.0, "B")]).as_bytes());
    let select = "SELECT order_id, symbol FROM orders";
    let drop = Run::orders("DROPMALFORMED", "", select, &text).await;
    assert_eq!(drop.rows().await, rows(&[&["1", "AAPL"], &["3", "GOOG"]]));
    let p = drop.progress();
    assert_eq!(reasons(&p), reason_map(&[("invalid UTF-8", 1)]));
    assert_eq!(sample_places(&p), drop.places(&[2]));
    assert!(p.malformed_samples[0].reason.contains("'symbol'"));

    let extra = ", _corrupt_record VARCHAR";
    let select = "SELECT order_id, symbol, _corrupt_record FROM orders";
    let kept = Run::orders("PERMISSIVE", extra, select, &text).await;
    assert_eq!(
        kept.rows().await,
        rows(&[
            &["1", "AAPL", "NULL"],
            &[
                "2",
                "NULL",
                "2016-03-22 20:00:02,2,102,MS\u{FFFD}FT,5,1.0,S"
            ],
            &["3", "GOOG", "NULL"],
        ])
    );
    assert_eq!(kept.progress().num_malformed_rows, 1);

    let fail = Run::orders("FAILFAST", "", "SELECT order_id FROM orders", &text).await;
    let err = fail.error();
    assert!(err.contains(&format!("{} line 2", fail.path)), "{err}");
    assert!(err.contains("invalid UTF-8 in column 'symbol'"), "{err}");
}

/// The events of a JSON source in parse mode `mode`, with `extra` columns.
fn json_ddl(mode: &str, extra: &str) -> String {
    format!(
        "CREATE UNBOUNDED EXTERNAL TABLE events (time TIMESTAMP, symbol VARCHAR, amount INT{extra}) \
         STORED AS JSON LOCATION '{{dir}}' OPTIONS ('mode' '{mode}');"
    )
}

/// PERMISSIVE keeps a JSON line that does not read (cut short, a trailing
/// comma, bytes that are not UTF-8) as a row of nulls with its text, and a
/// fraction in an INT column as a null, each counted with its line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_permissive_keeps_bad_lines_with_their_text() {
    let short = r#"{"time": "2016-03-22T20:00:02", "symbol": "MSFT", "amount": "#;
    let fraction = r#"{"time": "2016-03-22T20:00:03", "symbol": "GOOG", "amount": 1.5}"#;
    let comma = r#"{"time": "2016-03-22T20:00:04", "symbol": "IBM", "amount": 4,}"#;
    let mut text = lines(&[
        r#"{"time": "2016-03-22T20:00:01", "symbol": "AAPL", "amount": 10}"#,
        short,
        fraction,
        comma,
    ])
    .into_bytes();
    text.extend_from_slice(b"{\"time\": \"2016-03-22T20:00:05\", \"symbol\": \"\xff\"}\n");
    text.extend_from_slice(br#"{"time": "2016-03-22T20:00:06", "symbol": "AAPL", "amount": 5}"#);
    let ddl = json_ddl("PERMISSIVE", ", _corrupt_record VARCHAR");
    let select = "SELECT symbol, amount, _corrupt_record FROM events";
    let run = Run::file(&ddl, select, "e.json", &text).await;
    assert_eq!(
        run.rows().await,
        rows(&[
            &["AAPL", "10", "NULL"],
            &["AAPL", "5", "NULL"],
            &["GOOG", "NULL", fraction],
            &["NULL", "NULL", short],
            &["NULL", "NULL", comma],
            &[
                "NULL",
                "NULL",
                "{\"time\": \"2016-03-22T20:00:05\", \"symbol\": \"\u{FFFD}\"}"
            ],
        ])
    );
    let p = run.progress();
    assert_eq!((p.num_input_rows, p.num_malformed_rows), (6, 4));
    assert_eq!(
        reasons(&p),
        reason_map(&[
            ("invalid JSON record", 2),
            ("unparseable value", 1),
            ("invalid UTF-8", 1)
        ])
    );
    assert_eq!(sample_places(&p), run.places(&[2, 3, 4, 5]));
    let three = p.malformed_samples.iter().find(|s| s.line == 3).unwrap();
    assert!(three.reason.contains("'amount'"), "{}", three.reason);
}

/// FAILFAST stops at the first bad JSON line, a fraction in an INT column,
/// naming the file and the line; DROPMALFORMED drops a trailing comma.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_failfast_names_a_fraction_in_an_int_column() {
    let text = lines(&[
        r#"{"time": "2016-03-22T20:00:01", "symbol": "AAPL", "amount": 10}"#,
        r#"{"time": "2016-03-22T20:00:02", "symbol": "GOOG", "amount": 1.5}"#,
        r#"{"time": "2016-03-22T20:00:03", "symbol": "IBM", "amount": 4,}"#,
    ]);
    let select = "SELECT symbol, amount FROM events";
    let fail = Run::file(&json_ddl("FAILFAST", ""), select, "e.json", &text).await;
    let err = fail.error();
    assert!(err.contains(&format!("{} line 2", fail.path)), "{err}");
    assert!(err.contains("cannot parse column 'amount'"), "{err}");

    let drop = Run::file(&json_ddl("DROPMALFORMED", ""), select, "e.json", &text).await;
    assert_eq!(drop.rows().await, rows(&[&["AAPL", "10"]]));
    assert_eq!(sample_places(&drop.progress()), drop.places(&[2, 3]));
}

/// A text line that is not UTF-8 is malformed like a CSV or JSON one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_line_that_is_not_utf8_is_malformed() {
    let ddl = |mode: &str| {
        format!(
            "CREATE UNBOUNDED EXTERNAL TABLE lines (value VARCHAR) STORED AS TEXT \
             LOCATION '{{dir}}' OPTIONS ('mode' '{mode}');"
        )
    };
    let text = b"hello\r\nw\xffrld\nbye";
    let select = "SELECT value FROM lines";
    let drop = Run::file(&ddl("DROPMALFORMED"), select, "a.txt", text).await;
    assert_eq!(drop.rows().await, rows(&[&["bye"], &["hello"]]));
    let p = drop.progress();
    assert_eq!(reasons(&p), reason_map(&[("invalid UTF-8", 1)]));
    assert_eq!(sample_places(&p), drop.places(&[2]));

    let kept = Run::file(&ddl("PERMISSIVE"), select, "a.txt", text).await;
    assert_eq!(kept.rows().await, rows(&[&["NULL"], &["bye"], &["hello"]]));

    let fail = Run::file(&ddl("FAILFAST"), select, "a.txt", text).await;
    let err = fail.error();
    assert!(err.contains(&format!("{} line 2", fail.path)), "{err}");
    assert!(err.contains("invalid UTF-8"), "{err}");
}

/// FAILFAST names the first bad line of a file, whatever is wrong with the
/// lines after it (an earlier column, a wrong number of fields).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failfast_names_the_first_bad_line_of_a_file() {
    let text = lines(&[
        &order("20:00:01", 1, "AAPL", 10, 1.5, "B"),
        "2016-03-22 20:00:02,2,102,MSFT,5,abc,S",
        "notatime,3,103,GOOG,1,1.0,B",
        "2016-03-22 20:00:04,4,104,IBM,1,1.0",
    ]);
    let fail = Run::orders("FAILFAST", "", "SELECT order_id FROM orders", &text).await;
    let err = fail.error();
    assert!(err.contains(&format!("{} line 2", fail.path)), "{err}");
    assert!(err.contains("cannot parse column 'price'"), "{err}");
}
