//! Event-time windows end to end: boundaries, sliding membership, and
//! aggregates merged across batches, over real CSV files.

mod common;
use common::*;

use std::path::Path;

use brook::{Engine, OutputMode, StreamingQuery};
use std::sync::{Arc, Mutex};

/// Starts `INSERT INTO <table> <select>` into a memory sink in `mode`.
async fn start_memory(
    engine: &Engine,
    input: &Path,
    table: &str,
    mode: &str,
    select: &str,
) -> Arc<StreamingQuery> {
    let script = format!(
        "{} CREATE EXTERNAL TABLE {table} STORED AS MEMORY LOCATION '{table}' OPTIONS ('outputMode' '{mode}');
         INSERT INTO {table} {select};",
        source_ddl(input, true)
    );
    let mut queries = engine.execute(&script).await.unwrap();
    assert_eq!(queries.len(), 1);
    queries.remove(0)
}

fn ts(hms: &str) -> String {
    format!("2016-03-22T{hms}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_on_a_boundary_belongs_to_the_window_it_starts() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let query = start_memory(
        &engine,
        &input,
        "hourly",
        "complete",
        "SELECT window.start AS ws, window.end AS we, symbol, sum(amount) AS shares, count(*) AS n \
         FROM orders GROUP BY window(time, '1 hour'), symbol",
    )
    .await;
    put(
        &input,
        "a.csv",
        &[
            order("19:59:59", 1, "AAPL", 2, 1.0, "B"),
            order("20:00:00", 2, "AAPL", 1, 1.0, "B"),
            order("20:59:59.999", 3, "AAPL", 8, 1.0, "B"),
            order("21:00:00", 4, "AAPL", 4, 1.0, "B"),
        ],
    );
    query.process_all_available().await.unwrap();
    let got = table(
        &engine
            .sql("SELECT * FROM hourly ORDER BY ws")
            .await
            .unwrap(),
    );
    assert_eq!(
        got,
        vec![
            vec![
                ts("19:00:00"),
                ts("20:00:00"),
                "AAPL".into(),
                "2".into(),
                "1".into()
            ],
            vec![
                ts("20:00:00"),
                ts("21:00:00"),
                "AAPL".into(),
                "9".into(),
                "2".into()
            ],
            vec![
                ts("21:00:00"),
                ts("22:00:00"),
                "AAPL".into(),
                "4".into(),
                "1".into()
            ],
        ]
    );
    query.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_belongs_to_every_sliding_window_that_covers_it() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let query = start_memory(
        &engine,
        &input,
        "sliding",
        "complete",
        "SELECT window.start AS ws, window.end AS we, symbol, sum(amount) AS shares \
         FROM orders GROUP BY window(time, '1 hour', '10 minutes'), symbol",
    )
    .await;
    // 20:05 is in the windows starting 19:10 .. 20:00; 20:15 in 19:20 .. 20:10;
    // 20:20:00 exactly in 19:30 .. 20:20 (not in [19:20, 20:20), which excludes its end).
    put(
        &input,
        "a.csv",
        &[
            order("20:05:00", 1, "AAPL", 3, 1.0, "B"),
            order("20:20:00", 2, "MSFT", 2, 1.0, "S"),
        ],
    );
    query.process_all_available().await.unwrap();
    put(
        &input,
        "b.csv",
        &[order("20:15:00", 3, "AAPL", 5, 1.0, "B")],
    );
    query.process_all_available().await.unwrap();

    let got = table(
        &engine
            .sql("SELECT ws, we, symbol, shares FROM sliding ORDER BY ws, symbol")
            .await
            .unwrap(),
    );
    let w = |start: &str, end: &str, symbol: &str, shares: &str| {
        vec![ts(start), ts(end), symbol.to_string(), shares.to_string()]
    };
    assert_eq!(
        got,
        vec![
            w("19:10:00", "20:10:00", "AAPL", "3"),
            w("19:20:00", "20:20:00", "AAPL", "8"),
            w("19:30:00", "20:30:00", "AAPL", "8"),
            w("19:30:00", "20:30:00", "MSFT", "2"),
            w("19:40:00", "20:40:00", "AAPL", "8"),
            w("19:40:00", "20:40:00", "MSFT", "2"),
            w("19:50:00", "20:50:00", "AAPL", "8"),
            w("19:50:00", "20:50:00", "MSFT", "2"),
            w("20:00:00", "21:00:00", "AAPL", "8"),
            w("20:00:00", "21:00:00", "MSFT", "2"),
            w("20:10:00", "21:10:00", "AAPL", "5"),
            w("20:10:00", "21:10:00", "MSFT", "2"),
            w("20:20:00", "21:20:00", "MSFT", "2"),
        ]
    );
    let msft: Vec<String> = got
        .iter()
        .filter(|r| r[2] == "MSFT")
        .map(|r| r[0].clone())
        .collect();
    assert_eq!(
        msft,
        [
            "19:30:00", "19:40:00", "19:50:00", "20:00:00", "20:10:00", "20:20:00"
        ]
        .map(ts)
    );
    query.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sliding_windows_drop_only_the_closed_windows_of_a_late_row() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let query = start_memory(
        &engine,
        &input,
        "slide_upd",
        "update",
        "SELECT window.start AS ws, window.end AS we, symbol, sum(amount) AS shares \
         FROM orders GROUP BY window(time, '1 hour', '10 minutes'), symbol",
    )
    .await;
    put(&input, "a.csv", &[order("20:30:00", 1, "IBM", 1, 1.0, "B")]);
    query.process_all_available().await.unwrap();
    // Watermark 20:29:50. 20:15 lies in six windows; only [19:20, 20:20) has
    // ended. 19:00 lies in six windows that all ended by 20:00.
    put(
        &input,
        "b.csv",
        &[
            order("20:15:00", 2, "AAPL", 5, 1.0, "B"),
            order("19:00:00", 3, "GOOG", 9, 1.0, "B"),
        ],
    );
    query.process_all_available().await.unwrap();

    let progress = query.recent_progress();
    let last = progress.last().unwrap();
    assert_eq!(last.num_input_rows, 2);
    assert_eq!(
        last.num_late_rows, 7,
        "row-window pairs: 1 for AAPL, 6 for GOOG"
    );
    assert_eq!(
        last.event_time.watermark.as_deref(),
        Some("2016-03-22T20:29:50.000Z")
    );
    let got = table(
        &engine
            .sql("SELECT ws, we, symbol, shares FROM slide_upd WHERE symbol <> 'IBM' ORDER BY ws")
            .await
            .unwrap(),
    );
    // Each window ends an hour after it starts: the state merged across the two
    // batches groups windows by their start and puts the end back.
    let want: Vec<Vec<String>> = [
        ("19:30:00", "20:30:00"),
        ("19:40:00", "20:40:00"),
        ("19:50:00", "20:50:00"),
        ("20:00:00", "21:00:00"),
        ("20:10:00", "21:10:00"),
    ]
    .iter()
    .map(|(s, e)| vec![ts(s), ts(e), "AAPL".to_string(), "5".to_string()])
    .collect();
    assert_eq!(got, want);
    let ibm = table(
        &engine
            .sql("SELECT ws FROM slide_upd WHERE symbol = 'IBM' ORDER BY ws")
            .await
            .unwrap(),
    );
    let want: Vec<Vec<String>> = [
        "19:40:00", "19:50:00", "20:00:00", "20:10:00", "20:20:00", "20:30:00",
    ]
    .iter()
    .map(|s| vec![ts(s)])
    .collect();
    assert_eq!(ibm, want);
    query.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_avg_min_max_merge_across_batches() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let query = start_memory(
        &engine,
        &input,
        "stats",
        "complete",
        "SELECT window.start AS ws, symbol, count(*) AS n, sum(amount) AS shares, avg(price) AS avg_price, \
         min(price) AS lo, max(price) AS hi FROM orders GROUP BY window(time, '1 hour'), symbol",
    )
    .await;
    let snapshot = || async {
        table(
            &engine
                .sql("SELECT * FROM stats ORDER BY ws, symbol")
                .await
                .unwrap(),
        )
    };
    let r = |start: &str, sym: &str, n: &str, shares: &str, avg: &str, lo: &str, hi: &str| {
        vec![
            ts(start),
            sym.to_string(),
            n.into(),
            shares.into(),
            avg.into(),
            lo.into(),
            hi.into(),
        ]
    };

    put(
        &input,
        "a.csv",
        &[
            order("20:10:00", 1, "AAPL", 10, 10.0, "B"),
            order("20:20:00", 2, "MSFT", 5, 100.0, "S"),
        ],
    );
    query.process_all_available().await.unwrap();
    assert_eq!(
        snapshot().await,
        vec![
            r("20:00:00", "AAPL", "1", "10", "10.0", "10.0", "10.0"),
            r("20:00:00", "MSFT", "1", "5", "100.0", "100.0", "100.0"),
        ]
    );

    put(
        &input,
        "b.csv",
        &[
            order("20:30:00", 3, "AAPL", 20, 20.0, "B"),
            order("21:05:00", 4, "AAPL", 1, 7.0, "B"),
        ],
    );
    query.process_all_available().await.unwrap();
    assert_eq!(
        snapshot().await,
        vec![
            r("20:00:00", "AAPL", "2", "30", "15.0", "10.0", "20.0"),
            r("20:00:00", "MSFT", "1", "5", "100.0", "100.0", "100.0"),
            r("21:00:00", "AAPL", "1", "1", "7.0", "7.0", "7.0"),
        ]
    );

    put(
        &input,
        "c.csv",
        &[
            order("20:40:00", 5, "AAPL", 30, 30.5, "B"),
            order("20:50:00", 6, "AAPL", 40, 15.5, "S"),
            order("20:55:00", 7, "MSFT", 5, 50.0, "S"),
        ],
    );
    query.process_all_available().await.unwrap();
    // AAPL 20:00: prices 10, 20, 30.5, 15.5 -> avg 76 / 4 = 19; MSFT: (100 + 50) / 2 = 75.
    assert_eq!(
        snapshot().await,
        vec![
            r("20:00:00", "AAPL", "4", "100", "19.0", "10.0", "30.5"),
            r("20:00:00", "MSFT", "2", "10", "75.0", "50.0", "100.0"),
            r("21:00:00", "AAPL", "1", "1", "7.0", "7.0", "7.0"),
        ]
    );
    assert_eq!(
        query.last_progress().unwrap().state_operators[0].num_rows_total,
        3
    );
    query.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windowed_averages_in_append_mode_match_across_batches() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    engine.execute(&source_ddl(&input, true)).await.unwrap();
    let emitted: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
    let sink = emitted.clone();
    let query = engine
        .query(
            "SELECT window.start AS ws, count(*) AS n, avg(price) AS avg_price, min(amount) AS lo, \
             max(amount) AS hi FROM orders GROUP BY window(time, '10 minutes')",
        )
        .output_mode(OutputMode::Append)
        .foreach_batch(move |_, batches| {
            sink.lock().unwrap().extend(table(batches));
            Ok(())
        })
        .start()
        .await
        .unwrap();
    put(
        &input,
        "a.csv",
        &[
            order("20:01:00", 1, "AAPL", 4, 2.0, "B"),
            order("20:02:00", 2, "MSFT", 9, 4.0, "B"),
        ],
    );
    query.process_all_available().await.unwrap();
    put(
        &input,
        "b.csv",
        &[
            order("20:09:59", 3, "AAPL", 1, 6.0, "B"),
            order("20:10:00", 4, "AAPL", 3, 8.0, "B"),
        ],
    );
    query.process_all_available().await.unwrap();
    assert!(
        emitted.lock().unwrap().is_empty(),
        "watermark 20:09:50 closes nothing"
    );
    put(
        &input,
        "c.csv",
        &[order("20:10:10", 5, "AAPL", 5, 1.0, "B")],
    );
    query.process_all_available().await.unwrap();
    // Watermark 20:10:00 = end of [20:00, 20:10): closed, emitted once.
    assert_eq!(
        *emitted.lock().unwrap(),
        vec![vec![
            ts("20:00:00"),
            "3".into(),
            "4.0".into(),
            "1".into(),
            "9".into()
        ]]
    );
    query.stop().await.unwrap();
}

/// Append mode keeps sliding-window state per pane: late row-window pairs are
/// counted as in update mode, each window is emitted once when it closes, and
/// a row's closed windows stay out of the windows emitted later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sliding_windows_in_append_mode_are_emitted_once_from_panes() {
    append_mode_panes(false).await;
}

/// The same when the late rows come in the batch right after the one that moved
/// the watermark, with no batch without input between them to close windows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_closing_in_the_batch_of_its_late_rows_leaves_them_out() {
    append_mode_panes(true).await;
}

async fn append_mode_panes(together: bool) {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let a = [order("20:30:00", 1, "IBM", 1, 1.0, "B")];
    // With the watermark at 20:29:50, of AAPL's six windows only [19:20, 20:20)
    // has closed (and is emitted without it); all six of GOOG's have.
    let b = [
        order("20:15:00", 2, "AAPL", 5, 1.0, "B"),
        order("20:16:00", 3, "AAPL", 2, 1.0, "B"),
        order("19:00:00", 4, "GOOG", 9, 1.0, "B"),
    ];
    if together {
        // Both files wait when the query starts; it reads one per batch.
        put(&input, "a.csv", &a);
        put(&input, "b.csv", &b);
    }
    let query = start_memory(
        &engine,
        &input,
        "slide_app",
        "append",
        "SELECT window.start AS ws, symbol, sum(amount) AS shares \
         FROM orders GROUP BY window(time, '1 hour', '10 minutes'), symbol",
    )
    .await;
    if !together {
        put(&input, "a.csv", &a);
        query.process_all_available().await.unwrap();
        // Watermark 20:29:50 closes none of IBM's windows (the first ends at
        // 20:40), so no batch without input runs.
        assert_eq!(query.recent_progress().len(), 1);
        put(&input, "b.csv", &b);
    }
    query.process_all_available().await.unwrap();
    let late: u64 = query
        .recent_progress()
        .iter()
        .map(|p| p.num_late_rows)
        .sum();
    assert_eq!(late, 8, "row-window pairs: 1 for each AAPL row, 6 for GOOG");

    // Watermark 21:39:50 closes every window of these rows.
    put(
        &input,
        "c.csv",
        &[order("21:40:00", 5, "MSFT", 3, 1.0, "B")],
    );
    query.process_all_available().await.unwrap();
    // Watermark 21:59:50 emits none of their windows again.
    put(
        &input,
        "d.csv",
        &[order("22:00:00", 6, "MSFT", 4, 1.0, "B")],
    );
    query.process_all_available().await.unwrap();
    // Watermark 21:59:55 closes no window that was not emitted already ([21:00,
    // 22:00) ends after it), though the 21:40 pane's first windows have closed:
    // no batch without input runs.
    let batches = query.recent_progress().len();
    put(
        &input,
        "e.csv",
        &[order("22:00:05", 7, "MSFT", 1, 1.0, "B")],
    );
    query.process_all_available().await.unwrap();
    assert_eq!(query.recent_progress().len(), batches + 1);

    let got = table(
        &engine
            .sql("SELECT ws, symbol, shares FROM slide_app ORDER BY symbol, ws")
            .await
            .unwrap(),
    );
    let mut want: Vec<Vec<String>> = ["19:30:00", "19:40:00", "19:50:00", "20:00:00", "20:10:00"]
        .iter()
        .map(|s| vec![ts(s), "AAPL".to_string(), "7".to_string()])
        .collect();
    want.extend(
        [
            "19:40:00", "19:50:00", "20:00:00", "20:10:00", "20:20:00", "20:30:00",
        ]
        .iter()
        .map(|s| vec![ts(s), "IBM".to_string(), "1".to_string()]),
    );
    // [20:50, 21:50) is MSFT's only window the last watermark closed.
    want.push(vec![ts("20:50:00"), "MSFT".to_string(), "3".to_string()]);
    assert_eq!(got, want);
}

/// Sums of NOT NULL integers slide from one window to the next (less the pane
/// that leaves, plus the pane that enters); sums that may be null are summed
/// from their panes. Both give the same windows, late rows included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_window_sums_equal_sums_from_panes() {
    let (_tmp, input) = tmp_source();
    for i in 0..45i64 {
        let mut lines = vec![];
        for j in 0..24i64 {
            let minute = i * 4 + j / 6;
            let time = format!(
                "{:02}:{:02}:{:02}",
                20 + minute / 60,
                minute % 60,
                (j % 6) * 10
            );
            let symbol = ["AAPL", "GOOG", "IBM", "MSFT"][((i + j) % 4) as usize];
            lines.push(order(
                &time,
                i * 100 + j,
                symbol,
                (1 + (i * j) % 9) as i32,
                1.0,
                "B",
            ));
        }
        if i % 7 == 6 && i > 12 {
            // Late: its hour-long windows that ended before the watermark are closed.
            let minute = i * 4 - 50;
            let time = format!("{:02}:{:02}:00", 20 + minute / 60, minute % 60);
            lines.push(order(&time, i * 100 + 99, "LATE", 5, 1.0, "S"));
        }
        put(&input, &format!("{i:03}.csv"), &lines);
    }
    // Jumps of the watermark over empty hours: 3 hours (windows closed one after
    // another across the gap), then 12 (a backlog summed from panes at once).
    for (name, time) in [("100.csv", "02:00:00"), ("101.csv", "14:30:00")] {
        let line = format!("2016-03-23 {time},9999,1,AAPL,3,1.0,B");
        put(&input, name, &[line]);
    }
    let mut results = vec![];
    for amount in ["INT NOT NULL", "INT"] {
        let engine = Engine::new();
        let script = format!(
            "CREATE UNBOUNDED EXTERNAL TABLE orders (time TIMESTAMP NOT NULL, order_id BIGINT, \
             client_id BIGINT, symbol VARCHAR, amount {amount}, price DOUBLE, buy_sell VARCHAR, \
             WATERMARK FOR time AS time - INTERVAL '10' SECOND) STORED AS CSV LOCATION '{}' \
             OPTIONS ('maxFilesPerTrigger' '1');
             CREATE EXTERNAL TABLE w STORED AS MEMORY LOCATION 'w' OPTIONS ('outputMode' 'append');
             INSERT INTO w SELECT window.start AS ws, symbol, sum(amount) AS shares, count(*) AS n,
               avg(amount) AS mean
             FROM orders GROUP BY window(time, '1 hour', '10 minutes'), symbol;",
            input.display()
        );
        let query = engine.execute(&script).await.unwrap().remove(0);
        query.process_all_available().await.unwrap();
        let late: u64 = query
            .recent_progress()
            .iter()
            .map(|p| p.num_late_rows)
            .sum();
        results.push((
            sorted(table(&engine.sql("SELECT * FROM w").await.unwrap())),
            late,
        ));
        query.stop().await.unwrap();
    }
    let (running, late) = &results[0];
    assert!(running.len() > 60, "{} windows", running.len());
    assert!(*late > 0, "some rows came late");
    assert!(
        running.iter().any(|r| r[1] == "LATE"),
        "the late rows' open windows count them"
    );
    assert_eq!(results[0], results[1]);
}

/// A sum that may be null is summed from its panes: a window whose amounts are
/// all null sums to NULL, not to the 0 that subtracting would leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_of_null_amounts_sums_to_null() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::new();
    let query = start_memory(
        &engine,
        &input,
        "nullable",
        "append",
        "SELECT window.start AS ws, symbol, sum(amount) AS shares, count(*) AS n \
         FROM orders GROUP BY window(time, '20 minutes', '10 minutes'), symbol",
    )
    .await;
    put(&input, "a.csv", &[order("20:05:00", 1, "IBM", 4, 1.0, "B")]);
    put(
        &input,
        "b.csv",
        &["2016-03-22 20:15:00,2,102,IBM,,1.0,B".to_string()],
    );
    put(
        &input,
        "c.csv",
        &[order("21:00:00", 3, "MSFT", 1, 1.0, "B")],
    );
    query.process_all_available().await.unwrap();
    let got = table(
        &engine
            .sql("SELECT ws, symbol, shares, n FROM nullable WHERE symbol = 'IBM' ORDER BY ws")
            .await
            .unwrap(),
    );
    assert_eq!(
        got,
        rows(&[
            &[&ts("19:50:00"), "IBM", "4", "1"],
            &[&ts("20:00:00"), "IBM", "4", "2"],
            &[&ts("20:10:00"), "IBM", "NULL", "1"],
        ])
    );
    query.stop().await.unwrap();
}

/// A window sliding far more often than it is long copies each row into every
/// window it belongs to: the copies are taken from the engine's memory pool
/// first, so a query that needs more fails naming them instead of aborting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sliding_window_past_the_memory_limit_fails_the_query() {
    let (_tmp, input) = tmp_source();
    let engine = Engine::with_overrides(brook::Overrides {
        memory_limit: Some(1 << 20),
        ..brook::Overrides::default()
    });
    let query = start_memory(
        &engine,
        &input,
        "daily",
        "update",
        "SELECT window.start AS ws, symbol, sum(amount) AS shares \
         FROM orders GROUP BY window(time, '1 day', '1 second'), symbol",
    )
    .await;
    put(
        &input,
        "a.csv",
        &[
            order("20:00:00", 1, "AAPL", 2, 1.0, "B"),
            order("20:00:01", 2, "MSFT", 1, 1.0, "B"),
        ],
    );
    let error = query.process_all_available().await.unwrap_err().to_string();
    assert!(
        error.contains("(86400 windows of 86400s every 1s): ")
            && error.contains(" rows in this batch")
            && error.contains("Failed to allocate additional")
            && error.contains("for window expansion"),
        "{error}"
    );

    // Under the limit the same windows are computed: every row in 86,400 of them.
    let engine = Engine::new();
    let query = start_memory(
        &engine,
        &input,
        "daily",
        "update",
        "SELECT window.start AS ws, symbol, sum(amount) AS shares \
         FROM orders GROUP BY window(time, '1 day', '1 second'), symbol",
    )
    .await;
    query.process_all_available().await.unwrap();
    let got = table(
        &engine
            .sql("SELECT symbol, count(*), sum(shares) FROM daily GROUP BY symbol ORDER BY symbol")
            .await
            .unwrap(),
    );
    assert_eq!(
        got,
        rows(&[&["AAPL", "86400", "172800"], &["MSFT", "86400", "86400"]])
    );
}
