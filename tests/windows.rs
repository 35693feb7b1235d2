//! Window behaviour that the .slt suite (tests/slt/windows.slt) cannot state:
//! running sums checked against sums from panes over generated input, and the
//! memory limit set through the Rust API.

mod common;
use common::*;

use std::path::Path;
use std::sync::Arc;

use brook::{Engine, StreamingQuery};

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
