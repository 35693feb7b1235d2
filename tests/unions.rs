//! Queries reading two streams through UNION ALL, run with the CLI: each
//! stream's watermark in the progress record, the query's by the policy, and a
//! restart that picks up each stream's own watermark.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use brook::datafusion::prelude::SessionContext;
use chrono::{NaiveDate, TimeDelta};
use common::{put, run_checkpointed, sorted, table};

const SCRIPT: &str = "
CREATE UNBOUNDED EXTERNAL TABLE ua (time TIMESTAMP NOT NULL, v BIGINT,
  WATERMARK FOR time AS time - INTERVAL '10' SECOND)
STORED AS CSV LOCATION 'ua' OPTIONS ('maxFilesPerTrigger' '1');
CREATE UNBOUNDED EXTERNAL TABLE ub (time TIMESTAMP NOT NULL, v BIGINT,
  WATERMARK FOR time AS time - INTERVAL '30' SECOND)
STORED AS CSV LOCATION 'ub' OPTIONS ('maxFilesPerTrigger' '1');
CREATE EXTERNAL TABLE per_min STORED AS PARQUET LOCATION 'out_min' OPTIONS ('outputMode' 'append');
CREATE EXTERNAL TABLE per_max STORED AS PARQUET LOCATION 'out_max'
  OPTIONS ('outputMode' 'append', 'multipleWatermarkPolicy' 'max');
INSERT INTO per_min SELECT window.start AS ws, count(*) AS n, sum(v) AS total
FROM (SELECT * FROM ua UNION ALL SELECT * FROM ub) GROUP BY window(time, '1 minute');
INSERT INTO per_max SELECT window.start AS ws, count(*) AS n, sum(v) AS total
FROM (SELECT * FROM ua UNION ALL SELECT * FROM ub) GROUP BY window(time, '1 minute');
";

/// Seconds after 20:00 of the rows of file `file` of `source`: ua has a row
/// every 5 s, ub every 7 s, 20 rows a file.
fn seconds(source: &str, file: i64) -> Vec<i64> {
    let step = if source == "ua" { 5 } else { 7 };
    (file * 20..(file + 1) * 20).map(|i| i * step).collect()
}

fn write(dir: &Path, source: &str, file: i64) {
    let start = NaiveDate::from_ymd_opt(2016, 3, 22)
        .unwrap()
        .and_hms_opt(20, 0, 0)
        .unwrap();
    let v = if source == "ua" { 1 } else { 10 };
    let lines: Vec<String> = seconds(source, file)
        .into_iter()
        .map(|s| {
            format!(
                "{},{v}",
                (start + TimeDelta::seconds(s)).format("%Y-%m-%d %H:%M:%S")
            )
        })
        .collect();
    std::fs::create_dir_all(dir.join(source)).unwrap();
    put(&dir.join(source), &format!("part-{file}.csv"), &lines);
}

/// Runs the script until the input is used up; each query's progress records.
fn run(dir: &Path) -> BTreeMap<String, Vec<serde_json::Value>> {
    std::fs::write(dir.join("union.sql"), SCRIPT).unwrap();
    let mut by_query: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for p in run_checkpointed(dir, "union.sql") {
        by_query
            .entry(p["name"].as_str().unwrap().to_string())
            .or_default()
            .push(p);
    }
    by_query
}

async fn sink(dir: &Path, out: &str) -> Vec<Vec<String>> {
    let ctx = SessionContext::new();
    ctx.sql(&format!(
        "CREATE EXTERNAL TABLE sink STORED AS PARQUET LOCATION '{}/{out}/'",
        dir.display()
    ))
    .await
    .unwrap();
    let rows = ctx
        .sql("SELECT ws, n, total FROM sink")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    sorted(table(&rows))
}

/// The per-minute windows of every row that end at or before `watermark`
/// (seconds after 20:00), counted again here.
fn recount(files: i64, watermark: i64) -> Vec<Vec<String>> {
    let mut windows: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    for (source, v) in [("ua", 1), ("ub", 10)] {
        for file in 0..files {
            for s in seconds(source, file) {
                let w = windows.entry(s / 60 * 60).or_default();
                w.0 += 1;
                w.1 += v;
            }
        }
    }
    let start = NaiveDate::from_ymd_opt(2016, 3, 22)
        .unwrap()
        .and_hms_opt(20, 0, 0)
        .unwrap();
    sorted(
        windows
            .into_iter()
            .filter(|(ws, _)| ws + 60 <= watermark)
            .map(|(ws, (n, total))| {
                let at = (start + TimeDelta::seconds(ws)).format("%Y-%m-%dT%H:%M:%S");
                vec![at.to_string(), n.to_string(), total.to_string()]
            })
            .collect(),
    )
}

fn watermarks(p: &serde_json::Value) -> (String, Vec<String>) {
    let sources = p["sources"].as_array().unwrap();
    assert_eq!(sources.len(), 2, "{p}");
    (
        p["event_time"]["watermark"].as_str().unwrap().to_string(),
        sources
            .iter()
            .map(|s| s["watermark"].as_str().unwrap().to_string())
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn union_of_two_streams_keeps_a_watermark_each_and_resumes_them() {
    let dir = tempfile::tempdir().unwrap();
    for file in 0..2 {
        write(dir.path(), "ua", file);
        write(dir.path(), "ub", file);
    }
    let first = run(dir.path());
    // After two files each, ua's event time is at 195 s (watermark 185 s) and
    // ub's at 273 s (watermark 243 s): 'min' takes ua's, 'max' ub's.
    let ua = "2016-03-22T20:03:05.000Z";
    let ub = "2016-03-22T20:04:03.000Z";
    let last = |runs: &BTreeMap<String, Vec<serde_json::Value>>, q: &str| {
        watermarks(runs[q].last().unwrap())
    };
    assert_eq!(
        last(&first, "per_min"),
        (ua.into(), vec![ua.into(), ub.into()])
    );
    assert_eq!(
        last(&first, "per_max"),
        (ub.into(), vec![ua.into(), ub.into()])
    );

    // Only ua has new files: ub's watermark comes from the checkpoint, and
    // still holds 'min' back... until ua's passes it.
    for file in 2..4 {
        write(dir.path(), "ua", file);
    }
    let second = run(dir.path());
    let resumed = &second["per_min"][0];
    assert_eq!(resumed["sources"][1]["num_input_rows"], 0);
    assert_eq!(watermarks(resumed).1[1], ub, "ub's watermark restored");
    // ua is at 295 s (watermark 285 s), then 395 s (385 s); ub stays at 243 s.
    assert_eq!(last(&second, "per_min").0, ub);

    for file in 2..4 {
        write(dir.path(), "ub", file);
    }
    let third = run(dir.path());
    // ub is at 553 s (watermark 523 s); ua's 385 s is the smaller.
    assert_eq!(last(&third, "per_min").0, "2016-03-22T20:06:25.000Z");
    assert_eq!(sink(dir.path(), "out_min").await, recount(4, 385));
    let late = |runs: &[&BTreeMap<String, Vec<serde_json::Value>>], q: &str| -> u64 {
        runs.iter()
            .flat_map(|r| &r[q])
            .map(|p| p["num_late_rows"].as_u64().unwrap())
            .sum()
    };
    // 'min' never runs ahead of a stream, so nothing is late; 'max' runs with
    // ub, and drops ua's rows behind it.
    assert_eq!(late(&[&first, &second, &third], "per_min"), 0);
    assert!(late(&[&first, &second, &third], "per_max") > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_stops_holding_the_watermark_back() {
    let dir = tempfile::tempdir().unwrap();
    for source in ["ua", "quiet", "silent"] {
        std::fs::create_dir_all(dir.path().join(source)).unwrap();
    }
    let d = dir.path().display();
    let engine = brook::Engine::new();
    // Two empty streams, the same but for the idle timeout.
    let queries = engine
        .execute(&format!(
            "CREATE UNBOUNDED EXTERNAL TABLE ua (time TIMESTAMP NOT NULL, v BIGINT,
               WATERMARK FOR time AS time - INTERVAL '10' SECOND) STORED AS CSV LOCATION '{d}/ua';
             CREATE UNBOUNDED EXTERNAL TABLE quiet (time TIMESTAMP NOT NULL, v BIGINT,
               WATERMARK FOR time AS time - INTERVAL '10' SECOND) STORED AS CSV LOCATION '{d}/quiet'
               OPTIONS ('idleTimeout' '1 second');
             CREATE UNBOUNDED EXTERNAL TABLE silent (time TIMESTAMP NOT NULL, v BIGINT,
               WATERMARK FOR time AS time - INTERVAL '10' SECOND) STORED AS CSV LOCATION '{d}/silent';
             CREATE EXTERNAL TABLE with_idle STORED AS MEMORY LOCATION 'with_idle' OPTIONS ('outputMode' 'append');
             CREATE EXTERNAL TABLE without STORED AS MEMORY LOCATION 'without' OPTIONS ('outputMode' 'append');
             INSERT INTO with_idle SELECT window.start AS ws, count(*) AS n
             FROM (SELECT * FROM ua UNION ALL SELECT * FROM quiet) GROUP BY window(time, '1 minute');
             INSERT INTO without SELECT window.start AS ws, count(*) AS n
             FROM (SELECT * FROM ua UNION ALL SELECT * FROM silent) GROUP BY window(time, '1 minute');"
        ))
        .await
        .unwrap();
    write(dir.path(), "ua", 0);
    for q in &queries {
        q.process_all_available().await.unwrap();
    }
    let count = |rows: Vec<Vec<String>>| rows.len();
    let rows = |name: &'static str| {
        let engine = &engine;
        async move { table(&engine.sql(&format!("SELECT * FROM {name}")).await.unwrap()) }
    };
    assert_eq!(count(rows("with_idle").await), 0, "not idle yet");
    std::thread::sleep(std::time::Duration::from_millis(1200));
    for q in &queries {
        q.process_all_available().await.unwrap();
    }
    // ua is at 95 s (watermark 85 s): the window of 20:00 closes once 'quiet'
    // is idle; 'silent' holds it back for good.
    assert_eq!(
        rows("with_idle").await,
        vec![vec!["2016-03-22T20:00:00".to_string(), "12".to_string()]]
    );
    assert_eq!(count(rows("without").await), 0);
    let last = queries[0].last_progress().unwrap();
    assert_eq!(
        last.event_time.watermark.as_deref(),
        Some("2016-03-22T20:01:25.000Z")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_api_sets_the_watermark_policy_and_an_idle_timeout() {
    use brook::datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "ua", 0);
    write(dir.path(), "ub", 0);
    std::fs::create_dir_all(dir.path().join("quiet")).unwrap();
    let schema = std::sync::Arc::new(Schema::new(vec![
        Field::new(
            "time",
            DataType::Timestamp(TimeUnit::Nanosecond, None),
            false,
        ),
        Field::new("v", DataType::Int64, false),
    ]));
    let engine = brook::Engine::new();
    for (name, delay, idle) in [("ua", 10, None), ("ub", 30, None), ("quiet", 0, Some(0))] {
        let mut source = engine
            .read_stream(name)
            .schema(schema.clone())
            .watermark("time", std::time::Duration::from_secs(delay));
        if let Some(secs) = idle {
            source = source.idle_timeout(std::time::Duration::from_secs(secs));
        }
        source
            .load(dir.path().join(name).to_str().unwrap())
            .unwrap();
    }
    let start = |policy| {
        engine
            .query(
                "SELECT time FROM ua UNION ALL SELECT time FROM ub UNION ALL SELECT time FROM quiet",
            )
            .watermark_policy(policy)
            .memory_sink(&format!("{policy:?}"))
            .start()
    };
    let (min, max) = (
        start(brook::WatermarkPolicy::Min).await.unwrap(),
        start(brook::WatermarkPolicy::Max).await.unwrap(),
    );
    min.process_all_available().await.unwrap();
    max.process_all_available().await.unwrap();
    // ua is at 95 s (watermark 85 s), ub at 133 s (103 s); 'quiet' has never
    // had a row, but is idle at once.
    let watermark = |q: &brook::StreamingQuery| q.last_progress().unwrap().event_time.watermark;
    assert_eq!(watermark(&min).as_deref(), Some("2016-03-22T20:01:25.000Z"));
    assert_eq!(watermark(&max).as_deref(), Some("2016-03-22T20:01:43.000Z"));
}
