//! Sources, file sinks and checkpoints on S3, through `brook run` as a user
//! runs it, against a real S3-protocol server (s3s-fs) on a free local port.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use brook::datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use brook::testing::faults;
use common::s3::S3;
use object_store::path::Path as StorePath;
use object_store::{PutMode, PutOptions, PutPayload};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const SYMBOLS: [&str; 4] = ["AAPL", "GOOG", "MSFT", "TSLA"];

/// File `f`'s orders, `per_file` of them, one a second across the files.
fn orders_file(f: usize, per_file: usize) -> Vec<String> {
    (f * per_file..(f + 1) * per_file)
        .map(|i| {
            let (m, s) = (i / 60, i % 60);
            let symbol = SYMBOLS[i * 7 % SYMBOLS.len()];
            let side = if i % 3 == 0 { "S" } else { "B" };
            common::order(
                &format!("{:02}:{m:02}:{s:02}", 10 + m / 60 % 60),
                i as i64 + 1,
                symbol,
                (i % 90 + 10) as i32,
                100.0 + (i % 13) as f64,
                side,
            )
        })
        .collect()
}

async fn put_orders(s3: &S3, f: usize, per_file: usize) {
    let mut text = orders_file(f, per_file).join("\n");
    text.push('\n');
    s3.put(&format!("orders/orders-{f:03}.csv"), text.into_bytes())
        .await;
}

/// Every (order_id, symbol, amount) the orders of files `files` hold, sorted.
fn expected_rows(files: std::ops::Range<usize>, per_file: usize) -> Vec<String> {
    let mut rows: Vec<String> = files
        .flat_map(|f| orders_file(f, per_file))
        .map(|line| {
            let cells: Vec<&str> = line.split(',').collect();
            format!("{}|{}|{}", cells[1], cells[3], cells[4])
        })
        .collect();
    rows.sort();
    rows
}

const ORDERS_DDL: &str = "CREATE UNBOUNDED EXTERNAL TABLE orders (time TIMESTAMP NOT NULL, \
    order_id BIGINT NOT NULL, client_id BIGINT, symbol VARCHAR NOT NULL, amount INT NOT NULL, \
    price DOUBLE, buy_sell VARCHAR, WATERMARK FOR time AS time - INTERVAL '10' SECOND) \
    STORED AS CSV LOCATION 's3://bucket/orders/' OPTIONS ('maxFilesPerTrigger' '2');";

/// A copy of the orders into a Parquet sink at `s3://bucket/<out>/`.
fn copy_sql(out: &str) -> String {
    format!(
        "{ORDERS_DDL}\nCREATE EXTERNAL TABLE copy STORED AS PARQUET LOCATION 's3://bucket/{out}/';\n\
         INSERT INTO copy SELECT order_id, symbol, amount FROM orders;\n"
    )
}

/// Orders and shares per minute and symbol, emitted once the watermark closes
/// a minute: state in the checkpoint between batches, of which the last two
/// are kept.
fn minutes_sql(out: &str) -> String {
    format!(
        "{ORDERS_DDL}\nCREATE EXTERNAL TABLE minutes STORED AS PARQUET LOCATION 's3://bucket/{out}/' \
         OPTIONS ('outputMode' 'append', 'minBatchesToRetain' '2');\n\
         INSERT INTO minutes SELECT window.start AS minute, symbol, count(*) AS orders, \
         sum(amount) AS shares FROM orders GROUP BY window(time, '1 minute'), symbol;\n"
    )
}

/// Every row of the Parquet part files under `prefix` in the bucket, as
/// `a|b|c` strings, sorted.
async fn parquet_rows(s3: &S3, prefix: &str) -> Vec<String> {
    let mut rows = vec![];
    for key in s3.keys(prefix).await {
        let name = key.rsplit('/').next().unwrap();
        if !(name.starts_with("part-") && name.ends_with(".parquet")) {
            continue;
        }
        let reader = ParquetRecordBatchReaderBuilder::try_new(s3.get(&key).await)
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            for row in common::table(&[batch.unwrap()]) {
                rows.push(row.join("|"));
            }
        }
    }
    rows.sort();
    rows
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn signal(child: &Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill only sends a signal to the child this test started.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// Orders arriving in a bucket while `brook run` watches it are copied into a
/// Parquet sink in the same bucket, checkpointed there too; stopped with
/// SIGTERM and restarted on the S3 checkpoint with more files, the output
/// holds every order exactly once.
#[test]
fn orders_in_s3_reach_a_parquet_sink_in_s3_exactly_once_across_a_restart() {
    let rt = runtime();
    let s3 = S3::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("copy.sql"), copy_sql("out")).unwrap();
    const PER_FILE: usize = 40;
    for f in 0..3 {
        rt.block_on(put_orders(&s3, f, PER_FILE));
    }
    let mut running = s3
        .brook(dir.path())
        .args(["run", "copy.sql", "--checkpoint", "s3://bucket/cp"])
        .args(["--trigger", "200ms"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let wait_for_rows = |n: usize, running: &mut Child| {
        let start = Instant::now();
        loop {
            let rows = rt.block_on(parquet_rows(&s3, "out"));
            if rows.len() >= n {
                return rows;
            }
            if let Some(status) = running.try_wait().unwrap() {
                let mut stderr = String::new();
                std::io::Read::read_to_string(running.stderr.as_mut().unwrap(), &mut stderr)
                    .unwrap();
                panic!(
                    "brook run ended ({status}) with {} rows: {stderr}",
                    rows.len()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "{} of {n} rows after 2 minutes",
                rows.len()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for_rows(3 * PER_FILE, &mut running);
    // Files put while the query runs are picked up by later batches.
    for f in 3..6 {
        rt.block_on(put_orders(&s3, f, PER_FILE));
        std::thread::sleep(Duration::from_millis(150));
    }
    let rows = wait_for_rows(6 * PER_FILE, &mut running);
    assert_eq!(rows, expected_rows(0..6, PER_FILE));
    signal(&running, libc::SIGTERM);
    let stopped = running.wait_with_output().unwrap();
    assert_eq!(stopped.status.code(), Some(0), "{}", stderr_of(&stopped));

    let checkpoint = rt.block_on(s3.keys("cp/copy"));
    for file in ["cp/copy/metadata", "cp/copy/offsets/0", "cp/copy/commits/0"] {
        assert!(checkpoint.contains(&file.to_string()), "{checkpoint:?}");
    }

    for f in 6..9 {
        rt.block_on(put_orders(&s3, f, PER_FILE));
    }
    let out = s3
        .brook(dir.path())
        .args(["run", "copy.sql", "--checkpoint", "s3://bucket/cp"])
        .args(["--trigger", "available-now"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        rt.block_on(parquet_rows(&s3, "out")),
        expected_rows(0..9, PER_FILE),
        "every order exactly once after the restart"
    );
}

/// An object store has no lock that keeps a second query off a checkpoint:
/// a query frozen (SIGSTOP) while another one runs on its S3 checkpoint to
/// the end is refused when it goes on and writes a batch the other wrote,
/// rather than overwriting the other's log; the output holds every order once.
#[test]
fn a_second_query_on_an_s3_checkpoint_is_refused_and_no_row_doubles() {
    let rt = runtime();
    let s3 = S3::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("copy.sql"), copy_sql("out")).unwrap();
    const PER_FILE: usize = 30;
    for f in 0..3 {
        rt.block_on(put_orders(&s3, f, PER_FILE));
    }
    let run = |trigger: &str| {
        let mut command = s3.brook(dir.path());
        command
            .args(["run", "copy.sql", "--checkpoint", "s3://bucket/cp"])
            .args(["--trigger", trigger])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    };
    let first = run("100ms").spawn().unwrap();
    let start = Instant::now();
    while rt.block_on(parquet_rows(&s3, "out")).len() < 3 * PER_FILE {
        assert!(start.elapsed() < Duration::from_secs(60), "no output");
        std::thread::sleep(Duration::from_millis(50));
    }
    signal(&first, libc::SIGSTOP);
    for f in 3..6 {
        rt.block_on(put_orders(&s3, f, PER_FILE));
    }
    let second = run("available-now").output().unwrap();
    assert!(second.status.success(), "{}", stderr_of(&second));
    for f in 6..8 {
        rt.block_on(put_orders(&s3, f, PER_FILE));
    }
    signal(&first, libc::SIGCONT);
    let mut first = first;
    let start = Instant::now();
    while first.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            first.kill().unwrap();
            panic!("the first query went on running on a checkpoint another query wrote");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let first = first.wait_with_output().unwrap();
    let stderr = stderr_of(&first);
    assert_eq!(first.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("checkpoint s3://bucket/cp/copy/")
            && stderr.contains("already written by another query running on this checkpoint"),
        "{stderr}"
    );
    let last = run("available-now").output().unwrap();
    assert!(last.status.success(), "{}", stderr_of(&last));
    assert_eq!(
        rt.block_on(parquet_rows(&s3, "out")),
        expected_rows(0..8, PER_FILE)
    );
}

/// Runs `brook run <sql> --trigger available-now` to its end, or kills it
/// (SIGKILL) when it reports pausing at one of `points`, or after `after`.
/// Returns where it was killed.
fn run_or_kill(s3: &S3, dir: &Path, points: &str, after: Option<Duration>) -> Option<String> {
    let mut child = s3
        .brook(dir)
        .args(["run", "minutes.sql", "--checkpoint", "s3://bucket/cp"])
        .args(["--trigger", "available-now"])
        .env(faults::ENV, points)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (paused_tx, paused) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(at) = line.strip_prefix("brook: paused at ") {
                let _ = paused_tx.send(at.to_string());
            }
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let stderr = reader.join().unwrap();
            assert!(status.success(), "brook run failed: {stderr}");
            return None;
        }
        let due = match (paused.try_recv(), after) {
            (Ok(at), _) => Some(at),
            (_, Some(after)) if started.elapsed() >= after => Some(format!("after {after:?}")),
            _ => None,
        };
        if due.is_some() {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            return due;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "brook run hangs"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The last batch committed in the S3 checkpoint of query `minutes`.
async fn committed(s3: &S3) -> Option<u64> {
    s3.keys("cp/minutes/commits")
        .await
        .iter()
        .filter_map(|k| k.rsplit('/').next()?.parse::<u64>().ok())
        .max()
}

/// A windowed aggregation with its checkpoint and Parquet sink in S3, killed
/// with SIGKILL again and again (inside checkpoint, state and sink writes and
/// at random instants) and restarted each time, writes exactly the rows of a
/// run that was never interrupted: none lost, none twice.
#[test]
fn killed_and_restarted_on_an_s3_checkpoint_loses_and_repeats_no_row() {
    let seed: u64 = std::env::var("BROOK_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let rt = runtime();
    let s3 = S3::start();
    const FILES: usize = 24;
    const PER_FILE: usize = 40;
    const BATCHES: usize = FILES / 2;
    for f in 0..FILES {
        rt.block_on(put_orders(&s3, f, PER_FILE));
    }
    let reference = tempfile::tempdir().unwrap();
    std::fs::write(reference.path().join("minutes.sql"), minutes_sql("ref")).unwrap();
    // The reference checkpoints elsewhere in the bucket: `cp/` is the crashed run's.
    let out = s3
        .brook(reference.path())
        .args(["run", "minutes.sql", "--checkpoint", "s3://bucket/refcp"])
        .args(["--trigger", "available-now"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let expected = rt.block_on(parquet_rows(&s3, "ref"));
    // 16 minutes of orders: every closed minute, four symbols each.
    assert!(expected.len() >= 4 * 15, "{expected:?}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("minutes.sql"), minutes_sql("out")).unwrap();
    let points = [
        "metadata-tmp",
        "offsets",
        "sink-manifest-tmp",
        "state-tmp",
        "sink",
        "commits-tmp",
        "commits",
        "read",
    ];
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut kills = vec![];
    for attempt in 0..10 {
        let next = rt.block_on(committed(&s3)).map_or(0, |c| c + 1);
        let timed = attempt % 3 == 2;
        let point = points[attempt % points.len()];
        let (at, after) = if timed {
            (
                String::new(),
                Some(Duration::from_millis(rng.random_range(20..250))),
            )
        } else if point == "metadata-tmp" {
            // Reached as the query starts, outside its task: matched by batch alone.
            (format!("{point}:0"), None)
        } else {
            let target = (attempt * BATCHES / 10).max(next as usize);
            (format!("minutes/{point}:{target}"), None)
        };
        match run_or_kill(&s3, dir.path(), &at, after) {
            Some(how) => kills.push(how),
            None => break,
        }
    }
    assert!(run_or_kill(&s3, dir.path(), "", None).is_none());
    eprintln!("seed {seed}: {} kills: {kills:?}", kills.len());
    assert!(kills.len() >= 5, "seed {seed}: only {kills:?}");
    let rows = rt.block_on(parquet_rows(&s3, "out"));
    assert_eq!(
        rows, expected,
        "seed {seed}: the sink differs after kills {kills:?}"
    );
    // In the run never interrupted (a killed run's clean-up waits for the
    // next one), batches older than the two retained before the source's
    // progress written after batch 9 are deleted from the bucket.
    let mut left: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for key in rt.block_on(s3.keys("refcp/minutes")) {
        let parts: Vec<&str> = key.split('/').collect();
        if let [_, _, dir, name] = parts[..] {
            left.entry(dir.to_string())
                .or_default()
                .push(name.parse().unwrap());
        }
    }
    for dir in ["offsets", "commits"] {
        assert!(left[dir].iter().all(|b| *b >= 8), "{left:?}");
        assert!(left[dir].contains(&(BATCHES as u64 - 1)), "{left:?}");
    }
    assert_eq!(left["sources"], [10], "{left:?}");
}

/// A server that is not there, and credentials the server refuses, fail the
/// run with an error naming the location, in bounded time, not a hang.
#[test]
fn an_unreachable_endpoint_or_a_refused_key_fails_naming_the_location() {
    let s3 = S3::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("copy.sql"), copy_sql("out")).unwrap();
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let run_script = |script: &str, checkpoint: bool, key: &str, value: String| {
        let mut command = s3.brook(dir.path());
        command.args(["run", script, "--trigger", "available-now"]);
        if checkpoint {
            command.args(["--checkpoint", "s3://bucket/cp"]);
        }
        let mut child = command
            .env(key, value)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(120) {
                child.kill().unwrap();
                panic!("brook run still runs after 2 minutes");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
        stderr_of(&out)
    };
    let run = |key: &str, value: String| run_script("copy.sql", true, key, value);
    let refused = run("AWS_SECRET_ACCESS_KEY", "wrong".into());
    let settings = "check the S3 settings in the environment (AWS_ENDPOINT, AWS_REGION, \
                    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ALLOW_HTTP for http://)";
    // The first request is the checkpoint's metadata, named as a user wrote it.
    assert!(
        refused.contains("checkpoint s3://bucket/cp/copy/metadata: ")
            && refused.contains("403 Forbidden")
            && refused.contains(settings),
        "{refused}"
    );
    let unreachable = run("AWS_ENDPOINT", format!("http://127.0.0.1:{closed}"));
    assert!(
        unreachable.contains("checkpoint s3://bucket/cp/copy/metadata: ")
            && unreachable.contains("error sending request")
            && unreachable.contains(settings),
        "{unreachable}"
    );

    // Without a checkpoint, the source's listing is the first request.
    let source = run_script("copy.sql", false, "AWS_SECRET_ACCESS_KEY", "wrong".into());
    assert!(
        source.contains("source 's3://bucket/orders/': ")
            && source.contains("403 Forbidden")
            && source.contains(settings),
        "{source}"
    );
    // Local orders into a sink in the bucket: the sink's write is.
    std::fs::create_dir(dir.path().join("local")).unwrap();
    common::put(&dir.path().join("local"), "orders.csv", &orders_file(0, 5));
    std::fs::write(
        dir.path().join("sink.sql"),
        ORDERS_DDL.replace("s3://bucket/orders/", "local")
            + "CREATE EXTERNAL TABLE copy STORED AS PARQUET LOCATION 's3://bucket/out/';\n\
               INSERT INTO copy SELECT order_id FROM orders;",
    )
    .unwrap();
    let sink = run_script("sink.sql", false, "AWS_SECRET_ACCESS_KEY", "wrong".into());
    assert!(
        sink.contains("sink 's3://bucket/out/': ")
            && sink.contains("403 Forbidden")
            && sink.contains(settings),
        "{sink}"
    );
}

/// What a Delta Lake commit needs of the store: a put that creates an object
/// only if it is absent (`If-None-Match: *`), refused when it is there.
#[test]
fn the_s3_server_honours_create_if_absent_puts() {
    let rt = runtime();
    let s3 = S3::start();
    let path = StorePath::from("table/_delta_log/00000000000000000000.json");
    let create = || PutOptions {
        mode: PutMode::Create,
        ..PutOptions::default()
    };
    rt.block_on(async {
        s3.store
            .put_opts(&path, PutPayload::from_static(b"first"), create())
            .await
            .unwrap();
        let second = s3
            .store
            .put_opts(&path, PutPayload::from_static(b"second"), create())
            .await;
        assert!(
            matches!(second, Err(object_store::Error::AlreadyExists { .. })),
            "{second:?}"
        );
    });
    assert_eq!(rt.block_on(s3.get(path.as_ref())).as_ref(), b"first");
}
