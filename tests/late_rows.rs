//! Late rows in a backlog: several files a batch, whose rows the current
//! watermark has passed but the previous batch's has not. As Spark (3.4 and
//! later), a batch drops as late the rows behind the watermark the previous
//! batch ran under, and closes state by its own; the same files in the same
//! batches give Spark's output, which benches/spark/late_rows.py computed.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use brook::{Engine, OutputMode, Trigger};
use common::{put, table};

/// The files benches/spark/late_rows.py reads: `time,sym,value` on 2026-01-01,
/// read two per batch under a 5-second watermark.
const FILES: [&[&str]; 6] = [
    &["00:00:01,a,1", "00:00:12,a,2"],
    &["00:00:31,b,3"],
    &["00:00:18,a,4", "00:00:24,b,5", "00:00:12,a,2"],
    &["00:00:40,a,6"],
    &["00:00:27,c,7", "00:00:08,a,8", "00:00:09,a,9"],
    &["00:00:50,b,10"],
];
const FILES_PER_BATCH: usize = 2;
const DELAY: i64 = 5;

/// Per batch id: its rows (sorted) and its late rows.
type Batches = BTreeMap<u64, (Vec<Vec<String>>, u64)>;

fn write_files(input: &Path) {
    for (i, lines) in FILES.iter().enumerate() {
        let lines: Vec<String> = lines.iter().map(|l| format!("2026-01-01 {l}")).collect();
        put(input, &format!("file-{:04}.csv", i + 1), &lines);
    }
}

/// Runs `sql` over the files with the available-now trigger; every batch's
/// output (times as `HH:MM:SS`) and late rows.
async fn run(sql: &str, mode: OutputMode) -> Batches {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    write_files(&input);
    run_in(&input, None, sql, mode, Trigger::AvailableNow).await
}

/// Runs `sql` over the files in `input` with `trigger`, checkpointed in
/// `checkpoint` if given; every batch's output and late rows.
async fn run_in(
    input: &Path,
    checkpoint: Option<&Path>,
    sql: &str,
    mode: OutputMode,
    trigger: Trigger,
) -> Batches {
    let engine = Engine::new();
    engine
        .execute(&format!(
            "CREATE UNBOUNDED EXTERNAL TABLE events (time TIMESTAMP NOT NULL, sym VARCHAR, \
             value INT, WATERMARK FOR time AS time - INTERVAL '{DELAY}' SECOND) STORED AS CSV \
             LOCATION '{}' OPTIONS ('maxFilesPerTrigger' '{FILES_PER_BATCH}');",
            input.display()
        ))
        .await
        .unwrap();
    let log: Arc<Mutex<BTreeMap<u64, Vec<Vec<String>>>>> = Arc::default();
    let sink_log = log.clone();
    let mut query = engine.query(sql).output_mode(mode).trigger(trigger);
    if let Some(checkpoint) = checkpoint {
        query = query.checkpoint(checkpoint.to_str().unwrap());
    }
    let query = query
        .foreach_batch(move |id, batches| {
            let rows = table(batches)
                .into_iter()
                .map(|r| r.into_iter().map(|v| clock(&v)).collect())
                .collect();
            sink_log.lock().unwrap().insert(id, rows);
            Ok(())
        })
        .start()
        .await
        .unwrap();
    query.await_termination().await.unwrap();
    let mut out = Batches::new();
    for p in query.recent_progress() {
        let mut rows = log.lock().unwrap().remove(&p.batch_id).unwrap_or_default();
        rows.sort();
        out.insert(p.batch_id, (rows, p.num_late_rows));
    }
    out
}

/// A timestamp as its time of day; any other value as it is.
fn clock(v: &str) -> String {
    match v.split_once('T') {
        Some((_, time)) if v.starts_with("20") => time.to_string(),
        _ => v.to_string(),
    }
}

/// Seconds as a time of day (before midnight for negative ones).
fn hms(s: i64) -> String {
    let s = s.rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// A row of the files: seconds after midnight, key, value.
type Row = (i64, String, i64);

/// Each batch's rows, and the two watermarks (late, evict) each batch runs
/// under, the batch without input that follows the last one included, by
/// Spark's rule: late by the watermark the batch before ran under.
fn batches() -> Vec<(Vec<Row>, Option<i64>, Option<i64>)> {
    let mut out = vec![];
    let (mut late, mut evict, mut max): (Option<i64>, Option<i64>, Option<i64>) =
        (None, None, None);
    for files in FILES.chunks(FILES_PER_BATCH) {
        let rows: Vec<Row> = files
            .iter()
            .flat_map(|f| f.iter())
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                let t: Vec<i64> = f[0].split(':').map(|x| x.parse().unwrap()).collect();
                (
                    t[0] * 3600 + t[1] * 60 + t[2],
                    f[1].to_string(),
                    f[2].parse().unwrap(),
                )
            })
            .collect();
        out.push((rows.clone(), late, evict));
        max = rows.iter().map(|r| r.0).chain(max).max();
        late = evict;
        evict = max.map(|m| m - DELAY);
    }
    out.push((vec![], late, evict));
    out
}

/// An aggregation over windows of `size` sliding by `slide` (seconds),
/// recounted: per batch, the rows `mode` emits and the late (row, window)
/// pairs, with the number of groups they fall in (Spark counts those).
fn recount_windows(size: i64, slide: i64, mode: OutputMode) -> Vec<(Vec<Vec<String>>, u64, u64)> {
    let mut totals: BTreeMap<(i64, String), (i64, i64)> = BTreeMap::new();
    let mut emitted = BTreeSet::new();
    let mut out = vec![];
    for (rows, late, evict) in batches() {
        let (mut late_pairs, mut late_groups) = (0, BTreeSet::new());
        let mut changed = BTreeSet::new();
        for (t, key, value) in rows {
            let last = t.div_euclid(slide) * slide;
            for start in (last - size + slide..=last).step_by(slide as usize) {
                if late.is_some_and(|w| start + size <= w) {
                    late_pairs += 1;
                    late_groups.insert((start, key.clone()));
                    continue;
                }
                let total = totals.entry((start, key.clone())).or_default();
                *total = (total.0 + 1, total.1 + value);
                changed.insert((start, key.clone()));
            }
        }
        let shown = |(start, key): &(i64, String), (n, total): (i64, i64)| {
            vec![
                hms(*start),
                hms(start + size),
                key.clone(),
                n.to_string(),
                total.to_string(),
            ]
        };
        let mut emit = vec![];
        for (group, total) in &totals {
            let closed = evict.is_some_and(|w| group.0 + size <= w);
            let shows = match mode {
                OutputMode::Append => closed && emitted.insert(group.clone()),
                _ => changed.contains(group),
            };
            if shows {
                emit.push(shown(group, *total));
            }
        }
        emit.sort();
        out.push((emit, late_pairs, late_groups.len() as u64));
    }
    out
}

/// `rows` as owned strings.
fn rows(rows: &[&[&str]]) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|v| v.to_string()).collect())
        .collect();
    out.sort();
    out
}

/// Checks brook's batches against Spark's (`spark`: rows and
/// `numRowsDroppedByWatermark` per batch) and the recount.
fn check(brook: &Batches, spark: &[(&[&[&str]], u64)], recount: &[(Vec<Vec<String>>, u64, u64)]) {
    let ids: Vec<u64> = brook.keys().copied().collect();
    assert_eq!(
        ids,
        (0..spark.len() as u64).collect::<Vec<_>>(),
        "{brook:?}"
    );
    for (id, ((rows_out, late), ((spark_rows, spark_late), (re_rows, re_late, re_groups)))) in
        brook.values().zip(spark.iter().zip(recount)).enumerate()
    {
        assert_eq!(rows_out, &rows(spark_rows), "batch {id}: Spark's rows");
        assert_eq!(rows_out, re_rows, "batch {id}: the recount's rows");
        // brook counts the late rows (row-window pairs), Spark the groups they fall in.
        assert_eq!(late, re_late, "batch {id}: late rows");
        assert_eq!(spark_late, re_groups, "batch {id}: Spark's late groups");
    }
}

const TUMBLING: &str = "SELECT window.start AS ws, window.end AS we, sym, count(*) AS n, \
                        sum(value) AS total FROM events GROUP BY window(time, '10 seconds'), sym";
const SLIDING: &str = "SELECT window.start AS ws, window.end AS we, sym, count(*) AS n, \
                       sum(value) AS total FROM events \
                       GROUP BY window(time, '10 seconds', '5 seconds'), sym";

/// Batch 1 reads 00:00:18 after batch 0 read 00:00:31 (watermark 00:00:26):
/// [00:00:10, 00:00:20) has ended by the current watermark but not by the one
/// batch 0 ran under, so the row counts and the window is emitted with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_counts_rows_the_previous_batch_watermark_has_not_passed_tumbling_append() {
    let brook = run(TUMBLING, OutputMode::Append).await;
    // Spark 4.0.1's output, from benches/spark/late_rows.py ("tumbling_append").
    let spark: [(&[&[&str]], u64); 4] = [
        (&[], 0),
        (
            &[
                &["00:00:00", "00:00:10", "a", "1", "1"],
                &["00:00:10", "00:00:20", "a", "3", "8"],
            ],
            0,
        ),
        (
            &[
                &["00:00:20", "00:00:30", "b", "1", "5"],
                &["00:00:20", "00:00:30", "c", "1", "7"],
            ],
            1,
        ),
        (&[&["00:00:30", "00:00:40", "b", "1", "3"]], 0),
    ];
    check(&brook, &spark, &recount_windows(10, 10, OutputMode::Append));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_counts_rows_the_previous_batch_watermark_has_not_passed_tumbling_update() {
    let brook = run(TUMBLING, OutputMode::Update).await;
    // Spark 4.0.1's output, from benches/spark/late_rows.py ("tumbling_update").
    let spark: [(&[&[&str]], u64); 4] = [
        (
            &[
                &["00:00:00", "00:00:10", "a", "1", "1"],
                &["00:00:10", "00:00:20", "a", "1", "2"],
                &["00:00:30", "00:00:40", "b", "1", "3"],
            ],
            0,
        ),
        (
            &[
                &["00:00:10", "00:00:20", "a", "3", "8"],
                &["00:00:20", "00:00:30", "b", "1", "5"],
                &["00:00:40", "00:00:50", "a", "1", "6"],
            ],
            0,
        ),
        (
            &[
                &["00:00:20", "00:00:30", "c", "1", "7"],
                &["00:00:50", "00:01:00", "b", "1", "10"],
            ],
            1,
        ),
        (&[], 0),
    ];
    check(&brook, &spark, &recount_windows(10, 10, OutputMode::Update));
}

/// Sliding windows (kept as panes in append mode): a window between the two
/// watermarks is summed from panes holding the batch's rows, and emitted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_counts_rows_the_previous_batch_watermark_has_not_passed_sliding_append() {
    let brook = run(SLIDING, OutputMode::Append).await;
    // Spark 4.0.1's output, from benches/spark/late_rows.py ("sliding_append").
    let spark: [(&[&[&str]], u64); 4] = [
        (&[], 0),
        (
            &[
                &["00:00:00", "00:00:10", "a", "1", "1"],
                &["00:00:05", "00:00:15", "a", "2", "4"],
                &["00:00:10", "00:00:20", "a", "3", "8"],
                &["00:00:15", "00:00:25", "a", "1", "4"],
                &["00:00:15", "00:00:25", "b", "1", "5"],
                &["23:59:55", "00:00:05", "a", "1", "1"],
            ],
            0,
        ),
        (
            &[
                &["00:00:20", "00:00:30", "b", "1", "5"],
                &["00:00:20", "00:00:30", "c", "1", "7"],
                &["00:00:25", "00:00:35", "b", "1", "3"],
                &["00:00:25", "00:00:35", "c", "1", "7"],
            ],
            2,
        ),
        (
            &[
                &["00:00:30", "00:00:40", "b", "1", "3"],
                &["00:00:35", "00:00:45", "a", "1", "6"],
            ],
            0,
        ),
    ];
    check(&brook, &spark, &recount_windows(10, 5, OutputMode::Append));
}

/// Deduplication: 00:00:18 is kept (not late by the watermark batch 0 ran
/// under), and the second 00:00:12 is a duplicate of a key still in state,
/// not a late row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_counts_rows_the_previous_batch_watermark_has_not_passed_distinct() {
    let brook = run("SELECT DISTINCT sym, time FROM events", OutputMode::Append).await;
    // Spark 4.0.1's output, from benches/spark/late_rows.py ("distinct").
    let spark: [(&[&[&str]], u64); 4] = [
        (
            &[&["a", "00:00:01"], &["a", "00:00:12"], &["b", "00:00:31"]],
            0,
        ),
        (
            &[&["a", "00:00:18"], &["a", "00:00:40"], &["b", "00:00:24"]],
            0,
        ),
        (&[&["b", "00:00:50"], &["c", "00:00:27"]], 2),
        (&[], 0),
    ];
    // The recount: a row is late when its time is at or behind the watermark
    // the batch before ran under, and emitted when its key is new.
    let mut seen = BTreeSet::new();
    let mut recount = vec![];
    for (rows, late, _) in batches() {
        let mut out = vec![];
        let mut late_rows = 0;
        for (t, key, _) in rows {
            if late.is_some_and(|w| t <= w) {
                late_rows += 1;
            } else if seen.insert((key.clone(), t)) {
                out.push(vec![key, hms(t)]);
            }
        }
        out.sort();
        recount.push((out, late_rows, late_rows));
    }
    check(&brook, &spark, &recount);
}

/// A restart between two batches of a backlog: the commit records the
/// watermark the last batch ran under, so the batch after the restart judges
/// its rows late as the run never interrupted does (Spark reads it from its
/// offset log), not by the watermark that batch left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_in_a_backlog_judges_late_rows_as_the_run_never_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    write_files(&input);
    let checkpoint = dir.path().join("checkpoint");
    let mut restarted = Batches::new();
    for trigger in [Trigger::Once, Trigger::Once, Trigger::AvailableNow] {
        let ran = run_in(
            &input,
            Some(&checkpoint),
            TUMBLING,
            OutputMode::Append,
            trigger,
        )
        .await;
        restarted.extend(ran);
    }
    let whole = run(TUMBLING, OutputMode::Append).await;
    assert_eq!(restarted, whole);
    // Batch 1 keeps 00:00:18, which the watermark batch 0 left (00:00:26) has passed.
    assert!(
        whole[&1]
            .0
            .contains(&rows(&[&["00:00:10", "00:00:20", "a", "3", "8"]])[0])
    );
}

/// An outer join of two streams under an event-time aggregation: the join
/// emits an unmatched order padded in the batch whose watermark passes its
/// bound, and the aggregation, judging late rows by the previous batch's
/// watermark, counts it in its window, which that batch closes. Spark (3.5,
/// 4.0) runs it so in append mode; the windows closed equal a recount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outer_join_under_a_window_counts_its_padded_rows_as_spark_and_a_recount() {
    let (got, recount) = outer_join_windows(OutputMode::Append).await;
    // Spark 4.0.1 in append mode, the same files and query (a script as
    // benches/spark/late_rows.py): [00:00:00, 00:00:10) n=2 matched=1,
    // [00:00:30, 00:00:40) n=1 matched=0.
    assert_eq!(
        got,
        rows(&[&["00:00:00", "2", "1"], &["00:00:30", "1", "0"]])
    );
    assert_eq!(got, recount);
}

/// The same in update mode (which Spark refuses for any join of two
/// streams): each closed window's last update is the recount's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outer_join_under_a_window_in_update_mode_ends_each_window_at_the_recount() {
    let (got, recount) = outer_join_windows(OutputMode::Update).await;
    assert_eq!(got, recount);
}

/// Runs the outer join under windows in `mode`: the last row emitted for each
/// window the final watermark closed, and the recount of those windows.
async fn outer_join_windows(mode: OutputMode) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
    let dir = tempfile::tempdir().unwrap();
    let (orders, fills) = (dir.path().join("o"), dir.path().join("f"));
    std::fs::create_dir(&orders).unwrap();
    std::fs::create_dir(&fills).unwrap();
    let order_rows = [
        ("00:00:01", 1),
        ("00:00:05", 2),
        ("00:00:30", 3),
        ("00:01:30", 4),
    ];
    let fill_rows = [("00:00:03", 1), ("00:01:31", 4)];
    let lines = |rows: &[(&str, i64)]| -> Vec<String> {
        rows.iter()
            .map(|(t, id)| format!("2026-01-01 {t},{id}"))
            .collect()
    };
    put(&orders, "1.csv", &lines(&order_rows));
    put(&fills, "1.csv", &lines(&fill_rows));
    let engine = Engine::new();
    engine
        .execute(&format!(
            "CREATE UNBOUNDED EXTERNAL TABLE o (otime TIMESTAMP NOT NULL, oid BIGINT, \
             WATERMARK FOR otime AS otime - INTERVAL '5' SECOND) STORED AS CSV LOCATION '{}';
             CREATE UNBOUNDED EXTERNAL TABLE f (ftime TIMESTAMP NOT NULL, fid BIGINT, \
             WATERMARK FOR ftime AS ftime - INTERVAL '5' SECOND) STORED AS CSV LOCATION '{}';",
            orders.display(),
            fills.display()
        ))
        .await
        .unwrap();
    let out: Arc<Mutex<BTreeMap<String, Vec<String>>>> = Arc::default();
    let sink = out.clone();
    let query = engine
        .query(
            "SELECT window.start AS ws, count(*) AS n, count(f.fid) AS matched \
             FROM o LEFT JOIN f ON o.oid = f.fid \
             AND f.ftime BETWEEN o.otime AND o.otime + INTERVAL '10' SECOND \
             GROUP BY window(o.otime, '10 seconds')",
        )
        .output_mode(mode)
        .trigger(Trigger::AvailableNow)
        .foreach_batch(move |_, batches| {
            let mut last = sink.lock().unwrap();
            for row in table(batches) {
                let row: Vec<String> = row.into_iter().map(|v| clock(&v)).collect();
                last.insert(row[0].clone(), row);
            }
            Ok(())
        })
        .start()
        .await
        .unwrap();
    query.await_termination().await.unwrap();
    // The recount: the left join of all rows, per window of the order's time,
    // for the windows the final watermark (the smaller of the two, held back
    // by the join's 10-second bound) has closed.
    let secs = |t: &str| -> i64 {
        let p: Vec<i64> = t.split(':').map(|x| x.parse().unwrap()).collect();
        p[0] * 3600 + p[1] * 60 + p[2]
    };
    let max = |rows: &[(&str, i64)]| rows.iter().map(|r| secs(r.0)).max().unwrap();
    let closed_by = max(&order_rows).min(max(&fill_rows)) - 5 - 10;
    let mut windows: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    for (t, id) in order_rows {
        let t = secs(t);
        let matched = fill_rows
            .iter()
            .filter(|(ft, fid)| *fid == id && (t..=t + 10).contains(&secs(ft)))
            .count() as i64;
        let w = windows.entry(t.div_euclid(10) * 10).or_default();
        *w = (w.0 + matched.max(1), w.1 + matched);
    }
    let closed: Vec<i64> = windows
        .keys()
        .copied()
        .filter(|start| start + 10 <= closed_by)
        .collect();
    let recount: Vec<Vec<String>> = windows
        .into_iter()
        .filter(|(start, _)| closed.contains(start))
        .map(|(start, (n, matched))| vec![hms(start), n.to_string(), matched.to_string()])
        .collect();
    let last = out.lock().unwrap();
    let got = closed
        .iter()
        .filter_map(|start| last.get(&hms(*start)).cloned())
        .collect();
    (got, recount)
}

/// A checkpoint written before the commit recorded the watermark the batch
/// ran under still restarts, judging the next batch's rows late by the
/// current watermark, as brook did then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_without_the_previous_watermark_judges_late_rows_by_the_current_one() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    write_files(&input);
    let checkpoint = dir.path().join("checkpoint");
    run_in(
        &input,
        Some(&checkpoint),
        TUMBLING,
        OutputMode::Append,
        Trigger::Once,
    )
    .await;
    let removed = drop_late_watermark(&checkpoint.join("commits/0"));
    assert_eq!(
        removed,
        Some(serde_json::Value::Null),
        "batch 0 ran without a watermark"
    );

    let ran = run_in(
        &input,
        Some(&checkpoint),
        TUMBLING,
        OutputMode::Append,
        Trigger::Once,
    )
    .await;
    let (_, late, evict) = &batches()[1];
    assert_eq!(*late, None);
    let late_by_current = batches()[1]
        .0
        .iter()
        .filter(|(t, _, _)| t.div_euclid(10) * 10 + 10 <= evict.unwrap())
        .count() as u64;
    assert!(late_by_current > 0);
    assert_eq!(ran[&1].1, late_by_current);
}

/// Rewrites `commit` as brook wrote it before it recorded the watermark the
/// batch ran under; the value removed.
fn drop_late_watermark(commit: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(commit).unwrap();
    let (header, body) = text.split_once('\n').unwrap();
    let mut entry: serde_json::Value = serde_json::from_str(body).unwrap();
    let removed = entry["event_time"]
        .as_object_mut()
        .unwrap()
        .remove("late_watermark_ns");
    let version = header.split(' ').next().unwrap();
    let body = entry.to_string();
    let crc = crc32fast::hash(body.as_bytes());
    std::fs::write(commit, format!("{version} crc32={crc:08x}\n{body}")).unwrap();
    removed
}

/// Sliding windows in append mode restarted from commits that did not record
/// the late-events watermark: the windows the last batch left pending (the
/// watermark moved past them after it closed what it could) are emitted by
/// the next one, each once, as in a run never stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_without_the_previous_watermark_keeps_pending_sliding_windows() {
    for restart_after in [0, 1] {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        std::fs::create_dir(&input).unwrap();
        write_files(&input);
        let checkpoint = dir.path().join("checkpoint");
        let mut restarted = Batches::new();
        for _ in 0..=restart_after {
            let ran = run_in(
                &input,
                Some(&checkpoint),
                SLIDING,
                OutputMode::Append,
                Trigger::Once,
            )
            .await;
            restarted.extend(ran);
        }
        let commit = checkpoint.join(format!("commits/{restart_after}"));
        assert!(drop_late_watermark(&commit).is_some());
        let ran = run_in(
            &input,
            Some(&checkpoint),
            SLIDING,
            OutputMode::Append,
            Trigger::AvailableNow,
        )
        .await;
        restarted.extend(ran);
        let whole = run(SLIDING, OutputMode::Append).await;
        assert_eq!(restarted, whole, "restarted after batch {restart_after}");
    }
}

/// The JSON rows the file sink wrote under `out`, each as (start, n, total).
fn json_sink_rows(out: &Path) -> Vec<(String, i64, i64)> {
    let mut rows = vec![];
    for entry in std::fs::read_dir(out).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            rows.push((
                row["start"].as_str().unwrap().to_string(),
                row["n"].as_i64().unwrap(),
                row["total"].as_i64().unwrap(),
            ));
        }
    }
    rows.sort();
    rows
}

/// A child process killed (SIGKILL) when dropped, also when the test fails.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A batch logged before a crash runs again under the watermarks it was
/// logged with, as Spark's offset log keeps a batch's watermark. Here polls
/// that found no new file moved the watermark the next batch judges late
/// rows by, which the last commit does not hold: judged by the commit's, the
/// rerun would count a row the killed attempt dropped as late.
#[test]
fn a_batch_run_again_after_a_crash_runs_under_the_watermarks_it_was_logged_with() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let (input, out, checkpoint) = (
        dir.path().join("in"),
        dir.path().join("out"),
        dir.path().join("checkpoint"),
    );
    std::fs::create_dir(&input).unwrap();
    let script = dir.path().join("q.sql");
    std::fs::write(
        &script,
        format!(
            "CREATE UNBOUNDED EXTERNAL TABLE orders (time TIMESTAMP NOT NULL, sym VARCHAR, \
             value BIGINT, WATERMARK FOR time AS time - INTERVAL '{DELAY}' SECOND) \
             STORED AS CSV LOCATION '{}';
             CREATE EXTERNAL TABLE per_window STORED AS JSON LOCATION '{}' \
             OPTIONS ('outputMode' 'append', 'queryName' 'per_window');
             INSERT INTO per_window SELECT window.start AS start, count(*) AS n, \
             sum(value) AS total FROM orders GROUP BY window(time, '10 seconds');",
            input.display(),
            out.display()
        ),
    )
    .unwrap();
    let brook = |trigger: &str| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_brook"));
        command
            .args(["run", script.to_str().unwrap(), "--trigger", trigger])
            .args(["--checkpoint", checkpoint.to_str().unwrap()])
            .args(["--progress", "json"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    };
    let lines =
        |l: &[&str]| -> Vec<String> { l.iter().map(|l| format!("2026-01-01 {l}")).collect() };
    // Batch 0 leaves the watermark at 00:00:24 and closes no window.
    put(
        &input,
        "file-0001.csv",
        &lines(&["00:00:21,a,1", "00:00:29,a,2"]),
    );
    let mut child = Killed(
        brook("100ms")
            .env("BROOK_PAUSE_AT", "per_window/offsets:1")
            .spawn()
            .unwrap(),
    );
    let stderr = child.0.stderr.take().unwrap();
    let (tx, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let wait_for = |wanted: &dyn Fn(&str) -> bool| loop {
        let line = seen
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|e| panic!("brook run said nothing more: {e}"));
        if wanted(&line) {
            return;
        }
    };
    wait_for(&|l| l.starts_with('{') && l.contains("\"batch_id\":0"));
    // Polls that find no file: the next batch judges rows late by 00:00:24.
    std::thread::sleep(Duration::from_secs(1));
    // The window of 00:00:12 ends before it: the batch drops the row as late.
    put(
        &input,
        "file-0002.csv",
        &lines(&["00:00:12,a,4", "00:00:51,b,8"]),
    );
    wait_for(&|l| l.contains("brook: paused at per_window/offsets:1"));
    drop(child);
    let logged = std::fs::read_to_string(checkpoint.join("per_window/offsets/1")).unwrap();
    let at_24_seconds = 1_767_225_624_000_000_000i64;
    assert!(
        logged.contains(&format!("\"late_ns\":{at_24_seconds}")),
        "{logged}"
    );

    let ran = brook("available-now").output().unwrap();
    let stderr = String::from_utf8_lossy(&ran.stderr);
    assert!(ran.status.success(), "{stderr}");
    let rerun: serde_json::Value = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|p| p["batch_id"] == 1)
        .unwrap_or_else(|| panic!("batch 1 did not run again: {stderr}"));
    assert_eq!(rerun["num_late_rows"], 1, "{rerun}");
    // Only [00:00:20, 00:00:30) closed, with batch 0's two rows: the late
    // row's window [00:00:10, 00:00:20) was never opened.
    let rows = json_sink_rows(&out);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((rows[0].1, rows[0].2), (2, 3), "{rows:?}");
    assert!(rows[0].0.contains("00:00:20"), "{rows:?}");
}
