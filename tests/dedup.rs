//! Deduplication feeding an aggregation, run by `brook run` over real files:
//! orders a producer re-sent (within a file and in later files, as an
//! at-least-once sink does after a crash) are counted once, as a plain
//! recount of the distinct order ids finds, whether or not the query was
//! restarted from its checkpoint between batches.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use common::{order, put, run_checkpointed, source_ddl};

const SYMBOLS: [&str; 3] = ["AAPL", "MSFT", "IBM"];
/// Orders per file, one a second of event time.
const PER_FILE: i64 = 40;

/// Order `id`: its time (one a second from 20:00:00) and symbol.
fn order_of(id: i64) -> (i64, &'static str) {
    (id, SYMBOLS[(id * 7 % 3) as usize])
}

fn line(id: i64) -> String {
    let (_, symbol) = order_of(id);
    let time = format!("{:02}:{:02}:{:02}", 20 + id / 3600, id / 60 % 60, id % 60);
    order(&time, id, symbol, 1, 1.0, "B")
}

/// File `f`'s order ids: its own orders, every fifth of them sent twice, and
/// the previous file's last ten and every third order sent again.
fn file_ids(f: i64) -> Vec<i64> {
    let own = f * PER_FILE..(f + 1) * PER_FILE;
    let mut ids: Vec<i64> = own.clone().collect();
    ids.extend(own.step_by(5));
    if f > 0 {
        let previous = (f - 1) * PER_FILE..f * PER_FILE;
        ids.extend(previous.clone().skip(PER_FILE as usize - 10));
        ids.extend(previous.step_by(3));
    }
    ids
}

fn put_file(input: &Path, f: i64) {
    let lines: Vec<String> = file_ids(f).into_iter().map(line).collect();
    put(input, &format!("orders-{f:02}.csv"), &lines);
}

/// The deduplication as SELECT DISTINCT (its keys expire with the watermark).
const DISTINCT: &str = "FROM (SELECT DISTINCT order_id, symbol, time FROM orders)";
/// The deduplication as Flink writes it (its keys, order ids, are kept).
const ROW_NUMBER: &str = "FROM (SELECT order_id, symbol, time, \
     row_number() OVER (PARTITION BY order_id ORDER BY time) AS rn FROM orders) WHERE rn = 1";

/// Orders per minute and symbol, counted once each by the deduplication
/// `dedup`, into JSON files (append mode: a minute is written once the
/// watermark, 10 s behind, has passed it).
fn script(input: &Path, output: &Path, dedup: &str) -> String {
    format!(
        "{} CREATE EXTERNAL TABLE per_minute STORED AS JSON LOCATION '{}'
           OPTIONS ('outputMode' 'append');
         INSERT INTO per_minute SELECT window.start AS minute, symbol, count(*) AS orders
         {dedup} GROUP BY window(time, '1 minute'), symbol;",
        source_ddl(input, true),
        output.display()
    )
}

/// (minute, symbol) -> orders, as the sink's JSON lines say.
fn sink_counts(output: &Path) -> BTreeMap<(String, String), i64> {
    let mut counts = BTreeMap::new();
    for entry in std::fs::read_dir(output).unwrap() {
        let path = entry.unwrap().path();
        if !path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("part-")
        {
            continue;
        }
        for l in std::fs::read_to_string(&path).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let key = (
                v["minute"].as_str().unwrap().to_string(),
                v["symbol"].as_str().unwrap().to_string(),
            );
            let previous = counts.insert(key, v["orders"].as_i64().unwrap());
            assert!(previous.is_none(), "a minute written twice: {l}");
        }
    }
    counts
}

/// The distinct order ids of `files` per minute and symbol, for the minutes
/// that end at or before `watermark` (seconds after 20:00:00).
fn recount(files: std::ops::Range<i64>, watermark: i64) -> BTreeMap<(String, String), i64> {
    let ids: BTreeSet<i64> = files.flat_map(file_ids).collect();
    let mut counts = BTreeMap::new();
    for id in ids {
        let (_, symbol) = order_of(id);
        let minute = id / 60;
        if (minute + 1) * 60 > watermark {
            continue;
        }
        let start = format!("2016-03-22T{:02}:{:02}:00", 20 + minute / 60, minute % 60);
        *counts.entry((start, symbol.to_string())).or_insert(0) += 1;
    }
    counts
}

#[test]
fn re_sent_orders_are_counted_once_across_a_restart_as_a_recount_finds() {
    counted_once_across_a_restart(DISTINCT);
}

#[test]
fn re_sent_orders_kept_once_by_row_number_are_counted_once_across_a_restart() {
    counted_once_across_a_restart(ROW_NUMBER);
}

fn counted_once_across_a_restart(dedup: &str) {
    const FILES: i64 = 8;
    let (interrupted, uninterrupted) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for dir in [interrupted.path(), uninterrupted.path()] {
        std::fs::create_dir(dir.join("orders")).unwrap();
        std::fs::write(
            dir.join("q.sql"),
            script(&dir.join("orders"), &dir.join("out"), dedup),
        )
        .unwrap();
    }

    // Stopped after the first half; the second half re-sends orders of the
    // first (file 4 sends file 3's again) after the restart.
    let dir = interrupted.path();
    (0..FILES / 2).for_each(|f| put_file(&dir.join("orders"), f));
    let progress = run_checkpointed(dir, "q.sql");
    // Each stage reports its state: the deduplication its dropped duplicates.
    let operators = &progress[1]["state_operators"];
    assert_eq!(operators[0]["operator"], "dedupe", "{progress:?}");
    assert_eq!(operators[1]["operator"], "aggregate", "{progress:?}");
    let dropped = operators[0]["num_dropped_duplicate_rows"].as_i64().unwrap();
    assert!(dropped > 0, "{progress:?}");
    // SELECT DISTINCT over the event time forgets keys the watermark passed;
    // the order ids of ROW_NUMBER's PARTITION BY are kept.
    let expired: u64 = progress
        .iter()
        .map(|p| {
            p["state_operators"][0]["num_rows_removed"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert_eq!(expired > 0, dedup == DISTINCT, "{progress:?}");
    let before = sink_counts(&dir.join("out"));
    assert!(!before.is_empty(), "minutes closed before the restart");
    (FILES / 2..FILES).for_each(|f| put_file(&dir.join("orders"), f));
    run_checkpointed(dir, "q.sql");

    let dir = uninterrupted.path();
    (0..FILES).for_each(|f| put_file(&dir.join("orders"), f));
    run_checkpointed(dir, "q.sql");

    let got = sink_counts(&interrupted.path().join("out"));
    assert_eq!(got, sink_counts(&uninterrupted.path().join("out")));
    let last_time = FILES * PER_FILE - 1;
    let expected = recount(0..FILES, last_time - 10);
    assert!(expected.len() >= 12, "{expected:?}");
    assert_eq!(got, expected);

    // Both stages' state is in the last commit, under its own name.
    let commits = interrupted.path().join("checkpoint/per_minute/commits");
    let last = std::fs::read_dir(&commits)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_string_lossy().parse::<u64>().ok())
        .max()
        .unwrap();
    let commit = std::fs::read_to_string(commits.join(last.to_string())).unwrap();
    let body: serde_json::Value = serde_json::from_str(commit.lines().last().unwrap()).unwrap();
    let operators: Vec<&String> = body["state"].as_object().unwrap().keys().collect();
    assert_eq!(operators, ["aggregate", "stage0-dedupe"], "{commit}");
}
