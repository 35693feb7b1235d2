//! The DStream layer: operators against hand-computed batches.

mod common;

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brook::BrookError;
use brook::datafusion::prelude::SessionContext;
use brook::dstream::{DStream, Data, StateSpec, StreamingContext};

const TICK: Duration = Duration::from_millis(100);

type Seen<T> = Arc<Mutex<Vec<(i64, Vec<T>)>>>;

/// Every batch `stream` yields, with its time.
fn collect<T: Data>(stream: &DStream<T>) -> Seen<T> {
    let seen: Seen<T> = Arc::default();
    let sink = seen.clone();
    stream.foreach_rdd(move |rows, time| {
        sink.lock().unwrap().push((time, rows.to_vec()));
        Ok(())
    });
    seen
}

fn batches<T: Clone>(seen: &Seen<T>) -> Vec<Vec<T>> {
    seen.lock()
        .unwrap()
        .iter()
        .map(|(_, b)| b.clone())
        .collect()
}

fn sorted<T: Ord + Clone>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

async fn run(ctx: &StreamingContext, n: u64) {
    ctx.start().unwrap();
    ctx.await_batches(n).await.unwrap();
    ctx.stop(false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateless_and_pair_operators_per_batch() {
    let ctx = StreamingContext::new(&SessionContext::new(), TICK);
    let lines = ctx.queue_stream(
        vec![
            vec!["a b a".to_string(), "c".to_string()],
            vec!["b b".to_string()],
        ],
        true,
    );
    let words = lines.flat_map(|l| l.split(' ').map(str::to_string).collect::<Vec<_>>());
    let pairs = words.map(|w| (w.clone(), 1_i64));
    let counts = collect(&pairs.reduce_by_key(|a, b| a + b));
    let by_value = collect(&words.count_by_value());
    let count = collect(&words.count());
    let longest = collect(&lines.reduce(|a, b| {
        if a.len() >= b.len() {
            a.clone()
        } else {
            b.clone()
        }
    }));
    let not_a = collect(&words.filter(|w| w != "a"));
    let grouped = collect(&pairs.group_by_key());
    let combined = collect(&pairs.combine_by_key(
        |v| vec![*v],
        |mut c, v| {
            c.push(*v * 10);
            c
        },
    ));
    let doubled = collect(
        &pairs
            .map_values(|v| v * 2)
            .flat_map_values(|v| vec![*v, *v + 1]),
    );
    let sizes = collect(&words.map_partitions(|rows| vec![rows.len()]));
    let timed = collect(&words.transform(|rows, time| vec![(rows.len(), time)]));
    let both = collect(&words.union(&lines));
    let upper = words.map(|w| (w.clone(), w.to_uppercase()));
    let joined = collect(&pairs.join(&upper));
    let only_c = words.filter(|w| w == "c").map(|w| (w.clone(), true));
    let left = collect(&pairs.left_outer_join(&only_c));
    let co = collect(&pairs.cogroup(&only_c));
    run(&ctx, 3).await;

    assert_eq!(
        batches(&counts)[..3],
        [
            vec![("a".into(), 2), ("b".into(), 1), ("c".into(), 1)],
            vec![("b".into(), 2)],
            vec![]
        ]
    );
    assert_eq!(batches(&by_value)[..2], batches(&counts)[..2]);
    assert_eq!(batches(&count)[..3], [vec![4], vec![2], vec![0]]);
    assert_eq!(
        batches(&longest)[..3],
        [vec!["a b a".to_string()], vec!["b b".into()], vec![]]
    );
    assert_eq!(batches(&not_a)[0], ["b", "c"]);
    assert_eq!(
        batches(&grouped)[0],
        [
            ("a".into(), vec![1, 1]),
            ("b".into(), vec![1]),
            ("c".into(), vec![1])
        ]
    );
    assert_eq!(batches(&combined)[1], [("b".to_string(), vec![1, 10])]);
    assert_eq!(
        batches(&doubled)[1],
        [
            ("b".to_string(), 2),
            ("b".into(), 3),
            ("b".into(), 2),
            ("b".into(), 3)
        ]
    );
    assert_eq!(batches(&sizes)[..3], [vec![4], vec![2], vec![0]]);
    let t = timed.lock().unwrap().clone();
    assert_eq!(t[0].1, [(4, t[0].0)], "transform sees the batch time");
    assert_eq!(t[1].0 - t[0].0, 100, "batches are one interval apart");
    assert_eq!(t[0].0 % 100, 0, "batch times are multiples of the interval");
    assert_eq!(
        sorted(batches(&both)[1].clone()),
        ["b", "b", "b b"].map(String::from)
    );
    assert_eq!(
        sorted(batches(&joined)[1].clone()),
        [
            ("b".to_string(), (1, "B".to_string())),
            ("b".into(), (1, "B".into())),
            ("b".into(), (1, "B".into())),
            ("b".into(), (1, "B".into()))
        ]
    );
    assert_eq!(
        batches(&left)[0],
        [
            ("a".to_string(), (1, None)),
            ("a".into(), (1, None)),
            ("b".into(), (1, None)),
            ("c".into(), (1, Some(true)))
        ]
    );
    assert_eq!(
        batches(&co)[0],
        [
            ("a".to_string(), (vec![1, 1], vec![])),
            ("b".into(), (vec![1], vec![])),
            ("c".into(), (vec![1], vec![true]))
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_span_batches_and_emit_every_slide() {
    let ctx = StreamingContext::new(&SessionContext::new(), TICK);
    let input: Vec<Vec<i64>> = (1..=8).map(|i| vec![i]).collect();
    let numbers = ctx.queue_stream(input, true);
    let each = collect(&numbers);
    let window = collect(&numbers.window(TICK * 3, TICK * 2));
    let counted = collect(&numbers.count_by_window(TICK * 3, TICK));
    let summed = collect(&numbers.reduce_by_window(|a, b| a + b, TICK * 3, TICK));
    let keyed = numbers.map(|n| (n % 2, *n));
    let by_key = collect(&keyed.reduce_by_key_and_window(|a, b| a + b, TICK * 3, TICK));
    let by_key_inv = collect(&keyed.reduce_by_key_and_window_inv(
        |a, b| a + b,
        |a, b| a - b,
        TICK * 3,
        TICK,
        Some(Arc::new(|(_, v): &(i64, i64)| *v != 0)),
    ));
    run(&ctx, 10).await;

    let each = each.lock().unwrap().clone();
    // The rows of the batches in (t - 300 ms, t].
    let expected = |t: i64| -> Vec<i64> {
        each.iter()
            .filter(|(time, _)| *time > t - 300 && *time <= t)
            .flat_map(|(_, rows)| rows.clone())
            .collect()
    };
    let window = window.lock().unwrap().clone();
    assert!(window.len() >= 4, "{window:?}");
    for (t, rows) in &window {
        assert_eq!(t % 200, 0, "a window ends at a multiple of its slide");
        assert_eq!(rows, &expected(*t));
    }
    for (t, rows) in counted.lock().unwrap().iter() {
        assert_eq!(rows, &vec![expected(*t).len() as i64]);
    }
    for (t, rows) in summed.lock().unwrap().iter() {
        let sum: i64 = expected(*t).iter().sum();
        assert_eq!(rows, &if sum == 0 { vec![] } else { vec![sum] }, "at {t}");
    }
    let by_key = by_key.lock().unwrap().clone();
    let by_key_inv = by_key_inv.lock().unwrap().clone();
    assert_eq!(by_key.len(), by_key_inv.len());
    for ((t, plain), (_, inv)) in by_key.iter().zip(&by_key_inv) {
        let mut want: Vec<(i64, i64)> = vec![];
        for n in expected(*t) {
            match want.iter_mut().find(|(k, _)| *k == n % 2) {
                Some((_, v)) => *v += n,
                None => want.push((n % 2, n)),
            }
        }
        assert_eq!(sorted(plain.clone()), sorted(want.clone()), "at {t}");
        assert_eq!(sorted(inv.clone()), sorted(want), "inverse form at {t}");
    }
}

/// A running total per key with `update_state_by_key`, and the same with
/// `map_with_state`, over files dropped into a directory.
type Totals = Seen<(String, i64)>;

fn totals_program(dir: &str, checkpoint: &str) -> (StreamingContext, Totals, Totals) {
    let ctx = StreamingContext::get_or_create(checkpoint, || {
        StreamingContext::new(&SessionContext::new(), TICK)
    });
    let pairs = ctx.text_file_stream(dir).unwrap().flat_map(|line| {
        let (k, v) = line.split_once(',')?;
        Some((k.to_string(), v.trim().parse::<i64>().ok()?))
    });
    let updated = collect(
        &pairs.update_state_by_key(|values: &[i64], total: Option<i64>| {
            Some(total.unwrap_or(0) + values.iter().sum::<i64>())
        }),
    );
    let mapped = pairs.map_with_state(StateSpec::function(
        |_key: &String, value: Option<&i64>, state: &mut brook::dstream::State<i64>| {
            let total = state.get().copied().unwrap_or(0) + value.copied().unwrap_or(0);
            state.update(total);
            total
        },
    ));
    let snapshots = collect(mapped.state_snapshots());
    (ctx, updated, snapshots)
}

async fn wait_for<T: Clone + std::fmt::Debug>(seen: &Seen<T>, ok: impl Fn(&[T]) -> bool) -> Vec<T> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((_, last)) = seen.lock().unwrap().last()
            && ok(last)
        {
            return last.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never reached: {:?}",
            seen.lock().unwrap().last()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_restart_and_old_files_are_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("in");
    std::fs::create_dir(&dir).unwrap();
    common::put(&dir, "old.txt", &["a,1000".to_string()]);
    let checkpoint = tmp.path().join("ckpt");
    let (d, c) = (dir.to_str().unwrap(), checkpoint.to_str().unwrap());

    let (ctx, updated, snapshots) = totals_program(d, c);
    ctx.start().unwrap();
    ctx.await_batches(1).await.unwrap();
    common::put(
        &dir,
        "1.txt",
        &["a,1".into(), "b,2".into(), "bad line".into()],
    );
    common::put(&dir, "2.txt", &["a,3".into()]);
    let totals = wait_for(&updated, |t| t.contains(&("a".into(), 4))).await;
    assert_eq!(
        sorted(totals),
        [("a".to_string(), 4), ("b".into(), 2)],
        "old.txt is not read"
    );
    wait_for(&snapshots, |t| t.contains(&("a".into(), 4))).await;
    ctx.stop(false).await.unwrap();

    common::put(&dir, "3.txt", &["b,5".into(), "c,7".into()]);
    let (ctx, updated, snapshots) = totals_program(d, c);
    ctx.start().unwrap();
    let totals = wait_for(&updated, |t| t.iter().any(|(k, _)| k == "c")).await;
    assert_eq!(
        sorted(totals),
        [("a".to_string(), 4), ("b".into(), 7), ("c".into(), 7)],
        "totals carried over the restart, the file added meanwhile read once"
    );
    let snapshot = wait_for(&snapshots, |t| t.iter().any(|(k, _)| k == "c")).await;
    assert_eq!(
        sorted(snapshot),
        [("a".to_string(), 4), ("b".into(), 7), ("c".into(), 7)]
    );
    ctx.stop(false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_with_state_times_out_idle_keys_and_starts_from_an_initial_state() {
    let ctx = StreamingContext::new(&SessionContext::new(), TICK);
    let pairs = ctx.queue_stream(
        vec![
            vec![("a".to_string(), 1_i64)],
            vec![("b".into(), 1)],
            vec![],
            vec![],
            vec![],
        ],
        true,
    );
    let spec = StateSpec::function(
        |key: &String, value: Option<&i64>, state: &mut brook::dstream::State<i64>| {
            if state.is_timing_out() {
                return format!("{key} timed out at {}", state.get().copied().unwrap_or(0));
            }
            let total = state.get().copied().unwrap_or(0) + value.copied().unwrap_or(0);
            state.update(total);
            format!("{key}={total}")
        },
    )
    .timeout(TICK * 2)
    .initial_state(vec![("a".to_string(), 10)]);
    let mapped = pairs.map_with_state(spec);
    let out = collect(mapped.stream());
    let states = collect(mapped.state_snapshots());
    run(&ctx, 5).await;
    let out: Vec<String> = batches(&out).concat();
    assert_eq!(out[..2], ["a=11", "b=1"]);
    assert_eq!(
        sorted(out[2..4].to_vec()),
        ["a timed out at 11", "b timed out at 1"]
    );
    assert_eq!(
        batches(&states)[1],
        [("a".to_string(), 11), ("b".into(), 1)]
    );
    assert!(batches(&states)[4].is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_text_stream_reads_lines_from_a_tcp_server() {
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let writer = std::thread::spawn(move || {
        let (mut conn, _) = server.accept().unwrap();
        for i in 0..50 {
            writeln!(conn, "line {i}").unwrap();
        }
        conn.flush().unwrap();
        std::thread::sleep(Duration::from_secs(1));
    });
    let ctx = StreamingContext::new(&SessionContext::new(), TICK);
    let seen = collect(&ctx.socket_text_stream("127.0.0.1", port));
    ctx.start().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while batches(&seen).concat().len() < 50 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ctx.stop(false).await.unwrap();
    writer.join().unwrap();
    let lines = batches(&seen).concat();
    assert_eq!(
        lines,
        (0..50).map(|i| format!("line {i}")).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_as_text_files_writes_a_directory_per_batch_as_spark() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("out").to_str().unwrap().to_string();
    let ctx = StreamingContext::new(&SessionContext::new(), TICK);
    let stream = ctx.queue_stream(
        vec![vec![
            ("BUYS".to_string(), vec![5074_i64]),
            ("TOP5CLIENTS".into(), vec![34, 69]),
        ]],
        true,
    );
    stream.save_as_text_files(&prefix, "txt");
    let times = collect(&stream);
    run(&ctx, 2).await;
    let first = times.lock().unwrap()[0].0;
    let dir = tmp.path().join(format!("out-{first}.txt"));
    assert_eq!(
        std::fs::read_to_string(dir.join("part-00000")).unwrap(),
        "(BUYS,List(5074))\n(TOP5CLIENTS,List(34, 69))\n"
    );
    assert!(dir.join("_SUCCESS").exists());
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Trade {
    symbol: String,
    amount: i64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Total {
    symbol: String,
    shares: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transform_df_runs_each_batch_through_datafusion() {
    use brook::datafusion::functions_aggregate::expr_fn::sum;
    use brook::datafusion::prelude::col;
    let ctx = StreamingContext::new(&SessionContext::new(), TICK);
    let trade = |symbol: &str, amount| Trade {
        symbol: symbol.into(),
        amount,
    };
    let trades = ctx.queue_stream(
        vec![vec![trade("A", 5), trade("B", 1), trade("A", 2)], vec![]],
        true,
    );
    let totals = collect(&trades.transform_df::<Total, _, _>(|df| async move {
        df.aggregate(
            vec![col("symbol")],
            vec![sum(col("amount")).alias("shares")],
        )?
        .sort(vec![col("symbol").sort(true, true)])
    }));
    run(&ctx, 2).await;
    let total = |symbol: &str, shares| Total {
        symbol: symbol.into(),
        shares,
    };
    assert_eq!(
        batches(&totals)[..2],
        [vec![total("A", 7), total("B", 1)], vec![]]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inverse_window_agrees_with_the_plain_one_when_values_cancel() {
    let ctx = StreamingContext::new(&SessionContext::new(), TICK);
    let pairs = ctx.queue_stream(
        vec![
            vec![("A".to_string(), 5_i64)],
            vec![("A".into(), -5)],
            vec![],
            vec![],
            vec![("A".into(), 1)],
        ],
        true,
    );
    let nonzero = |(_, v): &(String, i64)| *v != 0;
    let plain = collect(
        &pairs
            .reduce_by_key_and_window(|a, b| a + b, TICK * 2, TICK)
            .filter(nonzero),
    );
    let inverse = collect(&pairs.reduce_by_key_and_window_inv(
        |a, b| a + b,
        |a, b| a - b,
        TICK * 2,
        TICK,
        Some(Arc::new(nonzero)),
    ));
    run(&ctx, 6).await;
    let plain = batches(&plain);
    assert_eq!(
        plain[..6],
        [
            vec![("A".to_string(), 5)],
            vec![],
            vec![("A".into(), -5)],
            vec![],
            vec![("A".into(), 1)],
            vec![("A".into(), 1)]
        ]
    );
    assert_eq!(batches(&inverse)[..6], plain[..6]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn programs_that_cannot_run_are_refused_at_start() {
    let ctx = StreamingContext::new(&SessionContext::new(), TICK);
    let numbers = ctx.queue_stream(vec![vec![1_i64]], true);
    collect(&numbers.window(Duration::from_millis(250), TICK));
    let err = ctx.start().unwrap_err().to_string();
    assert!(
        err.contains("window length 250ms is not a positive multiple of the batch interval"),
        "{err}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let ctx = StreamingContext::new(&SessionContext::new(), TICK);
    collect(&ctx.queue_stream(vec![vec![1_i64]], true));
    ctx.checkpoint(tmp.path().to_str().unwrap());
    let err = ctx.start().unwrap_err().to_string();
    assert!(err.contains("queue_stream cannot be checkpointed"), "{err}");
    ctx.stop(false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_batch_has_a_progress_record_with_its_input_and_output_rows() {
    let ctx = StreamingContext::new(&SessionContext::new(), TICK);
    let lines = ctx.queue_stream(
        vec![
            vec!["a b".to_string(), "c".into(), "d".into()],
            vec!["e f g".to_string(), "h".into()],
        ],
        true,
    );
    let words = collect(&lines.flat_map(|l| l.split(' ').map(str::to_string).collect::<Vec<_>>()));
    run(&ctx, 3).await;

    let progress = ctx.recent_progress();
    assert!(progress.len() >= 3, "{progress:?}");
    let first = &progress[..3];
    assert_eq!(
        first.iter().map(|p| p.batch_id).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert_eq!(
        first.iter().map(|p| p.num_input_rows).collect::<Vec<_>>(),
        [3, 2, 0],
        "the lines queued for each batch"
    );
    assert_eq!(
        first
            .iter()
            .map(|p| p.sink.num_output_rows)
            .collect::<Vec<_>>(),
        [4, 4, 0],
        "the words handed to the output"
    );
    let seen = words.lock().unwrap().clone();
    for (p, (time, _)) in first.iter().zip(&seen) {
        assert_eq!(
            (p.id.as_str(), p.name.as_str()),
            (ctx.id().as_str(), "dstream")
        );
        let at = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(*time).unwrap();
        assert_eq!(
            p.timestamp,
            at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "a batch is stamped with its batch time"
        );
        assert_eq!(p.sources.len(), 1);
        assert_eq!(p.sources[0].description, "queue");
        assert_eq!(p.sources[0].num_input_rows, p.num_input_rows);
        for phase in ["plan", "read", "sink", "commit", "total"] {
            assert!(
                p.duration_ms.contains_key(phase),
                "{phase}: {:?}",
                p.duration_ms
            );
        }
    }
}

/// The kill tests' child process: a totals program over the files of
/// `TOTALS_ARGS` (input directory, output file, checkpoint; one per line),
/// writing the totals after every batch and printing each batch's progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the kill tests' child process, not a test"]
async fn totals_process() {
    let args = std::env::var("TOTALS_ARGS").unwrap();
    let args: Vec<String> = args.split('\n').map(String::from).collect();
    let output = std::path::PathBuf::from(&args[1]);
    let ctx = StreamingContext::get_or_create(&args[2], || {
        StreamingContext::new(&SessionContext::new(), TICK)
    });
    ctx.set_name("totals");
    let pairs = ctx.text_file_stream(&args[0]).unwrap().flat_map(|line| {
        let (k, v) = line.split_once(',')?;
        Some((k.to_string(), v.trim().parse::<i64>().ok()?))
    });
    let totals = pairs.update_state_by_key(|values: &[i64], total: Option<i64>| {
        Some(total.unwrap_or(0) + values.iter().sum::<i64>())
    });
    totals.foreach_rdd(move |rows, _| {
        let lines: Vec<String> = sorted(rows.to_vec())
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        brook::source::write_atomically(
            output.parent().unwrap(),
            output.file_name().unwrap().to_str().unwrap(),
            lines.join(" ").as_bytes(),
        )
    });
    ctx.on_progress(|p| println!("progress {}", p.to_json()));
    ctx.start().unwrap();
    ctx.await_termination().await.unwrap();
}

/// A running `totals_process`: its progress records and the points it paused at.
struct TotalsProcess {
    child: std::process::Child,
    progress: std::sync::mpsc::Receiver<serde_json::Value>,
    paused: std::sync::mpsc::Receiver<String>,
}

impl TotalsProcess {
    fn start(input: &Path, output: &Path, checkpoint: &Path, pause: &str) -> Self {
        let args = [input, output, checkpoint].map(|p| p.to_str().unwrap().to_string());
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "totals_process", "--nocapture"])
            .env("TOTALS_ARGS", args.join("\n"))
            .env("BROOK_PAUSE_AT", pause)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let lines = |stream: Box<dyn std::io::Read + Send>, prefix: &'static str| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stream)
                    .lines()
                    .map_while(Result::ok)
                {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        let _ = tx.send(rest.to_string());
                    }
                }
            });
            rx
        };
        let progress = lines(Box::new(child.stdout.take().unwrap()), "progress ");
        let (tx, parsed) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in progress {
                let _ = tx.send(serde_json::from_str(&line).unwrap());
            }
        });
        let paused = lines(Box::new(child.stderr.take().unwrap()), "brook: paused at ");
        Self {
            child,
            progress: parsed,
            paused,
        }
    }

    /// The first progress record from now on that `ok` accepts, and those before it.
    fn until(&self, ok: impl Fn(&serde_json::Value) -> bool) -> Vec<serde_json::Value> {
        let mut seen = vec![];
        loop {
            let p = self
                .progress
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("no such batch ({e}); seen {seen:?}"));
            let done = ok(&p);
            seen.push(p);
            if done {
                return seen;
            }
        }
    }

    fn kill(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

fn last_batch(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.parse().ok())
        .max()
        .unwrap()
}

#[test]
fn a_dstream_batch_killed_before_its_commit_runs_again_once_on_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    std::fs::create_dir(&input).unwrap();
    let output = tmp.path().join("totals.txt");
    let checkpoint = tmp.path().join("ckpt");

    let run = TotalsProcess::start(&input, &output, &checkpoint, "");
    let started = run.until(|_| true);
    common::put(&input, "1.txt", &["a,1".into(), "b,2".into()]);
    let first = run.until(|p| p["num_input_rows"] == 2);
    run.kill();
    let id = &started[0]["id"];

    // Killed once the batch's output and state are written, before its commit:
    // a point the DStream loop reaches through the shared driver.
    common::put(&input, "2.txt", &["a,3".into(), "c,4".into(), "c,5".into()]);
    let next = last_batch(&checkpoint.join("offsets")) + 1;
    let run = TotalsProcess::start(
        &input,
        &output,
        &checkpoint,
        &format!("totals/state:{next}"),
    );
    let at = run.paused.recv_timeout(Duration::from_secs(60));
    run.kill();
    assert_eq!(at, Ok(format!("totals/state:{next}")));
    assert!(checkpoint.join(format!("offsets/{next}")).exists());
    assert!(!checkpoint.join(format!("commits/{next}")).exists());

    let run = TotalsProcess::start(&input, &output, &checkpoint, "");
    let rerun = run.until(|_| true);
    let after = run.until(|p| p["batch_id"] == next + 3);
    run.kill();
    assert_eq!(
        rerun[0]["batch_id"], next,
        "the uncommitted batch runs first"
    );
    assert_eq!(rerun[0]["num_input_rows"], 3, "with the file it had read");
    assert_eq!(rerun[0]["sources"][0]["num_input_rows"], 3);
    assert!(
        rerun[0]["sources"][0]["offset"]
            .to_string()
            .contains("2.txt"),
        "{}",
        rerun[0]["sources"][0]["offset"]
    );
    assert_eq!(&rerun[0]["id"], id, "the checkpoint's id, across restarts");
    assert_eq!(first.last().unwrap()["id"], *id);
    assert!(
        after.iter().all(|p| p["num_input_rows"] == 0),
        "no file is read again: {after:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&output).unwrap(),
        "a=4 b=2 c=9",
        "every file counted once"
    );
}

#[test]
fn a_dstream_batch_is_read_while_its_offsets_are_written() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    std::fs::create_dir(&input).unwrap();
    let checkpoint = tmp.path().join("ckpt");
    // The offsets write of the first batch is held up, as for SQL queries it
    // does not hold up the batch's read.
    let run = TotalsProcess::start(
        &input,
        &tmp.path().join("totals.txt"),
        &checkpoint,
        "totals/offsets-tmp:0,totals/read:0",
    );
    let mut paused = vec![];
    for _ in 0..2 {
        match run.paused.recv_timeout(Duration::from_secs(60)) {
            Ok(at) => paused.push(at),
            Err(e) => paused.push(format!("nothing more ({e})")),
        }
    }
    run.kill();
    paused.sort();
    assert_eq!(paused, ["totals/offsets-tmp:0", "totals/read:0"]);
    assert!(!checkpoint.join("offsets/0").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpointed_program_keeps_the_batches_it_is_told_to_retain() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("in");
    std::fs::create_dir(&dir).unwrap();
    let checkpoint = tmp.path().join("ckpt");
    let (ctx, _, _) = totals_program(dir.to_str().unwrap(), checkpoint.to_str().unwrap());
    ctx.min_batches_to_retain(3);
    ctx.start().unwrap();
    ctx.await_batches(22).await.unwrap();
    ctx.stop(false).await.unwrap();
    let last = ctx.last_progress().unwrap().batch_id;
    let ids = |sub: &str| {
        let mut ids: Vec<u64> = std::fs::read_dir(checkpoint.join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
            .collect();
        ids.sort();
        ids
    };
    // The sources' progress is written after every tenth batch, and the
    // batches more than 3 before it are removed, as for SQL queries.
    let snapshot = (last + 1) / 10 * 10;
    assert_eq!(ids("sources"), [snapshot]);
    let kept: Vec<u64> = (snapshot - 3..=last).collect();
    assert_eq!(ids("offsets"), kept);
    assert_eq!(ids("commits"), kept);
}

/// A program embedding the DStream API learns why its context stopped: a
/// `ContextFailed` holding the error of the output that failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_output_stops_the_context_with_its_error_as_the_source() {
    let tmp = tempfile::tempdir().unwrap();
    let blocker = tmp.path().join("blocker");
    std::fs::write(&blocker, "a file, not a directory").unwrap();
    let prefix = blocker.join("out");
    let ctx = StreamingContext::new(&SessionContext::new(), TICK);
    let numbers = ctx.queue_stream(vec![vec![1_i64]], true);
    numbers.save_as_text_files(prefix.to_str().unwrap(), "");
    ctx.start().unwrap();
    let err = ctx.await_termination().await.unwrap_err();
    let BrookError::ContextFailed { source } = &err else {
        panic!("not a context failure: {err:?}");
    };
    let BrookError::Sink { sink, message } = &**source else {
        panic!("not the output's error: {source:?}");
    };
    let expected = format!("saveAsTextFiles {}-", prefix.display());
    assert!(sink.starts_with(&expected), "{sink}");
    assert!(message.contains("cannot create the directory"), "{message}");
    assert!(
        err.to_string()
            .starts_with(&format!("the streaming context failed: sink '{expected}")),
        "{err}"
    );
    // Starting it again is a mistake of the program, not of its data.
    let again = ctx.start().unwrap_err();
    assert!(
        matches!(&again, BrookError::Usage(m) if m.contains("already started")),
        "{again}"
    );
}
