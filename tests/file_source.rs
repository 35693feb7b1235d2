//! The watched-directory source as users run it: `brook send` into a
//! directory, `brook run` over it, files that change, cannot be named, age,
//! or are cleaned up after their batch commits.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

fn brook() -> Command {
    Command::new(env!("CARGO_BIN_EXE_brook"))
}

/// A copy of each line of the TEXT directory `in` into the JSON directory
/// `out`, checkpointed in `cp`, with `options` on the source.
fn write_script(dir: &Path, options: &str) -> PathBuf {
    let script = dir.join("copy.sql");
    std::fs::create_dir_all(dir.join("in")).unwrap();
    std::fs::write(
        &script,
        format!(
            "CREATE UNBOUNDED EXTERNAL TABLE lines (value VARCHAR) STORED AS TEXT LOCATION 'in' \
             OPTIONS ('mode' 'PERMISSIVE'{options});\n\
             CREATE EXTERNAL TABLE out STORED AS JSON LOCATION 'out' \
             OPTIONS ('checkpointLocation' 'cp', 'queryName' 'copy');\n\
             INSERT INTO out SELECT value FROM lines;\n"
        ),
    )
    .unwrap();
    script
}

/// `brook run` of `script` until everything present is read.
fn run_available_now(dir: &Path, script: &Path) -> Output {
    brook()
        .args(["run", script.to_str().unwrap()])
        .args(["--trigger", "available-now", "--progress", "json"])
        .current_dir(dir)
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn progress_lines(out: &Output) -> Vec<serde_json::Value> {
    stderr(out)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The `value`s written by the copy query, sorted.
fn copied(dir: &Path) -> Vec<String> {
    let mut rows = vec![];
    let Ok(entries) = std::fs::read_dir(dir.join("out")) else {
        return rows;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("part-") {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            rows.push(row["value"].as_str().unwrap().to_string());
        }
    }
    rows.sort();
    rows
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn write_file(dir: &Path, name: &str, text: &str) {
    brook::source::write_atomically(dir, name, text.as_bytes()).unwrap();
}

/// Lines `first..first + count`, as `line-<n>`.
fn lines(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|i| format!("line-{i:06}\n"))
        .collect()
}

fn set_modified(path: &Path, time: SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(time)
        .unwrap();
}

#[test]
fn a_second_send_into_the_same_directory_adds_files_instead_of_replacing_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let script = write_script(dir, "");
    let send = |count: usize, first: usize| {
        std::fs::write(dir.join("orders.txt"), lines(first, count)).unwrap();
        let out = brook()
            .args(["send", "--input", "orders.txt", "--to", "in"])
            .args(["--lines-per-file", "1000", "--interval", "0s"])
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    };

    send(10_000, 0);
    let first = run_available_now(dir, &script);
    assert!(first.status.success(), "{}", stderr(&first));
    assert_eq!(copied(dir).len(), 10_000);
    let after_first = names(&dir.join("in"));

    // The book sends the day's orders, then the next day's, into the same directory.
    send(15_000, 10_000);
    let files = names(&dir.join("in"));
    assert_eq!(files.len(), 25, "{files:?}");
    assert!(after_first.is_subset(&files), "no file was replaced");
    // Sorted by name, a later send's files come after an earlier one's.
    let sorted: Vec<&String> = files.iter().collect();
    assert!(
        sorted[..10].iter().all(|n| after_first.contains(*n)),
        "{sorted:?}"
    );

    let second = run_available_now(dir, &script);
    assert!(second.status.success(), "{}", stderr(&second));
    let rows = copied(dir);
    assert_eq!(rows.len(), 25_000, "every order arrives once");
    assert_eq!(rows, lines(0, 25_000).lines().collect::<Vec<_>>());
    assert!(!stderr(&second).contains("changed after it was read"));
}

#[test]
fn a_file_replaced_after_it_was_read_is_counted_and_named_but_not_read_again() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let script = write_script(dir, "");
    let input = dir.join("in");
    write_file(&input, "a.csv", &lines(0, 3));
    let first = run_available_now(dir, &script);
    assert!(first.status.success(), "{}", stderr(&first));
    assert_eq!(
        progress_lines(&first)[0]["sources"][0]["files_changed_after_read"],
        0
    );

    // Replaced by a writer that reuses names, while the query was down.
    write_file(&input, "a.csv", &lines(100, 5));
    write_file(&input, "b.csv", &lines(200, 2));
    let second = run_available_now(dir, &script);
    let log = stderr(&second);
    assert!(second.status.success(), "{log}");
    let progress = progress_lines(&second);
    assert_eq!(progress.len(), 1, "{log}");
    assert_eq!(progress[0]["num_input_rows"], 2, "only b.csv is read");
    assert_eq!(progress[0]["sources"][0]["files_changed_after_read"], 1);
    assert!(
        log.contains("a.csv changed after it was read") && log.contains("not read again"),
        "{log}"
    );
    assert_eq!(copied(dir).len(), 5);
}

#[test]
fn a_file_replaced_while_the_query_runs_is_counted_and_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let script = write_script(dir, "");
    let input = dir.join("in");
    let mut running = brook()
        .args(["run", script.to_str().unwrap(), "--progress", "json"])
        .args(["--trigger", "100ms"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    write_file(&input, "a.csv", &lines(0, 3));
    wait_for("a.csv to be copied", || copied(dir).len() == 3);
    write_file(&input, "a.csv", &lines(100, 5));
    write_file(&input, "b.csv", &lines(200, 2));
    wait_for("b.csv to be copied", || copied(dir).len() == 5);
    // Appended to in place, once listings have learnt its file-system id:
    // the same file, found changed by its size.
    std::thread::sleep(Duration::from_millis(500));
    std::io::Write::write_all(
        &mut std::fs::File::options()
            .append(true)
            .open(input.join("b.csv"))
            .unwrap(),
        lines(300, 1).as_bytes(),
    )
    .unwrap();
    write_file(&input, "c.csv", &lines(400, 1));
    wait_for("c.csv to be copied", || copied(dir).len() == 6);
    let stopped = Command::new("kill")
        .args(["-INT", &running.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let mut log = String::new();
    std::io::Read::read_to_string(running.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(running.wait().unwrap().success(), "{log}");
    let last: serde_json::Value = serde_json::from_str(
        log.lines()
            .rfind(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("{log}")),
    )
    .unwrap();
    assert_eq!(last["batch_id"], 2, "{log}");
    assert_eq!(last["sources"][0]["files_changed_after_read"], 2, "{log}");
    assert!(log.contains("a.csv changed after it was read"), "{log}");
    assert!(log.contains("b.csv changed after it was read"), "{log}");
    assert_eq!(copied(dir).len(), 6, "neither is read again");
}

/// The UI's progress API carries the count, as monitors read it there.
#[test]
fn the_ui_progress_api_shows_files_changed_after_read() {
    use std::io::BufRead;

    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let script = write_script(dir, "");
    let input = dir.join("in");
    write_file(&input, "a.csv", &lines(0, 3));
    let first = run_available_now(dir, &script);
    assert!(first.status.success(), "{}", stderr(&first));
    write_file(&input, "a.csv", &lines(100, 5));
    write_file(&input, "b.csv", &lines(200, 2));

    let mut child = KillOnDrop(
        brook()
            .args([
                "run",
                "--ui",
                "--ui-port",
                "0",
                "--trigger",
                "available-now",
            ])
            .arg(&script)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut url = None;
    let stderr = std::io::BufReader::new(child.0.stderr.take().unwrap());
    for line in stderr.lines().map_while(Result::ok) {
        if let Some(u) = line.strip_prefix("brook: web UI at ") {
            url = Some(u.trim_end_matches('/').to_string());
        }
        if line.contains("stays up until Ctrl-C") {
            break;
        }
    }
    let url = url.expect("brook run printed no UI address");
    let progress: serde_json::Value = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let text = http
            .get(format!("{url}/api/queries/copy/progress"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        serde_json::from_str(&text).unwrap()
    });
    let records = progress.as_array().unwrap_or_else(|| panic!("{progress}"));
    assert_eq!(records.len(), 1, "{progress}");
    assert_eq!(
        records[0]["sources"][0]["files_changed_after_read"], 1,
        "{progress}"
    );
    assert_eq!(records[0]["sources"][0]["files_skipped"], 0, "{progress}");
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(unix)]
#[test]
fn a_file_whose_name_is_not_utf8_is_skipped_with_a_counted_warning() {
    use std::os::unix::ffi::OsStrExt;

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let script = write_script(dir, "");
    let input = dir.join("in");
    write_file(&input, "a.csv", &lines(0, 3));
    let bad = input.join(std::ffi::OsStr::from_bytes(b"caf\xe9.csv"));
    std::fs::write(&bad, lines(10, 4)).unwrap();

    for run in 0..2 {
        if run == 1 {
            write_file(&input, "b.csv", &lines(20, 2));
        }
        let out = run_available_now(dir, &script);
        let log = stderr(&out);
        assert!(out.status.success(), "run {run}: {log}");
        assert!(
            log.contains("skipping") && log.contains("caf\u{fffd}.csv") && log.contains("UTF-8"),
            "run {run}: {log}"
        );
        let progress = progress_lines(&out);
        assert_eq!(
            progress[0]["sources"][0]["files_skipped"], 1,
            "run {run}: {log}"
        );
    }
    assert_eq!(
        copied(dir),
        [
            "line-000000",
            "line-000001",
            "line-000002",
            "line-000020",
            "line-000021"
        ]
    );
}

/// The source's latest progress snapshot in the checkpoint (`sources/<N>`).
fn latest_source_snapshot(checkpoint: &Path) -> serde_json::Value {
    let dir = checkpoint.join("sources");
    let latest = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .parse::<u64>()
                .unwrap()
        })
        .max()
        .unwrap();
    let text = std::fs::read_to_string(dir.join(latest.to_string())).unwrap();
    let (_version, json) = text.split_once('\n').unwrap();
    // The file names its batch and query beside the source's own progress.
    let mut file: serde_json::Value = serde_json::from_str(json).unwrap();
    file["progress"].take()
}

/// 200 files a second apart, two per batch: without `maxFileAge` the source
/// remembers, and writes to its checkpoint, every file ever read; with it,
/// only those within the age of the newest.
#[test]
fn max_file_age_keeps_the_checkpointed_source_log_bounded() {
    const FILES: usize = 200;
    let remembered = |options: &str| {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let script = write_script(dir, options);
        let input = dir.join("in");
        let start = SystemTime::now() - Duration::from_secs(3600);
        for i in 0..FILES {
            write_file(&input, &format!("f{i:04}.txt"), &lines(i, 1));
            set_modified(
                &input.join(format!("f{i:04}.txt")),
                start + Duration::from_secs(i as u64),
            );
        }
        let out = run_available_now(dir, &script);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(progress_lines(&out).len(), FILES / 2);
        assert_eq!(copied(dir).len(), FILES, "every file is read");
        let snapshot = latest_source_snapshot(&dir.join("cp"));
        let files = snapshot["files"].as_array().unwrap().len();

        // A file older than the age allows, added later, is ignored; a new one is read.
        write_file(&input, "old.txt", "old\n");
        set_modified(&input.join("old.txt"), start);
        write_file(&input, "new.txt", "new\n");
        let out = run_available_now(dir, &script);
        assert!(out.status.success(), "{}", stderr(&out));
        let rows = copied(dir);
        (
            files,
            rows.contains(&"old".to_string()),
            rows.contains(&"new".to_string()),
        )
    };
    let (unbounded, old_read, new_read) = remembered(", 'maxFilesPerTrigger' '2'");
    assert!(unbounded >= FILES - 20, "{unbounded}");
    assert!(old_read && new_read);
    let (bounded, old_read, new_read) =
        remembered(", 'maxFilesPerTrigger' '2', 'maxFileAge' '10 seconds'");
    assert!(bounded <= 12, "{bounded} files remembered");
    assert!(!old_read && new_read);
}

#[test]
fn max_bytes_per_trigger_limits_a_batch_but_takes_a_larger_file_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let script = write_script(dir, ", 'maxBytesPerTrigger' '30b'");
    let input = dir.join("in");
    let start = SystemTime::now() - Duration::from_secs(60);
    // Sizes 12, 12, 12, 48 (larger than the limit), 12 bytes.
    for (i, count) in [1, 1, 1, 4, 1].into_iter().enumerate() {
        let name = format!("f{i}.txt");
        write_file(&input, &name, &lines(i * 10, count));
        set_modified(&input.join(&name), start + Duration::from_secs(i as u64));
    }
    let out = run_available_now(dir, &script);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<u64> = progress_lines(&out)
        .iter()
        .map(|p| p["num_input_rows"].as_u64().unwrap())
        .collect();
    assert_eq!(rows, [2, 1, 4, 1]);

    let bad = write_script(dir, ", 'maxBytesPerTrigger' 'lots'");
    let out = run_available_now(dir, &bad);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("option 'maxBytesPerTrigger': expected a size"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn clean_source_deletes_or_archives_files_after_their_batch_commits() {
    for mode in ["delete", "archive"] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let archive = dir.join("archive");
        let options = match mode {
            "delete" => ", 'cleanSource' 'delete'".to_string(),
            _ => format!(
                ", 'cleanSource' 'archive', 'sourceArchiveDir' '{}'",
                archive.display()
            ),
        };
        let script = write_script(dir, &format!("{options}, 'maxFilesPerTrigger' '1'"));
        let input = dir.join("in");
        for i in 0..3 {
            write_file(&input, &format!("f{i}.txt"), &lines(i * 10, 2));
        }
        let out = run_available_now(dir, &script);
        assert!(out.status.success(), "{mode}: {}", stderr(&out));
        assert_eq!(copied(dir).len(), 6, "{mode}");
        assert!(names(&input).is_empty(), "{mode}: {:?}", names(&input));
        if mode == "archive" {
            // Spark's layout: the archive directory, then the file's full path.
            let kept = archive.join(input.strip_prefix("/").unwrap());
            assert_eq!(names(&kept).len(), 3, "{kept:?}");
            assert_eq!(
                std::fs::read_to_string(kept.join("f1.txt")).unwrap(),
                lines(10, 2)
            );
        }
    }
}

/// Eight 3-line files in `dir/in`, and a script of two queries reading them:
/// `fast` takes all at once and deletes what it read, `slow` a file per batch.
fn fast_and_slow(dir: &Path) -> (PathBuf, PathBuf) {
    let input = dir.join("in");
    std::fs::create_dir_all(&input).unwrap();
    for i in 0..8 {
        write_file(&input, &format!("f{i}.txt"), &lines(i * 10, 3));
    }
    let script = dir.join("two.sql");
    std::fs::write(
        &script,
        "CREATE UNBOUNDED EXTERNAL TABLE fast (value VARCHAR) STORED AS TEXT LOCATION 'in' \
         OPTIONS ('cleanSource' 'delete');\n\
         CREATE UNBOUNDED EXTERNAL TABLE slow (value VARCHAR) STORED AS TEXT LOCATION 'in' \
         OPTIONS ('maxFilesPerTrigger' '1');\n\
         CREATE EXTERNAL TABLE out_fast STORED AS JSON LOCATION 'out_fast' \
         OPTIONS ('checkpointLocation' 'cp_fast', 'queryName' 'fast');\n\
         CREATE EXTERNAL TABLE out_slow STORED AS JSON LOCATION 'out_slow' \
         OPTIONS ('checkpointLocation' 'cp_slow', 'queryName' 'slow');\n\
         INSERT INTO out_fast SELECT value FROM fast;\n\
         INSERT INTO out_slow SELECT value FROM slow;\n",
    )
    .unwrap();
    (input, script)
}

/// Two queries read one directory; the one that deletes is done long before
/// the other, which takes a file per batch: no file goes before both read it.
#[test]
fn a_file_is_cleaned_only_once_every_query_on_its_directory_committed_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (input, script) = fast_and_slow(dir);
    let out = run_available_now(dir, &script);
    assert!(out.status.success(), "{}", stderr(&out));
    let count = |out: &str| {
        std::fs::read_dir(dir.join(out))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("part-")
            })
            .map(|p| std::fs::read_to_string(p).unwrap().lines().count())
            .sum::<usize>()
    };
    assert_eq!(count("out_fast"), 24);
    assert_eq!(count("out_slow"), 24, "the slow query read every file");
    assert!(names(&input).is_empty(), "{:?}", names(&input));
}

/// The number of batches committed in `checkpoint`.
fn committed_batches(checkpoint: &Path) -> u64 {
    std::fs::read_dir(checkpoint.join("commits"))
        .map(|entries| {
            entries
                .filter_map(|e| e.unwrap().file_name().to_string_lossy().parse::<u64>().ok())
                .map(|id| id + 1)
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

/// The files named by the committed batches' offsets in `checkpoint`.
fn committed_files(checkpoint: &Path) -> BTreeSet<String> {
    let ids = |sub: &str| -> Vec<u64> {
        match std::fs::read_dir(checkpoint.join(sub)) {
            Ok(entries) => entries
                .filter_map(|e| e.unwrap().file_name().to_string_lossy().parse().ok())
                .collect(),
            Err(_) => vec![],
        }
    };
    let Some(last) = ids("commits").into_iter().max() else {
        return BTreeSet::new();
    };
    let mut files = BTreeSet::new();
    for id in ids("offsets").into_iter().filter(|id| *id <= last) {
        let text = std::fs::read_to_string(checkpoint.join(format!("offsets/{id}"))).unwrap();
        let (_version, json) = text.split_once('\n').unwrap();
        let entry: serde_json::Value = serde_json::from_str(json).unwrap();
        for file in entry["source"].as_array().into_iter().flatten() {
            let path = file["path"].as_str().unwrap();
            files.insert(path.rsplit('/').next().unwrap().to_string());
        }
    }
    files
}

/// Kill -9 at random instants with `cleanSource` on, and restart: no row is
/// lost or repeated, no file is cleaned before its batch committed, and every
/// file is cleaned in the end but those of a batch committed just before a
/// kill. The seed is `BROOK_CRASH_SEED` (default 7).
#[test]
fn killed_and_restarted_with_clean_source_loses_nothing_and_cleans_every_file() {
    const FILES: usize = 60;
    const LINES: usize = 50;
    const KILLS: usize = 12;
    // The points every batch of this stateless query passes.
    const POINTS: [&str; 9] = [
        "read",
        "offsets-tmp",
        "offsets",
        "sink-part-tmp",
        "sink-part",
        "sink-manifest-tmp",
        "sink",
        "commits-tmp",
        "commits",
    ];
    let seed: u64 = std::env::var("BROOK_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let mut rng = SmallRng::seed_from_u64(seed);
    for mode in ["delete", "archive"] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let archive = dir.join("archive");
        let options = match mode {
            "delete" => ", 'cleanSource' 'delete'".to_string(),
            _ => format!(
                ", 'cleanSource' 'archive', 'sourceArchiveDir' '{}'",
                archive.display()
            ),
        };
        let script = write_script(dir, &format!("{options}, 'maxFilesPerTrigger' '1'"));
        let input = dir.join("in");
        let all: BTreeSet<String> = (0..FILES).map(|i| format!("f{i:03}.txt")).collect();
        for (i, name) in all.iter().enumerate() {
            write_file(&input, name, &lines(i * LINES, LINES));
        }
        let mut kills = vec![];
        loop {
            let next_batch = committed_batches(&dir.join("cp"));
            // Most runs stop at a named point of a batch still to come
            // (right after a commit, before cleaning, among them); the others
            // at a random instant.
            // Past the next batch: one re-run after a restart skips the offset points.
            let to_come = next_batch + 1 < FILES as u64;
            let pause = (kills.len() < KILLS && to_come && rng.random_bool(0.7)).then(|| {
                let point = POINTS[rng.random_range(0..POINTS.len())];
                // A few batches on, so that the kills spread over the whole run.
                let batch = (next_batch + rng.random_range(1..5)).min(FILES as u64 - 1);
                format!("{point}:{batch}")
            });
            let instant = (kills.len() < KILLS && pause.is_none())
                .then(|| Duration::from_millis(rng.random_range(5..150)));
            let mut command = brook();
            command
                .args([
                    "run",
                    script.to_str().unwrap(),
                    "--trigger",
                    "available-now",
                ])
                .current_dir(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            if let Some(pause) = &pause {
                command.env(brook::testing::faults::ENV, pause);
            }
            let mut child = command.spawn().unwrap();
            let stderr = child.stderr.take().unwrap();
            let (paused_tx, paused) = std::sync::mpsc::channel();
            let reader = std::thread::spawn(move || {
                let mut text = String::new();
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.starts_with("brook: paused at ") {
                        let _ = paused_tx.send(());
                    }
                    text.push_str(&line);
                    text.push('\n');
                }
                text
            });
            let started = Instant::now();
            let finished = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    let log = reader.join().unwrap();
                    assert!(status.success(), "seed {seed} {mode}: {log}");
                    break true;
                }
                let due = paused.try_recv().is_ok()
                    || instant.is_some_and(|after| started.elapsed() >= after);
                if due {
                    child.kill().unwrap(); // SIGKILL
                    child.wait().unwrap();
                    break false;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(120),
                    "seed {seed} {mode}: brook run hangs at {pause:?}"
                );
                std::thread::sleep(Duration::from_millis(2));
            };
            let committed = committed_files(&dir.join("cp"));
            let cleaned: BTreeSet<String> = all.difference(&names(&input)).cloned().collect();
            assert!(
                cleaned.is_subset(&committed),
                "seed {seed} {mode}: cleaned before its batch committed: {:?}",
                cleaned.difference(&committed).collect::<Vec<_>>()
            );
            if finished {
                break;
            }
            kills.push(pause.unwrap_or_else(|| format!("after {instant:?}")));
        }
        assert!(
            kills.len() >= KILLS / 2,
            "seed {seed} {mode}: only {kills:?}"
        );
        assert_eq!(
            copied(dir),
            lines(0, FILES * LINES).lines().collect::<Vec<_>>(),
            "seed {seed} {mode}: every line exactly once"
        );
        // A batch committed just before a kill keeps its file (as in Spark):
        // the restart never cleans what an earlier run committed.
        let left = names(&input);
        assert!(
            left.len() <= kills.len(),
            "seed {seed} {mode}: {left:?} left by {kills:?}"
        );
        if mode == "archive" {
            let kept = archive.join(input.strip_prefix("/").unwrap());
            let archived = names(&kept);
            assert!(archived.is_disjoint(&left), "seed {seed}: {archived:?}");
            assert_eq!(
                archived.union(&left).cloned().collect::<BTreeSet<_>>(),
                all,
                "seed {seed}: every file archived or left"
            );
        }
    }
}

/// As in Spark, `maxFileAge` is ignored when the newest files go first with a
/// per-batch limit: the older files still to read would otherwise be dropped.
#[test]
fn max_file_age_is_ignored_with_latest_first_and_a_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let script = write_script(
        dir,
        ", 'latestFirst' 'true', 'maxFilesPerTrigger' '5', 'maxFileAge' '10 seconds'",
    );
    let input = dir.join("in");
    let start = SystemTime::now() - Duration::from_secs(3600);
    for i in 0..30 {
        let name = format!("f{i:02}.txt");
        write_file(&input, &name, &lines(i, 1));
        set_modified(&input.join(&name), start + Duration::from_secs(i as u64));
    }
    let out = run_available_now(dir, &script);
    assert!(out.status.success(), "{}", stderr(&out));
    let progress = progress_lines(&out);
    assert_eq!(progress.len(), 6);
    let first = progress[0]["sources"][0]["offset"][0]["path"]
        .as_str()
        .unwrap();
    assert!(first.ends_with("f29.txt"), "newest first: {first}");
    assert_eq!(copied(dir).len(), 30, "old files are still read");
}

/// `brook run` of `script` at a 100 ms trigger with the web UI, and the UI's address.
fn run_with_ui(dir: &Path, script: &Path) -> (std::process::Child, String) {
    let mut child = brook()
        .args(["run", script.to_str().unwrap(), "--trigger", "100ms"])
        .args(["--ui", "--ui-port", "0"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let url = loop {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "no UI address");
        if let Some(url) = line.trim().strip_prefix("brook: web UI at ") {
            break url.trim_end_matches('/').to_string();
        }
    };
    // Drained, so that the run never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    (child, url)
}

/// Ctrl-C: the run finishes its batches and cleanings, and ends.
fn interrupt(mut child: std::process::Child) {
    let stopped = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    assert!(child.wait().unwrap().success());
}

/// A file deleted after its batch committed, and a new one written under its
/// name: the new file is read, then deleted, never deleted unread.
#[test]
fn a_new_file_under_a_cleaned_name_is_read_before_it_is_cleaned() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let script = write_script(dir, ", 'cleanSource' 'delete'");
    let input = dir.join("in");
    let running = brook()
        .args(["run", script.to_str().unwrap(), "--trigger", "100ms"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    write_file(&input, "a.txt", &lines(0, 3));
    wait_for("a.txt to be copied and deleted", || {
        copied(dir).len() == 3 && names(&input).is_empty()
    });
    write_file(&input, "a.txt", &lines(100, 2));
    wait_for("the new a.txt to be copied", || copied(dir).len() == 5);
    wait_for("the new a.txt to be deleted", || names(&input).is_empty());
    interrupt(running);
    let mut expected: Vec<String> = lines(0, 3).lines().map(String::from).collect();
    expected.extend(lines(100, 2).lines().map(String::from));
    assert_eq!(copied(dir), expected);
}

/// A file already in the archive under the name a file is archived to is
/// kept, and so is the file, with a warning naming both.
#[test]
fn archiving_never_replaces_a_file_already_in_the_archive() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let archive = dir.join("archive");
    let script = write_script(
        dir,
        &format!(
            ", 'cleanSource' 'archive', 'sourceArchiveDir' '{}'",
            archive.display()
        ),
    );
    let input = dir.join("in");
    let kept = archive.join(input.strip_prefix("/").unwrap());
    std::fs::create_dir_all(&kept).unwrap();
    std::fs::write(kept.join("a.txt"), "archived before\n").unwrap();
    write_file(&input, "a.txt", &lines(0, 2));
    write_file(&input, "b.txt", &lines(10, 2));
    let out = run_available_now(dir, &script);
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert_eq!(copied(dir).len(), 4);
    assert_eq!(
        std::fs::read_to_string(kept.join("a.txt")).unwrap(),
        "archived before\n"
    );
    assert_eq!(
        std::fs::read_to_string(input.join("a.txt")).unwrap(),
        lines(0, 2)
    );
    // The source names it as the object store does, without the leading `/`.
    let named = input.join("a.txt");
    let named = named.strip_prefix("/").unwrap().display();
    assert!(
        log.contains(&format!("could not clean up {named}"))
            && log.contains(&kept.join("a.txt").display().to_string()),
        "{log}"
    );
    assert_eq!(
        std::fs::read_to_string(kept.join("b.txt")).unwrap(),
        lines(10, 2)
    );
    assert!(!input.join("b.txt").exists());
}

/// Two queries on a directory, the deleting one done, the other behind when
/// the run stops. The deleting one restarts first, alone (its restart would
/// otherwise race the other's start): it cleans nothing an earlier run
/// committed, and the one behind, restarted with it, still reads every file.
#[test]
fn after_a_restart_no_file_a_query_behind_has_not_read_is_cleaned() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (input, script) = fast_and_slow(dir);
    // The slow query stops before its third batch; the fast one has read all.
    let mut first = brook()
        .args([
            "run",
            script.to_str().unwrap(),
            "--trigger",
            "available-now",
        ])
        .env(brook::testing::faults::ENV, "slow/read:2")
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = BufReader::new(first.stderr.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("brook: paused at slow/read:2") {
        line.clear();
        assert!(log.read_line(&mut line).unwrap() > 0, "never paused");
    }
    wait_for("the fast query to commit", || {
        committed_batches(&dir.join("cp_fast")) == 1
    });
    first.kill().unwrap();
    first.wait().unwrap();
    assert_eq!(committed_batches(&dir.join("cp_slow")), 2);
    let alone = dir.join("fast.sql");
    let text = std::fs::read_to_string(&script).unwrap();
    let fast_only: String = text
        .lines()
        .filter(|l| !l.contains("slow"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&alone, fast_only).unwrap();
    let out = run_available_now(dir, &alone);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(names(&input).len(), 6, "{:?}", names(&input));
    let out = run_available_now(dir, &script);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = |out: &str| {
        let mut rows = vec![];
        for entry in std::fs::read_dir(dir.join(out)).unwrap() {
            let path = entry.unwrap().path();
            if path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("part-")
            {
                rows.extend(
                    std::fs::read_to_string(path)
                        .unwrap()
                        .lines()
                        .map(String::from),
                );
            }
        }
        rows.len()
    };
    assert_eq!(rows("out_fast"), 24);
    assert_eq!(rows("out_slow"), 24, "the slow query read every file");
}

/// One of two queries on a directory is stopped; the deleting one goes on
/// and reads new files: none of them is cleaned while the stopped one could
/// still be restarted to read them.
#[test]
fn a_stopped_query_keeps_the_files_it_has_not_committed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let input = dir.join("in");
    std::fs::create_dir_all(&input).unwrap();
    let script = dir.join("two.sql");
    std::fs::write(
        &script,
        "CREATE UNBOUNDED EXTERNAL TABLE fast (value VARCHAR) STORED AS TEXT LOCATION 'in' \
         OPTIONS ('cleanSource' 'delete');\n\
         CREATE UNBOUNDED EXTERNAL TABLE slow (value VARCHAR) STORED AS TEXT LOCATION 'in';\n\
         CREATE EXTERNAL TABLE out_fast STORED AS JSON LOCATION 'out_fast' \
         OPTIONS ('checkpointLocation' 'cp_fast', 'queryName' 'fast');\n\
         CREATE EXTERNAL TABLE out_slow STORED AS JSON LOCATION 'out_slow' \
         OPTIONS ('checkpointLocation' 'cp_slow', 'queryName' 'slow');\n\
         INSERT INTO out_fast SELECT value FROM fast;\n\
         INSERT INTO out_slow SELECT value FROM slow;\n",
    )
    .unwrap();
    let (running, url) = run_with_ui(dir, &script);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    // The UI answers before the queries have started: asked until it knows "slow".
    wait_for("the slow query to stop", || {
        runtime
            .block_on(http.post(format!("{url}/api/queries/slow/stop")).send())
            .is_ok_and(|r| r.status().is_success())
    });
    for i in 0..3 {
        write_file(&input, &format!("g{i}.txt"), &lines(i * 10, 2));
    }
    wait_for("the fast query to commit the new files", || {
        committed_files(&dir.join("cp_fast")).len() == 3
    });
    interrupt(running);
    assert!(committed_files(&dir.join("cp_slow")).is_empty());
    assert_eq!(
        names(&input),
        BTreeSet::from(["g0.txt".into(), "g1.txt".into(), "g2.txt".into()])
    );
}

/// A kill between the two steps of archiving a file (linked into the archive,
/// not yet unlinked from the source directory) leaves it in both places; the
/// restart finishes the move rather than keep two copies or read it again.
#[test]
fn a_restart_finishes_an_archiving_a_kill_interrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let archive = dir.join("archive");
    let script = write_script(
        dir,
        &format!(
            ", 'cleanSource' 'archive', 'sourceArchiveDir' '{}'",
            archive.display()
        ),
    );
    let input = dir.join("in");
    let kept = archive.join(input.strip_prefix("/").unwrap());
    write_file(&input, "a.txt", &lines(0, 2));
    write_file(&input, "b.txt", &lines(10, 2));
    let out = run_available_now(dir, &script);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(names(&input).is_empty());
    // What the kill leaves: the archived file linked back under its name.
    std::fs::hard_link(kept.join("a.txt"), input.join("a.txt")).unwrap();
    write_file(&input, "c.txt", &lines(20, 2));
    let out = run_available_now(dir, &script);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(copied(dir).len(), 6, "a.txt is not read again");
    assert!(names(&input).is_empty(), "{:?}", names(&input));
    assert_eq!(
        names(&kept),
        ["a.txt", "b.txt", "c.txt"].map(String::from).into()
    );
    assert_eq!(
        std::fs::read_to_string(kept.join("a.txt")).unwrap(),
        lines(0, 2)
    );
}
