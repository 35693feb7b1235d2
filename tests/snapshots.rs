//! Complete-mode results in Parquet, CSV and JSON sinks, run by `brook run`
//! as a user runs it: each batch's whole result is a snapshot directory under
//! `snapshots/`, and `_latest` names the newest. Readers following `_latest`
//! (here, also pyarrow and polars) see one whole result, through crashes,
//! kills and restarts.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use brook::datafusion::arrow::array::{AsArray, RecordBatch};
use brook::datafusion::arrow::datatypes::Int64Type;
use brook::datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use brook::testing::faults;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Client -> (total amount, orders).
type Totals = BTreeMap<i64, (i64, i64)>;

/// Writes `files` CSV files of `client_id,amount` lines into `dir`, each read
/// as one batch; returns each file's lines' totals.
fn write_input(dir: &Path, files: usize, lines: usize, seed: u64) -> Vec<Totals> {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut out = vec![];
    for f in 0..files {
        let mut totals = Totals::new();
        let mut text = String::new();
        for _ in 0..lines {
            let client: i64 = rng.random_range(1..=400);
            let amount: i64 = rng.random_range(1..1000);
            text.push_str(&format!("{client},{amount}\n"));
            let t = totals.entry(client).or_default();
            t.0 += amount;
            t.1 += 1;
        }
        brook::source::write_atomically(dir, &format!("orders-{f:03}.csv"), text.as_bytes())
            .unwrap();
        out.push(totals);
    }
    out
}

/// The complete result after the first `files` files: the recount.
fn recount(per_file: &[Totals], files: usize) -> Totals {
    let mut all = Totals::new();
    for totals in &per_file[..files] {
        for (client, (amount, orders)) in totals {
            let t = all.entry(*client).or_default();
            t.0 += amount;
            t.1 += orders;
        }
    }
    all
}

/// A script totalling the orders of `input` per client into a `format` sink at
/// `out` in complete mode, one input file a batch.
fn script(dir: &Path, input: &Path, out: &Path, format: &str, extra: &str) -> PathBuf {
    let sql = format!(
        "CREATE UNBOUNDED EXTERNAL TABLE orders (client_id BIGINT NOT NULL, amount BIGINT NOT NULL) \
         STORED AS CSV LOCATION '{}' OPTIONS ('maxFilesPerTrigger' '1');\n\
         CREATE EXTERNAL TABLE totals STORED AS {format} LOCATION '{}' \
         OPTIONS ('outputMode' 'complete'{extra});\n\
         INSERT INTO totals SELECT client_id, sum(amount) AS total, count(*) AS orders \
         FROM orders GROUP BY client_id;\n",
        input.display(),
        out.display()
    );
    let path = dir.join(format!("totals-{}.sql", format.to_lowercase()));
    std::fs::write(&path, sql).unwrap();
    path
}

fn brook(script: &Path, checkpoint: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_brook"));
    command
        .args([
            "run",
            script.to_str().unwrap(),
            "--trigger",
            "available-now",
        ])
        .args(["--checkpoint", checkpoint.to_str().unwrap()]);
    command
}

/// Runs the script to its end, which must be a success.
fn run(script: &Path, checkpoint: &Path) {
    let out = brook(script, checkpoint).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs the script to its end, which must be a failure; returns its standard error.
fn run_refused(script: &Path, checkpoint: &Path) -> String {
    let out = brook(script, checkpoint).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "brook run went on: {stderr}");
    stderr
}

/// Runs the script until it pauses at `point` (as `BROOK_PAUSE_AT` names it), then kills it.
fn run_until_paused(script: &Path, checkpoint: &Path, point: &str) {
    let mut child = brook(script, checkpoint)
        .env(faults::ENV, point)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut seen = String::new();
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with("brook: paused at ") {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            return;
        }
    }
    let status = child.wait().unwrap();
    panic!("brook ended ({status}) without pausing at {point}: {seen}");
}

fn read_latest(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("_latest")).unwrap()).unwrap()
}

/// The snapshot directories left under `out`, sorted.
fn snapshots(out: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(out.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn totals_of(batches: &[RecordBatch]) -> Totals {
    let mut totals = Totals::new();
    for b in batches {
        let column = |name: &str| {
            b.column_by_name(name)
                .unwrap()
                .as_primitive::<Int64Type>()
                .values()
                .to_vec()
        };
        let (clients, amounts, orders) = (column("client_id"), column("total"), column("orders"));
        for i in 0..b.num_rows() {
            assert!(
                totals.insert(clients[i], (amounts[i], orders[i])).is_none(),
                "client {} twice",
                clients[i]
            );
        }
    }
    totals
}

fn read_parquet(path: &Path) -> std::result::Result<Totals, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let batches = reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(totals_of(&batches))
}

/// The rows of the snapshot `_latest` names, checking that it names one
/// file holding as many rows as it says.
fn latest_parquet(out: &Path) -> (u64, Totals) {
    let latest = read_latest(out);
    let files = latest["files"].as_array().unwrap();
    assert_eq!(files.len(), 1, "{latest}");
    let file = files[0]["path"].as_str().unwrap();
    assert!(
        file.starts_with(latest["path"].as_str().unwrap()),
        "{latest}"
    );
    let totals = read_parquet(&out.join(file)).unwrap();
    assert_eq!(latest["rows"].as_u64().unwrap(), totals.len() as u64);
    (latest["batch_id"].as_u64().unwrap(), totals)
}

/// The rows of the snapshot `_latest` names, as pyarrow and as polars read
/// them, the way docs/sources-and-sinks.md tells users to.
fn python_reads(out: &Path) -> (Totals, Totals) {
    let python = common::tools::python_readers();
    let program = r#"
import json, sys
import pyarrow.parquet as pq
import polars as pl
out = sys.argv[1]
with open(f"{out}/_latest") as f:
    latest = json.load(f)
for r in pq.read_table(f"{out}/{latest['path']}").to_pylist():
    print("pyarrow", r["client_id"], r["total"], r["orders"])
for r in pl.read_parquet(f"{out}/{latest['path']}/*.parquet").iter_rows(named=True):
    print("polars", r["client_id"], r["total"], r["orders"])
"#;
    let result = Command::new(python)
        .args(["-c", program, out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let (mut pyarrow, mut polars) = (Totals::new(), Totals::new());
    for line in String::from_utf8(result.stdout).unwrap().lines() {
        let words: Vec<&str> = line.split(' ').collect();
        let numbers: Vec<i64> = words[1..].iter().map(|w| w.parse().unwrap()).collect();
        let reader = if words[0] == "pyarrow" {
            &mut pyarrow
        } else {
            &mut polars
        };
        reader.insert(numbers[0], (numbers[1], numbers[2]));
    }
    (pyarrow, polars)
}

#[test]
fn complete_mode_to_parquet_keeps_the_latest_snapshots_and_a_pointer_to_the_newest() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("orders");
    let per_file = write_input(&input, 5, 2000, 1);
    let out = tmp.path().join("out/totals");
    let checkpoint = tmp.path().join("checkpoint");
    let sql = script(tmp.path(), &input, &out, "PARQUET", "");
    run(&sql, &checkpoint);

    let (batch, totals) = latest_parquet(&out);
    assert_eq!(batch, 4);
    assert_eq!(totals, recount(&per_file, 5));
    let latest = read_latest(&out);
    let tag = latest["path"].as_str().unwrap().rsplit_once('-').unwrap().1;
    assert_eq!(
        snapshots(&out),
        [format!("00003-{tag}"), format!("00004-{tag}")],
        "the default keeps two snapshots"
    );
    // The snapshot before the newest is whole as well: the result after four files.
    let before = out.join(format!("snapshots/00003-{tag}/part-0.parquet"));
    assert_eq!(read_parquet(&before).unwrap(), recount(&per_file, 4));
    let (pyarrow, polars) = python_reads(&out);
    assert_eq!(pyarrow, totals);
    assert_eq!(polars, totals);

    // A restart with nothing new leaves the pointer and the snapshot as they are.
    let pointer = std::fs::read(out.join("_latest")).unwrap();
    run(&sql, &checkpoint);
    assert_eq!(std::fs::read(out.join("_latest")).unwrap(), pointer);
    assert_eq!(latest_parquet(&out), (4, totals));

    // New input after the restart: the next batch's snapshot counts all the input.
    let more = write_input(&tmp.path().join("more"), 1, 2000, 2);
    std::fs::rename(
        tmp.path().join("more/orders-000.csv"),
        input.join("orders-005.csv"),
    )
    .unwrap();
    let per_file = [per_file, more].concat();
    run(&sql, &checkpoint);
    assert_eq!(latest_parquet(&out), (5, recount(&per_file, 6)));
    assert_eq!(
        snapshots(&out),
        [format!("00004-{tag}"), format!("00005-{tag}")]
    );
}

#[test]
fn a_crash_before_the_pointer_moves_leaves_the_previous_snapshot_named_and_a_restart_ends_as_an_uninterrupted_run()
 {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("orders");
    let per_file = write_input(&input, 5, 1000, 3);
    // The snapshot of batch 2 is written, `_latest` is not yet moved (written
    // under its temporary name for the second point).
    for (run_dir, point) in [("part", "sink-part:2"), ("pointer", "sink-manifest-tmp:2")] {
        let dir = tmp.path().join(run_dir);
        let out = dir.join("out");
        let checkpoint = dir.join("checkpoint");
        std::fs::create_dir_all(&dir).unwrap();
        let sql = script(&dir, &input, &out, "PARQUET", ", 'snapshotsToRetain' '3'");
        run_until_paused(&sql, &checkpoint, point);
        let (batch, totals) = latest_parquet(&out);
        assert_eq!((batch, &totals), (1, &recount(&per_file, 2)), "{point}");
        let tag = read_latest(&out)["path"]
            .as_str()
            .unwrap()
            .rsplit_once('-')
            .unwrap()
            .1
            .to_string();
        assert!(
            out.join(format!("snapshots/00002-{tag}/part-0.parquet"))
                .exists(),
            "{point}"
        );
        assert_eq!(
            out.join("._latest.tmp").exists(),
            point.starts_with("sink-manifest-tmp"),
            "{point}"
        );

        run(&sql, &checkpoint);
        assert_eq!(latest_parquet(&out), (4, recount(&per_file, 5)), "{point}");
        assert_eq!(
            snapshots(&out),
            (2..=4).map(|b| format!("{b:05}-{tag}")).collect::<Vec<_>>(),
            "{point}: snapshotsToRetain 3"
        );
        let hidden: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().starts_with('.'))
            .collect();
        assert!(hidden.is_empty(), "{point}: {hidden:?}");
    }
}

#[test]
fn readers_following_the_pointer_see_whole_results_while_the_writer_is_killed_again_and_again() {
    const FILES: usize = 60;
    const RUNS: usize = 8;
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("orders");
    let per_file = write_input(&input, FILES, 2000, 4);
    let results: Vec<Totals> = (1..=FILES).map(|n| recount(&per_file, n)).collect();
    let out = tmp.path().join("out");
    let checkpoint = tmp.path().join("checkpoint");
    let sql = script(tmp.path(), &input, &out, "PARQUET", "");

    let stop = Arc::new(AtomicBool::new(false));
    let (reads_tx, reads) = mpsc::channel();
    let reader = {
        let stop = stop.clone();
        let out = out.clone();
        std::thread::spawn(move || {
            let mut whole = 0;
            while !stop.load(Ordering::Relaxed) {
                // Before the first batch there is no pointer yet.
                // Polling without pause would take a core from the writer.
                std::thread::sleep(Duration::from_millis(3));
                let Ok(bytes) = std::fs::read(out.join("_latest")) else {
                    continue;
                };
                let latest: serde_json::Value = serde_json::from_slice(&bytes)
                    .unwrap_or_else(|e| panic!("a torn _latest ({e}): {bytes:?}"));
                let batch = latest["batch_id"].as_u64().unwrap() as usize;
                let file = out.join(latest["files"][0]["path"].as_str().unwrap());
                match read_parquet(&file) {
                    Ok(totals) => {
                        assert!(
                            totals == results[batch],
                            "batch {batch}'s snapshot holds {} clients and {} orders, \
                             not its whole result",
                            totals.len(),
                            totals.values().map(|t| t.1).sum::<i64>()
                        );
                        whole += 1;
                    }
                    // Retention removed it after the pointer moved on twice: not a read.
                    Err(_) if !file.exists() => {}
                    Err(e) => panic!("a partial snapshot: {e}"),
                }
            }
            reads_tx.send(whole).unwrap();
        })
    };

    let mut rng = SmallRng::seed_from_u64(5);
    let mut kills = 0;
    for run in 0..RUNS {
        let mut command = brook(&sql, &checkpoint);
        // A run stops at a snapshot's write in one of its next batches, so it
        // is still there to kill however fast the machine is (one run reads
        // all the files in less time than the longest wait).
        let next = std::fs::read(out.join("_latest"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|l| l["batch_id"].as_u64())
            .map_or(0, |b| b + 1);
        if next + 10 < FILES as u64 {
            let point = ["sink-part", "sink-manifest-tmp"][run % 2];
            command.env(
                faults::ENV,
                format!("{point}:{}", next + rng.random_range(0..10)),
            );
        }
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_millis(rng.random_range(30..500));
        while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(2));
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
    }
    run(&sql, &checkpoint);
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    let whole = reads.recv().unwrap();
    eprintln!("{kills} kills, {whole} whole reads");
    assert!(kills >= 4, "only {kills} of {RUNS} runs were killed");
    assert!(whole > 0, "the reader read nothing");
    assert_eq!(
        latest_parquet(&out),
        ((FILES - 1) as u64, recount(&per_file, FILES))
    );
    assert_eq!(snapshots(&out).len(), 2);
}

/// Parses a CSV snapshot with a header `client_id,total,orders`.
fn parse_csv(text: &str) -> Totals {
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("client_id,total,orders"));
    lines
        .map(|l| {
            let n: Vec<i64> = l.split(',').map(|w| w.parse().unwrap()).collect();
            (n[0], (n[1], n[2]))
        })
        .collect()
}

/// Parses a JSON-lines snapshot.
fn parse_json(text: &str) -> Totals {
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let n = |k: &str| v[k].as_i64().unwrap();
            (n("client_id"), (n("total"), n("orders")))
        })
        .collect()
}

#[test]
fn complete_mode_to_csv_and_json_writes_snapshots_in_their_format() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("orders");
    let per_file = write_input(&input, 3, 500, 6);
    for (format, ext, parse) in [
        ("CSV", "csv", parse_csv as fn(&str) -> Totals),
        ("JSON", "json", parse_json),
    ] {
        let out = tmp.path().join(ext);
        let sql = script(
            tmp.path(),
            &input,
            &out,
            format,
            ", 'snapshotsToRetain' '1'",
        );
        run(&sql, &tmp.path().join(format!("checkpoint-{ext}")));
        let latest = read_latest(&out);
        assert_eq!(latest["batch_id"], 2, "{format}");
        let file = latest["files"][0]["path"].as_str().unwrap();
        assert!(file.ends_with(&format!("/part-0.{ext}")), "{file}");
        let totals = parse(&std::fs::read_to_string(out.join(file)).unwrap());
        assert_eq!(totals, recount(&per_file, 3), "{format}");
        assert_eq!(latest["rows"].as_u64().unwrap(), totals.len() as u64);
        assert_eq!(snapshots(&out).len(), 1, "{format}: snapshotsToRetain 1");
    }
}

#[test]
fn update_mode_and_bad_snapshot_counts_are_refused_naming_what_to_use() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("orders");
    write_input(&input, 1, 10, 7);
    let out = tmp.path().join("out");
    let update = tmp.path().join("update.sql");
    std::fs::write(
        &update,
        std::fs::read_to_string(script(tmp.path(), &input, &out, "PARQUET", ""))
            .unwrap()
            .replace("'complete'", "'update'"),
    )
    .unwrap();
    let stderr = run_refused(&update, &tmp.path().join("checkpoint-update"));
    assert!(
        stderr.contains("file sinks take output mode 'append' or 'complete', not 'update'"),
        "{stderr}"
    );
    for (value, why) in [
        ("0", "must be at least 1"),
        ("two", "expected a positive count, found 'two'"),
        ("-1", "expected a positive count, found '-1'"),
    ] {
        let extra = format!(", 'snapshotsToRetain' '{value}'");
        let sql = script(tmp.path(), &input, &out, "CSV", &extra);
        let stderr = run_refused(&sql, &tmp.path().join("checkpoint-bad"));
        assert!(
            stderr.contains("snapshotsToRetain") && stderr.contains(why),
            "{value}: {stderr}"
        );
    }
    assert!(!out.join("_latest").exists());
}
