//! `brook scheduler` and `brook executor` as a user starts them: real
//! processes on 127.0.0.1 that run the plans a Ballista client sends.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use ballista::prelude::{SessionConfigExt, SessionContextExt};
use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::prelude::{CsvReadOptions, SessionConfig, SessionContext};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// The cluster's processes, killed when the test ends, also when it panics.
struct Processes {
    children: Vec<(String, Child, PathBuf)>,
}

impl Processes {
    fn new() -> Self {
        Self {
            children: Vec::new(),
        }
    }

    /// Starts `brook ARGS`, its standard error going to LOG.
    fn start(&mut self, name: &str, args: &[&str], log: &Path) -> usize {
        let child = Command::new(env!("CARGO_BIN_EXE_brook"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(File::create(log).unwrap())
            .spawn()
            .unwrap();
        self.children
            .push((name.to_string(), child, log.to_path_buf()));
        self.children.len() - 1
    }

    /// Every process's log, for a failure message.
    fn logs(&self) -> String {
        self.children
            .iter()
            .map(|(name, _, log)| {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {name} ---\n{}\n", tail.join("\n"))
            })
            .collect()
    }

    /// Fails with the logs if a process has already ended.
    fn check_running(&mut self) {
        let mut ended = Vec::new();
        for (name, child, _) in &mut self.children {
            if let Some(status) = child.try_wait().unwrap() {
                ended.push(format!("{name} exited with {status}"));
            }
        }
        if !ended.is_empty() {
            panic!("{}\n{}", ended.join("; "), self.logs());
        }
    }

    /// Sends SIGTERM to process `i` and waits (bounded) for it to exit.
    fn terminate(&mut self, i: usize) -> ExitStatus {
        let (name, child, _) = &mut self.children[i];
        let pid = i32::try_from(child.id()).unwrap();
        // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let name = name.clone();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.children[i].1.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "{name} did not exit within {WAIT:?} of SIGTERM\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GETs a scheduler REST endpoint; `None` while the scheduler does not answer.
async fn get_json(url: String) -> Option<Value> {
    let response = reqwest::get(&url).await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    serde_json::from_str(&response.text().await.ok()?).ok()
}

/// Polls `probe` until it gives a value; panics naming `what` after [`WAIT`].
async fn wait_for<T, F, Fut>(processes: &mut Processes, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        processes.check_running();
        if Instant::now() > deadline {
            panic!("waited {WAIT:?} for {what}\n{}", processes.logs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Orders in several CSV files: one file is one task of the scan stage.
/// Prices are in cents, so that sums are exact whatever order the
/// partitions add up in.
fn write_orders(dir: &Path, files: usize, rows: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for f in 0..files {
        let mut text = String::from("symbol,quantity,price_cents\n");
        for r in 0..rows {
            let i = f * rows + r;
            text.push_str(&format!(
                "S{},{},{}\n",
                (i * 7 + f) % 13,
                1 + i % 50,
                1000 + (i * 37) % 9000
            ));
        }
        std::fs::write(dir.join(format!("part-{f:02}.csv")), text).unwrap();
    }
}

const QUERY: &str = "SELECT symbol, COUNT(*) AS orders, SUM(quantity) AS quantity, \
     MIN(price_cents) AS low, MAX(price_cents) AS high, \
     SUM(quantity * price_cents) AS notional \
     FROM orders GROUP BY symbol ORDER BY symbol";

async fn run(ctx: &SessionContext, orders: &Path) -> String {
    ctx.register_csv(
        "orders",
        orders.to_str().unwrap(),
        CsvReadOptions::new().has_header(true),
    )
    .await
    .unwrap();
    let batches = ctx.sql(QUERY).await.unwrap().collect().await.unwrap();
    pretty_format_batches(&batches).unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_by_runs_on_two_executors_and_matches_local_datafusion() {
    let dir = tempfile::tempdir().unwrap();
    let orders = dir.path().join("orders");
    write_orders(&orders, 8, 400);

    let mut processes = Processes::new();
    let port = free_port().to_string();
    let scheduler = processes.start(
        "scheduler",
        &["scheduler", "--bind", "127.0.0.1", "--port", &port],
        &dir.path().join("scheduler.log"),
    );
    let api = format!("http://127.0.0.1:{port}/api");
    wait_for(&mut processes, "the scheduler's REST API", || {
        get_json(format!("{api}/executors"))
    })
    .await;

    let mut executors = Vec::new();
    for n in 0..2 {
        let (flight, grpc) = (free_port().to_string(), free_port().to_string());
        let work_dir = dir.path().join(format!("work-{n}"));
        let log = dir.path().join(format!("executor-{n}.log"));
        let i = processes.start(
            &format!("executor {n}"),
            &[
                "executor",
                "--scheduler",
                &format!("127.0.0.1:{port}"),
                "--port",
                &flight,
                "--grpc-port",
                &grpc,
                "--work-dir",
                work_dir.to_str().unwrap(),
                // One task at a time each: the scan's eight tasks need both.
                "--slots",
                "1",
            ],
            &log,
        );
        executors.push((i, flight, log));
    }
    let registered = wait_for(&mut processes, "both executors to register", || {
        let url = format!("{api}/executors");
        async move {
            let listed = get_json(url).await?;
            let listed = listed.as_array()?.clone();
            (listed.len() == 2).then_some(listed)
        }
    })
    .await;
    for (_, flight, _) in &executors {
        assert!(
            registered
                .iter()
                .any(|e| e["port"].as_u64() == flight.parse().ok() && e["host"] == "127.0.0.1"),
            "executor on port {flight} not in {registered:?}"
        );
    }

    let config = SessionConfig::new_with_ballista().with_target_partitions(8);
    let state = SessionStateBuilder::new()
        .with_config(config)
        .with_default_features()
        .build();
    let cluster = SessionContext::remote_with_state(&format!("df://127.0.0.1:{port}"), state)
        .await
        .unwrap();
    let on_cluster = run(&cluster, &orders).await;
    let local = run(&SessionContext::new(), &orders).await;
    assert_eq!(on_cluster, local);
    assert_eq!(on_cluster.lines().count(), 13 + 4, "{on_cluster}");

    let jobs = get_json(format!("{api}/jobs")).await.unwrap();
    let completed: Vec<&Value> = jobs
        .as_array()
        .unwrap()
        .iter()
        .filter(|job| job["status"] == "Completed")
        .collect();
    assert_eq!(completed.len(), 1, "{jobs:#}");
    let job_id = completed[0]["job_id"].as_str().unwrap();
    // Each executor logs every task it runs, named by its job.
    for (_, flight, log) in &executors {
        let text = std::fs::read_to_string(log).unwrap();
        let tasks = text
            .matches(&format!("Finished task : [TID {job_id}/"))
            .count();
        assert!(
            tasks > 0,
            "the executor on port {flight} ran no task of job {job_id}\n{}",
            processes.logs()
        );
    }

    // SIGTERM stops them cleanly, executors first, as an operator would.
    for (i, flight, _) in &executors {
        let status = processes.terminate(*i);
        assert!(
            status.success(),
            "executor {flight}: {status}\n{}",
            processes.logs()
        );
    }
    let status = processes.terminate(scheduler);
    assert!(
        status.success(),
        "scheduler: {status}\n{}",
        processes.logs()
    );
}

fn brook(args: &[&str]) -> (ExitStatus, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_brook"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_scheduler_on_a_taken_port_says_so() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (status, stderr) = brook(&["scheduler", "--port", &port]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "option '--port': cannot listen on 127.0.0.1:{port}"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn an_executor_without_a_scheduler_says_so() {
    // A port nothing listens on once this listener is gone.
    let port = free_port().to_string();
    let (flight, grpc) = (free_port().to_string(), free_port().to_string());
    let (status, stderr) = brook(&[
        "executor",
        "--scheduler",
        &format!("127.0.0.1:{port}"),
        "--port",
        &flight,
        "--grpc-port",
        &grpc,
        "--slots",
        "1",
    ]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "option '--scheduler': cannot reach the scheduler at 127.0.0.1:{port}"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn an_executor_on_a_taken_port_says_so() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let flight = taken.local_addr().unwrap().port().to_string();
    let (status, stderr) = brook(&[
        "executor",
        "--scheduler",
        "127.0.0.1:50050",
        "--port",
        &flight,
        "--grpc-port",
        &free_port().to_string(),
    ]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "option '--port': cannot listen on 127.0.0.1:{flight}"
        )),
        "{stderr}"
    );
}
