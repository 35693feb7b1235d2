//! Output modes end to end: real CSV files appear in a watched directory one
//! at a time, and each batch's output is checked exactly.

mod common;
use common::*;

use std::path::Path;
use std::sync::{Arc, Mutex};

use brook::{Engine, OutputMode, StreamingQuery};

type BatchLog = Arc<Mutex<Vec<(u64, Vec<Vec<String>>)>>>;

/// Starts `select` with a foreach-batch sink that records each batch's rows (sorted).
async fn start_logged(
    engine: &Engine,
    select: &str,
    mode: OutputMode,
) -> (Arc<StreamingQuery>, BatchLog) {
    let log: BatchLog = Arc::default();
    let sink_log = log.clone();
    let query = engine
        .query(select)
        .output_mode(mode)
        .foreach_batch(move |id, batches| {
            sink_log.lock().unwrap().push((id, sorted(table(batches))));
            Ok(())
        })
        .start()
        .await
        .unwrap();
    (query, log)
}

fn take_log(log: &BatchLog) -> Vec<(u64, Vec<Vec<String>>)> {
    std::mem::take(&mut *log.lock().unwrap())
}

const BY_SYMBOL: &str = "SELECT symbol, sum(amount) AS shares FROM orders GROUP BY symbol";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_mode_emits_only_the_groups_a_batch_changed() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    assert!(
        engine
            .execute(&source_ddl(&input, false))
            .await
            .unwrap()
            .is_empty()
    );
    let (query, log) = start_logged(&engine, BY_SYMBOL, OutputMode::Update).await;
    assert_eq!(query.output_mode(), OutputMode::Update);

    put(
        &input,
        "a.csv",
        &[
            order("20:00:01", 1, "AAPL", 10, 1.0, "B"),
            order("20:00:02", 2, "MSFT", 5, 1.0, "S"),
        ],
    );
    query.process_all_available().await.unwrap();
    assert_eq!(
        take_log(&log),
        vec![(0, rows(&[&["AAPL", "10"], &["MSFT", "5"]]))]
    );

    put(
        &input,
        "b.csv",
        &[
            order("20:00:03", 3, "AAPL", 3, 1.0, "B"),
            order("20:00:04", 4, "GOOG", 7, 1.0, "B"),
        ],
    );
    query.process_all_available().await.unwrap();
    // MSFT did not change: not emitted.
    assert_eq!(
        take_log(&log),
        vec![(1, rows(&[&["AAPL", "13"], &["GOOG", "7"]]))]
    );

    put(
        &input,
        "c.csv",
        &[
            order("20:00:05", 5, "MSFT", 1, 1.0, "S"),
            order("20:00:06", 6, "MSFT", 2, 1.0, "S"),
        ],
    );
    query.process_all_available().await.unwrap();
    assert_eq!(take_log(&log), vec![(2, rows(&[&["MSFT", "8"]]))]);

    let progress = query.recent_progress();
    assert_eq!(
        progress
            .iter()
            .map(|p| p.num_input_rows)
            .collect::<Vec<_>>(),
        vec![2, 2, 2]
    );
    assert_eq!(
        progress
            .iter()
            .map(|p| p.sink.num_output_rows)
            .collect::<Vec<_>>(),
        vec![2, 2, 1]
    );
    assert_eq!(
        progress
            .iter()
            .map(|p| p.state_operators[0].num_rows_total)
            .collect::<Vec<_>>(),
        vec![2, 3, 3]
    );
    assert!(query.is_active());
    query.stop().await.unwrap();
    assert!(!query.is_active());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_mode_emits_every_group_every_batch() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let script = format!(
        "{} CREATE EXTERNAL TABLE totals STORED AS MEMORY LOCATION 'totals' OPTIONS ('outputMode' 'complete');
         INSERT INTO totals {BY_SYMBOL};",
        source_ddl(&input, true)
    );
    let queries = engine.execute(&script).await.unwrap();
    assert_eq!(queries.len(), 1);
    let memory = &queries[0];
    assert_eq!(memory.output_mode(), OutputMode::Complete);
    let (logged, log) = start_logged(&engine, BY_SYMBOL, OutputMode::Complete).await;
    let snapshot = || async {
        table(
            &engine
                .sql("SELECT symbol, shares FROM totals ORDER BY symbol")
                .await
                .unwrap(),
        )
    };

    put(
        &input,
        "a.csv",
        &[
            order("20:00:01", 1, "AAPL", 10, 1.0, "B"),
            order("20:00:02", 2, "MSFT", 5, 1.0, "S"),
        ],
    );
    memory.process_all_available().await.unwrap();
    logged.process_all_available().await.unwrap();
    let after_a = rows(&[&["AAPL", "10"], &["MSFT", "5"]]);
    assert_eq!(snapshot().await, after_a);
    assert_eq!(take_log(&log), vec![(0, after_a)]);

    put(
        &input,
        "b.csv",
        &[
            order("20:00:03", 3, "AAPL", 3, 1.0, "B"),
            order("20:00:04", 4, "GOOG", 7, 1.0, "B"),
        ],
    );
    memory.process_all_available().await.unwrap();
    logged.process_all_available().await.unwrap();
    let after_b = rows(&[&["AAPL", "13"], &["GOOG", "7"], &["MSFT", "5"]]);
    assert_eq!(snapshot().await, after_b);
    assert_eq!(take_log(&log), vec![(1, after_b)]);

    // A batch that changes one group still emits all three.
    put(
        &input,
        "c.csv",
        &[
            order("20:00:05", 5, "MSFT", 1, 1.0, "S"),
            order("20:00:06", 6, "MSFT", 2, 1.0, "S"),
        ],
    );
    memory.process_all_available().await.unwrap();
    logged.process_all_available().await.unwrap();
    let after_c = rows(&[&["AAPL", "13"], &["GOOG", "7"], &["MSFT", "8"]]);
    assert_eq!(snapshot().await, after_c);
    assert_eq!(take_log(&log), vec![(2, after_c)]);

    // Complete mode never drops state, and the watermark adds no extra batches.
    let progress = memory.recent_progress();
    assert_eq!(progress.len(), 3);
    assert_eq!(
        progress
            .iter()
            .map(|p| p.sink.num_output_rows)
            .collect::<Vec<_>>(),
        vec![2, 3, 3]
    );
    engine.stop_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_mode_allows_order_by_and_limit() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let script = format!(
        "{} CREATE EXTERNAL TABLE top2 STORED AS MEMORY LOCATION 'top2' OPTIONS ('outputMode' 'complete');
         INSERT INTO top2 SELECT symbol, sum(amount) AS shares FROM orders GROUP BY symbol
           ORDER BY shares DESC LIMIT 2;",
        source_ddl(&input, false)
    );
    let queries = engine.execute(&script).await.unwrap();
    let query = &queries[0];
    let (ordered, log) = start_logged(
        &engine,
        "SELECT symbol, sum(amount) AS shares FROM orders GROUP BY symbol ORDER BY shares DESC LIMIT 2",
        OutputMode::Complete,
    )
    .await;
    let snapshot =
        || async { table(&engine.sql("SELECT symbol, shares FROM top2").await.unwrap()) };

    put(
        &input,
        "a.csv",
        &[
            order("20:00:01", 1, "AAPL", 10, 1.0, "B"),
            order("20:00:02", 2, "MSFT", 5, 1.0, "S"),
        ],
    );
    query.process_all_available().await.unwrap();
    assert_eq!(snapshot().await, rows(&[&["AAPL", "10"], &["MSFT", "5"]]));

    put(
        &input,
        "b.csv",
        &[
            order("20:00:03", 3, "AAPL", 3, 1.0, "B"),
            order("20:00:04", 4, "GOOG", 7, 1.0, "B"),
        ],
    );
    query.process_all_available().await.unwrap();
    assert_eq!(snapshot().await, rows(&[&["AAPL", "13"], &["GOOG", "7"]]));

    put(
        &input,
        "c.csv",
        &[
            order("20:00:05", 5, "MSFT", 1, 1.0, "S"),
            order("20:00:06", 6, "MSFT", 2, 1.0, "S"),
        ],
    );
    query.process_all_available().await.unwrap();
    // MSFT (8) overtakes GOOG (7).
    assert_eq!(snapshot().await, rows(&[&["AAPL", "13"], &["MSFT", "8"]]));

    ordered.process_all_available().await.unwrap();
    let logged = take_log(&log);
    assert_eq!(logged.len(), 3);
    assert_eq!(logged[2], (2, rows(&[&["AAPL", "13"], &["MSFT", "8"]])));

    // ORDER BY over an aggregation is rejected in update mode.
    let err = engine
        .query("SELECT symbol, sum(amount) AS shares FROM orders GROUP BY symbol ORDER BY shares DESC LIMIT 2")
        .output_mode(OutputMode::Update)
        .memory_sink("nope")
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("complete"), "{err}");
    engine.stop_all().await.unwrap();
}

const WINDOWED: &str = "SELECT window.start AS ws, window.end AS we, symbol, sum(amount) AS shares \
                        FROM orders GROUP BY window(time, '10 minutes'), symbol";

/// Three files for the watermark tests (delay 10 s, 10-minute windows):
/// a.csv: max 20:05:00, watermark after it 20:04:50 (closes nothing)
/// b.csv: max 20:12:00, watermark after it 20:11:50 (closes [20:00, 20:10))
/// c.csv: max 20:25:00 plus a late 20:05:00 row, watermark after it 20:24:50 (closes [20:10, 20:20))
fn write_watermark_file(input: &Path, n: usize) {
    match n {
        0 => put(
            input,
            "a.csv",
            &[
                order("20:01:00", 1, "AAPL", 10, 1.0, "B"),
                order("20:05:00", 2, "AAPL", 5, 1.0, "B"),
                order("20:03:00", 3, "MSFT", 2, 1.0, "S"),
            ],
        ),
        1 => put(input, "b.csv", &[order("20:12:00", 4, "AAPL", 1, 1.0, "B")]),
        _ => put(
            input,
            "c.csv",
            &[
                order("20:05:00", 5, "AAPL", 100, 1.0, "B"),
                order("20:25:00", 6, "MSFT", 4, 1.0, "S"),
            ],
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_mode_emits_each_window_once_after_the_watermark_passes_it() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    engine.execute(&source_ddl(&input, true)).await.unwrap();
    let (query, log) = start_logged(&engine, WINDOWED, OutputMode::Append).await;

    write_watermark_file(&input, 0);
    query.process_all_available().await.unwrap();
    // Batch 0 reads a.csv and moves the watermark to 20:04:50. No window has
    // ended by then, so no batch without input follows.
    assert_eq!(take_log(&log), vec![(0, vec![])]);

    write_watermark_file(&input, 1);
    query.process_all_available().await.unwrap();
    // Batch 1 reads b.csv (the watermark it runs with is still 20:04:50), then
    // batch 2 runs without input with 20:11:50 and closes [20:00, 20:10).
    assert_eq!(
        take_log(&log),
        vec![
            (1, vec![]),
            (
                2,
                rows(&[
                    &["2016-03-22T20:00:00", "2016-03-22T20:10:00", "AAPL", "15"],
                    &["2016-03-22T20:00:00", "2016-03-22T20:10:00", "MSFT", "2"],
                ])
            ),
        ]
    );

    write_watermark_file(&input, 2);
    query.process_all_available().await.unwrap();
    // The 20:05:00 row is late (its window ended at 20:10:00 <= 20:11:50): dropped,
    // so [20:00, 20:10) is not emitted again. [20:10, 20:20) closes in batch 4.
    assert_eq!(
        take_log(&log),
        vec![
            (3, vec![]),
            (
                4,
                rows(&[&["2016-03-22T20:10:00", "2016-03-22T20:20:00", "AAPL", "1"]])
            ),
        ]
    );

    let progress = query.recent_progress();
    assert_eq!(
        progress.iter().map(|p| p.batch_id).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );
    assert_eq!(
        progress
            .iter()
            .map(|p| p.num_input_rows)
            .collect::<Vec<_>>(),
        vec![3, 1, 0, 2, 0]
    );
    assert_eq!(
        progress.iter().map(|p| p.num_late_rows).collect::<Vec<_>>(),
        vec![0, 0, 0, 1, 0]
    );
    assert_eq!(
        progress
            .iter()
            .map(|p| p.sink.num_output_rows)
            .collect::<Vec<_>>(),
        vec![0, 0, 2, 0, 1]
    );
    let watermarks: Vec<Option<String>> = progress
        .iter()
        .map(|p| p.event_time.watermark.clone())
        .collect();
    let wm = |s: &str| Some(format!("2016-03-22T{s}.000Z"));
    assert_eq!(
        watermarks,
        vec![
            wm("20:04:50"),
            wm("20:11:50"),
            wm("20:11:50"),
            wm("20:24:50"),
            wm("20:24:50")
        ]
    );
    // State: [20:00) AAPL, MSFT; + [20:10) AAPL; evict [20:00); + [20:20) MSFT; evict [20:10).
    let state: Vec<u64> = progress
        .iter()
        .map(|p| p.state_operators[0].num_rows_total)
        .collect();
    assert_eq!(state, vec![2, 3, 1, 2, 1]);
    query.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_aggregation_without_a_watermark_is_rejected() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let script = format!(
        "{} CREATE EXTERNAL TABLE out STORED AS MEMORY LOCATION 'out' OPTIONS ('outputMode' 'append');
         INSERT INTO out {BY_SYMBOL};",
        source_ddl(&input, false)
    );
    let err = engine.execute(&script).await.unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("watermark"),
        "{err}"
    );

    // Also through the Rust API, and also with a windowed aggregation.
    let err = engine
        .query(WINDOWED)
        .output_mode(OutputMode::Append)
        .memory_sink("out2")
        .start()
        .await
        .unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("watermark"),
        "{err}"
    );
    assert!(engine.queries().is_empty());
}

/// A script's queries are planned side by side, but the error reported is
/// that of the first failing statement, the queries before it run, and what
/// the script declared after it is not kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_fails_at_its_first_bad_statement_and_runs_those_before() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let script = format!(
        "{}
         CREATE EXTERNAL TABLE ids STORED AS MEMORY LOCATION 'ids';
         INSERT INTO ids SELECT order_id FROM orders;
         CREATE EXTERNAL TABLE out STORED AS MEMORY LOCATION 'out' OPTIONS ('outputMode' 'append');
         INSERT INTO out {BY_SYMBOL};
         CREATE EXTERNAL TABLE later STORED AS MEMORY LOCATION 'later';
         INSERT INTO nowhere SELECT order_id FROM orders;
         INSERT INTO ids SELECT no_such_column FROM orders;",
        source_ddl(&input, false)
    );
    let err = engine.execute(&script).await.unwrap_err().to_string();
    assert!(
        err.starts_with("SQL error: statement 5: ") && err.contains("watermark"),
        "{err}"
    );
    let started = engine.queries();
    assert_eq!(started.len(), 1);
    // What the script declared after the failing statement was taken back.
    let err = engine
        .execute("INSERT INTO later SELECT order_id FROM orders;")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no sink table 'later'"), "{err}");
    put(
        &input,
        "a.csv",
        &[order("20:00:01", 7, "aapl", 10, 1.5, "B")],
    );
    started[0].process_all_available().await.unwrap();
    let ids = table(&engine.sql("SELECT order_id FROM ids").await.unwrap());
    assert_eq!(ids, rows(&[&["7"]]));
    started[0].stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateless_query_appends_each_batch_rows() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let script = format!(
        "{} CREATE EXTERNAL TABLE buys STORED AS MEMORY LOCATION 'buys';
         INSERT INTO buys SELECT order_id, upper(symbol) AS sym, amount * price AS notional
           FROM orders WHERE buy_sell = 'B';",
        source_ddl(&input, true)
    );
    let queries = engine.execute(&script).await.unwrap();
    let query = &queries[0];
    assert_eq!(query.output_mode(), OutputMode::Append);
    let snapshot = || async {
        table(
            &engine
                .sql("SELECT order_id, sym, notional FROM buys ORDER BY order_id")
                .await
                .unwrap(),
        )
    };

    put(
        &input,
        "a.csv",
        &[
            order("20:00:01", 1, "aapl", 10, 1.5, "B"),
            order("20:00:02", 2, "msft", 5, 2.0, "S"),
            order("20:00:03", 3, "goog", 4, 0.25, "B"),
        ],
    );
    query.process_all_available().await.unwrap();
    assert_eq!(
        snapshot().await,
        rows(&[&["1", "AAPL", "15.0"], &["3", "GOOG", "1.0"]])
    );

    put(
        &input,
        "b.csv",
        &[
            order("20:00:04", 4, "ibm", 2, 3.0, "B"),
            order("20:00:05", 5, "ibm", 9, 9.0, "S"),
        ],
    );
    query.process_all_available().await.unwrap();
    assert_eq!(
        snapshot().await,
        rows(&[
            &["1", "AAPL", "15.0"],
            &["3", "GOOG", "1.0"],
            &["4", "IBM", "6.0"]
        ])
    );
    let progress = query.recent_progress();
    // No state, so a watermark move does not add no-data batches.
    assert_eq!(progress.len(), 2);
    assert_eq!(
        progress
            .iter()
            .map(|p| p.num_input_rows)
            .collect::<Vec<_>>(),
        vec![3, 2]
    );
    assert_eq!(
        progress
            .iter()
            .map(|p| p.sink.num_output_rows)
            .collect::<Vec<_>>(),
        vec![2, 1]
    );
    assert!(progress.iter().all(|p| p.state_operators.is_empty()));

    // A stateless query cannot run in complete mode.
    let err = engine
        .query("SELECT order_id FROM orders")
        .output_mode(OutputMode::Complete)
        .memory_sink("nope")
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("complete"), "{err}");
    query.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_mode_state_shrinks_after_eviction() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    engine.execute(&source_ddl(&input, true)).await.unwrap();
    let (query, log) = start_logged(&engine, WINDOWED, OutputMode::Update).await;

    write_watermark_file(&input, 0);
    query.process_all_available().await.unwrap();
    write_watermark_file(&input, 1);
    query.process_all_available().await.unwrap();
    let progress = query.last_progress().unwrap();
    assert_eq!(progress.batch_id, 2);
    assert_eq!(
        progress.state_operators[0].num_rows_total, 1,
        "[20:00, 20:10) was evicted"
    );
    assert_eq!(progress.state_operators[0].num_rows_removed, 2);

    write_watermark_file(&input, 2);
    query.process_all_available().await.unwrap();

    let state: Vec<u64> = query
        .recent_progress()
        .iter()
        .map(|p| p.state_operators[0].num_rows_total)
        .collect();
    assert_eq!(state, vec![2, 3, 1, 2, 1]);
    let w = |s: &str, e: &str, sym: &str, n: &str| {
        vec![
            format!("2016-03-22T{s}"),
            format!("2016-03-22T{e}"),
            sym.to_string(),
            n.to_string(),
        ]
    };
    assert_eq!(
        take_log(&log),
        vec![
            (
                0,
                vec![
                    w("20:00:00", "20:10:00", "AAPL", "15"),
                    w("20:00:00", "20:10:00", "MSFT", "2")
                ]
            ),
            (1, vec![w("20:10:00", "20:20:00", "AAPL", "1")]),
            (2, vec![]),
            // The late AAPL row would have updated [20:00, 20:10): it is dropped instead.
            (3, vec![w("20:20:00", "20:30:00", "MSFT", "4")]),
            (4, vec![]),
        ]
    );
    query.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_row_is_dropped_and_counted() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let script = format!(
        "{} CREATE EXTERNAL TABLE w STORED AS MEMORY LOCATION 'w' OPTIONS ('outputMode' 'update');
         INSERT INTO w SELECT window.start AS ws, symbol, sum(amount) AS shares, count(*) AS n
           FROM orders GROUP BY window(time, '10 minutes'), symbol;",
        source_ddl(&input, true)
    );
    let queries = engine.execute(&script).await.unwrap();
    let query = &queries[0];

    put(
        &input,
        "a.csv",
        &[order("20:30:00", 1, "AAPL", 10, 1.0, "B")],
    );
    query.process_all_available().await.unwrap();
    // Watermark now 20:29:50. Two rows for [20:10, 20:20) (ended 20:20:00) and
    // one exactly at the watermark's window edge [20:20, 20:30) (ends 20:30:00, open).
    put(
        &input,
        "b.csv",
        &[
            order("20:15:00", 2, "AAPL", 1, 1.0, "B"),
            order("20:19:59", 3, "MSFT", 1, 1.0, "B"),
            order("20:29:55", 4, "AAPL", 7, 1.0, "B"),
        ],
    );
    query.process_all_available().await.unwrap();

    let progress = query.recent_progress();
    let data: Vec<_> = progress.iter().filter(|p| p.num_input_rows > 0).collect();
    assert_eq!(data.len(), 2);
    assert_eq!(data[0].num_late_rows, 0);
    assert_eq!(data[1].num_input_rows, 3);
    assert_eq!(data[1].num_late_rows, 2);
    assert_eq!(progress.iter().map(|p| p.num_late_rows).sum::<u64>(), 2);
    let got = table(
        &engine
            .sql("SELECT ws, symbol, shares, n FROM w ORDER BY ws, symbol")
            .await
            .unwrap(),
    );
    assert_eq!(
        got,
        rows(&[
            &["2016-03-22T20:20:00", "AAPL", "7", "1"],
            &["2016-03-22T20:30:00", "AAPL", "10", "1"]
        ])
    );
    query.stop().await.unwrap();
}
