//! The `brook` command as a user runs it.

use std::process::Command;

fn brook() -> Command {
    Command::new(env!("CARGO_BIN_EXE_brook"))
}

#[test]
fn gen_send_and_run_a_query_file() {
    let dir = tempfile::tempdir().unwrap();
    let orders = dir.path().join("orders.txt");
    let out = brook()
        .args(["gen-orders", "--count", "3000", "--malformed", "0.02"])
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::write(&orders, &out.stdout).unwrap();
    let lines = String::from_utf8(out.stdout).unwrap();
    assert_eq!(lines.lines().count(), 3000);
    assert!(
        lines.starts_with("2016-03-22 20:25:28,1,"),
        "{}",
        &lines[..60]
    );

    let send = brook()
        .args([
            "send",
            "--input",
            orders.to_str().unwrap(),
            "--to",
            "data/orders",
        ])
        .args(["--lines-per-file", "1000", "--interval", "0s"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        send.status.success(),
        "{}",
        String::from_utf8_lossy(&send.stderr)
    );
    let mut files: Vec<String> = std::fs::read_dir(dir.path().join("data/orders"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    // Named by the send's start and process, then numbered: never reused.
    assert_eq!(files.len(), 3, "{files:?}");
    for (n, name) in files.iter().enumerate() {
        assert!(
            name.starts_with("orders-") && name.ends_with(&format!("-{n:05}.csv")),
            "{files:?}"
        );
    }

    let query = concat!(env!("CARGO_MANIFEST_DIR"), "/queries/top_clients.sql");
    let run = brook()
        .args([
            "run",
            query,
            "--trigger",
            "available-now",
            "--progress",
            "json",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stdout.contains("Batch: 0") && stdout.contains("client_id"),
        "{stdout}"
    );
    let table_rows = stdout
        .lines()
        .filter(|l| l.starts_with("| ") && !l.contains("client_id"))
        .count();
    assert_eq!(table_rows, 5, "top 5 clients: {stdout}");
    let progress: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        progress[0]["num_input_rows"].as_u64().unwrap()
            + progress[0]["num_malformed_rows"].as_u64().unwrap(),
        3000
    );
    assert!(progress[0]["num_malformed_rows"].as_u64().unwrap() > 20);
}

#[test]
fn run_reports_bad_input_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let query = concat!(env!("CARGO_MANIFEST_DIR"), "/queries/top_clients.sql");
    let run = brook()
        .args(["run", query])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("data/orders") && stderr.contains("does not exist"),
        "{stderr}"
    );

    let bad = dir.path().join("bad.sql");
    std::fs::write(&bad, "CREATE UNBOUNDED EXTERNAL TABLE t (x INT) STORED AS CSV LOCATION '.' OPTIONS ('maxFilesPerTriger' '1');").unwrap();
    let run = brook()
        .args(["run", bad.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    let lower = stderr.to_lowercase();
    assert!(
        lower.contains("'maxfilespertriger'") && lower.contains("unknown option"),
        "{stderr}"
    );

    // One failing query of two ends the run at once, its error printed once and
    // naming it, while the other would have run forever.
    for (sub, line) in [("good", "1\n"), ("strict", "1\nnot a number\n")] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        std::fs::write(dir.path().join(sub).join("a.csv"), line).unwrap();
    }
    let script = "
        CREATE UNBOUNDED EXTERNAL TABLE good (x INT) STORED AS CSV LOCATION 'good';
        CREATE UNBOUNDED EXTERNAL TABLE strict (x INT) STORED AS CSV LOCATION 'strict'
            OPTIONS ('mode' 'FAILFAST');
        CREATE EXTERNAL TABLE good_count STORED AS CONSOLE LOCATION 'stdout'
            OPTIONS ('outputMode' 'complete');
        CREATE EXTERNAL TABLE strict_count STORED AS CONSOLE LOCATION 'stdout'
            OPTIONS ('outputMode' 'complete');
        INSERT INTO good_count SELECT count(*) AS n FROM good;
        INSERT INTO strict_count SELECT count(*) AS n FROM strict;";
    std::fs::write(dir.path().join("two.sql"), script).unwrap();
    let started = std::time::Instant::now();
    let run = brook()
        .args(["run", "two.sql"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    assert!(
        stderr.contains("query 'strict_count' failed: malformed record")
            && stderr.contains("a.csv line 2"),
        "{stderr}"
    );
    assert_eq!(stderr.matches("not a number").count(), 1, "{stderr}");

    let run = brook().args(["run", "nowhere.sql"]).output().unwrap();
    assert!(String::from_utf8_lossy(&run.stderr).contains("nowhere.sql"));

    // The UI can stop queries: serving it beyond loopback takes a token.
    let open = brook()
        .args(["demo", "--ui-bind", "0.0.0.0", "--duration", "1s"])
        .env_remove("BROOK_UI_TOKEN")
        .output()
        .unwrap();
    assert!(!open.status.success());
    let stderr = String::from_utf8_lossy(&open.stderr);
    assert!(
        stderr.contains("--ui-token") && stderr.contains("0.0.0.0"),
        "{stderr}"
    );
}

/// Every error of a script's statement names the file and the statement,
/// those DataFusion's planner and the option parsers give included.
#[test]
fn every_statement_error_names_the_file_and_statement() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("in")).unwrap();
    for (name, statement, message) in [
        (
            "planning.sql",
            "SELECT nosuch FROM orders;",
            "error: planning.sql: statement 2: Schema error: No field named nosuch",
        ),
        (
            "option.sql",
            "CREATE EXTERNAL TABLE s STORED AS MEMORY LOCATION 's' \
             OPTIONS ('outputMode' 'sometimes');",
            "error: option.sql: statement 2: option 'outputMode': expected append, update \
             or complete, found 'sometimes'",
        ),
    ] {
        let script = format!("{}\n{statement}\n", orders_ddl("in"));
        std::fs::write(dir.path().join(name), script).unwrap();
        let out = brook()
            .args(["run", name, "--trigger", "once"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        let stderr = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(message), "{stderr}");
    }
}

/// A second demo on the same --dir adds files: one replacing a file of the
/// first run would be skipped as already read by a checkpointed query.
#[test]
fn a_second_demo_into_the_same_directory_adds_files() {
    let dir = tempfile::tempdir().unwrap();
    let orders = dir.path().join("orders");
    let files = || {
        let mut names: Vec<_> = std::fs::read_dir(&orders)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    let demo = || {
        let out = brook()
            .args(["demo", "--no-ui", "--no-clear", "--duration", "2s"])
            .args(["--rate", "10", "--dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr_of(&out));
    };
    let read = |names: &[String]| -> Vec<Vec<u8>> {
        names
            .iter()
            .map(|n| std::fs::read(orders.join(n)).unwrap())
            .collect()
    };
    demo();
    let first = files();
    assert!(!first.is_empty());
    let before = read(&first);
    demo();
    let both = files();
    assert!(both.len() > first.len(), "{first:?} then {both:?}");
    assert_eq!(read(&first), before, "the first run's files were rewritten");
}

/// The demo writes its orders into DIR/orders, fills of most of them into
/// DIR/fills, and the symbols table its sector query reads into DIR.
#[test]
fn demo_writes_fills_of_its_orders_beside_them() {
    let dir = tempfile::tempdir().unwrap();
    let out = brook()
        .args(["demo", "--no-ui", "--no-clear", "--duration", "4s"])
        .args(["--rate", "300", "--malformed", "0", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let lines = |sub: &str| -> Vec<Vec<String>> {
        let mut lines = vec![];
        for entry in std::fs::read_dir(dir.path().join(sub)).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            lines.extend(
                text.lines()
                    .map(|l| l.split(',').map(str::to_string).collect()),
            );
        }
        lines
    };
    let orders: std::collections::HashMap<String, String> = lines("orders")
        .into_iter()
        .map(|f| (f[1].clone(), f[0].clone()))
        .collect();
    let fills = lines("fills");
    assert!(orders.len() >= 900, "{} orders", orders.len());
    // Most fills come within seconds: many of those of the first seconds are written.
    assert!(
        fills.len() * 4 > orders.len(),
        "{} fills of {} orders",
        fills.len(),
        orders.len()
    );
    for fill in &fills {
        assert_eq!(fill.len(), 5, "{fill:?}");
        let ordered = orders.get(&fill[2]);
        assert!(ordered.is_some_and(|t| *t <= fill[0]), "{fill:?}");
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join("symbols.csv")).unwrap(),
        include_str!("../queries/symbols.csv")
    );
}

#[test]
fn demo_shows_the_dashboard_and_stops() {
    let out = brook()
        .args(["demo", "--duration", "4s", "--no-clear", "--rate", "500"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("Top 5 clients by traded amount"),
        "{stdout}"
    );
    assert!(stdout.contains("buy_sell_per_second"), "{stdout}");
    assert!(stdout.contains("volume_per_sector"), "{stdout}");
    assert!(
        stdout.contains("Orders and shares per sector, this minute so far"),
        "{stdout}"
    );
    assert!(stdout.contains("demo stopped"), "{stdout}");
    assert!(
        stdout.contains("brook demo: the dashboard is at http://127.0.0.1:"),
        "{stdout}"
    );
    // By the last view the top-clients table has five rows.
    let last = stdout
        .rsplit("Top 5 clients by traded amount")
        .next()
        .unwrap();
    let table: Vec<&str> = last
        .lines()
        .skip_while(|l| !l.starts_with("+"))
        .take(9)
        .collect();
    assert_eq!(
        table
            .iter()
            .filter(|l| l.starts_with("| ") && !l.contains("client_id"))
            .count(),
        5,
        "{last}"
    );
}

/// Waits until `cond` holds, for at most a minute.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn progress_lines(stderr: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn run_with_a_checkpoint_stops_on_ctrl_c_and_resumes_and_keeps_a_second_run_out() {
    let dir = tempfile::tempdir().unwrap();
    let orders = dir.path().join("data/orders");
    let generated = brook()
        .args(["gen-orders", "--count", "2000"])
        .output()
        .unwrap();
    let lines = String::from_utf8(generated.stdout).unwrap();
    let lines: Vec<&str> = lines.lines().collect();
    std::fs::create_dir_all(&orders).unwrap();
    std::fs::write(orders.join("a.csv"), lines[..1000].join("\n") + "\n").unwrap();
    let query = concat!(env!("CARGO_MANIFEST_DIR"), "/queries/top_clients.sql");
    let checkpoint = dir.path().join("checkpoint");
    let run = |trigger: &str| {
        let mut c = brook();
        c.args([
            "run",
            query,
            "--checkpoint",
            "checkpoint",
            "--progress",
            "json",
        ])
        .args(["--trigger", trigger])
        .current_dir(dir.path());
        c
    };

    let first = run("1 second")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("batch 0's commit", || {
        checkpoint.join("top_clients/commits/0").exists()
    });

    let second = run("available-now").output().unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("in use by another running query")
            && stderr.contains(&format!("process {}", first.id())),
        "{stderr}"
    );

    let interrupted = std::process::Command::new("kill")
        .args(["-INT", &first.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let first = first.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{stderr}");
    assert!(stderr.contains("stopping"), "{stderr}");
    let before = progress_lines(&first.stderr);
    assert_eq!(before.len(), 1, "{stderr}");

    std::fs::write(orders.join("b.csv"), lines[1000..].join("\n") + "\n").unwrap();
    let resumed = run("available-now").output().unwrap();
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let after = progress_lines(&resumed.stderr);
    assert_eq!(after.len(), 1);
    assert_eq!(after[0]["batch_id"], 1);
    assert_eq!(after[0]["num_input_rows"], 1000, "only b.csv is new");
    assert_eq!(after[0]["id"], before[0]["id"], "the same query resumed");

    // The project moved: 'data/orders' is now another directory, whose files
    // the checkpoint has not seen; reading them again would count every order twice.
    let moved = tempfile::tempdir().unwrap();
    let copied = std::process::Command::new("cp")
        .args(["-a", ".", moved.path().to_str().unwrap()])
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(copied.success());
    let elsewhere = brook()
        .args([
            "run",
            query,
            "--checkpoint",
            "checkpoint",
            "--trigger",
            "available-now",
        ])
        .current_dir(moved.path())
        .output()
        .unwrap();
    assert!(!elsewhere.status.success());
    let stderr = String::from_utf8_lossy(&elsewhere.stderr);
    assert!(
        stderr.contains("source: checkpoint has orders CSV")
            && stderr.contains(&dir.path().join("data/orders").display().to_string()),
        "{stderr}"
    );
}

/// The orders columns as `gen-orders` writes them, read from `dir` a file per batch.
fn orders_ddl(dir: &str) -> String {
    format!(
        "CREATE UNBOUNDED EXTERNAL TABLE orders (time TIMESTAMP, order_id BIGINT, client_id INT, \
         symbol VARCHAR, amount INT, price DOUBLE, side VARCHAR) STORED AS CSV LOCATION '{dir}' \
         OPTIONS ('maxFilesPerTrigger' '1');"
    )
}

/// `count` generated orders, one line each.
fn generated(count: u64) -> Vec<String> {
    let out = brook()
        .args(["gen-orders", "--count", &count.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Writes `lines` into `dir` as files of `per_file` lines, named from `first` on.
fn write_files(dir: &std::path::Path, lines: &[String], per_file: usize, first: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for (i, chunk) in lines.chunks(per_file).enumerate() {
        let name = format!("orders-{:04}.csv", first + i);
        std::fs::write(dir.join(name), chunk.join("\n") + "\n").unwrap();
    }
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `5124095576030432h` is 2^64 ns and 3,584 s more: it wrapped to 3,584 s (and a
/// debug build panicked) wherever a duration is read.
#[test]
fn durations_too_long_are_refused_naming_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let huge = "5124095576030432h";
    let refused = |out: std::process::Output, value: &str| {
        let stderr = stderr_of(&out);
        assert_eq!(
            out.status.code(),
            Some(if value == huge { 2 } else { 1 }),
            "{stderr}"
        );
        assert!(
            stderr.contains(&format!("invalid duration '{value}': too long")),
            "{stderr}"
        );
    };
    refused(
        brook()
            .args(["demo", "--no-ui", "--duration", huge])
            .output()
            .unwrap(),
        huge,
    );
    let input = dir.path().join("orders.csv");
    std::fs::write(&input, generated(10).join("\n")).unwrap();
    refused(
        brook()
            .args(["send", "--input", input.to_str().unwrap(), "--to", "out"])
            .args(["--interval", huge])
            .current_dir(dir.path())
            .output()
            .unwrap(),
        huge,
    );
    let query = concat!(env!("CARGO_MANIFEST_DIR"), "/queries/top_clients.sql");
    refused(
        brook()
            .args(["run", query, "--trigger", huge])
            .output()
            .unwrap(),
        huge,
    );

    write_files(&dir.path().join("in"), &generated(10), 10, 0);
    let long = "9999999999999999 hours";
    for (name, sql) in [
        (
            "window.sql",
            format!(
                "{} SELECT window.start, count(*) FROM orders GROUP BY window(time, '{long}')",
                orders_ddl("in")
            ),
        ),
        (
            "watermark.sql",
            orders_ddl("in").replace(
                "side VARCHAR)",
                &format!("side VARCHAR, WATERMARK FOR time AS time - INTERVAL '{long}')"),
            ) + " SELECT count(*) FROM orders",
        ),
        (
            "trigger.sql",
            format!(
                "{} CREATE EXTERNAL TABLE c STORED AS CONSOLE LOCATION 'stdout' \
                 OPTIONS ('trigger' '{long}'); INSERT INTO c SELECT order_id FROM orders",
                orders_ddl("in")
            ),
        ),
    ] {
        std::fs::write(dir.path().join(name), sql).unwrap();
        refused(
            brook()
                .args(["run", name, "--trigger", "once"])
                .current_dir(dir.path())
                .output()
                .unwrap(),
            long,
        );
    }
}

/// `amount + 1 + 1 + ...` is parsed in a loop but walked a level at a time by
/// everything after: thousands of terms overflowed a thread's stack (SIGABRT).
#[test]
fn deep_expressions_are_refused_or_computed_never_aborted() {
    let dir = tempfile::tempdir().unwrap();
    write_files(&dir.path().join("in"), &generated(3), 3, 0);
    let run = |select: &str| {
        std::fs::write(
            dir.path().join("deep.sql"),
            format!("{} {select};", orders_ddl("in")),
        )
        .unwrap();
        brook()
            .args(["run", "deep.sql", "--trigger", "once"])
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    for terms in [2_000, 20_000] {
        let out = run(&format!(
            "SELECT amount{} AS x FROM orders",
            " + 1".repeat(terms)
        ));
        let stderr = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{terms} terms: {stderr}");
        assert!(
            stderr.contains("statement 2: an expression nests more than 500 levels deep"),
            "{stderr}"
        );
    }
    let out = run(&format!(
        "SELECT order_id, amount{} AS x FROM orders",
        " + 1".repeat(400)
    ));
    assert!(out.status.success(), "{}", stderr_of(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<Vec<String>> = stdout
        .lines()
        .filter(|l| l.starts_with("| ") && !l.contains("order_id"))
        .map(|l| l.split('|').map(|c| c.trim().to_string()).collect())
        .collect();
    let amounts: Vec<i64> = generated(3)
        .iter()
        .map(|l| l.split(',').nth(4).unwrap().parse().unwrap())
        .collect();
    let want: Vec<Vec<String>> = amounts
        .iter()
        .enumerate()
        .map(|(i, a)| {
            vec![
                String::new(),
                (i + 1).to_string(),
                (a + 400).to_string(),
                String::new(),
            ]
        })
        .collect();
    assert_eq!(rows, want, "{stdout}");

    let out = run(&vec!["SELECT amount FROM orders"; 61].join(" UNION ALL "));
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("60 set operations (UNION, EXCEPT, INTERSECT) in one statement"),
        "{stderr}"
    );
}

/// Runs `brook <args>` in `dir` through bash with its standard output (and,
/// with `both`, its standard error) piped into `head -n 1`; returns brook's exit code.
fn through_head(dir: &std::path::Path, args: &str, both: bool) -> (Option<i32>, String) {
    let redirect = if both { "2>&1" } else { "2>stderr.txt" };
    let status = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "\"$0\" {args} {redirect} | head -n 1 >/dev/null; exit ${{PIPESTATUS[0]}}"
        ))
        .arg(env!("CARGO_BIN_EXE_brook"))
        .current_dir(dir)
        .status()
        .unwrap();
    let stderr = std::fs::read_to_string(dir.join("stderr.txt")).unwrap_or_default();
    (status.code(), stderr)
}

/// `brook run ... --progress json 2>&1 | head` panicked ("failed printing to
/// stderr", exit 101) once `head` had its line; so did `brook demo | head`.
#[test]
fn a_reader_that_goes_away_ends_the_output_not_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let lines = generated(600);
    write_files(&dir.path().join("in"), &lines, 10, 0);
    std::fs::write(
        dir.path().join("copy.sql"),
        format!(
            "{} CREATE EXTERNAL TABLE copy STORED AS CSV LOCATION 'out';
             INSERT INTO copy SELECT order_id FROM orders;",
            orders_ddl("in")
        ),
    )
    .unwrap();
    // Progress stops being printed; the queries go on to the end.
    let (code, _) = through_head(
        dir.path(),
        "run copy.sql --trigger available-now --progress json",
        true,
    );
    assert_eq!(code, Some(0));
    let mut copied = 0;
    for part in std::fs::read_dir(dir.path().join("out")).unwrap() {
        let path = part.unwrap().path();
        if path.extension().is_some_and(|e| e == "csv") {
            copied += std::fs::read_to_string(path).unwrap().lines().count() - 1;
        }
    }
    assert_eq!(copied, lines.len());

    // The console sink's output is the query's whole point: the query fails,
    // saying why, rather than the process panicking.
    std::fs::write(
        dir.path().join("print.sql"),
        format!("{} SELECT order_id FROM orders;", orders_ddl("in")),
    )
    .unwrap();
    let (code, _) = through_head(dir.path(), "run print.sql --trigger available-now", true);
    assert_eq!(code, Some(1));
    let (code, stderr) = through_head(dir.path(), "run print.sql --trigger available-now", false);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("sink 'console': batch")
            && stderr.contains("could not be printed: the output was closed by its reader"),
        "{stderr}"
    );

    // brook send goes on sending after its reader has gone.
    std::fs::write(dir.path().join("orders.csv"), lines[..100].join("\n")).unwrap();
    let (code, _) = through_head(
        dir.path(),
        "send --input orders.csv --to sent --lines-per-file 1 --interval 10ms",
        true,
    );
    assert_eq!(code, Some(0));
    assert_eq!(
        std::fs::read_dir(dir.path().join("sent")).unwrap().count(),
        100
    );

    // Nobody watches the demo any more: it stops as if its time were up.
    let (code, stderr) = through_head(dir.path(), "demo --no-ui --no-clear --rate 100", false);
    assert_eq!(code, Some(0), "{stderr}");
}

/// `INSERT INTO "Quoted Name"` looked for a sink named with the quotes, and
/// `INSERT INTO MixedCase` for one not lower-cased as its `CREATE` was.
#[test]
fn sinks_and_sources_are_named_as_datafusion_names_tables() {
    let dir = tempfile::tempdir().unwrap();
    let lines = generated(200);
    write_files(&dir.path().join("in"), &lines, 200, 0);
    std::fs::write(
        dir.path().join("names.sql"),
        "CREATE UNBOUNDED EXTERNAL TABLE \"Order Book\" (time TIMESTAMP, order_id BIGINT, \
         client_id INT, symbol VARCHAR, amount INT, price DOUBLE, side VARCHAR) \
         STORED AS CSV LOCATION 'in';
         CREATE EXTERNAL TABLE \"Big Orders\" STORED AS CSV LOCATION 'big';
         CREATE EXTERNAL TABLE MixedCase STORED AS CSV LOCATION 'mixed';
         INSERT INTO \"Big Orders\" SELECT order_id FROM \"Order Book\" WHERE amount > 1000;
         INSERT INTO MIXEDCASE SELECT order_id FROM \"Order Book\" WHERE amount > 1500;",
    )
    .unwrap();
    let out = brook()
        .args(["run", "names.sql", "--trigger", "available-now"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let ids_over = |min: i64| -> Vec<String> {
        lines
            .iter()
            .filter(|l| l.split(',').nth(4).unwrap().parse::<i64>().unwrap() > min)
            .map(|l| l.split(',').nth(1).unwrap().to_string())
            .collect()
    };
    for (sink, min) in [("big", 1000), ("mixed", 1500)] {
        let mut ids = vec![];
        for part in std::fs::read_dir(dir.path().join(sink)).unwrap() {
            let path = part.unwrap().path();
            if path.extension().is_some_and(|e| e == "csv") {
                let text = std::fs::read_to_string(path).unwrap();
                ids.extend(text.lines().skip(1).map(str::to_string));
            }
        }
        ids.sort_by_key(|id| id.parse::<i64>().unwrap());
        assert!(!ids.is_empty());
        assert_eq!(ids, ids_over(min), "{sink}");
    }

    // A name that is not declared is shown as it would have to be written.
    std::fs::write(
        dir.path().join("missing.sql"),
        "INSERT INTO \"Small Orders\" SELECT 1",
    )
    .unwrap();
    let out = brook()
        .args(["run", "missing.sql"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        stderr_of(&out).contains(
            "no sink table 'Small Orders'; declare it first, e.g. CREATE EXTERNAL TABLE \"Small Orders\""
        ),
        "{}",
        stderr_of(&out)
    );
}

/// The order ids of every row a CSV file sink wrote under `dir`, sorted.
fn sink_ids(dir: &std::path::Path) -> Vec<i64> {
    let mut ids = vec![];
    for part in std::fs::read_dir(dir).unwrap() {
        let path = part.unwrap().path();
        if path.extension().is_some_and(|e| e == "csv") {
            let text = std::fs::read_to_string(path).unwrap();
            ids.extend(text.lines().skip(1).map(|l| l.parse::<i64>().unwrap()));
        }
    }
    ids.sort();
    ids
}

fn signal(child: &std::process::Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill only sends a signal to the child this test started.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

/// SIGTERM (what a supervisor or `docker stop` sends) killed `brook run` at
/// once (exit 143). It now stops as Ctrl-C does: the running batch is
/// finished and committed, and the next run goes on from there.
#[test]
fn sigterm_stops_a_run_gracefully_and_a_second_signal_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let lines = generated(1000);
    let input = dir.path().join("in");
    write_files(&input, &lines[..500], 50, 0);
    std::fs::write(
        dir.path().join("copy.sql"),
        format!(
            "{} CREATE EXTERNAL TABLE copy STORED AS CSV LOCATION 'out';
             INSERT INTO copy SELECT order_id FROM orders;",
            orders_ddl("in")
        ),
    )
    .unwrap();
    let run = |trigger: &str| {
        let mut c = brook();
        c.args([
            "run",
            "copy.sql",
            "--checkpoint",
            "checkpoint",
            "--trigger",
            trigger,
        ])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
        c
    };
    let commits = dir.path().join("checkpoint/copy/commits");
    let first = run("200ms").spawn().unwrap();
    wait_for("batch 0's commit", || commits.join("0").exists());
    signal(&first, libc::SIGTERM);
    let first = first.wait_with_output().unwrap();
    let stderr = stderr_of(&first);
    assert_eq!(first.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("stopping: finishing the running batches"),
        "{stderr}"
    );
    // What was committed is in the sink, whole.
    let committed = std::fs::read_dir(&commits)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_str().unwrap().parse::<u64>().is_ok()
        })
        .count();
    let written = sink_ids(&dir.path().join("out"));
    assert_eq!(written.len(), committed * 50);

    // A second signal ends a stop that waits on a batch (held here at its
    // "read" point), and the checkpoint runs that batch again next time.
    let mut held = run("200ms");
    held.env("BROOK_PAUSE_AT", format!("copy/read:{committed}"));
    write_files(&input, &lines[500..750], 50, 10);
    let mut second = held.spawn().unwrap();
    let mut stderr = std::io::BufReader::new(second.stderr.take().unwrap());
    let mut text = String::new();
    let mut read_until = |what: &str| {
        while !text.contains(what) {
            let read = std::io::BufRead::read_line(&mut stderr, &mut text).unwrap();
            assert!(read > 0, "no '{what}' in: {text}");
        }
    };
    read_until("brook: paused at");
    signal(&second, libc::SIGTERM);
    read_until("stopping");
    signal(&second, libc::SIGINT);
    read_until("stopped at once by a second signal");
    assert_eq!(second.wait().unwrap().code(), Some(1));

    write_files(&input, &lines[750..], 50, 15);
    let last = run("available-now").output().unwrap();
    assert!(last.status.success(), "{}", stderr_of(&last));
    let want: Vec<i64> = (1..=1000).collect();
    assert_eq!(
        sink_ids(&dir.path().join("out")),
        want,
        "no row lost or written twice"
    );
}

/// `window(time, '1 day', '1 second')` copies each row into 86,400 windows:
/// over 5,000 orders it asked for gigabytes and aborted the process.
#[test]
fn memory_limit_fails_an_oversized_query_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write_files(&dir.path().join("in"), &generated(5000), 5000, 0);
    std::fs::write(
        dir.path().join("windows.sql"),
        format!(
            "{} SELECT window.start, symbol, sum(amount) AS shares FROM orders \
             GROUP BY window(time, '1 day', '1 second'), symbol;",
            orders_ddl("in")
        ),
    )
    .unwrap();
    let out = brook()
        .args([
            "run",
            "windows.sql",
            "--trigger",
            "once",
            "--memory-limit",
            "64MB",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("query 'console' failed: window(...) puts each row into every window")
            && stderr.contains("(86400 windows of 86400s every 1s)")
            && stderr.contains("Failed to allocate additional")
            && stderr.contains("for window expansion")
            && stderr.contains("--memory-limit"),
        "{stderr}"
    );

    // DataFusion's own operators take their memory from the same pool.
    let out = brook()
        .args(["demo", "--duration", "10s", "--no-ui", "--rate", "200"])
        .args(["--memory-limit", "1KB"])
        .output()
        .unwrap();
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("failed: Resources exhausted")
            && stderr.contains("HashAggregateStream")
            && stderr.contains("pool_size: 1024.0 B"),
        "{stderr}"
    );

    let out = brook()
        .args(["run", "windows.sql", "--memory-limit", "64 parsecs"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr_of(&out).contains("expected a size such as '512MB' or '4GB', found '64 parsecs'"),
        "{}",
        stderr_of(&out)
    );
}

/// With `--ui`, a run whose queries had failed kept serving until Ctrl-C: a
/// supervisor never learned of the failure.
#[test]
fn a_failed_run_with_the_ui_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("in")).unwrap();
    std::fs::write(dir.path().join("in/a.csv"), "1\nnot a number\n").unwrap();
    std::fs::write(
        dir.path().join("strict.sql"),
        "CREATE UNBOUNDED EXTERNAL TABLE t (x INT) STORED AS CSV LOCATION 'in'
             OPTIONS ('mode' 'FAILFAST');
         SELECT count(*) AS n FROM t;",
    )
    .unwrap();
    let mut child = brook()
        .args(["run", "strict.sql", "--ui", "--ui-port", "0"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > std::time::Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("the failed run still serves the UI after a minute");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("malformed record"), "{stderr}");
}

/// `brook demo` stops on SIGTERM as on Ctrl-C, printing how long it ran.
#[test]
fn sigterm_stops_the_demo_gracefully() {
    let mut demo = brook()
        .args(["demo", "--no-ui", "--no-clear", "--rate", "100"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(demo.stdout.take().unwrap());
    let mut text = String::new();
    while !text.contains("Top 5 clients") {
        let read = std::io::BufRead::read_line(&mut stdout, &mut text).unwrap();
        assert!(read > 0, "{text}");
    }
    signal(&demo, libc::SIGTERM);
    std::io::Read::read_to_string(&mut stdout, &mut text).unwrap();
    assert_eq!(demo.wait().unwrap().code(), Some(0), "{text}");
    assert!(text.contains("demo stopped after"), "{text}");
}

/// `gen-orders --fills FILE` writes fills of about 80% of the orders, in time
/// order, each naming an order printed and coming no earlier than it.
#[test]
fn gen_orders_writes_fills_of_the_orders_it_prints() {
    let dir = tempfile::tempdir().unwrap();
    let fills = dir.path().join("fills.csv");
    let gen_with_fills = || {
        let out = brook()
            .args([
                "gen-orders",
                "--count",
                "5000",
                "--rate",
                "100",
                "--seed",
                "7",
            ])
            .args(["--malformed", "0.02", "--fills", fills.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr_of(&out));
        (out.stdout, std::fs::read_to_string(&fills).unwrap())
    };
    let (stdout, fill_text) = gen_with_fills();
    let orders: std::collections::HashMap<i64, chrono::NaiveDateTime> =
        String::from_utf8(stdout.clone())
            .unwrap()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                let time = chrono::NaiveDateTime::parse_from_str(f[0], "%Y-%m-%d %H:%M:%S");
                Some((f.get(1)?.parse().ok()?, time.ok()?))
            })
            .collect();
    assert!(orders.len() > 4800, "{} well-formed orders", orders.len());
    let lines: Vec<&str> = fill_text.lines().collect();
    assert!(
        (3700..4300).contains(&lines.len()),
        "{} fills of 5000 orders",
        lines.len()
    );
    let mut previous = None;
    for line in &lines {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), 5, "time,fill_id,order_id,quantity,price: {line}");
        let time = chrono::NaiveDateTime::parse_from_str(f[0], "%Y-%m-%d %H:%M:%S").unwrap();
        let order = orders.get(&f[2].parse().unwrap());
        assert!(
            order.is_some_and(|&o| o <= time),
            "{line}: no such order before it"
        );
        assert!(previous <= Some(time), "{line} out of time order");
        previous = Some(time);
    }
    // The same seed gives the same orders and fills; without --fills, the same orders.
    assert_eq!(gen_with_fills(), (stdout.clone(), fill_text));
    let plain = brook()
        .args([
            "gen-orders",
            "--count",
            "5000",
            "--rate",
            "100",
            "--seed",
            "7",
        ])
        .args(["--malformed", "0.02"])
        .output()
        .unwrap();
    assert_eq!(plain.stdout, stdout);

    let refused = brook()
        .args([
            "gen-orders",
            "--count",
            "10",
            "--fills",
            fills.to_str().unwrap(),
        ])
        .args(["--filled", "1.5"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr_of(&refused)
            .contains("option '--filled': 1.5 is not a share: give a number from 0 to 1"),
        "{}",
        stderr_of(&refused)
    );
}

/// Orders whose times would run past the calendar's end are refused, not a panic.
#[test]
fn gen_orders_refuses_a_start_too_near_the_end_of_the_calendar() {
    let out = brook()
        .args(["gen-orders", "--count", "10", "--rate", "1"])
        .args(["--start", "+262142-12-31 23:59:55"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out)
            .contains("option '--start': order 5 would fall past the last date the calendar has"),
        "{}",
        stderr_of(&out)
    );
}
