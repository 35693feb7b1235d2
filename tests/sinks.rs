//! Sinks end to end: Parquet, CSV and JSON part files with their manifest,
//! memory tables, the console, and the available-now trigger.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use brook::datafusion::arrow::array::RecordBatch;
use brook::datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use brook::sink::ConsoleSink;
use brook::{Engine, OutputMode, StreamingQuery, Trigger};

fn tmp_dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("orders");
    std::fs::create_dir(&input).unwrap();
    let output = dir.path().join("out");
    (dir, input, output)
}

/// `name` without the query-id tag a file sink puts before the extension
/// (`part-00000-1a2b3c4d.csv` is `part-00000.csv`).
fn untag(name: &str) -> String {
    let (stem, ext) = name.split_once('.').unwrap_or((name, ""));
    match stem.rsplit_once('-') {
        Some((base, tag)) if tag.len() == 8 && tag.chars().all(|c| c.is_ascii_hexdigit()) => {
            format!("{base}.{ext}")
        }
        _ => name.to_string(),
    }
}

/// The names in `dir` without their query-id tags, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| untag(&e.unwrap().file_name().to_string_lossy()))
        .collect();
    names.sort();
    names
}

/// The file in `dir` whose untagged name is `name`.
fn real(dir: &Path, name: &str) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| untag(&p.file_name().unwrap().to_string_lossy()) == name)
        .unwrap_or_else(|| panic!("no {name} in {}", dir.display()))
}

fn read_parquet(path: &Path) -> Vec<RecordBatch> {
    let file = std::fs::File::open(path).unwrap();
    ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect()
}

fn manifest(output: &Path, batch_id: u64) -> serde_json::Value {
    let path = real(
        &output.join("_brook_manifest"),
        &format!("{batch_id:020}.json"),
    );
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// The manifest entry a batch that wrote `rows` rows into `part` should have.
fn manifest_with(output: &Path, batch_id: u64, part: &str, rows: u64) -> serde_json::Value {
    let path = real(output, part);
    let bytes = std::fs::metadata(&path).unwrap().len();
    let name = path.file_name().unwrap().to_string_lossy();
    serde_json::json!({"batch_id": batch_id, "files": [{"path": name, "rows": rows, "bytes": bytes}]})
}

const BUYS: &str = "SELECT order_id, symbol, amount FROM orders WHERE buy_sell = 'B'";

fn first_files(input: &Path) {
    put(
        input,
        "a.csv",
        &[
            order("20:00:01", 1, "AAPL", 10, 1.5, "B"),
            order("20:00:02", 2, "MSFT", 5, 2.0, "S"),
            order("20:00:03", 3, "GOOG", 2, 3.0, "B"),
        ],
    );
}

fn second_files(input: &Path) {
    put(input, "b.csv", &[order("20:00:04", 4, "IBM", 7, 1.0, "B")]);
}

/// Starts `BUYS` into a file sink of `format` at `output`.
async fn start_file_sink(
    engine: &Engine,
    input: &Path,
    output: &Path,
    format: &str,
) -> Arc<StreamingQuery> {
    start_one(
        engine,
        &format!(
            "{} CREATE EXTERNAL TABLE out STORED AS {format} LOCATION '{}';
             INSERT INTO out {BUYS};",
            source_ddl(input, true),
            output.display()
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_sink_writes_one_part_per_batch_and_a_manifest() {
    let (_tmp, input, output) = tmp_dirs();
    let engine = Engine::new();
    let query = start_file_sink(&engine, &input, &output, "PARQUET").await;
    first_files(&input);
    query.process_all_available().await.unwrap();
    second_files(&input);
    query.process_all_available().await.unwrap();

    assert_eq!(
        listing(&output),
        [
            "_brook_manifest",
            "part-00000.parquet",
            "part-00001.parquet"
        ]
    );
    assert_eq!(
        listing(&output.join("_brook_manifest")),
        ["00000000000000000000.json", "00000000000000000001.json"]
    );
    let part0 = read_parquet(&real(&output, "part-00000.parquet"));
    assert_eq!(
        part0[0]
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect::<Vec<_>>(),
        ["order_id", "symbol", "amount"]
    );
    assert_eq!(
        table(&part0),
        rows(&[&["1", "AAPL", "10"], &["3", "GOOG", "2"]])
    );
    assert_eq!(
        table(&read_parquet(&real(&output, "part-00001.parquet"))),
        rows(&[&["4", "IBM", "7"]])
    );
    assert_eq!(
        manifest(&output, 0),
        manifest_with(&output, 0, "part-00000.parquet", 2)
    );
    assert_eq!(
        manifest(&output, 1),
        manifest_with(&output, 1, "part-00001.parquet", 1)
    );
    query.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_sink_of_a_windowed_append_writes_parts_only_for_batches_with_rows() {
    let (_tmp, input, output) = tmp_dirs();
    let engine = Engine::new();
    let query = start_one(
        &engine,
        &format!(
            "{} CREATE EXTERNAL TABLE out STORED AS PARQUET LOCATION '{}' OPTIONS ('outputMode' 'append');
             INSERT INTO out SELECT window.start AS ws, window.end AS we, symbol, sum(amount) AS shares
               FROM orders GROUP BY window(time, '10 minutes'), symbol;",
            source_ddl(&input, true),
            output.display()
        ),
    )
    .await;
    put(
        &input,
        "a.csv",
        &[
            order("20:01:00", 1, "AAPL", 10, 1.0, "B"),
            order("20:05:00", 2, "AAPL", 5, 1.0, "B"),
            order("20:03:00", 3, "MSFT", 2, 1.0, "S"),
        ],
    );
    query.process_all_available().await.unwrap();
    put(
        &input,
        "b.csv",
        &[order("20:12:00", 4, "AAPL", 1, 1.0, "B")],
    );
    query.process_all_available().await.unwrap();
    put(
        &input,
        "c.csv",
        &[order("20:25:00", 5, "MSFT", 4, 1.0, "S")],
    );
    query.process_all_available().await.unwrap();

    // Batches: 0 a.csv, 1 b.csv, 2 no-data closes [20:00, 20:10), 3 c.csv,
    // 4 no-data closes [20:10, 20:20). The watermark a.csv brought closed
    // nothing, so no batch without input ran after it.
    assert_eq!(
        listing(&output),
        [
            "_brook_manifest",
            "part-00002.parquet",
            "part-00004.parquet"
        ]
    );
    let entries = listing(&output.join("_brook_manifest"));
    assert_eq!(
        entries,
        (0..5).map(|i| format!("{i:020}.json")).collect::<Vec<_>>()
    );
    for empty in [0, 1, 3] {
        assert_eq!(
            manifest(&output, empty),
            serde_json::json!({"batch_id": empty, "files": []})
        );
    }
    assert_eq!(
        manifest(&output, 2),
        manifest_with(&output, 2, "part-00002.parquet", 2)
    );
    assert_eq!(
        manifest(&output, 4),
        manifest_with(&output, 4, "part-00004.parquet", 1)
    );
    let mut closed = table(&read_parquet(&real(&output, "part-00002.parquet")));
    closed.sort();
    assert_eq!(
        closed,
        rows(&[
            &["2016-03-22T20:00:00", "2016-03-22T20:10:00", "AAPL", "15"],
            &["2016-03-22T20:00:00", "2016-03-22T20:10:00", "MSFT", "2"],
        ])
    );
    assert_eq!(
        table(&read_parquet(&real(&output, "part-00004.parquet"))),
        rows(&[&["2016-03-22T20:10:00", "2016-03-22T20:20:00", "AAPL", "1"]])
    );
    query.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_sink_writes_part_files_with_a_header() {
    let (_tmp, input, output) = tmp_dirs();
    let engine = Engine::new();
    let query = start_file_sink(&engine, &input, &output, "CSV").await;
    first_files(&input);
    query.process_all_available().await.unwrap();
    second_files(&input);
    query.process_all_available().await.unwrap();

    assert_eq!(
        listing(&output),
        ["_brook_manifest", "part-00000.csv", "part-00001.csv"]
    );
    let part0 = std::fs::read_to_string(real(&output, "part-00000.csv")).unwrap();
    assert_eq!(part0, "order_id,symbol,amount\n1,AAPL,10\n3,GOOG,2\n");
    let part1 = std::fs::read_to_string(real(&output, "part-00001.csv")).unwrap();
    assert_eq!(part1, "order_id,symbol,amount\n4,IBM,7\n");
    assert_eq!(
        manifest(&output, 0),
        manifest_with(&output, 0, "part-00000.csv", 2)
    );
    assert_eq!(
        manifest(&output, 1),
        manifest_with(&output, 1, "part-00001.csv", 1)
    );
    query.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_sink_writes_json_lines_part_files() {
    let (_tmp, input, output) = tmp_dirs();
    let engine = Engine::new();
    let query = start_file_sink(&engine, &input, &output, "JSON").await;
    first_files(&input);
    query.process_all_available().await.unwrap();
    second_files(&input);
    query.process_all_available().await.unwrap();

    assert_eq!(
        listing(&output),
        ["_brook_manifest", "part-00000.json", "part-00001.json"]
    );
    let part0 = std::fs::read_to_string(real(&output, "part-00000.json")).unwrap();
    assert_eq!(
        part0,
        "{\"order_id\":1,\"symbol\":\"AAPL\",\"amount\":10}\n{\"order_id\":3,\"symbol\":\"GOOG\",\"amount\":2}\n"
    );
    let part1 = std::fs::read_to_string(real(&output, "part-00001.json")).unwrap();
    assert_eq!(part1, "{\"order_id\":4,\"symbol\":\"IBM\",\"amount\":7}\n");
    assert_eq!(
        manifest(&output, 0),
        manifest_with(&output, 0, "part-00000.json", 2)
    );
    assert_eq!(
        manifest(&output, 1),
        manifest_with(&output, 1, "part-00001.json", 1)
    );
    query.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_sink_is_queryable_while_the_query_runs() {
    let (_tmp, input, _output) = tmp_dirs();
    let engine = Engine::new();
    let query = start_one(
        &engine,
        &format!(
            "{} CREATE EXTERNAL TABLE live STORED AS MEMORY LOCATION 'live' OPTIONS ('outputMode' 'update');
             INSERT INTO live SELECT symbol, sum(amount) AS shares FROM orders GROUP BY symbol;",
            source_ddl(&input, true)
        ),
    )
    .await;
    // The table exists, empty, before any input.
    assert!(table(&engine.sql("SELECT * FROM live").await.unwrap()).is_empty());

    first_files(&input);
    query.process_all_available().await.unwrap();
    assert!(query.is_active());
    let got = table(
        &engine
            .sql("SELECT symbol, shares FROM live ORDER BY symbol")
            .await
            .unwrap(),
    );
    assert_eq!(
        got,
        rows(&[&["AAPL", "10"], &["GOOG", "2"], &["MSFT", "5"]])
    );

    put(
        &input,
        "b.csv",
        &[order("20:00:04", 4, "AAPL", 7, 1.0, "B")],
    );
    query.process_all_available().await.unwrap();
    assert!(query.is_active());
    // Update mode appends the changed group's new value.
    let got = table(
        &engine
            .sql("SELECT symbol, shares FROM live ORDER BY symbol, shares")
            .await
            .unwrap(),
    );
    assert_eq!(
        got,
        rows(&[
            &["AAPL", "10"],
            &["AAPL", "17"],
            &["GOOG", "2"],
            &["MSFT", "5"]
        ])
    );
    let latest = table(
        &engine
            .sql("SELECT max(shares) FROM live WHERE symbol = 'AAPL'")
            .await
            .unwrap(),
    );
    assert_eq!(latest, rows(&[&["17"]]));
    query.stop().await.unwrap();
    // Still queryable after the query stopped.
    assert_eq!(
        table(&engine.sql("SELECT count(*) FROM live").await.unwrap()),
        rows(&[&["4"]])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_sink_prints_each_batch_as_a_table() {
    let (_tmp, input, _output) = tmp_dirs();
    let engine = Engine::new();
    engine.execute(&source_ddl(&input, true)).await.unwrap();
    let (sink, buffer) = ConsoleSink::to_buffer(20);
    let query = engine
        .query("SELECT symbol, sum(amount) AS shares FROM orders GROUP BY symbol ORDER BY symbol")
        .sink(Arc::new(sink))
        .output_mode(OutputMode::Complete)
        .start()
        .await
        .unwrap();
    put(
        &input,
        "a.csv",
        &[
            order("20:00:01", 1, "AAPL", 10, 1.0, "B"),
            order("20:00:02", 2, "MSFT", 5, 1.0, "S"),
        ],
    );
    query.process_all_available().await.unwrap();
    put(
        &input,
        "b.csv",
        &[order("20:00:03", 3, "GOOG", 123, 1.0, "B")],
    );
    query.process_all_available().await.unwrap();
    query.stop().await.unwrap();

    let text = String::from_utf8(buffer.lock().unwrap().clone()).unwrap();
    let line = "-------------------------------------------";
    let want = format!(
        "{line}\nBatch: 0\n{line}\n\
         +--------+--------+\n\
         | symbol | shares |\n\
         +--------+--------+\n\
         | AAPL   | 10     |\n\
         | MSFT   | 5      |\n\
         +--------+--------+\n\n\
         {line}\nBatch: 1\n{line}\n\
         +--------+--------+\n\
         | symbol | shares |\n\
         +--------+--------+\n\
         | AAPL   | 10     |\n\
         | GOOG   | 123    |\n\
         | MSFT   | 5      |\n\
         +--------+--------+\n\n"
    );
    assert_eq!(text, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_sink_shows_at_most_num_rows() {
    let (_tmp, input, _output) = tmp_dirs();
    let engine = Engine::new();
    engine.execute(&source_ddl(&input, true)).await.unwrap();
    let (sink, buffer) = ConsoleSink::to_buffer(1);
    let query = engine
        .query("SELECT order_id FROM orders")
        .sink(Arc::new(sink))
        .start()
        .await
        .unwrap();
    put(
        &input,
        "a.csv",
        &[
            order("20:00:01", 1, "AAPL", 10, 1.0, "B"),
            order("20:00:02", 2, "MSFT", 5, 1.0, "S"),
        ],
    );
    query.process_all_available().await.unwrap();
    query.stop().await.unwrap();
    let text = String::from_utf8(buffer.lock().unwrap().clone()).unwrap();
    assert!(text.contains("Batch: 0\n"), "{text}");
    assert!(text.contains("| 1        |"), "{text}");
    assert!(!text.contains("| 2        |"), "{text}");
    assert!(text.contains("only showing top 1 rows"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_sink_table_from_sql_runs() {
    let (_tmp, input, _output) = tmp_dirs();
    let engine = Engine::new();
    let query = start_one(
        &engine,
        &format!(
            "{} CREATE EXTERNAL TABLE screen STORED AS CONSOLE LOCATION 'stdout' OPTIONS ('numRows' '5');
             INSERT INTO screen SELECT symbol, amount FROM orders;",
            source_ddl(&input, true)
        ),
    )
    .await;
    first_files(&input);
    query.process_all_available().await.unwrap();
    let p = query.last_progress().unwrap();
    assert_eq!(p.sink.description, "ConsoleSink");
    assert_eq!(p.sink.num_output_rows, 3);
    assert_eq!(query.name(), "screen");
    query.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn available_now_processes_every_file_then_stops() {
    let (_tmp, input, output) = tmp_dirs();
    put(
        &input,
        "a.csv",
        &[order("20:00:01", 1, "AAPL", 1, 1.0, "B")],
    );
    put(
        &input,
        "b.csv",
        &[
            order("20:00:02", 2, "MSFT", 2, 1.0, "B"),
            order("20:00:03", 3, "MSFT", 3, 1.0, "B"),
        ],
    );
    put(
        &input,
        "c.csv",
        &[
            order("20:00:04", 4, "GOOG", 4, 1.0, "B"),
            order("20:00:05", 5, "GOOG", 5, 1.0, "S"),
            order("20:00:06", 6, "IBM", 6, 1.0, "B"),
        ],
    );
    let engine = Engine::new();
    let query = start_one(
        &engine,
        &format!(
            "{} CREATE EXTERNAL TABLE out STORED AS PARQUET LOCATION '{}' OPTIONS ('trigger' 'available-now');
             INSERT INTO out SELECT order_id, symbol FROM orders;",
            source_ddl(&input, true),
            output.display()
        ),
    )
    .await;
    query.await_termination().await.unwrap();
    assert!(!query.is_active());
    let progress = query.recent_progress();
    assert_eq!(
        progress
            .iter()
            .map(|p| p.num_input_rows)
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(
        listing(&output),
        [
            "_brook_manifest",
            "part-00000.parquet",
            "part-00001.parquet",
            "part-00002.parquet"
        ]
    );
    let mut all: Vec<Vec<String>> = (0..3)
        .flat_map(|i| {
            table(&read_parquet(&real(
                &output,
                &format!("part-{i:05}.parquet"),
            )))
        })
        .collect();
    all.sort();
    assert_eq!(
        all,
        rows(&[
            &["1", "AAPL"],
            &["2", "MSFT"],
            &["3", "MSFT"],
            &["4", "GOOG"],
            &["5", "GOOG"],
            &["6", "IBM"]
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn available_now_from_the_rust_api_closes_windows_before_stopping() {
    let (_tmp, input, _output) = tmp_dirs();
    put(
        &input,
        "a.csv",
        &[order("20:01:00", 1, "AAPL", 1, 1.0, "B")],
    );
    put(
        &input,
        "b.csv",
        &[order("20:05:00", 2, "AAPL", 2, 1.0, "B")],
    );
    put(
        &input,
        "c.csv",
        &[order("20:20:00", 3, "AAPL", 4, 1.0, "B")],
    );
    let engine = Engine::new();
    engine.execute(&source_ddl(&input, true)).await.unwrap();
    let query = engine
        .query(
            "SELECT window.start AS ws, symbol, sum(amount) AS shares FROM orders \
             GROUP BY window(time, '10 minutes'), symbol",
        )
        .output_mode(OutputMode::Append)
        .trigger(Trigger::AvailableNow)
        .memory_sink("closed")
        .start()
        .await
        .unwrap();
    query.await_termination().await.unwrap();
    let progress = query.recent_progress();
    let data: Vec<u64> = progress
        .iter()
        .map(|p| p.num_input_rows)
        .filter(|n| *n > 0)
        .collect();
    assert_eq!(data, vec![1, 1, 1], "three data batches, one file each");
    // The last data batch moved the watermark to 20:19:50: the no-data batch
    // after it closed [20:00, 20:10) before the query stopped.
    assert_eq!(
        progress.last().unwrap().event_time.watermark.as_deref(),
        Some("2016-03-22T20:19:50.000Z")
    );
    let got = table(
        &engine
            .sql("SELECT ws, symbol, shares FROM closed")
            .await
            .unwrap(),
    );
    assert_eq!(got, rows(&[&["2016-03-22T20:00:00", "AAPL", "3"]]));
}

/// Expressions nested deeper than brook plans are refused by every way in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_expressions_are_refused_through_the_api() {
    let (_tmp, input, _output) = tmp_dirs();
    let engine = Engine::new();
    engine.execute(&source_ddl(&input, false)).await.unwrap();
    let deep = format!("SELECT amount{} AS x FROM orders", " + 1".repeat(20_000));
    let refused = |e: brook::BrookError| {
        let e = e.to_string();
        assert!(e.contains("nests more than 500 levels deep"), "{e}");
    };
    refused(
        engine
            .query(&deep)
            .memory_sink("deep")
            .start()
            .await
            .unwrap_err(),
    );
    refused(engine.execute(&deep).await.unwrap_err());
    refused(
        engine
            .sql(&format!("SELECT 1{}", " + 1".repeat(20_000)))
            .await
            .unwrap_err(),
    );
    let sum = engine
        .sql(&format!("SELECT 1{} AS n", " + 1".repeat(400)))
        .await
        .unwrap();
    assert_eq!(table(&sum), rows(&[&["401"]]));
}

/// A foreach-batch sink gets every batch with its id, the batches that emit
/// nothing included: here update mode over 10-minute windows, where the
/// batches without input that follow a watermark move evict and emit nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreach_batch_gets_every_batch_with_its_id() {
    /// A batch's id and its rows as text, sorted.
    type BatchRows = (u64, Vec<Vec<String>>);
    let (_tmp, input, _output) = tmp_dirs();
    let engine = Engine::new();
    engine.execute(&source_ddl(&input, true)).await.unwrap();
    let windowed = "SELECT window.start AS ws, symbol, sum(amount) AS shares \
                    FROM orders GROUP BY window(time, '10 minutes'), symbol";
    let log: Arc<std::sync::Mutex<Vec<BatchRows>>> = Arc::default();
    let sink_log = log.clone();
    let query = engine
        .query(windowed)
        .output_mode(OutputMode::Update)
        .foreach_batch(move |id, batches| {
            sink_log.lock().unwrap().push((id, sorted(table(batches))));
            Ok(())
        })
        .start()
        .await
        .unwrap();
    assert_eq!(query.output_mode(), OutputMode::Update);

    put(
        &input,
        "a.csv",
        &[
            order("20:01:00", 1, "AAPL", 10, 1.0, "B"),
            order("20:05:00", 2, "AAPL", 5, 1.0, "B"),
            order("20:03:00", 3, "MSFT", 2, 1.0, "S"),
        ],
    );
    query.process_all_available().await.unwrap();
    // Watermark 20:11:50 after this file: batch 2 evicts [20:00, 20:10).
    put(
        &input,
        "b.csv",
        &[order("20:12:00", 4, "AAPL", 1, 1.0, "B")],
    );
    query.process_all_available().await.unwrap();
    // 20:05:00 is late and dropped; batch 4 evicts [20:10, 20:20).
    put(
        &input,
        "c.csv",
        &[
            order("20:05:00", 5, "AAPL", 100, 1.0, "B"),
            order("20:25:00", 6, "MSFT", 4, 1.0, "S"),
        ],
    );
    query.process_all_available().await.unwrap();
    let w = |start: &str, symbol: &str, shares: &str| {
        vec![format!("2016-03-22T{start}"), symbol.into(), shares.into()]
    };
    assert_eq!(
        *log.lock().unwrap(),
        vec![
            (
                0,
                vec![w("20:00:00", "AAPL", "15"), w("20:00:00", "MSFT", "2")]
            ),
            (1, vec![w("20:10:00", "AAPL", "1")]),
            (2, vec![]),
            (3, vec![w("20:20:00", "MSFT", "4")]),
            (4, vec![]),
        ]
    );
    query.stop().await.unwrap();

    // The builder refuses what the SQL path refuses, and starts nothing.
    let before = engine.queries().len();
    let err = engine
        .query("SELECT symbol, sum(amount) AS shares FROM orders GROUP BY symbol")
        .output_mode(OutputMode::Append)
        .foreach_batch(|_, _| Ok(()))
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("output mode 'append' for an aggregation needs a watermark"),
        "{err}"
    );
    assert_eq!(engine.queries().len(), before);
}
