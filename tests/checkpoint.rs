//! Checkpoints in one process: resuming, re-running an uncommitted batch,
//! refusing a changed query, a damaged file or a second query, and clean-up.
//! Killing a process at many points is `tests/crash.rs`.

mod common;
use common::*;

use std::path::Path;
use std::sync::Arc;

use brook::{Engine, StreamingQuery};

/// Top clients by traded amount into a memory table, checkpointed at `checkpoint`.
fn top_clients(input: &Path, checkpoint: &Path, group_by: &str) -> String {
    format!(
        "{} CREATE EXTERNAL TABLE top STORED AS MEMORY LOCATION '' OPTIONS
           ('outputMode' 'complete', 'checkpointLocation' '{}', 'minBatchesToRetain' '3');
         INSERT INTO top SELECT {group_by}, sum(amount * price) AS traded, count(*) AS orders
           FROM orders GROUP BY {group_by};",
        source_ddl(input, true),
        checkpoint.display()
    )
}

async fn run_available(engine: &Engine, script: &str) -> Arc<StreamingQuery> {
    let query = start_one(engine, script).await;
    query.process_all_available().await.unwrap();
    query
}

async fn top(engine: &Engine) -> Vec<Vec<String>> {
    sorted(table(
        &engine
            .sql("SELECT client_id, traded, orders FROM top")
            .await
            .unwrap(),
    ))
}

fn batch_ids_and_rows(query: &StreamingQuery) -> Vec<(u64, u64)> {
    query
        .recent_progress()
        .iter()
        .map(|p| (p.batch_id, p.num_input_rows))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_query_resumes_with_its_state_and_reads_only_new_files() {
    let (tmp, input) = tmp_source();
    let checkpoint = tmp.path().join("checkpoint");
    let script = top_clients(&input, &checkpoint, "client_id");
    put(
        &input,
        "a.csv",
        &[order("20:00:01", 1, "AAPL", 10, 2.0, "B")],
    );
    put(
        &input,
        "b.csv",
        &[order("20:00:02", 2, "MSFT", 5, 1.0, "S")],
    );

    let first = Engine::new();
    let query = run_available(&first, &script).await;
    let id = query.id().to_string();
    assert_eq!(batch_ids_and_rows(&query), [(0, 1), (1, 1)]);
    query.stop().await.unwrap();

    put(&input, "c.csv", &[order("20:00:03", 1, "IBM", 1, 4.0, "B")]);
    let second = Engine::new();
    let query = start_one(&second, &script).await;
    query.process_all_available().await.unwrap();
    assert_eq!(query.id(), id, "the query id survives a restart");
    assert_eq!(
        batch_ids_and_rows(&query),
        [(2, 1)],
        "a.csv and b.csv are not read again"
    );
    assert_eq!(
        top(&second).await,
        rows(&[&["101", "24.0", "2"], &["102", "5.0", "1"]])
    );
    query.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_memory_sink_is_rebuilt_from_state_on_restart() {
    let (tmp, input) = tmp_source();
    let checkpoint = tmp.path().join("checkpoint");
    let script = top_clients(&input, &checkpoint, "client_id");
    put(
        &input,
        "a.csv",
        &[order("20:00:01", 1, "AAPL", 10, 2.0, "B")],
    );
    let first = Engine::new();
    run_available(&first, &script).await.stop().await.unwrap();

    let second = Engine::new();
    let query = run_available(&second, &script).await;
    assert!(query.recent_progress().is_empty(), "no new input, no batch");
    assert_eq!(top(&second).await, rows(&[&["101", "20.0", "1"]]));
    query.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_logged_but_not_committed_runs_again_with_the_same_files() {
    let (tmp, input) = tmp_source();
    let checkpoint = tmp.path().join("checkpoint");
    let output = tmp.path().join("out");
    let script = format!(
        "{} CREATE EXTERNAL TABLE out STORED AS JSON LOCATION '{}' OPTIONS ('checkpointLocation' '{}');
         INSERT INTO out SELECT order_id, symbol FROM orders;",
        source_ddl(&input, false),
        output.display(),
        checkpoint.display()
    );
    put(
        &input,
        "a.csv",
        &[order("20:00:01", 1, "AAPL", 10, 2.0, "B")],
    );
    put(
        &input,
        "b.csv",
        &[order("20:00:02", 2, "MSFT", 5, 1.0, "S")],
    );
    run_available(&Engine::new(), &script)
        .await
        .stop()
        .await
        .unwrap();

    // As if the process had died after batch 1's sink write, before its commit.
    std::fs::remove_file(checkpoint.join("commits/1")).unwrap();
    put(&input, "c.csv", &[order("20:00:03", 3, "IBM", 1, 4.0, "B")]);
    let query = run_available(&Engine::new(), &script).await;
    assert_eq!(
        batch_ids_and_rows(&query),
        [(1, 1), (2, 1)],
        "batch 1 re-runs with b.csv alone, then c.csv is batch 2"
    );
    assert_eq!(
        query.recent_progress()[0].sources[0].offset,
        serde_json::from_str::<serde_json::Value>(
            std::fs::read_to_string(checkpoint.join("offsets/1"))
                .unwrap()
                .split_once('\n')
                .unwrap()
                .1
        )
        .unwrap()["source"]
    );
    query.stop().await.unwrap();

    let mut parts: Vec<String> = std::fs::read_dir(&output)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("part-"))
        .collect();
    parts.sort();
    assert_eq!(parts.len(), 3, "the re-run replaced its part: {parts:?}");
    let lines: Vec<String> = parts
        .iter()
        .flat_map(|p| {
            std::fs::read_to_string(output.join(p))
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(
        lines,
        [
            r#"{"order_id":1,"symbol":"AAPL"}"#,
            r#"{"order_id":2,"symbol":"MSFT"}"#,
            r#"{"order_id":3,"symbol":"IBM"}"#
        ]
    );
}

async fn start_error(script: &str) -> String {
    Engine::new().execute(script).await.unwrap_err().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_query_is_refused_naming_the_difference() {
    let (tmp, input) = tmp_source();
    let checkpoint = tmp.path().join("checkpoint");
    put(
        &input,
        "a.csv",
        &[order("20:00:01", 1, "AAPL", 10, 2.0, "B")],
    );
    run_available(
        &Engine::new(),
        &top_clients(&input, &checkpoint, "client_id"),
    )
    .await
    .stop()
    .await
    .unwrap();

    let err = start_error(&top_clients(&input, &checkpoint, "symbol")).await;
    assert!(
        err.contains("GROUP BY: checkpoint has [orders.client_id], this query has [orders.symbol]"),
        "{err}"
    );
    assert!(err.contains(&checkpoint.display().to_string()), "{err}");

    let other_dir = tmp.path().join("elsewhere");
    std::fs::create_dir(&other_dir).unwrap();
    let err = start_error(&top_clients(&other_dir, &checkpoint, "client_id")).await;
    assert!(err.contains("source: checkpoint has orders CSV"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_checkpoint_files_are_reported_with_their_path() {
    let (tmp, input) = tmp_source();
    let checkpoint = tmp.path().join("checkpoint");
    let script = top_clients(&input, &checkpoint, "client_id");
    put(
        &input,
        "a.csv",
        &[order("20:00:01", 1, "AAPL", 10, 2.0, "B")],
    );
    put(
        &input,
        "b.csv",
        &[order("20:00:02", 2, "MSFT", 5, 1.0, "S")],
    );
    run_available(&Engine::new(), &script)
        .await
        .stop()
        .await
        .unwrap();
    // A truncated offset file.
    let offsets = checkpoint.join("offsets/1");
    let original = std::fs::read(&offsets).unwrap();
    std::fs::write(&offsets, &original[..original.len() - 5]).unwrap();
    let err = failure(&script).await;
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(err.contains(&offsets.display().to_string()), "{err}");
    std::fs::write(&offsets, &original).unwrap();

    // A state file with one byte changed.
    let state = checkpoint.join("state/aggregate/1.arrow");
    let mut bytes = std::fs::read(&state).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&state, &bytes).unwrap();
    let err = failure(&script).await;
    assert!(err.contains("damaged"), "{err}");
    assert!(err.contains(&state.display().to_string()), "{err}");
    bytes[middle] ^= 0x55;
    std::fs::write(&state, &bytes).unwrap();

    // A commit from a later checkpoint format.
    let commit = checkpoint.join("commits/1");
    let original = std::fs::read(&commit).unwrap();
    let mut newer = b"v9".to_vec();
    newer.extend_from_slice(&original[2..]);
    std::fs::write(&commit, &newer).unwrap();
    let err = failure(&script).await;
    assert!(err.contains("checkpoint format v9"), "{err}");
    std::fs::write(&commit, &original).unwrap();

    // An empty commit file.
    std::fs::write(&commit, b"").unwrap();
    let err = failure(&script).await;
    assert!(err.contains("truncated"), "{err}");
    assert!(err.contains(&commit.display().to_string()), "{err}");
}

/// The error a query started from `script` fails with.
async fn failure(script: &str) -> String {
    let engine = Engine::new();
    let query = start_one(&engine, script).await;
    query.await_termination().await.unwrap_err().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_query_on_a_checkpoint_in_use_is_refused() {
    let (tmp, input) = tmp_source();
    let checkpoint = tmp.path().join("checkpoint");
    let script = top_clients(&input, &checkpoint, "client_id");
    let first = Engine::new();
    let running = start_one(&first, &script).await;
    let err = start_error(&script).await;
    assert!(err.contains("in use by another running query"), "{err}");
    running.stop().await.unwrap();
    drop(first);
    // Once the first query is gone, the checkpoint is free again.
    Engine::new().execute(&script).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_batches_are_cleaned_up_beyond_the_retained_ones() {
    let (tmp, input) = tmp_source();
    let checkpoint = tmp.path().join("checkpoint");
    let script = top_clients(&input, &checkpoint, "client_id");
    for i in 0..25 {
        put(
            &input,
            &format!("{i:02}.csv"),
            &[order("20:00:01", i, "AAPL", 1, 1.0, "B")],
        );
    }
    let engine = Engine::new();
    let query = run_available(&engine, &script).await;
    assert_eq!(query.last_progress().unwrap().batch_id, 24);
    query.stop().await.unwrap();
    let names = |dir: &str| {
        let mut n: Vec<String> = std::fs::read_dir(checkpoint.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort_by_key(|s| s.split('.').next().unwrap().parse::<u64>().unwrap());
        n
    };
    // Clean-up runs with each source snapshot (after batch 19, before batch 20)
    // and keeps 3 batches before it, plus everything since.
    assert_eq!(names("sources"), ["20"]);
    let kept: Vec<String> = (17..25).map(|i| i.to_string()).collect();
    assert_eq!(names("offsets"), kept);
    assert_eq!(names("commits"), kept);
    // State files go with them, except from the snapshot the latest commit at
    // clean-up (batch 19) built on: its changes, and snapshots written since,
    // which a next commit may name. The last commit's files are all there.
    let commit = |batch: u64| {
        let text = std::fs::read_to_string(checkpoint.join(format!("commits/{batch}"))).unwrap();
        serde_json::from_str::<serde_json::Value>(text.split_once('\n').unwrap().1).unwrap()
    };
    let name = |file: &serde_json::Value| {
        let path = file["file"].as_str().unwrap();
        path.strip_prefix("state/aggregate/").unwrap().to_string()
    };
    let state_files = names("state/aggregate");
    let last = commit(24);
    let changes = last["state_deltas"]["aggregate"].as_array().unwrap();
    for file in changes.iter().chain([&last["state"]["aggregate"]]) {
        assert!(
            state_files.contains(&name(file)),
            "{file} is gone: {state_files:?}"
        );
    }
    let floor = commit(19)["state"]["aggregate"]["batch_id"]
        .as_u64()
        .unwrap();
    for file in &state_files {
        let batch: u64 = file.split('.').next().unwrap().parse().unwrap();
        assert!(batch >= floor.min(17), "{file} was kept: {state_files:?}");
    }
    assert!(
        state_files.iter().any(|f| f.ends_with(".delta.arrow")),
        "a batch that changes one client of many writes only its changes: {state_files:?}"
    );

    let again = Engine::new();
    let query = run_available(&again, &script).await;
    assert!(query.recent_progress().is_empty());
    assert_eq!(top(&again).await.len(), 25);
    query.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_skipped_at_the_first_start_stay_skipped_after_a_restart() {
    let (tmp, input) = tmp_source();
    let checkpoint = tmp.path().join("checkpoint");
    let script = format!(
        "CREATE UNBOUNDED EXTERNAL TABLE orders (time TIMESTAMP NOT NULL, order_id BIGINT, \
         client_id BIGINT, symbol VARCHAR, amount INT, price DOUBLE, buy_sell VARCHAR) \
         STORED AS CSV LOCATION '{}' OPTIONS ('includeExistingFiles' 'false');
         CREATE EXTERNAL TABLE ids STORED AS MEMORY LOCATION '' OPTIONS ('checkpointLocation' '{}');
         INSERT INTO ids SELECT order_id FROM orders;",
        input.display(),
        checkpoint.display()
    );
    put(
        &input,
        "old.csv",
        &[order("20:00:01", 1, "AAPL", 1, 1.0, "B")],
    );
    run_available(&Engine::new(), &script)
        .await
        .stop()
        .await
        .unwrap();
    put(
        &input,
        "new.csv",
        &[order("20:00:02", 2, "AAPL", 1, 1.0, "B")],
    );
    let engine = Engine::new();
    let query = run_available(&engine, &script).await;
    assert_eq!(
        table(&engine.sql("SELECT order_id FROM ids").await.unwrap()),
        rows(&[&["2"]])
    );
    query.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_location_that_is_a_file_is_refused_clearly() {
    let (tmp, input) = tmp_source();
    let file = tmp.path().join("checkpoint");
    std::fs::write(&file, "not a directory").unwrap();
    let err = start_error(&top_clients(&input, &file, "client_id")).await;
    assert!(
        err.contains(&file.display().to_string())
            && err.contains("(it is a file)")
            && err.contains("names a directory"),
        "{err}"
    );
    let below = file.join("query");
    let err = start_error(&top_clients(&input, &below, "client_id")).await;
    assert!(
        err.contains(&below.display().to_string()) && err.contains("a parent is a file"),
        "{err}"
    );
}

/// Sliding windows over 20 symbols, one file per 2 minutes of event time.
fn hourly_shares(input: &Path, checkpoint: &Path) -> String {
    format!(
        "{} CREATE EXTERNAL TABLE shares STORED AS MEMORY LOCATION '' OPTIONS
           ('outputMode' 'append', 'checkpointLocation' '{}');
         INSERT INTO shares SELECT window.start AS ws, symbol, sum(amount) AS shares
           FROM orders GROUP BY window(time, '1 hour', '10 minutes'), symbol;",
        source_ddl(input, true),
        checkpoint.display()
    )
}

fn put_minutes(input: &Path, files: std::ops::Range<i64>) {
    for i in files {
        let minute = i * 2;
        let time = format!("{:02}:{:02}:00", 20 + minute / 60, minute % 60);
        let lines: Vec<String> = (0..20)
            .map(|s| {
                order(
                    &time,
                    i * 100 + s,
                    &format!("S{s:02}"),
                    (i + s) as i32,
                    1.0,
                    "B",
                )
            })
            .collect();
        put(input, &format!("{i:03}.csv"), &lines);
    }
}

async fn shares(engine: &Engine) -> Vec<Vec<String>> {
    table(
        &engine
            .sql("SELECT ws, symbol, shares FROM shares")
            .await
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_state_saved_as_changes_resumes_exactly() {
    let (tmp, input) = tmp_source();
    let reference_input = tmp.path().join("reference_orders");
    std::fs::create_dir_all(&reference_input).unwrap();
    put_minutes(&reference_input, 0..60);
    let reference = Engine::new();
    let script = hourly_shares(&reference_input, &tmp.path().join("reference"));
    run_available(&reference, &script)
        .await
        .stop()
        .await
        .unwrap();
    let want = sorted(shares(&reference).await);
    assert!(want.len() > 100, "{} windows closed", want.len());

    let checkpoint = tmp.path().join("checkpoint");
    let script = hourly_shares(&input, &checkpoint);
    put_minutes(&input, 0..37);
    let first = Engine::new();
    run_available(&first, &script).await.stop().await.unwrap();
    let mut got = shares(&first).await;

    // The last commit builds on a snapshot and the changes written since.
    let last = (0..)
        .take_while(|b| checkpoint.join(format!("commits/{b}")).exists())
        .last()
        .unwrap();
    let commit = std::fs::read_to_string(checkpoint.join(format!("commits/{last}"))).unwrap();
    // A build that knows only whole-state commits (v1) refuses it.
    assert!(commit.starts_with("v2 crc32="), "{commit}");
    let commit: serde_json::Value =
        serde_json::from_str(commit.split_once('\n').unwrap().1).unwrap();
    let changes = commit["state_deltas"]["aggregate"].as_array().unwrap();
    assert!(!changes.is_empty(), "{commit}");
    let change = checkpoint.join(changes[0]["file"].as_str().unwrap());
    let mut bytes = std::fs::read(&change).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&change, &bytes).unwrap();
    let err = failure(&script).await;
    assert!(err.contains("damaged"), "{err}");
    assert!(err.contains(&change.display().to_string()), "{err}");
    bytes[middle] ^= 0x55;
    std::fs::write(&change, &bytes).unwrap();

    put_minutes(&input, 37..60);
    let second = Engine::new();
    run_available(&second, &script).await.stop().await.unwrap();
    got.extend(shares(&second).await);
    assert_eq!(sorted(got), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_with_names_that_need_escaping_are_read_once_across_restarts() {
    let (tmp, input) = tmp_source();
    let checkpoint = tmp.path().join("checkpoint");
    let script = top_clients(&input, &checkpoint, "client_id");
    put(
        &input,
        "day one #1b.csv",
        &[order("20:00:01", 1, "AAPL", 10, 2.0, "B")],
    );
    put(
        &input,
        "zürich%.csv",
        &[order("20:00:02", 2, "MSFT", 5, 1.0, "S")],
    );
    let first = Engine::new();
    let query = run_available(&first, &script).await;
    assert_eq!(batch_ids_and_rows(&query), [(0, 1), (1, 1)]);
    query.stop().await.unwrap();

    let second = Engine::new();
    let query = run_available(&second, &script).await;
    assert!(query.recent_progress().is_empty(), "nothing is read again");
    assert_eq!(top(&second).await.len(), 2);
    query.stop().await.unwrap();
}

/// Each order's id and symbol into JSON part files in `output`, one file per batch.
fn orders_to_json(input: &Path, output: &Path, checkpoint: &Path) -> String {
    format!(
        "{} CREATE EXTERNAL TABLE out STORED AS JSON LOCATION '{}' OPTIONS ('checkpointLocation' '{}');
         INSERT INTO out SELECT order_id, symbol FROM orders;",
        source_ddl(input, false),
        output.display(),
        checkpoint.display()
    )
}

/// The lines of all part files in `output`, sorted.
fn sink_lines(output: &Path) -> Vec<String> {
    let mut lines = vec![];
    for entry in std::fs::read_dir(output).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("part-")
        {
            let text = std::fs::read_to_string(&path).unwrap();
            lines.extend(text.lines().map(str::to_string));
        }
    }
    lines.sort();
    lines
}

fn order_lines(ids: &[(i64, &str)]) -> Vec<String> {
    ids.iter()
        .map(|(id, symbol)| format!(r#"{{"order_id":{id},"symbol":"{symbol}"}}"#))
        .collect()
}

/// Orders 1 (a.csv), 2 (b.csv) and 3 (c.csv) run as batches 0, 1 and 2.
async fn three_batches(input: &Path, script: &str) {
    put(input, "a.csv", &[order("20:00:01", 1, "AAPL", 1, 1.0, "B")]);
    put(input, "b.csv", &[order("20:00:02", 2, "MSFT", 1, 1.0, "S")]);
    put(input, "c.csv", &[order("20:00:03", 3, "IBM", 1, 1.0, "B")]);
    let query = run_available(&Engine::new(), script).await;
    assert_eq!(batch_ids_and_rows(&query), [(0, 1), (1, 1), (2, 1)]);
    query.stop().await.unwrap();
}

/// The error a restarted query fails with; a query that runs instead fails the test.
async fn refusal(script: &str) -> String {
    let engine = Engine::new();
    let query = start_one(&engine, script).await;
    let outcome = query.process_all_available().await;
    let _ = query.stop().await;
    match outcome {
        Ok(()) => panic!("the query ran: {:?}", batch_ids_and_rows(&query)),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_commit_copied_under_a_later_batch_number_is_refused() {
    let (tmp, input) = tmp_source();
    let (checkpoint, output) = (tmp.path().join("checkpoint"), tmp.path().join("out"));
    let script = orders_to_json(&input, &output, &checkpoint);
    three_batches(&input, &script).await;
    // Resuming after "batch 0" would run d.csv as batch 1 and overwrite b.csv's part.
    let stale = checkpoint.join("commits/2");
    std::fs::copy(checkpoint.join("commits/0"), &stale).unwrap();
    put(&input, "d.csv", &[order("20:00:04", 4, "SAP", 1, 1.0, "S")]);
    let err = refusal(&script).await;
    assert!(
        err.contains(&stale.display().to_string())
            && err.contains("holds batch 0's commit, not batch 2's"),
        "{err}"
    );
    assert_eq!(
        sink_lines(&output),
        order_lines(&[(1, "AAPL"), (2, "MSFT"), (3, "IBM")])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_offsets_copied_under_the_batch_to_rerun_are_refused() {
    let (tmp, input) = tmp_source();
    let (checkpoint, output) = (tmp.path().join("checkpoint"), tmp.path().join("out"));
    let script = orders_to_json(&input, &output, &checkpoint);
    three_batches(&input, &script).await;
    // Batch 2 planned but not committed, its offsets replaced by batch 1's:
    // re-running it would count b.csv's order twice.
    std::fs::remove_file(checkpoint.join("commits/2")).unwrap();
    let stale = checkpoint.join("offsets/2");
    std::fs::copy(checkpoint.join("offsets/1"), &stale).unwrap();
    let err = refusal(&script).await;
    assert!(
        err.contains(&stale.display().to_string())
            && err.contains("holds batch 1's offsets, not batch 2's"),
        "{err}"
    );
    assert_eq!(
        sink_lines(&output),
        order_lines(&[(1, "AAPL"), (2, "MSFT"), (3, "IBM")])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_from_another_checkpoint_are_refused() {
    let (tmp, input) = tmp_source();
    let (checkpoint, output) = (tmp.path().join("checkpoint"), tmp.path().join("out"));
    let script = orders_to_json(&input, &output, &checkpoint);
    three_batches(&input, &script).await;
    // The same query over the same files with a checkpoint of its own.
    let other = tmp.path().join("other");
    let other_script = orders_to_json(&input, &tmp.path().join("other_out"), &other);
    run_available(&Engine::new(), &other_script)
        .await
        .stop()
        .await
        .unwrap();
    std::fs::remove_file(checkpoint.join("commits/2")).unwrap();
    let foreign = checkpoint.join("offsets/2");
    std::fs::copy(other.join("offsets/2"), &foreign).unwrap();
    let err = refusal(&script).await;
    assert!(
        err.contains(&foreign.display().to_string()) && err.contains("written by another query"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_from_a_diverged_copy_of_the_checkpoint_is_refused() {
    let (tmp, input) = tmp_source();
    let (checkpoint, output) = (tmp.path().join("checkpoint"), tmp.path().join("out"));
    let script = orders_to_json(&input, &output, &checkpoint);
    put(
        &input,
        "a.csv",
        &[order("20:00:01", 1, "AAPL", 1, 1.0, "B")],
    );
    run_available(&Engine::new(), &script)
        .await
        .stop()
        .await
        .unwrap();
    // A copy of the checkpoint (same query id) goes on with other input.
    let copy = tmp.path().join("copy");
    let copied = std::process::Command::new("cp")
        .args(["-a"])
        .arg(&checkpoint)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(copied.success());
    let copy_script = orders_to_json(&input, &tmp.path().join("copy_out"), &copy);
    put(&input, "x.csv", &[order("20:00:09", 9, "XOM", 1, 1.0, "S")]);
    run_available(&Engine::new(), &copy_script)
        .await
        .stop()
        .await
        .unwrap();
    std::fs::remove_file(input.join("x.csv")).unwrap();
    put(
        &input,
        "b.csv",
        &[order("20:00:02", 2, "MSFT", 1, 1.0, "S")],
    );
    run_available(&Engine::new(), &script)
        .await
        .stop()
        .await
        .unwrap();
    // Both have a batch 1: x.csv in the copy, b.csv here.
    let mixed = checkpoint.join("commits/1");
    std::fs::copy(copy.join("commits/1"), &mixed).unwrap();
    let err = refusal(&script).await;
    assert!(
        err.contains(&mixed.display().to_string())
            && err.contains("does not follow")
            && err.contains("offsets/1"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_source_snapshot_copied_under_a_later_number_is_refused() {
    let (tmp, input) = tmp_source();
    let (checkpoint, output) = (tmp.path().join("checkpoint"), tmp.path().join("out"));
    let script = orders_to_json(&input, &output, &checkpoint);
    put(
        &input,
        "00.csv",
        &[order("20:00:00", 100, "AAPL", 1, 1.0, "B")],
    );
    run_available(&Engine::new(), &script)
        .await
        .stop()
        .await
        .unwrap();
    let first = std::fs::read(checkpoint.join("sources/0")).unwrap();
    for i in 1..12 {
        put(
            &input,
            &format!("{i:02}.csv"),
            &[order("20:00:01", 100 + i, "AAPL", 1, 1.0, "B")],
        );
    }
    run_available(&Engine::new(), &script)
        .await
        .stop()
        .await
        .unwrap();
    // The source's progress before batch 0 as that before batch 10: every file
    // read since would be read again.
    let stale = checkpoint.join("sources/10");
    assert!(stale.exists());
    let before = sink_lines(&output);
    assert_eq!(before.len(), 12);
    std::fs::write(&stale, first).unwrap();
    put(
        &input,
        "12.csv",
        &[order("20:00:02", 112, "AAPL", 1, 1.0, "B")],
    );
    let err = refusal(&script).await;
    assert!(
        err.contains(&stale.display().to_string())
            && err.contains("holds the source's progress before batch 0, not before batch 10"),
        "{err}"
    );
    assert_eq!(sink_lines(&output), before);
}

/// Rewrites a checkpoint JSON file as `change` says, with a header of `version`
/// (by default the file's own).
fn rewrite(
    path: &Path,
    version: Option<&str>,
    change: impl Fn(serde_json::Value) -> serde_json::Value,
) {
    let text = std::fs::read_to_string(path).unwrap();
    let (header, body) = text.split_once('\n').unwrap();
    let version = version.unwrap_or_else(|| header.split(' ').next().unwrap());
    let body: serde_json::Value = serde_json::from_str(body).unwrap();
    let body = serde_json::to_vec(&change(body)).unwrap();
    let mut bytes = format!("{version} crc32={:08x}\n", crc32fast::hash(&body)).into_bytes();
    bytes.extend_from_slice(&body);
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_written_before_batch_links_still_resumes() {
    let (tmp, input) = tmp_source();
    let checkpoint = tmp.path().join("checkpoint");
    let script = top_clients(&input, &checkpoint, "client_id");
    put(
        &input,
        "a.csv",
        &[order("20:00:01", 1, "AAPL", 10, 2.0, "B")],
    );
    put(
        &input,
        "b.csv",
        &[order("20:00:02", 2, "MSFT", 5, 1.0, "S")],
    );
    run_available(&Engine::new(), &script)
        .await
        .stop()
        .await
        .unwrap();
    // As the previous release wrote them: no query id or digests in the logs,
    // the source's progress alone in its file.
    for dir in ["offsets", "commits"] {
        for entry in std::fs::read_dir(checkpoint.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            rewrite(&path, None, |mut v| {
                let fields = v.as_object_mut().unwrap();
                for new in ["query_id", "previous_commit_crc32", "offsets_crc32"] {
                    fields.remove(new);
                }
                v
            });
        }
    }
    rewrite(&checkpoint.join("sources/0"), Some("v1"), |v| {
        v["progress"].clone()
    });

    put(&input, "c.csv", &[order("20:00:03", 1, "IBM", 1, 4.0, "B")]);
    let engine = Engine::new();
    let query = run_available(&engine, &script).await;
    assert_eq!(batch_ids_and_rows(&query), [(2, 1)]);
    assert_eq!(
        top(&engine).await,
        rows(&[&["101", "24.0", "2"], &["102", "5.0", "1"]])
    );
    query.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_files_a_kill_leaves_are_removed_at_the_next_start() {
    let (tmp, input) = tmp_source();
    let checkpoint = tmp.path().join("checkpoint");
    let script = top_clients(&input, &checkpoint, "client_id");
    put(
        &input,
        "a.csv",
        &[order("20:00:01", 1, "AAPL", 10, 2.0, "B")],
    );
    run_available(&Engine::new(), &script)
        .await
        .stop()
        .await
        .unwrap();
    // What a write killed before its rename leaves: `.<name>.tmp` beside the file.
    let left = [
        ".metadata.tmp",
        "offsets/.1.tmp",
        "commits/.1.tmp",
        "sources/.30.tmp",
        "state/aggregate/.1.arrow.tmp",
        "state/aggregate/.1.delta.arrow.tmp",
    ];
    for name in left {
        std::fs::write(checkpoint.join(name), "half written").unwrap();
    }
    put(
        &input,
        "b.csv",
        &[order("20:00:02", 2, "MSFT", 5, 1.0, "S")],
    );
    let engine = Engine::new();
    let query = run_available(&engine, &script).await;
    assert_eq!(batch_ids_and_rows(&query), [(1, 1)]);
    query.stop().await.unwrap();
    for name in left {
        assert!(!checkpoint.join(name).exists(), "{name} is still there");
    }
}

#[test]
fn a_query_name_that_leaves_the_checkpoint_directory_is_refused() {
    let (tmp, input) = tmp_source();
    let project = tmp.path().join("project");
    std::fs::create_dir(&project).unwrap();
    for name in ["../../x", "a/b", "..", ".", ""] {
        let script = format!(
            "{} CREATE EXTERNAL TABLE out STORED AS MEMORY LOCATION '' OPTIONS ('queryName' '{name}');
             INSERT INTO out SELECT order_id FROM orders;",
            source_ddl(&input, false)
        );
        std::fs::write(project.join("q.sql"), script).unwrap();
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_brook"))
            .args(["run", "q.sql", "--checkpoint", "checkpoint"])
            .args(["--trigger", "available-now"])
            .current_dir(&project)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{name}: {stderr}");
        assert!(
            stderr.contains("queryName") && stderr.contains(&format!("'{name}'")),
            "{name}: {stderr}"
        );
        assert!(!tmp.path().join("x").exists());
    }
}

#[test]
fn a_quoted_sink_name_that_leaves_the_checkpoint_directory_is_refused() {
    let (tmp, input) = tmp_source();
    let project = tmp.path().join("project");
    std::fs::create_dir(&project).unwrap();
    for name in ["../../x", "a/b", ".."] {
        let script = format!(
            "{} CREATE EXTERNAL TABLE \"{name}\" STORED AS MEMORY LOCATION '';
             INSERT INTO \"{name}\" SELECT order_id FROM orders;",
            source_ddl(&input, false)
        );
        std::fs::write(project.join("q.sql"), script).unwrap();
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_brook"))
            .args(["run", "q.sql", "--checkpoint", "checkpoint"])
            .args(["--trigger", "available-now"])
            .current_dir(&project)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{name}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "sink table \"{name}\" cannot name its query's checkpoint"
            )) && stderr.contains("queryName"),
            "{name}: {stderr}"
        );
        assert!(!tmp.path().join("x").exists());
        assert!(!project.join("a").exists());
    }
}

/// Each distinct (order_id, symbol) of the orders into JSON part files.
fn distinct_orders(input: &Path, output: &Path, checkpoint: &Path) -> String {
    format!(
        "{} CREATE EXTERNAL TABLE out STORED AS JSON LOCATION '{}' OPTIONS ('checkpointLocation' '{}');
         INSERT INTO out SELECT DISTINCT order_id, symbol FROM orders;",
        source_ddl(input, false),
        output.display(),
        checkpoint.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_distinct_keeps_its_seen_keys_across_a_restart() {
    let (tmp, input) = tmp_source();
    let checkpoint = tmp.path().join("checkpoint");
    let output = tmp.path().join("out");
    let script = distinct_orders(&input, &output, &checkpoint);
    // Orders as a producer re-sending after a crash writes them: some twice.
    let files: [(&str, &[(i64, &str)]); 5] = [
        ("a.csv", &[(1, "AAPL"), (2, "MSFT"), (1, "AAPL")]),
        ("b.csv", &[(2, "MSFT"), (3, "IBM")]),
        ("c.csv", &[(3, "IBM"), (1, "AAPL"), (4, "AAPL")]),
        ("d.csv", &[(4, "AAPL"), (5, "MSFT"), (2, "MSFT")]),
        ("e.csv", &[(6, "IBM"), (6, "IBM")]),
    ];
    let put_file = |(name, ids): (&str, &[(i64, &str)])| {
        let lines: Vec<String> = ids
            .iter()
            .map(|(id, symbol)| order("20:00:01", *id, symbol, 1, 1.0, "B"))
            .collect();
        put(&input, name, &lines);
    };
    files[..2].iter().for_each(|f| put_file(*f));
    let query = run_available(&Engine::new(), &script).await;
    assert_eq!(batch_ids_and_rows(&query), [(0, 3), (1, 2)]);
    query.stop().await.unwrap();
    assert_eq!(
        sink_lines(&output),
        order_lines(&[(1, "AAPL"), (2, "MSFT"), (3, "IBM")])
    );

    files[2..4].iter().for_each(|f| put_file(*f));
    let query = run_available(&Engine::new(), &script).await;
    assert_eq!(batch_ids_and_rows(&query), [(2, 3), (3, 3)]);
    let dedup = &query.recent_progress()[1].state_operators[0];
    assert_eq!(
        (
            dedup.operator.as_str(),
            dedup.num_rows_total,
            dedup.num_dropped_duplicate_rows
        ),
        ("dedupe", 5, Some(2)),
        "keys held and duplicates dropped after d.csv"
    );
    query.stop().await.unwrap();

    // As if the process had died after batch 3's sink write, before its commit:
    // the batch runs again over the state batch 2 committed.
    std::fs::remove_file(checkpoint.join("commits/3")).unwrap();
    put_file(files[4]);
    let query = run_available(&Engine::new(), &script).await;
    assert_eq!(batch_ids_and_rows(&query), [(3, 3), (4, 2)]);
    query.stop().await.unwrap();

    // Each distinct pair of the input once: none lost, none emitted twice.
    let mut expected: Vec<(i64, &str)> = files.iter().flat_map(|(_, ids)| ids.to_vec()).collect();
    expected.sort();
    expected.dedup();
    assert_eq!(expected.len(), 6);
    assert_eq!(sink_lines(&output), order_lines(&expected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_by_checkpoint_is_refused_to_the_same_keys_under_select_distinct() {
    let (tmp, input) = tmp_source();
    let checkpoint = tmp.path().join("checkpoint");
    put(
        &input,
        "a.csv",
        &[order("20:00:01", 1, "AAPL", 10, 2.0, "B")],
    );
    let grouped = format!(
        "{} CREATE EXTERNAL TABLE out STORED AS MEMORY LOCATION '' OPTIONS
           ('outputMode' 'update', 'checkpointLocation' '{}');
         INSERT INTO out SELECT order_id, symbol FROM orders GROUP BY order_id, symbol;",
        source_ddl(&input, false),
        checkpoint.display()
    );
    run_available(&Engine::new(), &grouped)
        .await
        .stop()
        .await
        .unwrap();
    let distinct = grouped.replace("'update'", "'append'").replace(
        "SELECT order_id, symbol FROM orders GROUP BY order_id, symbol",
        "SELECT DISTINCT order_id, symbol FROM orders",
    );
    let err = start_error(&distinct).await;
    assert!(err.contains("this query has [SELECT DISTINCT]"), "{err}");
}
