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
use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionConfig, SessionContext};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

mod common;
#[path = "../examples/udf.rs"]
#[allow(dead_code)]
mod udf;
use common::s3::S3;
use common::tools::free_port;

const WAIT: Duration = Duration::from_secs(60);

/// The cluster's processes, killed when the test ends, also when it panics.
struct Processes {
    children: Vec<(String, Child, PathBuf)>,
    /// Those the test killed on purpose.
    killed: Vec<usize>,
}

impl Processes {
    fn new() -> Self {
        Self {
            children: Vec::new(),
            killed: Vec::new(),
        }
    }

    /// Starts `brook ARGS` with `env`, its standard error going to LOG.
    fn start(&mut self, name: &str, args: &[&str], env: &[(&str, String)], log: &Path) -> usize {
        let child = Command::new(env!("CARGO_BIN_EXE_brook"))
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
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
                let tail: Vec<&str> = text
                    .lines()
                    .filter(|l| !l.contains(" task"))
                    .rev()
                    .take(30)
                    .collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {name} ---\n{}\n", tail.join("\n"))
            })
            .collect()
    }

    /// Fails with the logs if a process has already ended.
    fn check_running(&mut self) {
        let mut ended = Vec::new();
        for (i, (name, child, _)) in self.children.iter_mut().enumerate() {
            if self.killed.contains(&i) {
                continue;
            }
            if let Some(status) = child.try_wait().unwrap() {
                ended.push(format!("{name} exited with {status}"));
            }
        }
        if !ended.is_empty() {
            panic!("{}\n{}", ended.join("; "), self.logs());
        }
    }

    /// Kills process `i` with SIGKILL, as a machine's failure would.
    fn kill(&mut self, i: usize) {
        let child = &mut self.children[i].1;
        child.kill().unwrap();
        child.wait().unwrap();
        self.killed.push(i);
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

/// A scheduler and its executors on 127.0.0.1, with the environment `env`
/// (an object store's settings), logging into `dir`.
struct TestCluster {
    processes: Processes,
    dir: PathBuf,
    env: Vec<(&'static str, String)>,
    port: String,
    api: String,
    scheduler: usize,
    /// Process index, results port and log of each executor started.
    executors: Vec<(usize, String, PathBuf)>,
}

impl TestCluster {
    /// A scheduler and `executors` executors of `slots` task slots, all registered.
    async fn start(
        dir: &Path,
        executors: usize,
        slots: &str,
        env: Vec<(&'static str, String)>,
    ) -> Self {
        let mut processes = Processes::new();
        let port = free_port().to_string();
        let scheduler = processes.start(
            "scheduler",
            // A killed executor is noticed within seconds, not the default 30.
            &[
                "scheduler",
                "--bind",
                "127.0.0.1",
                "--port",
                &port,
                "--executor-timeout",
                "4",
            ],
            &env,
            &dir.join("scheduler.log"),
        );
        let api = format!("http://127.0.0.1:{port}/api");
        wait_for(&mut processes, "the scheduler's REST API", || {
            get_json(format!("{api}/executors"))
        })
        .await;
        let mut cluster = Self {
            processes,
            dir: dir.to_path_buf(),
            env,
            port,
            api,
            scheduler,
            executors: vec![],
        };
        for _ in 0..executors {
            cluster.start_executor(slots);
        }
        cluster.registered(executors).await;
        cluster
    }

    /// Starts one more executor (not waiting for it to register).
    fn start_executor(&mut self, slots: &str) -> usize {
        let n = self.executors.len();
        let (flight, grpc) = (free_port().to_string(), free_port().to_string());
        let work_dir = self.dir.join(format!("work-{n}"));
        let log = self.dir.join(format!("executor-{n}.log"));
        let i = self.processes.start(
            &format!("executor {n}"),
            &[
                "executor",
                "--scheduler",
                &format!("127.0.0.1:{}", self.port),
                "--port",
                &flight,
                "--grpc-port",
                &grpc,
                "--work-dir",
                work_dir.to_str().unwrap(),
                "--slots",
                slots,
                "--heartbeat-interval",
                "1",
            ],
            &self.env,
            &log,
        );
        self.executors.push((i, flight, log));
        n
    }

    /// The scheduler's list of executors, once it holds `count`.
    async fn registered(&mut self, count: usize) -> Vec<Value> {
        let url = format!("{}/executors", self.api);
        wait_for(&mut self.processes, "the executors to register", || {
            let url = url.clone();
            async move {
                let listed = get_json(url).await?;
                let listed = listed.as_array()?.clone();
                (listed.len() == count).then_some(listed)
            }
        })
        .await
    }

    fn url(&self) -> String {
        format!("df://127.0.0.1:{}", self.port)
    }

    /// An engine keeping its queries' checkpoints under `checkpoints`, whose
    /// batches run on this cluster if `on_cluster`.
    fn engine(&self, checkpoints: &Path, on_cluster: bool) -> brook::Engine {
        let builder = brook::Engine::builder().checkpoint_root(checkpoints.to_str().unwrap());
        match on_cluster {
            true => builder.cluster(&self.url()).build(),
            false => builder.build(),
        }
    }

    /// Jobs the scheduler completed.
    async fn completed_jobs(&self) -> Vec<String> {
        let jobs = get_json(format!("{}/jobs", self.api)).await.unwrap();
        jobs.as_array()
            .unwrap()
            .iter()
            .filter(|job| job["status"] == "Completed")
            .map(|job| job["job_id"].as_str().unwrap().to_string())
            .collect()
    }

    /// The tasks of `job` (all jobs if `None`) executor `n` logged as finished.
    fn finished_tasks(&self, n: usize, job: Option<&str>) -> usize {
        let text = std::fs::read_to_string(&self.executors[n].2).unwrap();
        let prefix = format!(
            "Finished task : [TID {}",
            job.map_or(String::new(), |j| format!("{j}/"))
        );
        text.matches(&prefix).count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_by_runs_on_two_executors_and_matches_local_datafusion() {
    let dir = tempfile::tempdir().unwrap();
    let orders = dir.path().join("orders");
    write_orders(&orders, 8, 400);
    // One task at a time each: the scan's eight tasks need both.
    let mut cluster = TestCluster::start(dir.path(), 2, "1", vec![]).await;
    let registered = cluster.registered(2).await;
    for (_, flight, _) in &cluster.executors {
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
    let ctx = SessionContext::remote_with_state(&cluster.url(), state)
        .await
        .unwrap();
    let on_cluster = run(&ctx, &orders).await;
    let local = run(&SessionContext::new(), &orders).await;
    assert_eq!(on_cluster, local);
    assert_eq!(on_cluster.lines().count(), 13 + 4, "{on_cluster}");

    let completed = cluster.completed_jobs().await;
    assert_eq!(completed.len(), 1, "{completed:?}");
    // Each executor logs every task it runs, named by its job.
    for n in 0..2 {
        assert!(
            cluster.finished_tasks(n, Some(&completed[0])) > 0,
            "executor {n} ran no task of job {}\n{}",
            completed[0],
            cluster.processes.logs()
        );
    }

    // SIGTERM stops them cleanly, executors first, as an operator would.
    let executors: Vec<(usize, String)> = cluster
        .executors
        .iter()
        .map(|(i, flight, _)| (*i, flight.clone()))
        .collect();
    for (i, flight) in executors {
        let status = cluster.processes.terminate(i);
        assert!(
            status.success(),
            "executor {flight}: {status}\n{}",
            cluster.processes.logs()
        );
    }
    let status = cluster.processes.terminate(cluster.scheduler);
    assert!(
        status.success(),
        "scheduler: {status}\n{}",
        cluster.processes.logs()
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
fn state_partitions_need_a_cluster_and_a_count_from_1() {
    let (status, stderr) = brook(&["run", "q.sql", "--state-partitions", "3"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("the following required arguments were not provided")
            && stderr.contains("--cluster <df://HOST:PORT>"),
        "{stderr}"
    );
    let url = "df://127.0.0.1:1";
    let (status, stderr) = brook(&["run", "q.sql", "--cluster", url, "--state-partitions", "0"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("invalid value '0' for '--state-partitions <N>'"),
        "{stderr}"
    );
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

/// The book's dashboard exported as Parquet (queries/dashboard_parquet.sql),
/// reading its orders from `orders` (a URL), `per_batch` files a batch.
fn dashboard_script(orders: &str, per_batch: usize) -> String {
    let script = include_str!("../queries/dashboard_parquet.sql");
    let from = "LOCATION 'data/orders' OPTIONS ('mode' 'DROPMALFORMED')";
    assert!(script.contains(from));
    script.replace(
        from,
        &format!(
            "LOCATION '{orders}' OPTIONS ('mode' 'DROPMALFORMED', 'maxFilesPerTrigger' \
             '{per_batch}')"
        ),
    )
}

/// `count` orders of `brook gen-orders` (1% malformed) as the contents of
/// `files` CSV files, in order.
fn generated_orders(count: usize, files: usize) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_brook"))
        .args(["gen-orders", "--count", &count.to_string()])
        .args(["--malformed", "0.01"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    lines
        .chunks(lines.len().div_ceil(files))
        .map(|chunk| chunk.join("\n") + "\n")
        .collect()
}

/// Generated orders put into the bucket as `files` CSV files under `prefix`.
async fn put_orders(s3: &S3, prefix: &str, count: usize, files: usize) {
    for (f, body) in generated_orders(count, files).into_iter().enumerate() {
        s3.put(&format!("{prefix}/part-{f:02}.csv"), body.into_bytes())
            .await;
    }
}

/// `brook run` of the dashboard script in `dir` until its input is used up,
/// with `extra` arguments, `per_batch` files a batch.
fn dashboard_run(
    s3: &S3,
    dir: &Path,
    per_batch: usize,
    checkpoint: &str,
    extra: &[&str],
) -> Command {
    std::fs::create_dir_all(dir).unwrap();
    let script = dashboard_script("s3://bucket/orders", per_batch);
    std::fs::write(dir.join("dashboard.sql"), script).unwrap();
    let mut command = s3.brook(dir);
    command
        .args(["run", "dashboard.sql", "--checkpoint", checkpoint])
        .args(["--trigger", "available-now", "--progress", "json"])
        .args(extra);
    command
}

/// Runs the dashboard script in `dir` to its end; its progress records.
fn run_dashboard(s3: &S3, dir: &Path, checkpoint: &str, extra: &[&str]) -> Vec<Value> {
    let out = dashboard_run(s3, dir, 2, checkpoint, extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The rows of the Parquet files under `path`, sorted.
async fn parquet_rows(path: &Path) -> Vec<Vec<String>> {
    let batches = SessionContext::new()
        .read_parquet(path.to_str().unwrap(), ParquetReadOptions::default())
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    common::sorted(common::table(&batches))
}

/// The dashboard's three outputs under `out`: the appended per-second counts
/// and top stocks, and the newest top-clients snapshot.
async fn dashboard_output(out: &Path) -> [Vec<Vec<String>>; 3] {
    let latest: Value =
        serde_json::from_slice(&std::fs::read(out.join("top_clients/_latest")).unwrap()).unwrap();
    let snapshot = out
        .join("top_clients")
        .join(latest["path"].as_str().unwrap());
    [
        parquet_rows(&out.join("buy_sell_per_second")).await,
        parquet_rows(&out.join("top_stocks")).await,
        parquet_rows(&snapshot).await,
    ]
}

/// Input rows and malformed lines the batches of a run counted.
fn read_counts(progress: &[Value]) -> (u64, u64) {
    progress.iter().fold((0, 0), |(rows, bad), p| {
        (
            rows + p["num_input_rows"].as_u64().unwrap(),
            bad + p["num_malformed_rows"].as_u64().unwrap(),
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_from_s3_on_two_executors_equals_the_local_run() {
    let s3 = S3::start();
    put_orders(&s3, "orders", 12_000, 6).await;
    let dir = tempfile::tempdir().unwrap();
    let (local, on_cluster) = (dir.path().join("local"), dir.path().join("cluster"));
    std::fs::create_dir_all(&local).unwrap();
    std::fs::create_dir_all(&on_cluster).unwrap();
    let mut cluster = TestCluster::start(dir.path(), 2, "1", s3.env()).await;

    let here = run_dashboard(&s3, &local, "checkpoint", &[]);
    // The checkpoint in the bucket too, where every executor leaves what it read.
    let there = run_dashboard(
        &s3,
        &on_cluster,
        "s3://bucket/checkpoint",
        &["--cluster", &cluster.url()],
    );
    let (rows, malformed) = read_counts(&here);
    assert!(
        rows > 11_000 && malformed > 0,
        "{rows} rows, {malformed} malformed"
    );
    assert_eq!(read_counts(&there), (rows, malformed));
    let expected = dashboard_output(&local.join("out")).await;
    assert!(expected.iter().all(|t| !t.is_empty()), "{expected:?}");
    assert_eq!(dashboard_output(&on_cluster.join("out")).await, expected);
    // Every batch with input ran as a job on both executors; so did one
    // without input that only closes windows if the executors keep the state
    // (not the top stocks': the driver keeps a sliding window's panes).
    let batches = there
        .iter()
        .filter(|p| p["num_input_rows"].as_u64() > Some(0) || p["name"] != "top_stocks")
        .count();
    let jobs = cluster.completed_jobs().await;
    assert_eq!(jobs.len(), batches, "{jobs:?}");
    for n in 0..2 {
        assert!(
            cluster.finished_tasks(n, None) > 0,
            "executor {n} ran no task\n{}",
            cluster.processes.logs()
        );
    }
    let keys = s3.keys("checkpoint").await;
    assert!(
        keys.iter()
            .all(|k| !k.contains("/cluster/") || k.contains("/cluster/state/part-")),
        "the tasks' reports outlive their batches: {keys:?}"
    );
    // Each query's state is in the bucket, a Parquet version per partition
    // (but the top stocks' panes, which the driver keeps).
    for query in ["buy_sell_per_second", "top_clients"] {
        let parts: std::collections::BTreeSet<_> = keys
            .iter()
            .filter(|k| k.contains(&format!("{query}/cluster/state/part-")))
            .filter_map(|k| k.split("/cluster/state/").nth(1)?.split('/').next())
            .collect();
        assert_eq!(parts.len(), 4, "{query}: {keys:?}");
    }
    cluster.processes.check_running();
}

/// Waits (bounded) for `child` to exit by itself, which it must do successfully.
fn finishes(child: &mut Child, what: &str, log: &Path, cluster: &Processes) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            assert!(status.success(), "{what} failed: {status}\n{text}");
            return;
        }
        if Instant::now() > deadline {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            // The warnings, not the progress.
            let notes: Vec<&str> = text.lines().filter(|l| !l.starts_with('{')).collect();
            panic!("{what} hangs:\n{}\n{}", notes.join("\n"), cluster.logs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The dashboard in `dir` on the cluster at `url`, a file a batch.
fn cluster_driver(s3: &S3, dir: &Path, checkpoint: &str, url: &str) -> Command {
    let mut command = dashboard_run(s3, dir, 1, checkpoint, &["--cluster", url]);
    command.stdout(Stdio::null());
    command
}

/// Ten executors killed (SIGKILL) at random instants while a query's batches
/// run on them, then ten drivers: the outputs equal an uninterrupted local run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_executors_and_drivers_lose_and_repeat_no_row() {
    const KILLS: usize = 10;
    let seed: u64 = std::env::var("BROOK_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(11);
    let mut rng = SmallRng::seed_from_u64(seed);
    let s3 = S3::start();
    // A file a batch: many short jobs, so that a kill lands in one.
    put_orders(&s3, "orders", 24_000, 60).await;
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("reference");
    let out = dashboard_run(&s3, &reference, 1, "checkpoint", &[])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = dashboard_output(&reference.join("out")).await;
    assert!(expected.iter().all(|t| !t.is_empty()), "{expected:?}");

    let mut cluster = TestCluster::start(dir.path(), 2, "2", s3.env()).await;
    let url = cluster.url();

    // Executors: each kill takes one of the live ones, and a new one replaces it.
    let executors_run = dir.path().join("executor-kills");
    let driver_log = dir.path().join("driver-a.log");
    let mut driver = cluster_driver(&s3, &executors_run, "s3://bucket/ck-a", &url)
        .stderr(File::create(&driver_log).unwrap())
        .spawn()
        .unwrap();
    let mut live: Vec<usize> = (0..2).collect();
    for kill in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..700))).await;
        assert!(
            driver.try_wait().unwrap().is_none(),
            "the run ended after {kill} executor kills: give it more input"
        );
        let victim = live.remove(rng.random_range(0..live.len()));
        cluster.processes.kill(cluster.executors[victim].0);
        let n = cluster.start_executor("2");
        live.push(n);
        let log = cluster.executors[n].2.clone();
        wait_for(&mut cluster.processes, "a new executor to register", || {
            let log = log.clone();
            async move {
                let text = std::fs::read_to_string(&log).ok()?;
                text.contains("Executor registration succeed").then_some(())
            }
        })
        .await;
    }
    finishes(
        &mut driver,
        "the run whose executors were killed",
        &driver_log,
        &cluster.processes,
    );
    let scheduler_log = std::fs::read_to_string(dir.path().join("scheduler.log")).unwrap();
    assert!(
        scheduler_log.contains("on lost Executor"),
        "the scheduler noticed no lost executor:\n{scheduler_log}"
    );
    assert_eq!(
        dashboard_output(&executors_run.join("out")).await,
        expected,
        "seed {seed}: outputs differ after executor kills"
    );

    // Drivers: each run is killed at a random instant and the next resumes
    // from the checkpoint; the last runs to the end.
    let drivers_run = dir.path().join("driver-kills");
    for kill in 0..KILLS {
        let mut driver = cluster_driver(&s3, &drivers_run, "s3://bucket/ck-b", &url)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        assert!(
            driver.try_wait().unwrap().is_none(),
            "the run ended after {kill} driver kills: give it more input"
        );
        driver.kill().unwrap(); // SIGKILL
        driver.wait().unwrap();
    }
    let out = dashboard_run(
        &s3,
        &drivers_run,
        1,
        "s3://bucket/ck-b",
        &["--cluster", &url],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        dashboard_output(&drivers_run.join("out")).await,
        expected,
        "seed {seed}: outputs differ after driver kills"
    );
}

/// `brook run SCRIPT --cluster URL` in a directory holding an orders source;
/// its exit code and standard error.
fn run_on(url: &str, query: &str) -> (ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("orders")).unwrap();
    let script = format!(
        "CREATE UNBOUNDED EXTERNAL TABLE orders (time TIMESTAMP NOT NULL, client_id BIGINT, \
         amount INT, WATERMARK FOR time AS time - INTERVAL '5' SECOND) STORED AS CSV \
         LOCATION 'orders';\n{query}"
    );
    std::fs::write(dir.path().join("q.sql"), script).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_brook"))
        .args([
            "run",
            "q.sql",
            "--trigger",
            "available-now",
            "--cluster",
            url,
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const COUNTS: &str = "SELECT client_id, count(*) AS orders FROM orders GROUP BY client_id;";

#[test]
fn a_cluster_that_is_no_scheduler_address_is_refused() {
    let (status, stderr) = run_on("http://127.0.0.1:50050", COUNTS);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "option '--cluster': 'http://127.0.0.1:50050' is not a scheduler's address; use \
             df://HOST:PORT"
        ),
        "{stderr}"
    );
}

#[test]
fn a_cluster_whose_scheduler_does_not_answer_is_refused() {
    let port = free_port();
    let (status, stderr) = run_on(&format!("df://127.0.0.1:{port}"), COUNTS);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "option '--cluster': no scheduler answers at 127.0.0.1:{port}"
        )) && stderr.contains("start one with `brook scheduler`"),
        "{stderr}"
    );
}

/// A memory table `name`, the sink of the query of that name in output `mode`.
fn memory_table(name: &str, mode: &str) -> String {
    format!(
        "CREATE EXTERNAL TABLE {name} STORED AS MEMORY LOCATION '' \
         OPTIONS ('outputMode' '{mode}', 'queryName' '{name}');"
    )
}

/// Queries whose plan the executors cannot run: sessions, a function and a
/// table registered from Rust, a static table partitioned by directories.
fn driver_plans_script(orders: &Path, parted: &Path) -> String {
    format!(
        "CREATE UNBOUNDED EXTERNAL TABLE orders (time TIMESTAMP NOT NULL, order_id BIGINT, \
         client_id BIGINT, symbol VARCHAR, amount INT, price DOUBLE, buy_sell VARCHAR, \
         WATERMARK FOR time AS time - INTERVAL '1' SECOND) \
         STORED AS CSV LOCATION '{}' OPTIONS ('mode' 'DROPMALFORMED', 'maxFilesPerTrigger' '2');
         CREATE EXTERNAL TABLE parted (client_id BIGINT, region VARCHAR) STORED AS CSV \
         PARTITIONED BY (region) LOCATION '{}/';
         {}
         INSERT INTO sessions SELECT client_id, session_window.start AS start, count(*) AS n \
         FROM orders GROUP BY session_window(time, '300 milliseconds'), client_id;
         {}
         INSERT INTO traded SELECT symbol, round(sum(notional(amount, price)), 2) AS traded \
         FROM orders GROUP BY symbol;
         {}
         INSERT INTO vips SELECT order_id, amount FROM orders \
         WHERE client_id IN (SELECT client_id FROM vip);
         {}
         INSERT INTO per_region SELECT p.region, count(*) AS n FROM orders o \
         JOIN parted p ON o.client_id = p.client_id GROUP BY p.region;",
        orders.display(),
        parted.display(),
        memory_table("sessions", "append"),
        memory_table("traded", "complete"),
        memory_table("vips", "append"),
        memory_table("per_region", "complete"),
    )
}

const DRIVER_PLAN_TABLES: [&str; 4] = ["sessions", "traded", "vips", "per_region"];

/// Runs `driver_plans_script` with `engine` to the input's end: each table's rows, sorted.
async fn driver_plans_run(
    engine: brook::Engine,
    orders: &Path,
    parted: &Path,
) -> Vec<Vec<Vec<String>>> {
    engine.register_udf(udf::notional()).unwrap();
    let vip = datafusion::arrow::array::RecordBatch::try_from_iter([(
        "client_id",
        std::sync::Arc::new(datafusion::arrow::array::Int64Array::from(vec![7, 8, 9]))
            as datafusion::arrow::array::ArrayRef,
    )])
    .unwrap();
    let table = datafusion::datasource::MemTable::try_new(vip.schema(), vec![vec![vip]]).unwrap();
    engine
        .register_table("vip", std::sync::Arc::new(table))
        .unwrap();
    let queries = engine
        .execute(&driver_plans_script(orders, parted))
        .await
        .unwrap();
    let mut out = vec![];
    for (q, name) in queries.iter().zip(DRIVER_PLAN_TABLES) {
        q.process_all_available().await.unwrap();
        let rows = engine.sql(&format!("SELECT * FROM {name}")).await.unwrap();
        out.push(common::sorted(rounded(&rows)));
    }
    engine.stop_all().await.unwrap();
    out
}

/// A query whose plan the executors cannot run still runs on a cluster: the
/// executors read and decode each batch, and the driver runs the plan over
/// the rows they send, with the local run's results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_whose_plan_runs_on_the_driver_have_their_input_read_by_the_executors() {
    let dir = tempfile::tempdir().unwrap();
    let (orders, parted) = (dir.path().join("orders"), dir.path().join("parted"));
    write_generated_orders(&orders, 6_000, 6);
    for (region, ids) in [("eu", 1..100), ("us", 100..200)] {
        let dir = parted.join(format!("region={region}"));
        std::fs::create_dir_all(&dir).unwrap();
        let ids: Vec<String> = ids.map(|i: i32| i.to_string()).collect();
        std::fs::write(
            dir.join("a.csv"),
            format!("client_id\n{}\n", ids.join("\n")),
        )
        .unwrap();
    }
    let cluster = TestCluster::start(dir.path(), 2, "1", vec![]).await;
    let here = driver_plans_run(brook::Engine::new(), &orders, &parted).await;
    let there = driver_plans_run(
        brook::Engine::builder().cluster(&cluster.url()).build(),
        &orders,
        &parted,
    )
    .await;
    for (table, rows) in DRIVER_PLAN_TABLES.iter().zip(&here) {
        assert!(!rows.is_empty(), "{table} is empty");
    }
    assert_eq!(here[3].len(), 2);
    assert_eq!(there, here);
    // Three batches of each query, each read by a job on the cluster.
    assert_eq!(cluster.completed_jobs().await.len(), 12);
}

/// Generated orders as `files` CSV files under `dir`.
fn write_generated_orders(dir: &Path, count: usize, files: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for (f, body) in generated_orders(count, files).into_iter().enumerate() {
        std::fs::write(dir.join(format!("part-{f:02}.csv")), body).unwrap();
    }
}

/// Many kinds of aggregate, each of whose partial state crosses to the
/// cluster and back, in complete mode into a memory table.
const AGGREGATES: &str = "INSERT INTO per_symbol SELECT symbol, count(*) AS orders, \
     sum(amount) AS shares, avg(price) AS mean_price, min(price) AS low, max(price) AS high, \
     stddev(price) AS spread, count(DISTINCT client_id) AS clients, \
     approx_distinct(client_id) AS approx_clients, median(amount) AS median_amount, \
     bool_or(buy_sell = 'B') AS any_buy, sum(amount) FILTER (WHERE buy_sell = 'S') AS sold \
     FROM orders GROUP BY symbol";

/// `batches` as text, floats rounded: floating sums may differ in their last
/// digits with the order of addition.
fn rounded(batches: &[datafusion::arrow::array::RecordBatch]) -> Vec<Vec<String>> {
    common::table(batches)
        .into_iter()
        .map(|row| {
            row.into_iter()
                .map(|cell| match cell.parse::<f64>() {
                    Ok(x) if cell.contains('.') => format!("{x:.6}"),
                    _ => cell,
                })
                .collect()
        })
        .collect()
}

/// The rows the aggregates gave over `orders`, and the rows of a query without
/// aggregation (which runs whole on a cluster), run by `engine` to the input's end.
async fn queries_over(engine: brook::Engine, orders: &Path) -> [Vec<Vec<String>>; 2] {
    let script = format!(
        "CREATE UNBOUNDED EXTERNAL TABLE orders (time TIMESTAMP NOT NULL, order_id BIGINT, \
         client_id BIGINT, symbol VARCHAR, amount INT, price DOUBLE, buy_sell VARCHAR) \
         STORED AS CSV LOCATION '{}' OPTIONS ('mode' 'DROPMALFORMED', 'maxFilesPerTrigger' '2');
         CREATE EXTERNAL TABLE per_symbol STORED AS MEMORY LOCATION '' \
         OPTIONS ('outputMode' 'complete');
         {AGGREGATES};
         CREATE EXTERNAL TABLE big STORED AS MEMORY LOCATION '';
         INSERT INTO big SELECT order_id, upper(symbol) AS symbol, amount * price AS value \
         FROM orders WHERE amount > 500;",
        orders.display()
    );
    for q in engine.execute(&script).await.unwrap() {
        q.process_all_available().await.unwrap();
    }
    let mut tables = vec![];
    for sql in [
        "SELECT * FROM per_symbol ORDER BY symbol",
        "SELECT * FROM big ORDER BY order_id",
    ] {
        let batches = engine.sql(sql).await.unwrap();
        tables.push(rounded(&batches));
    }
    engine.stop_all().await.unwrap();
    [tables.remove(0), tables.remove(0)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_built_with_a_cluster_runs_aggregates_and_plain_queries_there() {
    let dir = tempfile::tempdir().unwrap();
    let orders = dir.path().join("orders");
    write_generated_orders(&orders, 6_000, 6);
    let cluster = TestCluster::start(dir.path(), 2, "1", vec![]).await;
    let local = queries_over(brook::Engine::new(), &orders).await;
    // Without a checkpoint the tasks report to a temporary directory of the query's.
    let report_dirs = || -> Vec<std::ffi::OsString> {
        std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .filter(|n| n.to_string_lossy().starts_with("brook-cluster-"))
            .collect()
    };
    let before = report_dirs();
    let on_cluster = queries_over(
        brook::Engine::builder().cluster(&cluster.url()).build(),
        &orders,
    )
    .await;
    assert!(local[0].len() > 10 && local[1].len() > 100, "{local:?}");
    assert_eq!(on_cluster, local);
    // Three batches of each query, each a job.
    assert_eq!(cluster.completed_jobs().await.len(), 6);
    let left: Vec<_> = report_dirs()
        .into_iter()
        .filter(|d| !before.contains(d))
        .collect();
    assert!(left.is_empty(), "the stopped queries left {left:?}");
}

/// Aggregations of every kind of state, all kept on the executors: keyed in
/// update mode, tumbling windows closed by the watermark in append mode,
/// SELECT DISTINCT, a global aggregate in complete mode, and sliding windows
/// in update mode, alone and per symbol.
fn stateful_script(orders: &Path) -> String {
    format!(
        "CREATE UNBOUNDED EXTERNAL TABLE orders (time TIMESTAMP NOT NULL, order_id BIGINT, \
         client_id BIGINT, symbol VARCHAR, amount INT, price DOUBLE, buy_sell VARCHAR, \
         WATERMARK FOR time AS time - INTERVAL '2' SECOND) \
         STORED AS CSV LOCATION '{}' OPTIONS ('mode' 'DROPMALFORMED', 'maxFilesPerTrigger' '1');
         {}
         INSERT INTO updated SELECT symbol, count(*) AS orders, sum(amount) AS shares, \
         avg(price) AS mean_price FROM orders GROUP BY symbol;
         {}
         INSERT INTO per_window SELECT window.start AS start, symbol, count(*) AS orders, \
         max(price) AS high FROM orders GROUP BY window(time, '2 seconds'), symbol;
         {}
         INSERT INTO firsts SELECT DISTINCT client_id, symbol FROM orders;
         {}
         INSERT INTO total SELECT count(*) AS orders, sum(amount) AS shares FROM orders;
         {}
         INSERT INTO sliding SELECT window.start AS start, count(*) AS orders \
         FROM orders GROUP BY window(time, '4 seconds', '2 seconds');
         {}
         INSERT INTO sliding_symbols SELECT window.start AS start, symbol, count(*) AS orders, \
         sum(amount) AS shares FROM orders GROUP BY window(time, '4 seconds', '2 seconds'), symbol;",
        orders.display(),
        memory_table("updated", "update"),
        memory_table("per_window", "append"),
        memory_table("firsts", "append"),
        memory_table("total", "complete"),
        memory_table("sliding", "update"),
        memory_table("sliding_symbols", "update"),
    )
}

const STATEFUL_TABLES: [&str; 6] = [
    "updated",
    "per_window",
    "firsts",
    "total",
    "sliding",
    "sliding_symbols",
];

/// Runs `stateful_script` with `engine` to the input's end: each table's rows,
/// sorted, and each query's state as its batches reported it (rows kept at the
/// end; rows updated, removed and late in all).
async fn stateful_run(engine: brook::Engine, orders: &Path) -> Vec<(Vec<Vec<String>>, [u64; 4])> {
    let queries = engine.execute(&stateful_script(orders)).await.unwrap();
    let mut out = vec![];
    for (q, table) in queries.iter().zip(STATEFUL_TABLES) {
        q.process_all_available().await.unwrap();
        let mut state = [0; 4];
        for p in q.recent_progress() {
            let op = &p.state_operators[0];
            state[0] = op.num_rows_total;
            state[1] += op.num_rows_updated;
            state[2] += op.num_rows_removed;
            state[3] += p.num_late_rows;
        }
        let batches = engine.sql(&format!("SELECT * FROM {table}")).await.unwrap();
        out.push((common::sorted(rounded(&batches)), state));
    }
    engine.stop_all().await.unwrap();
    out
}

/// State kept on the executors gives what the driver's gives, also across a
/// restart that takes the state up again from its versions in the checkpoint;
/// a checkpoint keeps its state where it was created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_kept_on_the_executors_equals_state_kept_on_the_driver() {
    let dir = tempfile::tempdir().unwrap();
    let orders = dir.path().join("orders");
    let all = generated_orders(16_000, 8);
    let cluster = TestCluster::start(dir.path(), 2, "1", vec![]).await;
    let (local, remote) = (dir.path().join("local"), dir.path().join("remote"));
    let engine = |checkpoints: &Path, on_cluster: bool| cluster.engine(checkpoints, on_cluster);
    std::fs::create_dir_all(&orders).unwrap();
    let mut runs = vec![];
    // Half the files, a stop, then the rest, as a restarted query reads them.
    for half in [&all[..4], &all[4..]] {
        for body in half {
            let n = std::fs::read_dir(&orders).unwrap().count();
            std::fs::write(orders.join(format!("part-{n:02}.csv")), body).unwrap();
        }
        let here = stateful_run(engine(&local, false), &orders).await;
        let there = stateful_run(engine(&remote, true), &orders).await;
        runs.push((here, there));
    }
    for (here, there) in &runs {
        for ((table, (rows, state)), (rows_there, state_there)) in
            STATEFUL_TABLES.iter().zip(here).zip(there)
        {
            assert!(!rows.is_empty(), "{table} is empty");
            assert_eq!(rows_there, rows, "{table}");
            assert_eq!(state_there, state, "{table}: rows, updated, removed, late");
        }
    }
    // Restarted without new input, a complete-mode memory table holds the
    // result again, read from the state's versions.
    let here = stateful_run(engine(&local, false), &orders).await;
    let there = stateful_run(engine(&remote, true), &orders).await;
    assert!(!here[3].0.is_empty());
    assert_eq!(there[3].0, here[3].0);
    assert_eq!(there[3].0, runs[1].0[3].0);
    // Windows were closed and late rows dropped, so the watermark was at work.
    let (first, _) = &runs[0];
    assert!(first[1].1[2] > 0, "no window closed: {:?}", first[1]);
    // Each partition of each query's state on the executors has versions.
    // Sliding windows are partitioned by their other keys, as all the windows
    // a row adds to must be merged together: one partition without any.
    for table in &STATEFUL_TABLES {
        let state = remote.join(table).join("cluster/state");
        let parts: Vec<_> = std::fs::read_dir(&state)
            .unwrap_or_else(|e| panic!("{}: {e}", state.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let expected = if ["total", "sliding"].contains(table) {
            1
        } else {
            4
        };
        assert_eq!(parts.len(), expected, "{table}: {parts:?}");
    }
    // A checkpoint created without a cluster goes on on one, its state kept
    // by the driver as it was created: a copy of it run on the cluster over
    // one more file gives what it gives run here.
    let copy = dir.path().join("local-copy");
    common::files::copy_dir(&local, &copy);
    let more = Command::new(env!("CARGO_BIN_EXE_brook"))
        .args(["gen-orders", "--count", "2000", "--seed", "7"])
        .args(["--start", "2016-03-22 20:25:50", "--malformed", "0.01"])
        .output()
        .unwrap();
    assert!(more.status.success());
    std::fs::write(orders.join("part-08.csv"), &more.stdout).unwrap();
    let here = stateful_run(engine(&local, false), &orders).await;
    let there = stateful_run(engine(&copy, true), &orders).await;
    assert!(here.iter().all(|(rows, _)| !rows.is_empty()));
    assert_eq!(there, here);
    assert!(!copy.join("updated/cluster/state").exists());
    // A checkpoint whose state the executors keep cannot go on without them.
    let err = engine(&remote, false)
        .execute(&stateful_script(&orders))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("state: checkpoint has it in 4 partition(s) on a cluster's executors"),
        "{err}"
    );
}

/// The Kafka dashboard (queries/dashboard_kafka.sql) into memory tables,
/// reading `servers`, 1,500 records a batch, run by `engine` to the topic's
/// end: each table's rows, sorted, and the malformed records counted.
async fn kafka_dashboard(engine: brook::Engine, servers: &str) -> (Vec<Vec<Vec<String>>>, u64) {
    let script = include_str!("../queries/dashboard_kafka.sql")
        .replace(
            "LOCATION '127.0.0.1:9092'",
            &format!("LOCATION '{servers}'"),
        )
        .replace(
            "'mode' 'DROPMALFORMED'",
            "'mode' 'DROPMALFORMED', 'maxOffsetsPerTrigger' '1500'",
        )
        .replace(
            "STORED AS CONSOLE LOCATION 'stdout'",
            "STORED AS MEMORY LOCATION ''",
        );
    let queries = engine.execute(&script).await.unwrap();
    assert_eq!(queries.len(), 3);
    let mut malformed = 0;
    for q in &queries {
        q.process_all_available().await.unwrap();
        malformed += q
            .recent_progress()
            .iter()
            .map(|p| p.num_malformed_rows)
            .sum::<u64>();
    }
    let mut tables = vec![];
    for name in ["buy_sell_per_second", "top_clients", "top_stocks"] {
        let rows = engine.sql(&format!("SELECT * FROM {name}")).await.unwrap();
        tables.push(common::sorted(rounded(&rows)));
    }
    engine.stop_all().await.unwrap();
    (tables, malformed)
}

/// Kafka offset ranges are read by the executors, one task per partition's
/// range, as Spark's executors read them: the dashboard over a topic of four
/// partitions, stopped halfway and resumed from its checkpoint, equals the
/// local run's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kafka_dashboard_read_by_two_executors_equals_the_local_run() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker::Broker::start();
    broker.create_topic("orders", 4).await;
    // 20 orders a second of event time: the watermark closes many seconds.
    let out = Command::new(env!("CARGO_BIN_EXE_brook"))
        .args([
            "gen-orders",
            "--count",
            "8000",
            "--rate",
            "20",
            "--malformed",
            "0.01",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let lines: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let cluster = TestCluster::start(dir.path(), 2, "2", vec![]).await;
    let (local, remote) = (dir.path().join("local"), dir.path().join("remote"));
    // The cluster's checkpoints are created with 3 state partitions, which
    // the restart keeps although it asks for 5.
    let engine = |checkpoints: &Path, partitions: Option<usize>| {
        let builder = brook::Engine::builder().checkpoint_root(checkpoints.to_str().unwrap());
        match partitions {
            Some(n) => builder.cluster(&cluster.url()).state_partitions(n).build(),
            None => builder.build(),
        }
    };
    for (half, partitions) in lines.chunks(lines.len() / 2).zip([3, 5]) {
        broker.produce("orders", 4, half);
        let here = kafka_dashboard(engine(&local, None), &broker.servers()).await;
        let there = kafka_dashboard(engine(&remote, Some(partitions)), &broker.servers()).await;
        assert!(here.1 > 10, "{} malformed", here.1);
        let [per_second, clients, stocks] = &here.0[..] else {
            panic!("{:?}", here.0)
        };
        let sizes = [per_second.len(), clients.len(), stocks.len()];
        assert!(
            sizes[0] > 100 && sizes[1] == 5 && sizes[2] > 50,
            "{sizes:?}"
        );
        assert_eq!(there, here);
    }
    // Each partition's range was a task, and tasks ran on both executors.
    for n in 0..2 {
        assert!(
            cluster.finished_tasks(n, None) > 0,
            "executor {n} ran no task"
        );
    }
    // The state of two of the queries is on the executors, in the checkpoint
    // (the top stocks' panes stay on the driver).
    for query in ["buy_sell_per_second", "top_clients"] {
        let state = remote.join(query).join("cluster/state");
        let found = std::fs::read_dir(&state)
            .unwrap_or_else(|e| panic!("{}: {e}", state.display()))
            .count();
        assert_eq!(found, 3, "{query}");
    }
}

/// Two queries joining the stream with a static table of clients: orders per
/// tier (an aggregation), and the gold clients' orders (a subquery).
fn lookup_script(orders: &Path, clients: &Path) -> String {
    format!(
        "CREATE UNBOUNDED EXTERNAL TABLE orders (time TIMESTAMP NOT NULL, order_id BIGINT, \
         client_id BIGINT, symbol VARCHAR, amount INT, price DOUBLE, buy_sell VARCHAR) \
         STORED AS CSV LOCATION '{}' OPTIONS ('mode' 'DROPMALFORMED', 'maxFilesPerTrigger' '2');
         CREATE EXTERNAL TABLE clients (client_id BIGINT, tier VARCHAR) STORED AS CSV \
         LOCATION '{}';
         CREATE EXTERNAL TABLE per_tier STORED AS MEMORY LOCATION '' \
         OPTIONS ('outputMode' 'complete', 'queryName' 'per_tier');
         INSERT INTO per_tier SELECT c.tier, count(*) AS orders, sum(o.amount) AS shares \
         FROM orders o JOIN clients c ON o.client_id = c.client_id GROUP BY c.tier;
         CREATE EXTERNAL TABLE gold STORED AS MEMORY LOCATION '' OPTIONS ('queryName' 'gold');
         INSERT INTO gold SELECT order_id, client_id, amount FROM orders \
         WHERE client_id IN (SELECT client_id FROM clients WHERE tier = 'gold');",
        orders.display(),
        clients.display()
    )
}

/// Runs `lookup_script` with `engine` to the input's end: both tables' rows, sorted.
async fn lookup_run(engine: brook::Engine, orders: &Path, clients: &Path) -> Vec<Vec<Vec<String>>> {
    let queries = engine
        .execute(&lookup_script(orders, clients))
        .await
        .unwrap();
    let mut out = vec![];
    for (q, table) in queries.iter().zip(["per_tier", "gold"]) {
        q.process_all_available().await.unwrap();
        let rows = engine.sql(&format!("SELECT * FROM {table}")).await.unwrap();
        out.push(common::sorted(rounded(&rows)));
    }
    engine.stop_all().await.unwrap();
    out
}

/// `clients` CSV lines (with a header) for client ids `ids`, each a tier by its id.
fn write_clients(dir: &Path, name: &str, ids: std::ops::Range<u64>) {
    std::fs::create_dir_all(dir).unwrap();
    let tiers = ["gold", "silver", "bronze"];
    let mut text = String::from("client_id,tier\n");
    for id in ids {
        text.push_str(&format!("{id},{}\n", tiers[id as usize % 3]));
    }
    std::fs::write(dir.join(name), text).unwrap();
}

/// A join with a static table runs on the executors, which read the table's
/// files as they are when each batch starts: a file added between two runs
/// is joined from then on, as it is without a cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_with_a_static_table_runs_on_the_executors_as_it_runs_here() {
    let dir = tempfile::tempdir().unwrap();
    let (orders, clients) = (dir.path().join("orders"), dir.path().join("clients"));
    let all = generated_orders(8_000, 8);
    let cluster = TestCluster::start(dir.path(), 2, "1", vec![]).await;
    let (local, remote) = (dir.path().join("local"), dir.path().join("remote"));
    // The state in one partition, which the restart keeps.
    let on_cluster = || {
        brook::Engine::builder()
            .checkpoint_root(remote.to_str().unwrap())
            .cluster(&cluster.url())
            .state_partitions(1)
            .build()
    };
    std::fs::create_dir_all(&orders).unwrap();
    // Half the clients for the first half of the orders, all for the rest.
    write_clients(&clients, "a.csv", 1..150);
    // DataFusion's listing leaves out files in subdirectories, here and there.
    write_clients(&clients.join("archive"), "old.csv", 1..400);
    for (half, more_clients) in [(&all[..4], false), (&all[4..], true)] {
        if more_clients {
            write_clients(&clients, "b.csv", 150..400);
        }
        for body in half {
            let n = std::fs::read_dir(&orders).unwrap().count();
            std::fs::write(orders.join(format!("part-{n:02}.csv")), body).unwrap();
        }
        let jobs_before = cluster.completed_jobs().await.len();
        let here = lookup_run(cluster.engine(&local, false), &orders, &clients).await;
        let there = lookup_run(on_cluster(), &orders, &clients).await;
        assert!(here[0].len() == 3 && here[1].len() > 100, "{here:?}");
        assert_eq!(there, here);
        // Clients from 150 on are joined once b.csv is there.
        let newer = here[1].iter().any(|r| r[1].parse::<u64>().unwrap() >= 150);
        assert_eq!(newer, more_clients);
        // Two batches of each query, each a job on the cluster.
        assert_eq!(cluster.completed_jobs().await.len(), jobs_before + 4);
    }
    // The executors ran the join under the aggregation: they keep its state.
    let state = remote.join("per_tier/cluster/state");
    let parts = std::fs::read_dir(&state)
        .unwrap_or_else(|e| panic!("{}: {e}", state.display()))
        .count();
    assert_eq!(parts, 1);
}

/// Orders and their fills as `files` CSV files each, under `dir/orders` and `dir/fills`.
fn write_orders_and_fills(dir: &Path, count: usize, files: usize) {
    let fills = dir.join("fills.csv");
    let out = Command::new(env!("CARGO_BIN_EXE_brook"))
        .args(["gen-orders", "--count", &count.to_string(), "--rate", "50"])
        .args(["--fills", fills.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let orders = String::from_utf8(out.stdout).unwrap();
    let fills = std::fs::read_to_string(&fills).unwrap();
    for (name, text) in [("orders", orders), ("fills", fills)] {
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.len() > count / 2, "{name}: {} lines", lines.len());
        std::fs::create_dir_all(dir.join(name)).unwrap();
        for (f, chunk) in lines.chunks(lines.len().div_ceil(files)).enumerate() {
            std::fs::write(
                dir.join(name).join(format!("part-{f:02}.csv")),
                chunk.join("\n") + "\n",
            )
            .unwrap();
        }
    }
}

/// A join of two streams (orders with their fills within a minute) and a
/// union of them under an aggregation.
fn two_streams_script(dir: &Path) -> String {
    format!(
        "CREATE UNBOUNDED EXTERNAL TABLE orders (time TIMESTAMP NOT NULL, order_id BIGINT NOT NULL, \
         client_id BIGINT, symbol VARCHAR, amount INT, price DOUBLE, buy_sell VARCHAR, \
         WATERMARK FOR time AS time - INTERVAL '10' SECOND) \
         STORED AS CSV LOCATION '{d}/orders' OPTIONS ('maxFilesPerTrigger' '1');
         CREATE UNBOUNDED EXTERNAL TABLE fills (time TIMESTAMP NOT NULL, fill_id BIGINT NOT NULL, \
         order_id BIGINT NOT NULL, quantity INT, price DOUBLE, \
         WATERMARK FOR time AS time - INTERVAL '10' SECOND) \
         STORED AS CSV LOCATION '{d}/fills' OPTIONS ('maxFilesPerTrigger' '1');
         CREATE EXTERNAL TABLE filled STORED AS MEMORY LOCATION '' OPTIONS ('queryName' 'filled');
         INSERT INTO filled SELECT o.order_id, o.symbol, f.quantity, f.price FROM orders o \
         JOIN fills f ON o.order_id = f.order_id \
         AND f.time BETWEEN o.time AND o.time + INTERVAL '1' MINUTE;
         CREATE EXTERNAL TABLE per_bucket STORED AS MEMORY LOCATION '' \
         OPTIONS ('outputMode' 'complete', 'queryName' 'per_bucket');
         INSERT INTO per_bucket SELECT order_id % 7 AS bucket, count(*) AS n FROM \
         (SELECT order_id FROM orders UNION ALL SELECT order_id FROM fills) GROUP BY order_id % 7;",
        d = dir.display()
    )
}

/// Runs `two_streams_script` with `engine` to the input's end: each table's
/// rows, sorted, and each query's rows read and state rows kept.
async fn two_streams_run(engine: brook::Engine, dir: &Path) -> Vec<(Vec<Vec<String>>, u64, u64)> {
    let queries = engine.execute(&two_streams_script(dir)).await.unwrap();
    let mut out = vec![];
    for (q, table) in queries.iter().zip(["filled", "per_bucket"]) {
        q.process_all_available().await.unwrap();
        let progress = q.recent_progress();
        let read = progress.iter().map(|p| p.num_input_rows).sum();
        let kept = progress
            .last()
            .map_or(0, |p| p.state_operators[0].num_rows_total);
        let rows = engine.sql(&format!("SELECT * FROM {table}")).await.unwrap();
        out.push((common::sorted(rounded(&rows)), read, kept));
    }
    engine.stop_all().await.unwrap();
    out
}

/// A join of two streams and a union of two run on a cluster: the executors
/// read both streams (the join's state stays on the driver, the union's
/// aggregation's on the executors), with the local run's results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_and_a_union_of_two_streams_read_on_the_executors_equal_the_local_run() {
    let dir = tempfile::tempdir().unwrap();
    write_orders_and_fills(dir.path(), 4_000, 4);
    let cluster = TestCluster::start(dir.path(), 2, "1", vec![]).await;
    let checkpoints = dir.path().join("checkpoints");
    let here = two_streams_run(brook::Engine::new(), dir.path()).await;
    let there = two_streams_run(cluster.engine(&checkpoints, true), dir.path()).await;
    let (filled, read, kept) = &here[0];
    assert!(
        filled.len() > 1_000 && *read > 4_000 && *kept > 0,
        "{here:?}"
    );
    assert_eq!(here[1].0.len(), 7);
    assert_eq!(there, here);
    // Four batches read both streams: a job per stream for the join, one for
    // the union, whose aggregation's state the executors keep.
    assert_eq!(cluster.completed_jobs().await.len(), 4 * 2 + 4);
    assert!(checkpoints.join("per_bucket/cluster/state").is_dir());
    assert!(!checkpoints.join("filled/cluster/state").exists());
}
