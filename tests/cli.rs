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
