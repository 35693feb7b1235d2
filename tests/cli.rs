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
    assert_eq!(
        files,
        ["orders-00000.csv", "orders-00001.csv", "orders-00002.csv"]
    );

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

    let run = brook().args(["run", "nowhere.sql"]).output().unwrap();
    assert!(String::from_utf8_lossy(&run.stderr).contains("nowhere.sql"));
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
