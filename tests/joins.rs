//! Streams joined with static tables, checked against DataFusion's batch answer
//! over the same files, and a static table registered from Rust.

mod common;

use std::sync::Arc;

use brook::Engine;
use brook::datafusion::arrow::array::{Int64Array, RecordBatch, StringArray};
use brook::datafusion::arrow::datatypes::{DataType, Field, Schema};
use brook::datafusion::datasource::MemTable;
use brook::datafusion::prelude::SessionContext;
use brook::orders::{GeneratorConfig, OrderGenerator};
use chrono::{NaiveDate, TimeDelta};
use common::{put, run_checkpointed, sorted, table};

/// Generated orders in three files under `dir/orders`, and a symbols table
/// under `dir/symbols` giving a sector to the symbols from A to S (those from
/// T on have none, so that inner and outer joins differ).
fn write_inputs(dir: &std::path::Path) {
    let orders = dir.join("orders");
    let symbols = dir.join("symbols");
    std::fs::create_dir_all(&orders).unwrap();
    std::fs::create_dir_all(&symbols).unwrap();
    let mut generator = OrderGenerator::new(GeneratorConfig {
        symbols: 100,
        ..GeneratorConfig::default()
    });
    let start = NaiveDate::from_ymd_opt(2016, 3, 22)
        .unwrap()
        .and_hms_opt(20, 0, 0)
        .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for file in 0..3 {
        let lines: Vec<String> = (0..1000)
            .map(|i| generator.line(start + TimeDelta::milliseconds((file * 1000 + i) * 97)))
            .collect();
        for l in &lines {
            seen.insert(l.split(',').nth(3).unwrap().to_string());
        }
        put(&orders, &format!("part-{file}.csv"), &lines);
    }
    let mut rows = vec!["symbol,sector".to_string()];
    for s in seen {
        let sector = match s.as_bytes()[0] {
            b'A'..=b'F' => "Energy",
            b'G'..=b'M' => "Financials",
            b'N'..=b'S' => "Health Care",
            _ => continue,
        };
        rows.push(format!("{s},{sector}"));
    }
    put(&symbols, "symbols.csv", &rows);
}

const COLUMNS: &str = "time TIMESTAMP NOT NULL, order_id BIGINT, client_id BIGINT, symbol VARCHAR, \
                       amount INT, price DOUBLE, buy_sell VARCHAR";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_under_windowed_aggregate_matches_datafusion_batch() {
    let dir = tempfile::tempdir().unwrap();
    write_inputs(dir.path());
    let d = dir.path().display();
    let engine = Engine::new();
    let queries = engine
        .execute(&format!(
            "CREATE UNBOUNDED EXTERNAL TABLE orders ({COLUMNS}, \
               WATERMARK FOR time AS time - INTERVAL '10' SECOND) \
             STORED AS CSV LOCATION '{d}/orders' OPTIONS ('maxFilesPerTrigger' '1');
             CREATE EXTERNAL TABLE symbols (symbol VARCHAR, sector VARCHAR) \
             STORED AS CSV LOCATION '{d}/symbols';
             CREATE EXTERNAL TABLE inner_out STORED AS MEMORY LOCATION 'inner_out' \
               OPTIONS ('outputMode' 'complete');
             CREATE EXTERNAL TABLE left_out STORED AS MEMORY LOCATION 'left_out' \
               OPTIONS ('outputMode' 'complete');
             INSERT INTO inner_out SELECT s.sector, window.start AS minute, sum(o.amount) AS shares, \
               count(*) AS n FROM orders o JOIN symbols s ON o.symbol = s.symbol \
               GROUP BY s.sector, window(o.time, '1 minute');
             INSERT INTO left_out SELECT s.sector, window.start AS minute, sum(o.amount) AS shares, \
               count(*) AS n FROM orders o LEFT JOIN symbols s ON o.symbol = s.symbol \
               GROUP BY s.sector, window(o.time, '1 minute');"
        ))
        .await
        .unwrap();
    for q in &queries {
        q.process_all_available().await.unwrap();
    }
    assert_eq!(queries[0].recent_progress().len(), 3, "one batch per file");

    let batch = SessionContext::new();
    batch
        .sql(&format!(
            "CREATE EXTERNAL TABLE orders ({COLUMNS}) STORED AS CSV LOCATION '{d}/orders' \
             OPTIONS ('format.has_header' 'false')"
        ))
        .await
        .unwrap();
    batch
        .sql(&format!(
            "CREATE EXTERNAL TABLE symbols (symbol VARCHAR, sector VARCHAR) STORED AS CSV \
             LOCATION '{d}/symbols' OPTIONS ('format.has_header' 'true')"
        ))
        .await
        .unwrap();
    for (join, out) in [("JOIN", "inner_out"), ("LEFT JOIN", "left_out")] {
        let expected: Vec<RecordBatch> = batch
            .sql(&format!(
                "SELECT s.sector, date_bin(INTERVAL '1 minute', o.time) AS minute, \
                   sum(o.amount) AS shares, count(*) AS n \
                 FROM orders o {join} symbols s ON o.symbol = s.symbol GROUP BY 1, 2"
            ))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let got = engine.sql(&format!("SELECT * FROM {out}")).await.unwrap();
        let expected = sorted(table(&expected));
        assert!(expected.len() > 10, "{expected:?}");
        assert_eq!(sorted(table(&got)), expected, "{join}");
    }
    // The outer join keeps the orders of symbols without a sector.
    let unmatched = engine
        .sql("SELECT sum(n) FROM left_out WHERE sector IS NULL")
        .await
        .unwrap();
    assert_ne!(table(&unmatched), vec![vec!["NULL".to_string()]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_registered_from_rust_is_a_static_table() {
    let dir = tempfile::tempdir().unwrap();
    let orders = dir.path().join("orders");
    std::fs::create_dir(&orders).unwrap();
    let engine = Engine::new();
    let schema = Arc::new(Schema::new(vec![
        Field::new("symbol", DataType::Utf8, false),
        Field::new("lot", DataType::Int64, false),
    ]));
    let lots = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(vec!["AAPL", "XOM"])),
            Arc::new(Int64Array::from(vec![100, 10])),
        ],
    )
    .unwrap();
    engine
        .register_table(
            "Lots",
            Arc::new(MemTable::try_new(schema, vec![vec![lots]]).unwrap()),
        )
        .unwrap();
    let q = engine
        .execute(&format!(
            "{}
             CREATE EXTERNAL TABLE out STORED AS MEMORY LOCATION 'out';
             INSERT INTO out SELECT o.order_id, o.amount * l.lot AS shares \
               FROM orders o JOIN LOTS l ON o.symbol = l.symbol;",
            common::source_ddl(&orders, false)
        ))
        .await
        .unwrap()
        .remove(0);
    put(
        &orders,
        "a",
        &[
            common::order("20:00:00", 1, "AAPL", 2, 1.0, "B"),
            common::order("20:00:01", 2, "MSFT", 3, 1.0, "B"),
            common::order("20:00:02", 3, "XOM", 4, 1.0, "S"),
        ],
    );
    q.process_all_available().await.unwrap();
    let got = engine.sql("SELECT * FROM out").await.unwrap();
    assert_eq!(
        sorted(table(&got)),
        common::rows(&[&["1", "200"], &["3", "40"]])
    );
}

/// `queries/volume_per_sector.sql` over generated orders, against a recount in
/// plain Rust with the sectors of `queries/symbols.csv`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sector_query_matches_a_recount() {
    use brook::cli::demo::demo_sql;
    use brook::orders::{SYMBOLS_CSV, TIME_FORMAT};
    use chrono::NaiveDateTime;
    use std::collections::{BTreeMap, HashMap};

    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("orders");
    std::fs::create_dir(&input).unwrap();
    // More symbols than the book's 80: the made-up ones are 'Unlisted'.
    let mut generator = OrderGenerator::new(GeneratorConfig {
        symbols: 100,
        malformed: 0.01,
        seed: 3,
        ..GeneratorConfig::default()
    });
    let start = NaiveDateTime::parse_from_str("2016-03-22 20:25:28", TIME_FORMAT).unwrap();
    let lines: Vec<String> = (0..12_000)
        .map(|i| generator.line(start + TimeDelta::milliseconds(i * 50)))
        .collect();
    let sql = demo_sql(
        include_str!("../queries/volume_per_sector.sql"),
        &input.display().to_string(),
        concat!(env!("CARGO_MANIFEST_DIR"), "/queries/symbols.csv"),
        "volume_per_sector",
    );
    let engine = Engine::new();
    let q = engine.execute(&sql).await.unwrap().remove(0);
    for (n, chunk) in lines.chunks(3_000).enumerate() {
        put(&input, &format!("orders-{n}.csv"), chunk);
        q.process_all_available().await.unwrap();
    }

    let sectors: HashMap<&str, &str> = SYMBOLS_CSV
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0], f[1])
        })
        .collect();
    let mut expected: BTreeMap<(String, String), (i64, i64)> = BTreeMap::new();
    let mut parsed = vec![];
    for l in &lines {
        let f: Vec<&str> = l.split(',').collect();
        let (Ok(time), true) = (
            NaiveDateTime::parse_from_str(f[0], TIME_FORMAT),
            f.len() == 7 && f[4].parse::<i64>().is_ok() && f[5].parse::<f64>().is_ok(),
        ) else {
            continue;
        };
        let t = time.and_utc().timestamp();
        parsed.push((t, f[3].to_string(), f[4].parse::<i64>().unwrap()));
    }
    // The lines' times only grow: no order is late.
    for (t, symbol, amount) in parsed {
        let minute = t - t.rem_euclid(60);
        let key = (
            chrono::DateTime::from_timestamp(minute, 0)
                .unwrap()
                .naive_utc()
                .format("%Y-%m-%dT%H:%M:%S")
                .to_string(),
            sectors
                .get(symbol.as_str())
                .unwrap_or(&"Unlisted")
                .to_string(),
        );
        let e = expected.entry(key).or_default();
        e.0 += 1;
        e.1 += amount;
    }
    let expected: Vec<Vec<String>> = expected
        .into_iter()
        .map(|((m, s), (n, shares))| vec![m, s, n.to_string(), shares.to_string()])
        .collect();
    assert!(expected.iter().any(|r| r[1] == "Unlisted"));
    assert!(expected.iter().any(|r| r[1] == "Energy"));
    // Update mode emitted each (minute, sector) as its counts grew: the last
    // row of each is the one with the most orders.
    let got = engine.sql("SELECT * FROM volume_per_sector").await.unwrap();
    let mut last: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for row in table(&got) {
        let key = (row[0].clone(), row[1].clone());
        let n: i64 = row[2].parse().unwrap();
        if last
            .get(&key)
            .is_none_or(|r| r[2].parse::<i64>().unwrap() < n)
        {
            last.insert(key, row);
        }
    }
    assert!(got.iter().map(|b| b.num_rows()).sum::<usize>() > last.len());
    assert_eq!(last.into_values().collect::<Vec<_>>(), expected);
}

/// Orders placed and filled, files `files` of 100 orders each per stream, one
/// order a second: each order gets two fills, at pseudo-random delays of up to
/// 99 s and up to 129 s, so that some fall within a minute and some not, and
/// some land in a later file than their order.
fn write_streams(dir: &std::path::Path, files: std::ops::Range<i64>) {
    std::fs::create_dir_all(dir.join("placed")).unwrap();
    std::fs::create_dir_all(dir.join("filled")).unwrap();
    let start = NaiveDate::from_ymd_opt(2016, 3, 22)
        .unwrap()
        .and_hms_opt(20, 0, 0)
        .unwrap();
    let at = |s: i64| (start + TimeDelta::seconds(s)).format("%Y-%m-%d %H:%M:%S");
    for file in files {
        let ids = file * 100..(file + 1) * 100;
        let placed: Vec<String> = ids
            .clone()
            .map(|id| format!("{},{id},S{}", at(id), id % 7))
            .collect();
        let filled: Vec<String> = ids
            .flat_map(|id| {
                [
                    format!("{},{id},{}", at(id + (id * 37) % 100), id % 13),
                    format!("{},{id},{}", at(id + (id * 53) % 130), id % 11),
                ]
            })
            .collect();
        put(&dir.join("placed"), &format!("part-{file:02}.csv"), &placed);
        put(&dir.join("filled"), &format!("part-{file:02}.csv"), &filled);
    }
}

/// The join script with `JOIN` as `join` (an outer join, say).
fn join_script(join: &str) -> String {
    JOIN_SCRIPT.replace("JOIN filled f", &format!("{join} filled f"))
}

const JOIN_SCRIPT: &str = "
CREATE UNBOUNDED EXTERNAL TABLE placed (time TIMESTAMP NOT NULL, order_id BIGINT, symbol VARCHAR,
  WATERMARK FOR time AS time - INTERVAL '2' MINUTE)
STORED AS CSV LOCATION 'placed' OPTIONS ('maxFilesPerTrigger' '1');
CREATE UNBOUNDED EXTERNAL TABLE filled (time TIMESTAMP NOT NULL, order_id BIGINT, qty BIGINT,
  WATERMARK FOR time AS time - INTERVAL '2' MINUTE)
STORED AS CSV LOCATION 'filled' OPTIONS ('maxFilesPerTrigger' '1');
CREATE EXTERNAL TABLE fills STORED AS PARQUET LOCATION 'out';
INSERT INTO fills
SELECT o.order_id, o.symbol, f.qty, o.time AS placed_at, f.time AS filled_at
FROM placed o JOIN filled f
  ON o.order_id = f.order_id AND f.time >= o.time AND f.time <= o.time + INTERVAL '1' MINUTE;
";

/// Runs the join script in `dir` with the CLI until the input is used up, with
/// a checkpoint; its progress records.
fn run_join(dir: &std::path::Path) -> Vec<serde_json::Value> {
    run_script(dir, JOIN_SCRIPT)
}

fn run_script(dir: &std::path::Path, script: &str) -> Vec<serde_json::Value> {
    std::fs::write(dir.join("join.sql"), script).unwrap();
    run_checkpointed(dir, "join.sql")
}

/// Every row of the Parquet files under `dir`, sorted, and the same rows as
/// DataFusion's batch join of the input files computes them.
async fn sink_and_batch_join(dir: &std::path::Path) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
    sink_and_batch(
        dir,
        "SELECT o.order_id, o.symbol, f.qty, o.time, f.time FROM placed o JOIN filled f \
         ON o.order_id = f.order_id AND f.time BETWEEN o.time AND o.time + INTERVAL '1' MINUTE",
    )
    .await
}

/// The sink's rows under `dir`, and `batch` run by DataFusion over the input files.
async fn sink_and_batch(
    dir: &std::path::Path,
    batch: &str,
) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
    sink_columns_and_batch(
        dir,
        "SELECT order_id, symbol, qty, placed_at, filled_at FROM sink",
        batch,
    )
    .await
}

/// The rows `sink_select` reads from the sink under `dir`, and `batch` run by
/// DataFusion over the input files.
async fn sink_columns_and_batch(
    dir: &std::path::Path,
    sink_select: &str,
    batch: &str,
) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
    let ctx = SessionContext::new();
    let d = dir.display();
    ctx.sql(&format!(
        "CREATE EXTERNAL TABLE sink STORED AS PARQUET LOCATION '{d}/out/'"
    ))
    .await
    .unwrap();
    let got = ctx.sql(sink_select).await.unwrap().collect().await.unwrap();
    for (name, columns) in [
        ("placed", "time TIMESTAMP, order_id BIGINT, symbol VARCHAR"),
        ("filled", "time TIMESTAMP, order_id BIGINT, qty BIGINT"),
    ] {
        ctx.sql(&format!(
            "CREATE EXTERNAL TABLE {name} ({columns}) STORED AS CSV LOCATION '{d}/{name}/' \
             OPTIONS ('format.has_header' 'false')"
        ))
        .await
        .unwrap();
    }
    let expected = ctx.sql(batch).await.unwrap().collect().await.unwrap();
    (sorted(table(&got)), sorted(table(&expected)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_stream_join_matches_the_batch_join_with_flat_state() {
    let dir = tempfile::tempdir().unwrap();
    write_streams(dir.path(), 0..12);
    let progress = run_join(dir.path());
    // One batch per pair of files, then one without input that drops the
    // rows the last batch's watermark expired.
    assert_eq!(progress.len(), 13);
    assert_eq!(progress[12]["num_input_rows"], 0);
    let (got, expected) = sink_and_batch_join(dir.path()).await;
    // Each order has two fills; about half of them fall within the minute.
    assert!(
        expected.len() > 600 && expected.len() < 2400,
        "{}",
        expected.len()
    );
    assert_eq!(got, expected);
    // The state holds the last couple of minutes of each stream, not all of
    // it: it stops growing once the watermark moves.
    let totals: Vec<u64> = progress
        .iter()
        .map(|p| {
            let op = &p["state_operators"][0];
            assert_eq!(op["operator"], "symmetricHashJoin");
            op["num_rows_total"].as_u64().unwrap()
        })
        .collect();
    let removed: u64 = progress
        .iter()
        .map(|p| {
            p["state_operators"][0]["num_rows_removed"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert!(removed > 2000, "{removed} {totals:?}");
    assert!(
        totals[11] <= totals[4] && totals.iter().all(|t| *t < 1000) && totals[12] < totals[11],
        "{totals:?}"
    );
    assert_eq!(progress[11]["num_late_rows"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_stream_join_resumes_from_its_checkpoint_as_if_never_stopped() {
    let whole = tempfile::tempdir().unwrap();
    write_streams(whole.path(), 0..8);
    run_join(whole.path());
    // The same input, read by two runs: the first stops with rows of both
    // sides in state, which the second matches with the rows it reads.
    let split = tempfile::tempdir().unwrap();
    write_streams(split.path(), 0..3);
    let first = run_join(split.path());
    assert_eq!(first.len(), 4, "three batches, then one without input");
    assert!(
        first[3]["state_operators"][0]["num_rows_total"]
            .as_u64()
            .unwrap()
            > 0
    );
    write_streams(split.path(), 3..8);
    let second = run_join(split.path());
    assert_eq!(second.len(), 6);
    assert_eq!(second[0]["batch_id"], 4);
    let (got_whole, expected) = sink_and_batch_join(whole.path()).await;
    let (got_split, _) = sink_and_batch_join(split.path()).await;
    assert_eq!(got_whole, expected);
    assert_eq!(got_split, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_stream_left_join_pads_expired_orders_across_a_restart() {
    // Two runs, so that orders in state when the first stops, matched or not,
    // are matched or padded by the second.
    let dir = tempfile::tempdir().unwrap();
    let script = join_script("LEFT JOIN");
    write_streams(dir.path(), 0..3);
    let first = run_script(dir.path(), &script);
    write_streams(dir.path(), 3..8);
    let second = run_script(dir.path(), &script);
    let with_input = first
        .iter()
        .chain(&second)
        .filter(|p| p["num_input_rows"] != 0)
        .count();
    assert_eq!(with_input, 8, "one batch per pair of files");
    let watermark = second.last().unwrap()["event_time"]["watermark"]
        .as_str()
        .unwrap()
        .trim_end_matches('Z')
        .to_string();
    // The matched pairs, and the orders nothing matched whose minute the
    // final watermark has passed; the later ones wait in state.
    let (got, expected) = sink_and_batch(
        dir.path(),
        &format!(
            "SELECT o.order_id, o.symbol, f.qty, o.time, f.time FROM placed o LEFT JOIN filled f \
             ON o.order_id = f.order_id AND f.time BETWEEN o.time AND o.time + INTERVAL '1' MINUTE \
             WHERE f.order_id IS NOT NULL OR o.time + INTERVAL '1' MINUTE < TIMESTAMP '{watermark}'"
        ),
    )
    .await;
    let padded = expected.iter().filter(|r| r[2] == "NULL").count();
    assert!(padded > 20, "{padded}");
    assert_eq!(got, expected);
}

/// Fills per minute of their order and symbol: the join of two streams under
/// a windowed aggregation, appended as each minute closes.
const AGGREGATED_JOIN_SCRIPT: &str = "
CREATE UNBOUNDED EXTERNAL TABLE placed (time TIMESTAMP NOT NULL, order_id BIGINT, symbol VARCHAR,
  WATERMARK FOR time AS time - INTERVAL '2' MINUTE)
STORED AS CSV LOCATION 'placed' OPTIONS ('maxFilesPerTrigger' '1');
CREATE UNBOUNDED EXTERNAL TABLE filled (time TIMESTAMP NOT NULL, order_id BIGINT, qty BIGINT,
  WATERMARK FOR time AS time - INTERVAL '2' MINUTE)
STORED AS CSV LOCATION 'filled' OPTIONS ('maxFilesPerTrigger' '1');
CREATE EXTERNAL TABLE per_minute STORED AS PARQUET LOCATION 'out' OPTIONS ('outputMode' 'append');
INSERT INTO per_minute
SELECT window.start AS minute, o.symbol, count(*) AS fills, sum(f.qty) AS qty
FROM placed o JOIN filled f
  ON o.order_id = f.order_id AND f.time BETWEEN o.time AND o.time + INTERVAL '1' MINUTE
GROUP BY window(o.time, '1 minute'), o.symbol;
";

/// The aggregated join's sink under `dir`, and DataFusion's batch join and
/// GROUP BY over the input files, keeping the minutes that the aggregation's
/// watermark has closed: that of the last progress record in `progress`, held
/// back by the join's minute (an order that old may still meet its fill).
async fn sink_and_batch_aggregate(
    dir: &std::path::Path,
    progress: &[serde_json::Value],
) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
    let watermark = progress.last().unwrap()["event_time"]["watermark"]
        .as_str()
        .unwrap()
        .trim_end_matches('Z')
        .to_string();
    sink_columns_and_batch(
        dir,
        "SELECT minute, symbol, fills, qty FROM sink",
        &format!(
            "SELECT date_bin(INTERVAL '1 minute', o.time) AS minute, o.symbol, count(*), \
             sum(f.qty) FROM placed o JOIN filled f \
             ON o.order_id = f.order_id AND f.time BETWEEN o.time AND o.time + INTERVAL '1' MINUTE \
             GROUP BY 1, 2 \
             HAVING date_bin(INTERVAL '1 minute', o.time) + INTERVAL '2' MINUTE <= TIMESTAMP '{watermark}'"
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregated_stream_stream_join_matches_batch_join_and_group_by_with_flat_state() {
    let dir = tempfile::tempdir().unwrap();
    write_streams(dir.path(), 0..12);
    let progress = run_script(dir.path(), AGGREGATED_JOIN_SCRIPT);
    let with_input = progress.iter().filter(|p| p["num_input_rows"] != 0).count();
    // And batches without input that close the minutes the watermark passed.
    assert_eq!(with_input, 12, "one batch per pair of files");
    let (got, expected) = sink_and_batch_aggregate(dir.path(), &progress).await;
    // 7 symbols over the 17 minutes that closed.
    assert!(expected.len() > 100, "{}", expected.len());
    assert_eq!(got, expected);
    // Both stages' state stops growing: the join's keeps the last couple of
    // minutes of each stream, the aggregation's the minutes still open.
    let totals = |operator: &str| -> Vec<u64> {
        progress
            .iter()
            .map(|p| {
                let ops = p["state_operators"].as_array().unwrap();
                assert_eq!(ops.len(), 2, "{ops:?}");
                let op = ops.iter().find(|o| o["operator"] == operator).unwrap();
                op["num_rows_total"].as_u64().unwrap()
            })
            .collect()
    };
    let join = totals("symmetricHashJoin");
    let aggregate = totals("aggregate");
    assert!(
        join[11] <= join[4] && join.iter().all(|t| *t < 1000),
        "{join:?}"
    );
    assert!(
        aggregate[11] <= aggregate[4] + 7 && aggregate.iter().all(|t| *t < 60),
        "{aggregate:?}"
    );
    assert!(progress.iter().all(|p| p["num_late_rows"] == 0));
    // The checkpoint keeps each stage's state under its own name.
    for operator in ["join-left", "join-right", "aggregate"] {
        assert!(
            dir.path()
                .join("checkpoint/per_minute/state")
                .join(operator)
                .is_dir(),
            "{operator}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregated_stream_stream_join_resumes_from_its_checkpoint_as_if_never_stopped() {
    let whole = tempfile::tempdir().unwrap();
    write_streams(whole.path(), 0..8);
    let progress = run_script(whole.path(), AGGREGATED_JOIN_SCRIPT);
    // The first run stops with rows of both sides in the join's state and
    // open minutes in the aggregation's.
    let split = tempfile::tempdir().unwrap();
    write_streams(split.path(), 0..3);
    let first = run_script(split.path(), AGGREGATED_JOIN_SCRIPT);
    let held: Vec<u64> = first.last().unwrap()["state_operators"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["num_rows_total"].as_u64().unwrap())
        .collect();
    assert!(held.len() == 2 && held.iter().all(|n| *n > 0), "{held:?}");
    write_streams(split.path(), 3..8);
    let second = run_script(split.path(), AGGREGATED_JOIN_SCRIPT);
    assert_eq!(second[0]["batch_id"], first.len());
    let (got_whole, expected) = sink_and_batch_aggregate(whole.path(), &progress).await;
    let (got_split, _) = sink_and_batch_aggregate(split.path(), &second).await;
    assert!(!expected.is_empty());
    assert_eq!(got_whole, expected);
    assert_eq!(got_split, expected);
}

#[path = "../examples/orders_fills.rs"]
#[allow(dead_code)]
mod orders_fills;

/// The orders-and-fills example as a user runs it: its inner join finds the
/// pairs the generated files hold, and its outer join the same matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orders_and_fills_example_finds_the_fills_the_files_hold() {
    let counts = orders_fills::run(12_000).await.unwrap();
    assert!(
        counts.recounted_in_time > 3_000,
        "{}",
        counts.recounted_in_time
    );
    assert_eq!(counts.fills_in_time, counts.recounted_in_time);
    assert_eq!(counts.outer_matched, counts.fills_in_time);
    // The orders of the first minutes, unfilled in time, are emitted padded.
    assert!(counts.unfilled_emitted > 0);
}
