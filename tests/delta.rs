//! The Delta Lake sink (`STORED AS DELTA`) end to end, through `brook run`:
//! the tables it writes are read back with delta-rs and DataFusion, and with
//! the Python readers BI users have (deltalake, polars).

mod common;

use common::tools;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use brook::datafusion::arrow::util::display::array_value_to_string;
use brook::datafusion::prelude::SessionContext;
use deltalake::DeltaTableBuilder;
use url::Url;

const USERS: [&str; 4] = ["alice", "bob", "carol", "dave"];

/// Input file `n` (of 10 rows) in `dir/in`: user, amount and time (minute `n` after 10:00).
fn write_input(dir: &Path, n: usize) -> Vec<(String, i64, String)> {
    let input = dir.join("in");
    std::fs::create_dir_all(&input).unwrap();
    let rows: Vec<(String, i64, String)> = (0..10)
        .map(|i| {
            let user = USERS[(n * 3 + i) % USERS.len()].to_string();
            let amount = (n * 10 + i) as i64;
            let time = format!("2024-01-01 {:02}:{:02}:{:02}", 10 + n / 60, n % 60, i);
            (user, amount, time)
        })
        .collect();
    let text: String = rows
        .iter()
        .map(|(u, a, t)| format!("{u},{a},{t}\n"))
        .collect();
    let tmp = input.join(format!(".orders-{n:03}.csv.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, input.join(format!("orders-{n:03}.csv"))).unwrap();
    rows
}

/// A script reading `dir/in` one file a batch into the Delta table `dir/out`.
fn script(dir: &Path, table: &str, select: &str) -> std::path::PathBuf {
    let sql = format!(
        "CREATE UNBOUNDED EXTERNAL TABLE orders (user VARCHAR NOT NULL, amount BIGINT NOT NULL, \
         time TIMESTAMP NOT NULL) STORED AS CSV LOCATION '{}' OPTIONS ('maxFilesPerTrigger' '1');\n\
         {table};\n\
         INSERT INTO out {select};\n",
        dir.join("in").display()
    );
    let path = dir.join("query.sql");
    std::fs::write(&path, sql).unwrap();
    path
}

fn run(dir: &Path, script: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_brook"))
        .args(["run", script.to_str().unwrap(), "--checkpoint"])
        .arg(dir.join("checkpoint"))
        .args(["--trigger", "available-now"])
        .output()
        .unwrap()
}

fn run_ok(dir: &Path, script: &Path) {
    let out = run(dir, script);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run_refused(dir: &Path, script: &Path) -> String {
    let out = run(dir, script);
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The table's rows at `version` (the newest without), read with delta-rs and
/// DataFusion, as sorted `a|b|c` lines.
async fn delta_rows(table: &Path, version: Option<u64>) -> Vec<String> {
    let url = Url::from_directory_path(table).unwrap();
    let mut builder = DeltaTableBuilder::from_url(url).unwrap();
    if let Some(v) = version {
        builder = builder.with_version(v);
    }
    let table = builder.load().await.unwrap();
    let ctx = SessionContext::new();
    table.update_datafusion_session(&ctx.state()).unwrap();
    ctx.register_table("t", table.table_provider().await.unwrap())
        .unwrap();
    let batches = ctx
        .sql("SELECT * FROM t")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let mut rows = vec![];
    for b in &batches {
        for r in 0..b.num_rows() {
            let cells: Vec<String> = b
                .columns()
                .iter()
                .map(|c| array_value_to_string(c, r).unwrap())
                .collect();
            rows.push(cells.join("|"));
        }
    }
    rows.sort();
    rows
}

/// The table's rows as Python's `deltalake` and `polars` read them, in the
/// column order `columns`, as sorted `a|b|c` lines.
fn python_rows(table: &Path, columns: &[&str]) -> (Vec<String>, Vec<String>) {
    let program = r#"
import sys, deltalake, polars
path, columns = sys.argv[1], sys.argv[2].split(",")
def show(rows):
    return sorted("|".join(str(r[c]) for c in columns) for r in rows)
for line in show(deltalake.DeltaTable(path).to_pyarrow_table().to_pylist()):
    print("deltalake " + line)
for line in show(polars.read_delta(path).to_dicts()):
    print("polars " + line)
"#;
    let out = Command::new(tools::python_readers())
        .args(["-c", program, table.to_str().unwrap(), &columns.join(",")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let of = |reader: &str| {
        let mut rows: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix(reader))
            .map(|l| l.trim_start().to_string())
            .collect();
        rows.sort();
        rows
    };
    (of("deltalake"), of("polars"))
}

/// Python's `deltalake` and `polars` each read `expected` from `table`.
fn assert_python_reads(table: &Path, columns: &[&str], expected: &[String]) {
    let (deltalake, polars) = python_rows(table, columns);
    assert_eq!(deltalake, expected, "Python deltalake");
    assert_eq!(polars, expected, "polars");
}

/// The table's commits in order, each as its actions.
fn log(table: &Path) -> Vec<Vec<serde_json::Value>> {
    let mut files: Vec<_> = std::fs::read_dir(table.join("_delta_log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        })
        .collect()
}

fn action<'a>(commit: &'a [serde_json::Value], kind: &str) -> Option<&'a serde_json::Value> {
    commit.iter().find_map(|a| a.get(kind))
}

/// The txn version of each commit, with its operation.
fn txns(table: &Path) -> Vec<(Option<i64>, String)> {
    log(table)
        .iter()
        .map(|c| {
            (
                action(c, "txn").map(|t| t["version"].as_i64().unwrap()),
                operation(c),
            )
        })
        .collect()
}

fn plain_rows(rows: &[(String, i64, String)]) -> Vec<String> {
    let mut out: Vec<String> = rows
        .iter()
        .map(|(u, a, t)| format!("{u}|{a}|{t}"))
        .collect();
    out.sort();
    out
}

/// `rows` with their times as Arrow prints them (`2024-01-01T10:00:00`).
fn iso(rows: &[String]) -> Vec<String> {
    rows.iter().map(|r| r.replace(' ', "T")).collect()
}

/// `user|total` per user over `rows`, recounted.
fn totals(rows: &[(String, i64, String)]) -> Vec<String> {
    let mut sums: BTreeMap<&str, i64> = BTreeMap::new();
    for (u, a, _) in rows {
        *sums.entry(u).or_default() += a;
    }
    sums.iter().map(|(u, s)| format!("{u}|{s}")).collect()
}

const APPEND_TABLE: &str = "CREATE EXTERNAL TABLE out STORED AS DELTA LOCATION 'OUT'";

fn table_sql(dir: &Path, ddl: &str) -> String {
    ddl.replace("OUT", dir.join("out").to_str().unwrap())
}

/// Writes input files `0..files`, runs `select` into the table `ddl`
/// declares (its location `OUT`); the input's rows and the table's directory.
fn run_files(
    dir: &Path,
    files: usize,
    ddl: &str,
    select: &str,
) -> (Vec<(String, i64, String)>, std::path::PathBuf) {
    let input = (0..files).flat_map(|n| write_input(dir, n)).collect();
    run_ok(dir, &script(dir, &table_sql(dir, ddl), select));
    (input, dir.join("out"))
}

/// The operation a commit records (`WRITE`, `OPTIMIZE`, `VACUUM START`, ...).
fn operation(commit: &[serde_json::Value]) -> String {
    action(commit, "commitInfo").unwrap()["operation"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn append_mode_writes_one_commit_a_batch_and_restarts_on_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mut input = vec![];
    for n in 0..3 {
        input.extend(write_input(dir, n));
    }
    let sql = script(
        dir,
        &table_sql(dir, APPEND_TABLE),
        "SELECT user, amount, time FROM orders",
    );
    run_ok(dir, &sql);
    for n in 3..5 {
        input.extend(write_input(dir, n));
    }
    run_ok(dir, &sql);

    let out = dir.join("out");
    let expected = plain_rows(&input);
    assert_eq!(delta_rows(&out, None).await, iso(&expected));
    assert_python_reads(&out, &["user", "amount", "time"], &expected);
    // One commit a batch, each recording its batch id; the time column is a
    // wall-clock time in microseconds, as Delta stores one.
    let commits = txns(&out);
    let batches: Vec<(Option<i64>, String)> = (0..5).map(|b| (Some(b), "WRITE".into())).collect();
    assert_eq!(commits, batches);
    let schema = action(&log(&out)[0], "metaData").unwrap()["schemaString"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(schema.contains(r#""type":"timestamp_ntz""#), "{schema}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_committed_before_a_crash_is_not_written_again() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mut input = vec![];
    for n in 0..3 {
        input.extend(write_input(dir, n));
    }
    let sql = script(
        dir,
        &table_sql(dir, APPEND_TABLE),
        "SELECT user, amount, time FROM orders",
    );
    // Killed after the Delta commit of batch 1, before brook commits the batch.
    let mut child = Command::new(env!("CARGO_BIN_EXE_brook"))
        .args(["run", sql.to_str().unwrap(), "--checkpoint"])
        .arg(dir.join("checkpoint"))
        .args(["--trigger", "available-now"])
        .env("BROOK_PAUSE_AT", "delta-commit:1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut paused = false;
    for line in stderr.lines().map_while(Result::ok) {
        if line.starts_with("brook: paused at") {
            paused = true;
            break;
        }
    }
    assert!(paused, "brook never reached the Delta commit of batch 1");
    child.kill().unwrap();
    child.wait().unwrap();
    let out = dir.join("out");
    assert_eq!(
        txns(&out),
        [
            (Some(0), "WRITE".to_string()),
            (Some(1), "WRITE".to_string())
        ]
    );

    run_ok(dir, &sql);
    assert_eq!(delta_rows(&out, None).await, iso(&plain_rows(&input)));
    let batches: Vec<(Option<i64>, String)> = (0..3).map(|b| (Some(b), "WRITE".into())).collect();
    assert_eq!(txns(&out), batches);
}

const TOTALS: &str = "SELECT user, sum(amount) AS total FROM orders GROUP BY user";

#[tokio::test(flavor = "multi_thread")]
async fn complete_mode_overwrites_the_table_with_each_batchs_result() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mut input = vec![];
    let mut after_each = vec![];
    for n in 0..3 {
        input.extend(write_input(dir, n));
        after_each.push(totals(&input));
    }
    let ddl = "CREATE EXTERNAL TABLE out STORED AS DELTA LOCATION 'OUT' \
               OPTIONS ('outputMode' 'complete')";
    let sql = script(dir, &table_sql(dir, ddl), TOTALS);
    run_ok(dir, &sql);
    let out = dir.join("out");
    for (version, expected) in after_each.iter().enumerate() {
        assert_eq!(
            &delta_rows(&out, Some(version as u64)).await,
            expected,
            "version {version}"
        );
    }
    for commit in log(&out) {
        let info = action(&commit, "commitInfo").unwrap();
        assert_eq!(info["operationParameters"]["mode"], "Overwrite", "{info}");
    }
    assert_eq!(log(&out).len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn update_mode_merges_each_batchs_groups_into_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let ddl = "CREATE EXTERNAL TABLE out STORED AS DELTA LOCATION 'OUT' \
               OPTIONS ('outputMode' 'update')";
    let (input, out) = run_files(dir, 4, ddl, TOTALS);
    assert_eq!(delta_rows(&out, None).await, totals(&input));
    let operations: Vec<String> = txns(&out).into_iter().map(|(_, op)| op).collect();
    assert_eq!(operations, ["WRITE", "MERGE", "MERGE", "MERGE"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partitioned_table_has_a_directory_a_value_and_reads_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let ddl = "CREATE EXTERNAL TABLE out STORED AS DELTA PARTITIONED BY (user) LOCATION 'OUT'";
    let (input, out) = run_files(dir, 2, ddl, "SELECT user, amount, time FROM orders");
    for user in USERS {
        assert!(out.join(format!("user={user}")).is_dir(), "{user}");
    }
    let expected = plain_rows(&input);
    assert_python_reads(&out, &["user", "amount", "time"], &expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn compact_every_packs_the_files_without_changing_the_rows() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let ddl = "CREATE EXTERNAL TABLE out STORED AS DELTA LOCATION 'OUT' \
               OPTIONS ('compactEvery' '4', 'targetFileSize' '64MB')";
    let (input, out) = run_files(dir, 4, ddl, "SELECT user, amount, time FROM orders");
    assert_eq!(delta_rows(&out, None).await, iso(&plain_rows(&input)));
    let operations: Vec<String> = txns(&out).into_iter().map(|(_, op)| op).collect();
    assert_eq!(operations, ["WRITE", "WRITE", "WRITE", "WRITE", "OPTIMIZE"]);
    let url = Url::from_directory_path(&out).unwrap();
    let table = DeltaTableBuilder::from_url(url.clone())
        .unwrap()
        .load()
        .await
        .unwrap();
    assert_eq!(table.get_file_uris().unwrap().count(), 1);
    let before = DeltaTableBuilder::from_url(url)
        .unwrap()
        .with_version(3)
        .load()
        .await
        .unwrap();
    assert_eq!(before.get_file_uris().unwrap().count(), 4);
}

/// The data files under `table` (relative paths), hidden and log files left out.
fn files_on_disk(table: &Path) -> std::collections::BTreeSet<String> {
    let mut found = std::collections::BTreeSet::new();
    let mut dirs = vec![table.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with('_') || name.starts_with('.') {
                continue;
            }
            if path.is_dir() {
                dirs.push(path);
            } else {
                found.insert(
                    path.strip_prefix(table)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn vacuum_retention_deletes_the_files_compaction_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let ddl = "CREATE EXTERNAL TABLE out STORED AS DELTA LOCATION 'OUT' \
               OPTIONS ('compactEvery' '3', 'vacuumRetention' '0 seconds')";
    let (input, out) = run_files(dir, 9, ddl, "SELECT user, amount, time FROM orders");
    assert_eq!(delta_rows(&out, None).await, iso(&plain_rows(&input)));
    assert_python_reads(&out, &["user", "amount", "time"], &plain_rows(&input));

    let commits = log(&out);
    let count = |op: &str| commits.iter().filter(|c| operation(c) == op).count();
    // The compactions ran beside the appends (in any order), each followed by
    // a VACUUM; one that came due while the last still ran was run after it,
    // for both due points.
    assert_eq!(count("WRITE"), 9);
    let optimized = count("OPTIMIZE");
    assert!((2..=3).contains(&optimized), "{optimized}");
    assert_eq!(count("VACUUM START"), optimized);
    assert_eq!(count("VACUUM END"), optimized);
    // Every file an OPTIMIZE replaced before the last one is gone: a later
    // VACUUM found it removed longer ago than the retention. The last
    // OPTIMIZE's own VACUUM may have run within the same millisecond.
    let last = commits
        .iter()
        .rposition(|c| operation(c) == "OPTIMIZE")
        .unwrap();
    let disk = files_on_disk(&out);
    for c in &commits[..last] {
        for remove in c.iter().filter_map(|a| a.get("remove")) {
            let path = remove["path"].as_str().unwrap();
            assert!(!disk.contains(path), "{path} is still on disk: {disk:?}");
        }
    }
    let url = Url::from_directory_path(&out).unwrap();
    let table = DeltaTableBuilder::from_url(url)
        .unwrap()
        .load()
        .await
        .unwrap();
    let live: Vec<String> = table
        .get_file_uris()
        .unwrap()
        .map(|u| u.rsplit('/').next().unwrap().to_string())
        .collect();
    assert_eq!(live.len(), 1, "{live:?}");
    assert!(live.iter().all(|f| disk.contains(f)), "{live:?} {disk:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_complete_mode_table_is_vacuumed_while_batches_replace_it() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let ddl = "CREATE EXTERNAL TABLE out STORED AS DELTA LOCATION 'OUT' \
               OPTIONS ('outputMode' 'complete', 'vacuumRetention' '0 seconds')";
    let (input, out) = run_files(dir, 104, ddl, TOTALS);
    assert_eq!(delta_rows(&out, None).await, totals(&input));
    // The log checkpoint at commit 99 brought a VACUUM while the next batches
    // overwrote the table: the files every earlier commit replaced are gone.
    let commits = log(&out);
    let start = commits
        .iter()
        .position(|c| operation(c) == "VACUUM START")
        .expect("a VACUUM after the checkpoint");
    assert!(start >= 100, "{start}");
    let disk = files_on_disk(&out);
    for c in &commits[..start - 1] {
        for remove in c.iter().filter_map(|a| a.get("remove")) {
            let path = remove["path"].as_str().unwrap();
            assert!(!disk.contains(path), "{path} is still on disk");
        }
    }
    let batches: Vec<i64> = txns(&out).into_iter().filter_map(|(t, _)| t).collect();
    assert_eq!(batches, (0..104).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread")]
async fn update_mode_merges_wait_for_a_running_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let ddl = "CREATE EXTERNAL TABLE out STORED AS DELTA LOCATION 'OUT' \
               OPTIONS ('outputMode' 'update', 'compactEvery' '2')";
    // Each batch's groups are new (a new minute): the MERGE adds a file, so
    // there are files to compact.
    let (input, out) = run_files(
        dir,
        5,
        ddl,
        "SELECT date_trunc('minute', time) AS minute, user, sum(amount) AS total \
         FROM orders GROUP BY date_trunc('minute', time), user",
    );
    let mut sums: BTreeMap<(String, &str), i64> = BTreeMap::new();
    for (u, a, t) in &input {
        *sums.entry((format!("{}:00", &t[..16]), u)).or_default() += a;
    }
    let expected: Vec<String> = sums
        .iter()
        .map(|((m, u), s)| format!("{m}|{u}|{s}"))
        .collect();
    assert_eq!(delta_rows(&out, None).await, iso(&expected));
    // A MERGE and an OPTIMIZE rewriting the same files at once would fail one
    // commit: each MERGE waited for the compaction the batch before started.
    let operations: Vec<String> = txns(&out).into_iter().map(|(_, op)| op).collect();
    assert_eq!(
        operations,
        [
            "WRITE", "MERGE", "OPTIMIZE", "MERGE", "MERGE", "OPTIMIZE", "MERGE"
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_checkpoint_is_written_every_hundred_commits() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (input, out) = run_files(
        dir,
        102,
        APPEND_TABLE,
        "SELECT user, amount, time FROM orders",
    );
    // As delta-rs would at commit 99, but written beside the batches.
    assert!(
        out.join("_delta_log/00000000000000000099.checkpoint.parquet")
            .is_file()
    );
    let last: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("_delta_log/_last_checkpoint")).unwrap(),
    )
    .unwrap();
    assert_eq!(last["version"], 99);
    let expected = plain_rows(&input);
    assert_eq!(delta_rows(&out, None).await, iso(&expected));
    assert_python_reads(&out, &["user", "amount", "time"], &expected);
    let batches: Vec<Option<i64>> = txns(&out).into_iter().map(|(t, _)| t).collect();
    assert_eq!(batches, (0..102).map(Some).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread")]
async fn brook_compact_optimizes_a_delta_table_written_with_parquet_options() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let ddl = "CREATE EXTERNAL TABLE out STORED AS DELTA LOCATION 'OUT' \
               OPTIONS ('compression' 'snappy', 'rowGroupSize' '4')";
    let (input, out) = run_files(dir, 3, ddl, "SELECT user, amount, time FROM orders");
    let parts: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    assert_eq!(parts.len(), 3);
    for part in &parts {
        let reader = brook::datafusion::parquet::file::reader::SerializedFileReader::new(
            std::fs::File::open(part).unwrap(),
        )
        .unwrap();
        let meta = brook::datafusion::parquet::file::reader::FileReader::metadata(&reader);
        // 10 rows a file, at most 4 a row group.
        assert_eq!(meta.num_row_groups(), 3, "{}", part.display());
        assert_eq!(
            meta.row_group(0).column(0).compression(),
            brook::datafusion::parquet::basic::Compression::SNAPPY
        );
    }
    let compact = Command::new(env!("CARGO_BIN_EXE_brook"))
        .args(["compact", "out"])
        .current_dir(dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&compact.stdout);
    assert!(
        compact.status.success(),
        "{}",
        String::from_utf8_lossy(&compact.stderr)
    );
    assert_eq!(
        stdout.trim(),
        "compacted Delta table out: compacted 3 files into 1 (table version 3)"
    );
    let operations: Vec<String> = txns(&out).into_iter().map(|(_, op)| op).collect();
    assert_eq!(operations, ["WRITE", "WRITE", "WRITE", "OPTIMIZE"]);
    assert_eq!(delta_rows(&out, None).await, iso(&plain_rows(&input)));
}

#[test]
fn a_table_with_other_columns_is_refused_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    write_input(dir, 0);
    let sql = script(
        dir,
        &table_sql(dir, APPEND_TABLE),
        "SELECT user, amount, time FROM orders",
    );
    run_ok(dir, &sql);
    std::fs::remove_dir_all(dir.join("checkpoint")).unwrap();
    let sql = script(
        dir,
        &table_sql(dir, APPEND_TABLE),
        "SELECT user, CAST(amount AS DOUBLE) AS amount, user AS name FROM orders",
    );
    let stderr = run_refused(dir, &sql);
    assert!(
        stderr.contains("the Delta table there has other columns than the query writes")
            && stderr.contains("'amount' is long in the table, double in the query")
            && stderr.contains("'name' is not in the table")
            && stderr.contains("'time' is not in the query's output")
            && stderr.contains(dir.join("out").to_str().unwrap()),
        "{stderr}"
    );
}

#[test]
fn an_unknown_partition_column_is_refused_naming_the_output_columns() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    write_input(dir, 0);
    let ddl = "CREATE EXTERNAL TABLE out STORED AS DELTA PARTITIONED BY (day) LOCATION 'OUT'";
    let sql = script(dir, &table_sql(dir, ddl), "SELECT user, amount FROM orders");
    let stderr = run_refused(dir, &sql);
    assert!(
        stderr.contains(
            "PARTITIONED BY names day, which the query does not output; its columns: user, amount"
        ),
        "{stderr}"
    );
}

#[test]
fn update_mode_without_the_group_keys_in_the_output_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    write_input(dir, 0);
    let ddl = "CREATE EXTERNAL TABLE out STORED AS DELTA LOCATION 'OUT' \
               OPTIONS ('outputMode' 'update')";
    let sql = script(
        dir,
        &table_sql(dir, ddl),
        "SELECT sum(amount) AS total FROM orders GROUP BY user",
    );
    let stderr = run_refused(dir, &sql);
    assert!(
        stderr.contains(
            "output mode 'update' merges rows on the GROUP BY keys, but orders.user is not in \
             the query's output (its columns: total)"
        ),
        "{stderr}"
    );
    std::fs::remove_dir_all(dir.join("checkpoint")).unwrap();
    let sql = script(dir, &table_sql(dir, ddl), "SELECT user, amount FROM orders");
    let stderr = run_refused(dir, &sql);
    assert!(
        stderr.contains("this query has no GROUP BY (its columns: user, amount); use 'append'"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn update_mode_merges_on_a_windows_start_standing_for_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mut input = vec![];
    for n in 0..3 {
        input.extend(write_input(dir, n));
    }
    let ddl = "CREATE EXTERNAL TABLE out STORED AS DELTA LOCATION 'OUT' \
               OPTIONS ('outputMode' 'update')";
    let sql = script(
        dir,
        &table_sql(dir, ddl),
        "SELECT window.start AS minute, user, sum(amount) AS total FROM orders \
         GROUP BY window(time, '2 minutes'), user",
    );
    run_ok(dir, &sql);
    // Recounted: minutes 0-1 and 2-3 start windows at 10:00 and 10:02.
    let mut sums: BTreeMap<(String, String), i64> = BTreeMap::new();
    for (user, amount, time) in &input {
        let minute: u32 = time[14..16].parse().unwrap();
        let start = format!("2024-01-01T10:{:02}:00", minute - minute % 2);
        *sums.entry((start, user.clone())).or_default() += amount;
    }
    let expected: Vec<String> = sums
        .iter()
        .map(|((start, user), total)| format!("{start}|{user}|{total}"))
        .collect();
    assert_eq!(delta_rows(&dir.join("out"), None).await, expected);
}

/// A Delta table and the checkpoint both in S3 (s3s-fs): brook's own store
/// serves the table, commits are create-if-absent puts, and a restart resumes
/// from the S3 checkpoint without writing a batch twice.
#[tokio::test(flavor = "multi_thread")]
async fn an_s3_table_gets_one_commit_a_batch_across_a_restart_on_an_s3_checkpoint() {
    let s3 = common::s3::S3::start();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mut input = vec![];
    for n in 0..2 {
        input.extend(write_input(dir, n));
    }
    let ddl = "CREATE EXTERNAL TABLE out STORED AS DELTA LOCATION 's3://bucket/tables/orders'";
    let sql = script(dir, ddl, "SELECT user, amount, time FROM orders");
    let run_s3 = || {
        let out = s3
            .brook(dir)
            .args(["run", sql.to_str().unwrap()])
            .args([
                "--checkpoint",
                "s3://bucket/cp",
                "--trigger",
                "available-now",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run_s3();
    for n in 2..5 {
        input.extend(write_input(dir, n));
    }
    run_s3();
    assert!(!s3.keys("cp").await.is_empty());

    // The bucket is a directory on the server's disk: the table is read back
    // from there as a local one.
    let table = s3.bucket_dir().join("tables/orders");
    let expected = plain_rows(&input);
    assert_eq!(delta_rows(&table, None).await, iso(&expected));
    assert_python_reads(&table, &["user", "amount", "time"], &expected);
    let batches: Vec<(Option<i64>, String)> = (0..5).map(|b| (Some(b), "WRITE".into())).collect();
    assert_eq!(txns(&table), batches);

    // `brook compact` packs the five files in S3 into one OPTIMIZE commit.
    let compact = s3
        .brook(dir)
        .args(["compact", "s3://bucket/tables/orders"])
        .output()
        .unwrap();
    assert!(
        compact.status.success(),
        "{}",
        String::from_utf8_lossy(&compact.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&compact.stdout).trim(),
        "compacted Delta table s3://bucket/tables/orders: compacted 5 files into 1 (table version 5)"
    );
    assert_eq!(delta_rows(&table, None).await, iso(&expected));
    let operations: Vec<String> = txns(&table).into_iter().map(|(_, op)| op).collect();
    assert_eq!(operations.last().map(String::as_str), Some("OPTIMIZE"));
}

/// `queries/dashboard_delta.sql` over generated orders (some malformed), three
/// files read one a batch, checked with Python's deltalake against a recount.
#[test]
fn the_delta_dashboard_matches_a_recount_of_the_well_formed_orders() {
    use brook::orders::{GeneratorConfig, OrderGenerator, TIME_FORMAT};
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let input = dir.join("data/orders");
    std::fs::create_dir_all(&input).unwrap();
    let mut generator = OrderGenerator::new(GeneratorConfig {
        clients: 30,
        symbols: 10,
        malformed: 0.02,
        seed: 11,
    });
    let start = chrono::NaiveDateTime::parse_from_str("2016-03-22 20:25:28", TIME_FORMAT).unwrap();
    let lines: Vec<String> = (0..3_000)
        .map(|i| generator.line(start + chrono::TimeDelta::milliseconds(i * 50)))
        .collect();
    for (n, chunk) in lines.chunks(1_000).enumerate() {
        std::fs::write(
            input.join(format!("orders-{n}.csv")),
            chunk.join("\n") + "\n",
        )
        .unwrap();
    }
    let sql = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/queries/dashboard_delta.sql"
    ))
    .unwrap()
    .replace(
        "('mode' 'DROPMALFORMED')",
        "('mode' 'DROPMALFORMED', 'maxFilesPerTrigger' '1')",
    );
    std::fs::write(dir.join("dashboard.sql"), sql).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_brook"))
        .current_dir(dir)
        .args(["run", "dashboard.sql", "--checkpoint", "ckpt"])
        .args(["--trigger", "available-now"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The well-formed orders: time (s), client, symbol, amount, price, buy.
    let orders: Vec<(i64, i64, f64, bool)> = lines
        .iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            if f.len() != 7 || !(f[6] == "B" || f[6] == "S") {
                return None;
            }
            let time = chrono::NaiveDateTime::parse_from_str(f[0], TIME_FORMAT).ok()?;
            let amount: i64 = f[4].parse().ok()?;
            let price: f64 = f[5].parse().ok()?;
            Some((
                time.and_utc().timestamp(),
                f[2].parse::<i64>().ok()?,
                amount as f64 * price,
                f[6] == "B",
            ))
        })
        .collect();
    assert!(orders.len() < lines.len(), "some lines are malformed");
    let watermark = orders.iter().map(|o| o.0).max().unwrap() - 5;
    let mut per_second: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    for o in orders.iter().filter(|o| o.0 < watermark) {
        let e = per_second.entry(o.0).or_default();
        if o.3 { e.0 += 1 } else { e.1 += 1 }
    }
    let want: Vec<String> = per_second
        .iter()
        .map(|(s, (b, x))| {
            let t = chrono::DateTime::from_timestamp(*s, 0).unwrap().naive_utc();
            format!("{}|{}|{b}|{x}", t.date(), t)
        })
        .collect();
    let tables = dir.join("out/delta");
    let (got, _) = python_rows(
        &tables.join("buy_sell_per_second"),
        &["trade_date", "second", "buys", "sells"],
    );
    assert_eq!(got, want);
    assert!(
        tables
            .join("buy_sell_per_second/trade_date=2016-03-22")
            .is_dir()
    );
    let versions: Vec<i64> = txns(&tables.join("buy_sell_per_second"))
        .into_iter()
        .filter_map(|(v, _)| v)
        .collect();
    // One commit per batch (a file each, then the batch the watermark closes
    // the last seconds in), each with its own batch's txn.
    let batches: Vec<i64> = (0..versions.len() as i64).collect();
    assert!(versions.len() >= 3, "{versions:?}");
    assert_eq!(versions, batches);

    let mut traded: BTreeMap<i64, f64> = BTreeMap::new();
    for o in &orders {
        *traded.entry(o.1).or_default() += o.2;
    }
    let mut ranking: Vec<(i64, f64)> = traded.into_iter().collect();
    ranking.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let (got, _) = python_rows(&tables.join("top_clients"), &["client_id"]);
    let mut want: Vec<String> = ranking[..5].iter().map(|r| r.0.to_string()).collect();
    want.sort();
    assert_eq!(got, want);
    let (got, _) = python_rows(&tables.join("top_stocks"), &["rank"]);
    assert!(!got.is_empty(), "closed hourly windows are ranked");
}
