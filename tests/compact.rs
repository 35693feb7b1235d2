//! Compaction of a file sink's output: `compactEvery` on the sink, and
//! `brook compact DIR`, as a user runs them, with readers that follow the
//! manifest and readers that glob the whole directory.

#[allow(dead_code)] // the other tools are for other tests
#[path = "common/tools.rs"]
mod tools;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use brook::datafusion::arrow::array::{Array, Int64Array};
use brook::datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use brook::datafusion::prelude::{ParquetReadOptions, SessionContext};
use brook::source::write_atomically;

fn brook() -> Command {
    Command::new(env!("CARGO_BIN_EXE_brook"))
}

fn ok(out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "brook failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn failure(out: Output) -> String {
    assert!(!out.status.success(), "brook succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Input file `n` of the source: ten rows, ids `10n .. 10n+9`.
fn put_input(dir: &Path, n: u64) {
    let text: String = (10 * n..10 * n + 10)
        .map(|id| format!("{id},v{id}\n"))
        .collect();
    write_atomically(dir, &format!("in-{n:05}.csv"), text.as_bytes()).unwrap();
}

/// A script copying the input into a Parquet sink at `out` with `options`.
fn script(dir: &Path, out: &str, options: &str) -> std::path::PathBuf {
    let sql = format!(
        "CREATE UNBOUNDED EXTERNAL TABLE src (id BIGINT NOT NULL, v VARCHAR NOT NULL) \
         STORED AS CSV LOCATION '{}' OPTIONS ('maxFilesPerTrigger' '1');\n\
         CREATE EXTERNAL TABLE out STORED AS PARQUET LOCATION '{out}' {options};\n\
         INSERT INTO out SELECT id, v FROM src;\n",
        dir.join("in").display()
    );
    let path = dir.join("q.sql");
    std::fs::write(&path, sql).unwrap();
    path
}

fn run_available_now(dir: &Path, script: &Path) {
    ok(brook()
        .args([
            "run",
            script.to_str().unwrap(),
            "--checkpoint",
            "checkpoint",
        ])
        .args(["--trigger", "available-now"])
        .current_dir(dir)
        .output()
        .unwrap());
}

/// The live files of a sink directory, as its manifest says: the batch
/// entries' files, minus those compaction entries removed, plus those they added.
fn live_files(out: &Path) -> Vec<String> {
    let mut files = BTreeSet::new();
    let mut removed = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir(out.join("_brook_manifest")) else {
        return vec![]; // no batch written yet
    };
    for entry in entries {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.starts_with('.') {
            continue;
        }
        let json: serde_json::Value = serde_json::from_slice(
            &std::fs::read(out.join("_brook_manifest").join(&name)).unwrap(),
        )
        .unwrap();
        let list = if name.starts_with("compact-") {
            for path in json["removed"].as_array().unwrap() {
                removed.insert(path.as_str().unwrap().to_string());
            }
            &json["added"]
        } else {
            &json["files"]
        };
        for file in list.as_array().unwrap() {
            files.insert(file["path"].as_str().unwrap().to_string());
        }
    }
    files.difference(&removed).cloned().collect()
}

fn ids_in(path: &Path) -> Vec<i64> {
    let file = std::fs::File::open(path).unwrap();
    let mut ids = vec![];
    for batch in ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap()
    {
        let batch = batch.unwrap();
        let col = batch.column_by_name("id").unwrap();
        let col = col.as_any().downcast_ref::<Int64Array>().unwrap();
        ids.extend((0..col.len()).map(|i| col.value(i)));
    }
    ids
}

/// The ids in the live files, sorted.
fn live_ids(out: &Path) -> Vec<i64> {
    let mut ids: Vec<i64> = live_files(out)
        .iter()
        .flat_map(|f| ids_in(&out.join(f)))
        .collect();
    ids.sort();
    ids
}

/// The ids that `inputs` files hold: what a recount of the input gives.
fn recount(inputs: u64) -> Vec<i64> {
    (0..10 * inputs as i64).collect()
}

/// The data files anywhere in the directory, outside the manifest.
fn data_files(out: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".parquet"))
        .collect();
    names.sort();
    names
}

/// `count(*)` and `count(DISTINCT id)` of the whole directory through DataFusion's ListingTable.
async fn listing_counts(out: &Path) -> (i64, i64) {
    let ctx = SessionContext::new();
    ctx.register_parquet("t", out.to_str().unwrap(), ParquetReadOptions::default())
        .await
        .unwrap();
    let batches = ctx
        .sql("SELECT count(*), count(DISTINCT id) FROM t")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let value = |c: usize| {
        batches[0]
            .column(c)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .value(0)
    };
    (value(0), value(1))
}

fn compact(dir: &Path, args: &[&str]) -> String {
    ok(brook()
        .arg("compact")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap())
}

#[tokio::test]
async fn a_sink_compacting_every_ten_batches_keeps_few_live_files_and_every_row_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir(dir.join("in")).unwrap();
    for n in 0..30 {
        put_input(&dir.join("in"), n);
    }
    let sql = script(dir, "out", "OPTIONS ('compactEvery' '10')");
    run_available_now(dir, &sql);
    let out = dir.join("out");
    let batches = std::fs::read_dir(out.join("_brook_manifest"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with('0')
        })
        .count();
    assert_eq!(batches, 30, "one batch per input file");
    // After batches 9, 19 and 29 everything merged into one file (far below 128 MiB).
    assert_eq!(live_files(&out).len(), 1, "{:?}", live_files(&out));
    assert_eq!(live_ids(&out), recount(30));
    // The files the last compaction replaced stay until the next run deletes them.
    assert!(data_files(&out).len() > 1, "{:?}", data_files(&out));
    let printed = compact(dir, &["out"]);
    assert!(printed.contains("live files: 1 ("), "{printed}");
    assert_eq!(data_files(&out), live_files(&out));
    assert_eq!(live_ids(&out), recount(30));
    assert_eq!(listing_counts(&out).await, (300, 300));
    let python = tools::python_readers();
    let read = Command::new(python)
        .args([
            "-c",
            "import sys, pyarrow.parquet as pq\n\
             ids = pq.read_table(sys.argv[1]).column('id').to_pylist()\n\
             print(len(ids), len(set(ids)), min(ids), max(ids))",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(ok(read).trim(), "300 300 0 299");
}

#[tokio::test]
async fn brook_compact_while_a_query_keeps_writing_loses_and_doubles_no_row() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir(dir.join("in")).unwrap();
    let sql = script(dir, "out", "");
    let mut run = brook()
        .args(["run", sql.to_str().unwrap(), "--checkpoint", "checkpoint"])
        .args(["--trigger", "50ms"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = dir.join("out");
    let inputs = 40;
    let mut merged = 0;
    let started = Instant::now();
    for n in 0..inputs {
        put_input(&dir.join("in"), n);
        if n % 4 == 3 {
            // The query has the files before the last two, and may be writing those now.
            while live_ids(&out).len() < 10 * (n as usize - 1) {
                assert!(run.try_wait().unwrap().is_none(), "brook run ended");
                assert!(
                    started.elapsed() < Duration::from_secs(120),
                    "the query stalls"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            let printed = compact(dir, &["out", "--target-file-size", "1k"]);
            if !printed.contains("merged 0 files") {
                merged += 1;
            }
        }
    }
    while live_ids(&out).len() < 10 * inputs as usize {
        assert!(run.try_wait().unwrap().is_none(), "brook run ended");
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the query stalls"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    run.kill().unwrap();
    run.wait().unwrap();
    assert!(merged > 0, "no compaction merged anything");
    assert_eq!(live_ids(&out), recount(inputs));
    // One run merges everything (far below 128 MiB); the next deletes what it replaced.
    compact(dir, &["out"]);
    assert_eq!(live_files(&out).len(), 1);
    let printed = compact(dir, &["out"]);
    assert!(printed.contains("merged 0 files into 0"), "{printed}");
    assert_eq!(live_ids(&out), recount(inputs));
    assert_eq!(data_files(&out), live_files(&out));
    assert_eq!(listing_counts(&out).await, (400, 400));
}

/// Runs `brook compact out` until it pauses at `point`, then kills it.
fn compact_killed_at(dir: &Path, point: &str) {
    let mut child = brook()
        .args(["compact", "out"])
        .env("BROOK_PAUSE_AT", point)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let paused = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .any(|line| line.starts_with("brook: paused at ") && line.ends_with(point));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(paused, "brook compact did not reach {point}");
}

#[tokio::test]
async fn a_compaction_killed_midway_leaves_the_old_or_the_new_live_set() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir(dir.join("in")).unwrap();
    for n in 0..20 {
        put_input(&dir.join("in"), n);
    }
    run_available_now(dir, &script(dir, "out", ""));
    let out = dir.join("out");
    assert_eq!(live_files(&out).len(), 20);

    // Killed with the merged file written and no entry: the old live set, and an orphan.
    compact_killed_at(dir, "compact-merged:1");
    assert_eq!(live_files(&out).len(), 20);
    assert_eq!(data_files(&out).len(), 21);
    assert_eq!(live_ids(&out), recount(20));

    // Killed with the entry written: the new live set; the replaced files are still there.
    compact_killed_at(dir, "compact-entry:1");
    assert_eq!(live_files(&out).len(), 1);
    assert_eq!(live_ids(&out), recount(20));

    // The next run deletes the replaced files and the orphan.
    let printed = compact(dir, &["out"]);
    assert!(printed.contains("deleted 21 files"), "{printed}");
    assert_eq!(data_files(&out), live_files(&out));
    assert_eq!(listing_counts(&out).await, (200, 200));

    // A query killed in its sink's compaction (beside its batches) loses nothing on restart.
    for n in 20..30 {
        put_input(&dir.join("in"), n);
    }
    let sql = script(dir, "out", "OPTIONS ('compactEvery' '5')");
    let mut child = brook()
        .args(["run", sql.to_str().unwrap(), "--checkpoint", "checkpoint"])
        .args(["--trigger", "available-now"])
        .env("BROOK_PAUSE_AT", "compact-entry:3")
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let paused = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .any(|line| line.starts_with("brook: paused at ") && line.ends_with("compact-entry:3"));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(paused, "the query did not reach compact-entry:3");
    run_available_now(dir, &sql);
    assert_eq!(live_ids(&out), recount(30));
    // The query's last compaction may still have been due when it stopped;
    // one run merges what is left, the next deletes what that replaced.
    compact(dir, &["out"]);
    compact(dir, &["out"]);
    assert_eq!(data_files(&out), live_files(&out));
    assert_eq!(listing_counts(&out).await, (300, 300));
}

#[test]
fn bad_compaction_settings_and_directories_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir(dir.join("in")).unwrap();
    put_input(&dir.join("in"), 0);
    let run = |options: &str| {
        let sql = script(dir, "out", options);
        failure(
            brook()
                .args(["run", sql.to_str().unwrap(), "--trigger", "available-now"])
                .current_dir(dir)
                .output()
                .unwrap(),
        )
    };
    let err = run("OPTIONS ('compactEvery' '10', 'targetFileSize' 'huge')");
    assert!(
        err.contains("option 'targetFileSize': expected a size such as 1048576, 512k, 100m or 1g, found 'huge'"),
        "{err}"
    );
    let err = run("OPTIONS ('compactEvery' '0')");
    assert!(
        err.contains("option 'compactEvery': must be at least 1"),
        "{err}"
    );
    let err = run("OPTIONS ('compactEvery' 'often')");
    assert!(
        err.contains("option 'compactEvery': expected a positive count, found 'often'"),
        "{err}"
    );
    let err = run("OPTIONS ('targetFileSize' '1m')");
    assert!(err.contains("option 'targetFileSize': is the size compaction merges files to: give 'compactEvery' too"), "{err}");

    let console = dir.join("console.sql");
    std::fs::write(
        &console,
        format!(
            "CREATE UNBOUNDED EXTERNAL TABLE src (id BIGINT NOT NULL, v VARCHAR NOT NULL) \
             STORED AS CSV LOCATION '{}';\n\
             CREATE EXTERNAL TABLE shown STORED AS CONSOLE LOCATION 'stdout' OPTIONS ('compactEvery' '10');\n\
             INSERT INTO shown SELECT * FROM src;\n",
            dir.join("in").display()
        ),
    )
    .unwrap();
    let err = failure(
        brook()
            .args(["run", console.to_str().unwrap()])
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("option 'compactEvery': sink table 'shown' is STORED AS CONSOLE: only file sinks (PARQUET, CSV, JSON) and Delta tables compact their output"),
        "{err}"
    );

    let err = failure(
        brook()
            .args(["compact", "in"])
            .current_dir(dir)
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("in is not a brook file sink directory (it has no _brook_manifest)"),
        "{err}"
    );
    std::fs::create_dir_all(dir.join("delta/_delta_log")).unwrap();
    let err = failure(
        brook()
            .args(["compact", "delta"])
            .current_dir(dir)
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("sink 'delta': there is no Delta table there (no commit in its _delta_log)"),
        "{err}"
    );
    let err = failure(
        brook()
            .args(["compact", "in", "--target-file-size", "big"])
            .current_dir(dir)
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("expected a size such as 1048576, 512k, 100m or 1g, found 'big'"),
        "{err}"
    );
}

#[test]
fn csv_and_json_outputs_merge_into_one_file_with_one_header() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir(dir.join("in")).unwrap();
    for n in 0..5 {
        put_input(&dir.join("in"), n);
    }
    let sql = dir.join("q.sql");
    std::fs::write(
        &sql,
        format!(
            "CREATE UNBOUNDED EXTERNAL TABLE src (id BIGINT NOT NULL, v VARCHAR NOT NULL) \
             STORED AS CSV LOCATION '{}' OPTIONS ('maxFilesPerTrigger' '1');\n\
             CREATE EXTERNAL TABLE as_csv STORED AS CSV LOCATION 'csv';\n\
             CREATE EXTERNAL TABLE as_json STORED AS JSON LOCATION 'json';\n\
             INSERT INTO as_csv SELECT id, v FROM src;\n\
             INSERT INTO as_json SELECT id, v FROM src;\n",
            dir.join("in").display()
        ),
    )
    .unwrap();
    run_available_now(dir, &sql);
    for (table, ext) in [("csv", "csv"), ("json", "json")] {
        let printed = compact(dir, &[table]);
        assert!(printed.contains("merged 5 files into 1"), "{printed}");
        let live = live_files(&dir.join(table));
        assert_eq!(live.len(), 1, "{live:?}");
        assert!(live[0].ends_with(ext), "{live:?}");
        let text = std::fs::read_to_string(dir.join(table).join(&live[0])).unwrap();
        let mut ids: Vec<i64> = match ext {
            "csv" => {
                let mut lines = text.lines();
                assert_eq!(lines.next(), Some("id,v"));
                lines
                    .map(|l| l.split(',').next().unwrap().parse().unwrap())
                    .collect()
            }
            _ => text
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                        .as_i64()
                        .unwrap()
                })
                .collect(),
        };
        ids.sort();
        assert_eq!(ids, recount(5), "{text}");
    }
}

#[test]
fn files_merge_only_within_their_partition_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir(dir.join("in")).unwrap();
    for n in 0..4 {
        put_input(&dir.join("in"), n);
    }
    run_available_now(dir, &script(dir, "flat", ""));
    // The same part files laid out in Hive-style directories, as a partitioned sink writes them.
    let out = dir.join("out");
    std::fs::create_dir_all(out.join("_brook_manifest")).unwrap();
    for (n, name) in live_files(&dir.join("flat")).iter().enumerate() {
        let part = if n % 2 == 0 { "k=even" } else { "k=odd" };
        std::fs::create_dir_all(out.join(part)).unwrap();
        let path = format!("{part}/{name}");
        std::fs::copy(dir.join("flat").join(name), out.join(&path)).unwrap();
        let bytes = std::fs::metadata(out.join(&path)).unwrap().len();
        let entry = serde_json::json!({"batch_id": n, "files": [{"path": path, "rows": 10, "bytes": bytes}]});
        std::fs::write(
            out.join(format!("_brook_manifest/{n:020}-abcdefgh.json")),
            entry.to_string(),
        )
        .unwrap();
    }
    let printed = compact(dir, &["out"]);
    assert!(printed.contains("merged 4 files into 2"), "{printed}");
    let live = live_files(&out);
    assert_eq!(live.len(), 2, "{live:?}");
    for (file, part) in live.iter().zip(["k=even", "k=odd"]) {
        assert!(
            file.starts_with(&format!("{part}/part-compact-")),
            "{live:?}"
        );
        let mut ids = ids_in(&out.join(file));
        ids.sort();
        let batches: Vec<i64> = if part == "k=even" {
            vec![0, 2]
        } else {
            vec![1, 3]
        };
        let expected: Vec<i64> = batches.iter().flat_map(|b| 10 * b..10 * b + 10).collect();
        assert_eq!(ids, expected);
    }
}

/// A static table over a sink's output reads the live files only: not the
/// files a compaction replaced (still on disk until the next one), nor a part
/// file no manifest entry lists (a batch that crashed before its entry).
#[tokio::test]
async fn a_static_table_over_a_compacted_sink_reads_every_row_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out = dir.join("out");
    std::fs::create_dir_all(dir.join("in")).unwrap();
    std::fs::create_dir_all(dir.join("probe")).unwrap();
    for n in 0..5 {
        put_input(&dir.join("in"), n);
    }
    run_available_now(dir, &script(dir, "out", ""));
    compact(dir, &["out"]);
    let stray = data_files(&out)
        .into_iter()
        .find(|f| !live_files(&out).contains(f))
        .expect("the compaction left the files it replaced");
    std::fs::copy(out.join(&stray), out.join("part-99999-uncommitted.parquet")).unwrap();
    let (glob_rows, glob_distinct) = listing_counts(&out).await;
    assert!(
        glob_rows > glob_distinct,
        "a plain listing of the directory sees rows twice: {glob_rows} rows, {glob_distinct} ids"
    );

    for n in 0..5 {
        put_input(&dir.join("probe"), n);
    }
    let sql = "CREATE UNBOUNDED EXTERNAL TABLE probe (id BIGINT NOT NULL, v VARCHAR NOT NULL) \
               STORED AS CSV LOCATION 'probe';\n\
               CREATE EXTERNAL TABLE looked STORED AS PARQUET LOCATION 'out';\n\
               CREATE EXTERNAL TABLE joined STORED AS PARQUET LOCATION 'joined';\n\
               INSERT INTO joined SELECT p.id, l.v FROM probe p JOIN looked l ON p.id = l.id;\n";
    std::fs::write(dir.join("join.sql"), sql).unwrap();
    ok(brook()
        .args(["run", "join.sql", "--checkpoint", "join-checkpoint"])
        .args(["--trigger", "available-now"])
        .current_dir(dir)
        .output()
        .unwrap());
    let joined = dir.join("joined");
    let mut ids: Vec<i64> = data_files(&joined)
        .iter()
        .flat_map(|f| ids_in(&joined.join(f)))
        .collect();
    ids.sort();
    assert_eq!(ids, recount(5), "each id joins exactly one live row");
}

/// Runs a query streaming the sink output `from` into a Parquet sink `to`, until the input is used up.
fn stream_from(dir: &Path, from: &str, to: &str) -> Output {
    let sql = format!(
        "CREATE UNBOUNDED EXTERNAL TABLE s (id BIGINT NOT NULL, v VARCHAR NOT NULL) \
         STORED AS PARQUET LOCATION '{from}';\n\
         CREATE EXTERNAL TABLE copy STORED AS PARQUET LOCATION '{to}';\n\
         INSERT INTO copy SELECT id, v FROM s;\n"
    );
    let script = dir.join(format!("{to}.sql"));
    std::fs::write(&script, sql).unwrap();
    brook()
        .args(["run", script.to_str().unwrap()])
        .args(["--checkpoint", &format!("{to}-checkpoint")])
        .args(["--trigger", "available-now"])
        .current_dir(dir)
        .output()
        .unwrap()
}

/// A stream over a sink's output takes the batches' files once each, in
/// batch order: not a compaction's merged files (their rows came already),
/// nor a part file no manifest entry lists.
#[tokio::test]
async fn a_stream_over_a_compacted_sink_reads_every_row_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out = dir.join("out");
    std::fs::create_dir_all(dir.join("in")).unwrap();
    for n in 0..5 {
        put_input(&dir.join("in"), n);
    }
    run_available_now(dir, &script(dir, "out", ""));
    let first = live_files(&out)[0].clone();
    std::fs::copy(out.join(&first), out.join("part-99999-uncommitted.parquet")).unwrap();
    compact(dir, &["out"]);
    assert!(data_files(&out).len() > live_files(&out).len());

    ok(stream_from(dir, "out", "copy"));
    let copy = dir.join("copy");
    let mut ids: Vec<i64> = data_files(&copy)
        .iter()
        .flat_map(|f| ids_in(&copy.join(f)))
        .collect();
    ids.sort();
    assert_eq!(ids, recount(5));
}

/// Files a compaction merged, then deleted at the next one, before a stream
/// read them: the stream fails naming the directory and the batch.
#[tokio::test]
async fn a_stream_behind_two_compactions_fails_naming_the_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("in")).unwrap();
    for n in 0..3 {
        put_input(&dir.join("in"), n);
    }
    run_available_now(dir, &script(dir, "out", ""));
    compact(dir, &["out"]);
    compact(dir, &["out"]);

    let err = failure(stream_from(dir, "out", "copy"));
    assert!(
        err.contains("out") && err.contains("of the sink's batch 0 was merged and deleted by a compaction before this query read it")
            && err.contains("compact it less often"),
        "{err}"
    );
}
